#!/usr/bin/env bash
# Benchmarks ferrule-proxy on loopback and writes bench/results/latest.md.
#
# Load generators: wrk (HTTP/1.1) and h2load (HTTP/2, unary gRPC), both from Debian.
# Backend: proxy/app/examples/bench_backend.rs (hyper; "ok" for HTTP/1.1, an empty unary gRPC
# answer with grpc-status trailers for application/grpc).
# Paths measured: direct to the backend, through one proxy (client proxy -> backend, plain
# endpoint), and through a proxy pair (client proxy -> server proxy over the mesh's h2 -> backend).
# Discovery is static (--static-endpoint), so no controller is needed.
#
# Environment: BENCH_DURATION (seconds per run, default 5), CARGO_TARGET_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DURATION="${BENCH_DURATION:-5}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$ROOT/bench/results/latest.md"
WORK="$(mktemp -d)"
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

for tool in wrk h2load curl; do
    command -v "$tool" >/dev/null || { echo "bench needs $tool (apt-get install wrk nghttp2-client curl)" >&2; exit 1; }
done

echo "building (release)..." >&2
cargo build --quiet --release -p ferrule-proxy --bin ferrule-proxy --example bench_backend
PROXY="$TARGET_DIR/release/ferrule-proxy"
BACKEND_BIN="$TARGET_DIR/release/examples/bench_backend"

# Fixed loopback ports; a busy one fails loudly at bind.
BACKEND=127.0.0.1:18080
SERVER_IN=127.0.0.1:18143
ONE=127.0.0.1:18140
PAIR=127.0.0.1:18141

"$BACKEND_BIN" "$BACKEND" 2>"$WORK/backend.log" &
PIDS+=($!)
RUST_LOG=warn "$PROXY" --service=bench --app-addr="$BACKEND" --inbound-addr="$SERVER_IN" \
    --admin-addr=127.0.0.1:18191 2>"$WORK/server-proxy.log" &
SERVER_PID=$!
PIDS+=($SERVER_PID)
RUST_LOG=warn "$PROXY" --upstream=bench="$ONE" --static-endpoint=bench="$BACKEND" \
    --admin-addr=127.0.0.1:18192 2>"$WORK/one-proxy.log" &
ONE_PID=$!
PIDS+=($ONE_PID)
RUST_LOG=warn "$PROXY" --upstream=bench="$PAIR" --static-endpoint=bench="$SERVER_IN/meshed" \
    --admin-addr=127.0.0.1:18193 2>"$WORK/pair-proxy.log" &
PAIR_PID=$!
PIDS+=($PAIR_PID)

wait_ready() {
    for _ in $(seq 1 100); do
        if curl -fsS -o /dev/null "$1"; then return 0; fi
        sleep 0.1
    done
    echo "not ready: $1" >&2
    exit 1
}
wait_ready "http://$BACKEND/"
for admin in 18191 18192 18193; do wait_ready "http://127.0.0.1:$admin/ready"; done

# wrk paced by a Lua delay: each connection waits DELAY ms after each response, so the rate
# is at most connections * 1000 / DELAY (wrk reports the rate it reached).
cat >"$WORK/paced.lua" <<'LUA'
local ms = tonumber(os.getenv("WRK_DELAY_MS"))
function delay() return ms end
LUA
printf '\x00\x00\x00\x00\x00' >"$WORK/grpc-req.bin"

# wrk output -> "rps p50 p99"
wrk_run() {
    local out
    out="$("$@")"
    local rps p50 p99
    rps="$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<<"$out")"
    p50="$(awk '$1=="50%" {print $2}' <<<"$out")"
    p99="$(awk '$1=="99%" {print $2}' <<<"$out")"
    local errors
    errors="$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')"
    echo "$rps $p50 $p99 ${errors:-}"
}

# h2load with a per-request log -> "rps p50 p99 failed"
h2_run() {
    local log="$WORK/h2.log"
    rm -f "$log"
    local out
    out="$(h2load --log-file="$log" -H 'content-type: application/grpc' -H 'te: trailers' \
        -d "$WORK/grpc-req.bin" "$@")"
    local rps failed
    rps="$(awk '/^finished in/ {gsub(",", "", $4); printf "%.0f", $4}' <<<"$out")"
    failed="$(awk '/^requests:/ {for (i=1;i<=NF;i++) if ($(i+1)=="failed,") print $i}' <<<"$out")"
    # Third column: microseconds until the end of the response.
    read -r p50 p99 < <(cut -f3 "$log" | sort -n | awk '{v[NR]=$1} END {
        if (NR == 0) { print "- -"; exit }
        i50 = int(NR*0.50); if (i50 < 1) i50 = 1
        i99 = int(NR*0.99); if (i99 < 1) i99 = 1
        printf "%.2fms %.2fms\n", v[i50]/1000, v[i99]/1000 }')
    echo "$rps $p50 $p99 ${failed:-0}"
}

declare -A RESULT
for path in direct one pair; do
    case $path in
        direct) addr=$BACKEND ;;
        one) addr=$ONE ;;
        pair) addr=$PAIR ;;
    esac
    echo "measuring $path ($addr)..." >&2
    RESULT[$path,h1sat]="$(wrk_run wrk -t2 -c32 -d"${DURATION}s" --latency "http://$addr/")"
    RESULT[$path,h1r1k]="$(WRK_DELAY_MS=10 wrk_run wrk -t1 -c10 -d"${DURATION}s" --latency -s "$WORK/paced.lua" "http://$addr/")"
    RESULT[$path,h1r5k]="$(WRK_DELAY_MS=10 wrk_run wrk -t2 -c50 -d"${DURATION}s" --latency -s "$WORK/paced.lua" "http://$addr/")"
    RESULT[$path,grpcsat]="$(h2_run -D "$DURATION" -t2 -c8 -m16 "http://$addr/bench.Echo/Unary")"
    RESULT[$path,grpc1]="$(h2_run -D "$DURATION" -t1 -c1 -m1 "http://$addr/bench.Echo/Unary")"
done

rss() { awk '/VmHWM/ {printf "%.1f MiB", $2/1024}' "/proc/$1/status"; }
RSS_SERVER="$(rss $SERVER_PID)"
RSS_ONE="$(rss $ONE_PID)"
RSS_PAIR="$(rss $PAIR_PID)"

field() { awk -v n="$2" '{print $n}' <<<"${RESULT[$1]}"; }
extra() { cut -d' ' -f4- <<<"${RESULT[$1]}"; }

mkdir -p "$(dirname "$OUT")"
{
    echo "# ferrule-proxy benchmark"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) CPUs ($(uname -m)), loopback, ${DURATION}s per run."
    echo "Load generators: $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2) (HTTP/1.1) and $(h2load --version | head -1) (unary gRPC over HTTP/2)."
    echo "Backend: proxy/app/examples/bench_backend.rs (hyper). Proxies: release build, static discovery."
    echo "The load generator, the backend and the proxies share the same CPUs, so saturation numbers"
    echo "are lower bounds of what the proxy alone could do."
    echo
    echo "Paths: **direct** (client -> backend), **one proxy** (client -> ferrule-proxy -> backend),"
    echo "**pair** (client -> client proxy -> mesh HTTP/2 -> server proxy -> backend)."
    echo
    echo "## HTTP/1.1 GET (wrk)"
    echo
    echo "| path | saturation req/s (32 conns) | p50 / p99 at saturation | ~1,000 req/s: achieved, p50 / p99 | ~5,000 req/s: achieved, p50 / p99 |"
    echo "| --- | --- | --- | --- | --- |"
    for path in direct one pair; do
        echo "| $path | $(field $path,h1sat 1) | $(field $path,h1sat 2) / $(field $path,h1sat 3) | $(field $path,h1r1k 1), $(field $path,h1r1k 2) / $(field $path,h1r1k 3) | $(field $path,h1r5k 1), $(field $path,h1r5k 2) / $(field $path,h1r5k 3) |"
    done
    echo
    echo "Paced runs: wrk waits 10 ms after each response per connection (10 connections for"
    echo "~1,000 req/s, 50 for ~5,000 req/s); the achieved rate is shown."
    echo
    echo "## Unary gRPC (h2load)"
    echo
    echo "| path | saturation req/s (8 conns x 16 streams) | p50 / p99 at saturation | p50 / p99 at concurrency 1 (req/s) | failed |"
    echo "| --- | --- | --- | --- | --- |"
    for path in direct one pair; do
        echo "| $path | $(field $path,grpcsat 1) | $(field $path,grpcsat 2) / $(field $path,grpcsat 3) | $(field $path,grpc1 2) / $(field $path,grpc1 3) ($(field $path,grpc1 1)) | $(field $path,grpcsat 4) |"
    done
    echo
    echo "h2load cannot pace requests, so gRPC latency is reported at saturation and with a single"
    echo "request in flight rather than at a fixed rate."
    echo
    echo "## Peak RSS (VmHWM)"
    echo
    echo "| proxy | peak RSS |"
    echo "| --- | --- |"
    echo "| one proxy (client side) | $RSS_ONE |"
    echo "| pair, client side | $RSS_PAIR |"
    echo "| pair, server side | $RSS_SERVER |"
    for path in direct one pair; do
        for k in h1sat h1r1k h1r5k; do
            e="$(extra $path,$k)"
            if [ -n "$e" ]; then echo; echo "Note ($path, $k): $e"; fi
        done
    done
} >"$OUT"
cat "$OUT"
