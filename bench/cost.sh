#!/usr/bin/env bash
# What one request costs a Ferrule sidecar, in numbers that do not drift with the machine:
# instructions per request (valgrind callgrind) and heap allocations per request (valgrind
# dhat), for a fixed number of requests through a client+server pair in front of the bench
# backend. Wall-clock throughput on the shared 2-CPU machines moves by 2x between runs;
# instruction counts repeat to within a fraction of a percent, so they compare two builds, or
# a build and HAProxy, where a throughput run cannot (bench/results/session7.md).
#
# The measured sidecar runs under valgrind (about 50 times slower), the other one natively.
# Counters start after a warm-up request, so start-up is not counted. dhat sees only the
# system allocator, so allocations are counted on a build with `--no-default-features`
# (built here) while instructions are counted on the default build (mimalloc).
#
# Environment: COST_SIDE [client | server], COST_SCENARIO [h1 | h2 | grpc],
# COST_REQUESTS [5000], COST_PROXY [unset: the workspace's release build, built first; else
# that ferrule-proxy binary (then no allocation count unless COST_PROXY_GLIBC is given)],
# CARGO_TARGET_DIR, COST_PROFILE [unset; else a file that gets the callgrind profile of the
# load, for `callgrind_annotate --inclusive=yes FILE`]. Writes the figures to stdout and to
# bench/results/cost-SIDE-SCENARIO.txt.
# Loopback only, bounded; everything started here is killed on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
SIDE="${COST_SIDE:-client}"
SCENARIO="${COST_SCENARIO:-h1}"
REQUESTS="${COST_REQUESTS:-5000}"
case $SIDE in client | server) ;; *) echo "COST_SIDE is client or server, not $SIDE" >&2; exit 1 ;; esac
case $SCENARIO in h1 | h2 | grpc) ;; *) echo "COST_SCENARIO is h1, h2 or grpc, not $SCENARIO" >&2; exit 1 ;; esac
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
export CARGO_TARGET_DIR="$TARGET_DIR" RUST_LOG=warn
# $WORK, $PIDS and the cleanup on exit.
source "$ROOT/bench/lib.sh"

for tool in valgrind callgrind_control h2load curl; do
    command -v "$tool" >/dev/null || { echo "cost.sh needs $tool (Debian: valgrind nghttp2-client curl)" >&2; exit 1; }
done
if [ -n "${COST_PROXY:-}" ]; then
    PROXY="$COST_PROXY"
    GLIBC="${COST_PROXY_GLIBC:-}"
else
    cargo build --quiet --release -p ferrule-proxy --bin ferrule-proxy --no-default-features
    GLIBC="$WORK/ferrule-proxy-glibc"
    cp "$TARGET_DIR/release/ferrule-proxy" "$GLIBC"
    cargo build --quiet --release -p ferrule-proxy --bin ferrule-proxy --example bench_backend
    PROXY="$TARGET_DIR/release/ferrule-proxy"
fi

BACKEND=127.0.0.1:18380
"$TARGET_DIR/release/examples/bench_backend" "$BACKEND" >"$WORK/backend.log" 2>&1 &
PIDS+=($!)
printf '\x00\x00\x00\x00\x00' >"$WORK/grpc-req.bin"

wait_ready() { # URL PID
    local _
    for _ in $(seq 1 300); do
        curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || { echo "cost.sh: a process exited early" >&2; return 1; }
        sleep 0.2
    done
    echo "cost.sh: $1 not ready" >&2
    return 1
}

load() { # the fixed number of requests through the pair
    case $SCENARIO in
        h1) h2load --h1 -t1 -c10 -n "$REQUESTS" http://127.0.0.1:18381/ ;;
        h2) h2load -t1 -c10 -m10 -n "$REQUESTS" http://127.0.0.1:18381/ ;;
        grpc) h2load -t1 -c10 -m10 -n "$REQUESTS" -H 'content-type: application/grpc' \
            -H 'te: trailers' -d "$WORK/grpc-req.bin" http://127.0.0.1:18381/bench.Echo/Unary ;;
    esac >"$WORK/load.txt" 2>&1
    grep -q "succeeded, 0 failed, 0 errored" "$WORK/load.txt" \
        || { echo "cost.sh: the load failed:" >&2; cat "$WORK/load.txt" >&2; return 1; }
}

# One measurement: the pair with the SIDE sidecar under `valgrind --tool=TOOL`; prints the
# tool's total for the load (instructions, or blocks and bytes).
measure() { # TOOL BINARY
    local tool=$1 binary=$2 wrap_client=() wrap_server=() out="$WORK/$1.out"
    local -a wrap=(valgrind --tool="$tool" "--$tool-out-file=$out")
    [ "$tool" = callgrind ] && wrap+=(--instr-atstart=no)
    if [ "$SIDE" = server ]; then wrap_server=("${wrap[@]}"); else wrap_client=("${wrap[@]}"); fi
    "${wrap_server[@]}" "$binary" --service=bench --app-addr="$BACKEND" \
        --inbound-addr=127.0.0.1:18383 --admin-addr=127.0.0.1:18391 >"$WORK/server.log" 2>&1 &
    local server=$!
    PIDS+=("$server")
    "${wrap_client[@]}" "$binary" --upstream=bench=127.0.0.1:18381 \
        --static-endpoint=bench=127.0.0.1:18383/meshed --admin-addr=127.0.0.1:18392 \
        >"$WORK/client.log" 2>&1 &
    local client=$!
    PIDS+=("$client")
    wait_ready http://127.0.0.1:18391/ready "$server"
    wait_ready http://127.0.0.1:18392/ready "$client"
    curl -fsS -o /dev/null --max-time 10 http://127.0.0.1:18381/ # warm-up: the pool's connect
    local measured=$client
    [ "$SIDE" = server ] && measured=$server
    if [ "$tool" = callgrind ]; then callgrind_control -i on "$measured" >/dev/null 2>&1; fi
    load
    if [ "$tool" = callgrind ]; then
        callgrind_control -d "$measured" >/dev/null 2>&1
        # The dump of the load is the first numbered file.
        for _ in $(seq 1 50); do [ -s "$out.1" ] && break; sleep 0.2; done
        grep '^totals:' "$out.1" | awk '{print $2}'
        if [ -n "${COST_PROFILE:-}" ]; then cp "$out.1" "$COST_PROFILE"; fi
    fi
    kill -INT "$measured"
    wait "$measured" 2>/dev/null || true
    kill "$client" "$server" 2>/dev/null || true
    wait "$client" "$server" 2>/dev/null || true
    if [ "$tool" = dhat ]; then
        # Start-up is included here (about 1,400 blocks; 0.3 per request at 5,000 requests).
        grep 'Total:' "$WORK/$SIDE.log" | sed 's/.*Total: *//; s/,//g' \
            | awk '{print $1, $4}'
    fi
}

{
    echo "# What one request costs the Ferrule $SIDE sidecar ($SCENARIO)"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(git rev-parse --short HEAD), $REQUESTS requests"
    echo "(h2load -t1 -c10$([ "$SCENARIO" = h1 ] && echo ' --h1' || echo ' -m10')), counted from after a warm-up request."
    echo
    instructions=$(measure callgrind "$PROXY")
    echo "instructions per request (callgrind, $(basename "$PROXY")): $((instructions / REQUESTS))"
    if [ -n "$GLIBC" ]; then
        read -r bytes blocks < <(measure dhat "$GLIBC")
        echo "heap allocations per request (dhat, system allocator): $(awk -v b="$blocks" -v n="$REQUESTS" 'BEGIN{printf "%.1f", b/n}')," \
            "$(awk -v b="$bytes" -v n="$REQUESTS" 'BEGIN{printf "%.0f", b/n}') bytes"
    fi
} | tee "bench/results/cost-$SIDE-$SCENARIO.txt"
