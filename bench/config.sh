#!/usr/bin/env bash
# Config propagation benchmark (issue #5, item 5): time from an apply returning until every
# proxy has the new version, for 1,000 Config/Watch streams from one process and for 10 real
# ferrule-proxy sidecars, plus the controller's RSS. Everything runs on 127.0.0.1 and is bounded
# (config-bench --deadline, 110 s by default); the processes it starts are killed on exit.
#
# The measuring is tests/src/bin/config-bench.rs (in the harness crate); this script builds the
# release binaries, runs it, writes bench/results/config.md and points bench/results/latest.md
# (which bench/run.sh rewrites) at it.
#
# Environment: CARGO_TARGET_DIR; CONFIG_BENCH_ARGS (extra config-bench flags, e.g.
# "--streams 200 --rounds 5").
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$ROOT/bench/results/config.md"
LATEST="$ROOT/bench/results/latest.md"

echo "building (release)..." >&2
cargo build --quiet --release -p ferrule-controller -p ferrule-proxy -p ferrule-harness --bins
cargo build --quiet --release -p ferrule-cli --bin ferrule

# 1,000 streams are 1,000 connections on each side, plus the proxies' sockets.
ulimit -n 8192 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# shellcheck disable=SC2086 # CONFIG_BENCH_ARGS is a list of flags.
"$TARGET_DIR/release/config-bench" --out "$OUT" ${CONFIG_BENCH_ARGS:-}

mkdir -p "$(dirname "$LATEST")"
if ! grep -qs '(config.md)' "$LATEST"; then
    {
        echo
        echo "## Config propagation"
        echo
        echo "Apply-to-ack times for 1,000 config streams and 10 real proxies, and the"
        echo "controller's RSS: see [config.md](config.md) (bench/config.sh)."
    } >>"$LATEST"
fi
