#!/usr/bin/env bash
# Control-plane scale (issue #9, item 3): one controller with CP_SCALE_STREAMS (10,000)
# Config/Watch streams open and a config change acked by CP_SCALE_PROXIES (100) real
# ferrule-proxy sidecars; writes bench/results/config-scale.md.
#
# It is bench/config.sh's measurement at a larger size: the same tests/src/bin/config-bench.rs
# (apply -> snapshot on every stream, apply -> every real proxy acked, the controller's VmRSS
# and VmHWM), plus the controller's CPU time, read here from /proc/PID/stat while it runs.
# CP_SCALE_ENDPOINTS (10,000) endpoints are registered first and stay registered throughout,
# with a discovery watcher on one of their services (config-bench --endpoints).
#
# Loopback only; config-bench bounds the run (--deadline) and kills what it started.
# Environment: CP_SCALE_STREAMS [10000], CP_SCALE_PROXIES [100], CP_SCALE_ROUNDS [10],
# CP_SCALE_ENDPOINTS [10000],
# CARGO_TARGET_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
export CARGO_TARGET_DIR="$TARGET_DIR"
STREAMS="${CP_SCALE_STREAMS:-10000}"
PROXIES="${CP_SCALE_PROXIES:-100}"
ROUNDS="${CP_SCALE_ROUNDS:-10}"
ENDPOINTS="${CP_SCALE_ENDPOINTS:-10000}"
OUT="$ROOT/bench/results/config-scale.md"
WORK="$(mktemp -d)"
BENCH_PID=""
cleanup() {
    if [ -n "$BENCH_PID" ]; then
        kill "$BENCH_PID" 2>/dev/null || true
        wait "$BENCH_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "cp-scale: building (release)..." >&2
cargo build --quiet --release -p ferrule-controller -p ferrule-proxy -p ferrule-harness --bins
cargo build --quiet --release -p ferrule-cli --bin ferrule

# Each stream is a connection on both sides, in this one process tree.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

"$TARGET_DIR/release/config-bench" --streams "$STREAMS" --proxies "$PROXIES" \
    --rounds "$ROUNDS" --endpoints "$ENDPOINTS" --round-timeout 60 --deadline 600 --out "$WORK/config-bench.md" \
    >"$WORK/config-bench.log" 2>&1 &
BENCH_PID=$!

# The controller is config-bench's child: follow its CPU time (utime+stime) while it lives.
CLK_TCK="$(getconf CLK_TCK)"
controller=""
last_ticks=0
while kill -0 "$BENCH_PID" 2>/dev/null; do
    if [ -z "$controller" ]; then
        controller="$(pgrep -P "$BENCH_PID" -x ferrule-control || true)"
    fi
    if [ -n "$controller" ] && [ -r "/proc/$controller/stat" ]; then
        ticks="$(awk '{print $14 + $15}' "/proc/$controller/stat" 2>/dev/null || echo "$last_ticks")"
        last_ticks="${ticks:-$last_ticks}"
    fi
    sleep 0.5
done
status=0
wait "$BENCH_PID" || status=$?
BENCH_PID=""
if [ "$status" -ne 0 ]; then
    echo "cp-scale: config-bench failed ($status):" >&2
    tail -n 20 "$WORK/config-bench.log" >&2
    exit 1
fi

{
    echo "# Control-plane scale: $ENDPOINTS endpoints, $STREAMS watch streams, $PROXIES real proxies"
    echo
    echo "\`bash bench/cp-scale.sh\` ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, load average"
    echo "$(cut -d' ' -f1-3 /proc/loadavg)): tests/src/bin/config-bench.rs with \`--streams $STREAMS"
    echo "--proxies $PROXIES --rounds $ROUNDS --endpoints $ENDPOINTS\`, as bench/config.sh runs it at 1,000 / 10. The"
    echo "controller used $(awk -v t="$last_ticks" -v h="$CLK_TCK" 'BEGIN {printf "%.1f", t / h}') CPU-seconds over the whole run (utime+stime from"
    echo "/proc/PID/stat, last read before it exited; setup of every stream and proxy included)."
    echo
    # config-bench's own report, its title demoted one level.
    sed '1s/^# /## /' "$WORK/config-bench.md"
} >"$OUT"
echo "cp-scale: results in $OUT" >&2
