#!/usr/bin/env bash
# Profiles one sidecar of the Ferrule pair at saturation (issue #9's recipe): the bench
# backend, a server sidecar and a client sidecar as in bench/run.sh, wrk -t1 -c50 HTTP/1.1 GETs
# through the pair, and `perf record -g` of the client (or, with PERF_SIDE=server, the server)
# sidecar for PERF_SECONDS in the middle of the load. Writes the flat profile (self time per
# symbol, and per shared object) and the connections each sidecar's pools made to
# bench/results/perf-SIDE.txt and keeps perf.data in $CARGO_TARGET_DIR/perf/ for
# `perf report -i ...` by hand.
#
# Needs perf (Debian linux-perf; `make deps`) and root (or kernel.perf_event_paranoid <= 1).
# Loopback only; the load and the recording are bounded; everything started here is killed on
# exit. Environment: PERF_SECONDS [8], PERF_CALL_GRAPH [dwarf,16384] (the release profile has
# line tables, and Rust's std has no frame pointers, so dwarf unwinding gives whole stacks;
# "fp" is cheaper), PERF_SCENARIO [h1 | h2 | grpc], PERF_SIDE [client | server],
# PERF_PROXY [unset: the workspace's release build, built first; else that ferrule-proxy
# binary, nothing built (bench_backend must have been built)],
# CARGO_TARGET_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
SECONDS_TO_RECORD="${PERF_SECONDS:-8}"
CALL_GRAPH="${PERF_CALL_GRAPH:-dwarf,16384}"
SCENARIO="${PERF_SCENARIO:-h1}"
SIDE="${PERF_SIDE:-client}"
case $SIDE in
    client | server) ;;
    *) echo "PERF_SIDE is client or server, not $SIDE" >&2; exit 1 ;;
esac
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
export CARGO_TARGET_DIR="$TARGET_DIR" RUST_LOG=warn
OUT="$ROOT/bench/results/perf-$SIDE.txt"
DATA_DIR="$TARGET_DIR/perf"
# $WORK, $PIDS and the cleanup on exit.
source "$ROOT/bench/lib.sh"

for tool in perf wrk h2load curl; do
    command -v "$tool" >/dev/null || { echo "perf.sh needs $tool (make deps)" >&2; exit 1; }
done
if [ -n "${PERF_PROXY:-}" ]; then
    PROXY="$PERF_PROXY"
else
    cargo build --quiet --release -p ferrule-proxy --bin ferrule-proxy --example bench_backend
    PROXY="$TARGET_DIR/release/ferrule-proxy"
fi

BACKEND=127.0.0.1:18080
"$TARGET_DIR/release/examples/bench_backend" "$BACKEND" >"$WORK/backend.log" 2>&1 &
PIDS+=($!)
"$PROXY" --service=bench --app-addr="$BACKEND" --inbound-addr=127.0.0.1:18143 \
    --admin-addr=127.0.0.1:18191 >"$WORK/server.log" 2>&1 &
SERVER=$!
PIDS+=("$SERVER")
"$PROXY" --upstream=bench=127.0.0.1:18141 --static-endpoint=bench=127.0.0.1:18143/meshed \
    --admin-addr=127.0.0.1:18192 >"$WORK/client.log" 2>&1 &
CLIENT=$!
PIDS+=("$CLIENT")
for url in "http://$BACKEND/" http://127.0.0.1:18191/ready http://127.0.0.1:18192/ready \
    http://127.0.0.1:18141/; do
    for _ in $(seq 1 100); do
        curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null && break
        sleep 0.1
    done
done

LOAD_SECONDS=$((SECONDS_TO_RECORD + 4))
printf '\x00\x00\x00\x00\x00' >"$WORK/grpc-req.bin"
case $SCENARIO in
    h1) timeout $((LOAD_SECONDS + 30)) wrk -t1 -c50 -d"${LOAD_SECONDS}s" http://127.0.0.1:18141/ \
        >"$WORK/load.txt" & ;;
    h2) timeout $((LOAD_SECONDS + 30)) h2load -t1 -c10 -m10 -D "$LOAD_SECONDS" \
        http://127.0.0.1:18141/ >"$WORK/load.txt" & ;;
    grpc) timeout $((LOAD_SECONDS + 30)) h2load -t1 -c10 -m10 -D "$LOAD_SECONDS" \
        -H 'content-type: application/grpc' -H 'te: trailers' -d "$WORK/grpc-req.bin" \
        http://127.0.0.1:18141/bench.Echo/Unary >"$WORK/load.txt" & ;;
    *) echo "PERF_SCENARIO is h1, h2 or grpc, not $SCENARIO" >&2; exit 1 ;;
esac
LOAD=$!
PIDS+=("$LOAD")
sleep 2
mkdir -p "$DATA_DIR"
if [ "$SIDE" = server ]; then RECORDED=$SERVER; else RECORDED=$CLIENT; fi
DATA="$DATA_DIR/$SIDE.data"
perf record -q -F 499 --call-graph "$CALL_GRAPH" -p "$RECORDED" -o "$DATA" \
    -- sleep "$SECONDS_TO_RECORD" 2>"$WORK/perf-record.log"
wait "$LOAD" || true

# `head` closes the pipes early: a report cut short is not a failure.
set +o pipefail
{
    echo "# perf profile of the Ferrule $SIDE sidecar at saturation"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, $(git rev-parse --short HEAD);"
    echo "load: $SCENARIO ($(grep -E 'Requests/sec|^finished in' "$WORK/load.txt" | head -1));"
    echo "perf record -F 499 --call-graph $CALL_GRAPH -p ${SIDE^^} -- sleep $SECONDS_TO_RECORD"
    echo
    echo "Connections the pools made over the whole load (pool_connects_total): client"
    echo "$(curl -fsS --max-time 2 http://127.0.0.1:18192/metrics | grep '^pool_connects' | tr '\n' ' ')"
    echo "server $(curl -fsS --max-time 2 http://127.0.0.1:18191/metrics | grep '^pool_connects' | tr '\n' ' ')"
    echo
    echo "## Self time by shared object"
    echo
    perf report -i "$DATA" --stdio --no-children --sort dso -g none \
        --percent-limit 0.5 2>/dev/null | grep -v '^#' | grep -v '^$' | sed 's/ *- *- *$//; s/ *$//'
    echo
    echo "## Self time by symbol (top 60)"
    echo
    perf report -i "$DATA" --stdio --no-children --no-inline --sort symbol \
        -g none --percent-limit 0.3 2>/dev/null | grep -v '^#' | grep -v '^$' | sed 's/ *- *- *$//; s/ *$//' | head -60
    echo
    echo "## Time including callees (top 60)"
    echo
    perf report -i "$DATA" --stdio --children --no-inline --sort symbol \
        -g none --percent-limit 2 2>/dev/null | grep -v '^#' | grep -v '^$' | sed 's/ *- *- *$//; s/ *$//' | head -60
    echo
    echo "## Ferrule, hyper and h2 frames including callees (top 40)"
    echo
    perf report -i "$DATA" --stdio --children --no-inline --sort symbol \
        -g none --percent-limit 1 2>/dev/null | grep -E 'ferrule|hyper|h2::|tower' \
        | sed 's/ *- *- *$//; s/ *$//' | head -40
} >"$OUT"
echo "perf.sh: profile in $OUT; perf report -i $DATA for the call graphs" >&2
