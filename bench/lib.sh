# What every bench script shares, sourced after `set -euo pipefail`: a scratch directory
# ($WORK) and the list of processes the script started ($PIDS), both cleaned up when the
# script exits, also on a failure or Ctrl-C.
# shellcheck shell=bash

WORK="$(mktemp -d)"
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
