#!/usr/bin/env bash
# What tracing costs (issue #11): a Ferrule pair (client sidecar -> mesh h2 -> server sidecar ->
# backend, static discovery, no controller, as in bench/run.sh) with tracing off, and a second
# pair exporting to a local OTLP receiver (proto/trace/examples/otlp_receiver.rs, the receiver
# `ferrule dev up` runs) sampling 0 %, 1 % and 100 % of new traces. The traced pair's ratio is
# changed live between runs (`POST /tracing?sample_ratio=R` on both admin listeners), so the
# same processes serve every ratio. Per variant: HTTP/1.1 saturation (wrk -t1 -c50) and its
# CPU per 1,000 requests, then a fixed 1,000 req/s (bench_load, open loop) with each proxy's
# CPU (% of one core) and p50/p99, and the spans the pair exported per request. Rounds are
# interleaved, the variant order rotating; the report gives medians. Writes
# bench/results/tracing-cost.md. Everything listens on 127.0.0.1; every load run is bounded;
# every process started here is killed on exit.
# Environment (defaults in brackets):
#   TRACE_BENCH_ROUNDS [3]  TRACE_BENCH_SAT_SECONDS [3]  TRACE_BENCH_RATE_SECONDS [4]
#   TRACE_BENCH_RATE [1000]  TRACE_BENCH_NOTE [""] (a line added to the report, e.g. why the
#   machine was busy)  BENCH_RESULTS_DIR [bench/results]  CARGO_TARGET_DIR [./target]
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
ROUNDS="${TRACE_BENCH_ROUNDS:-3}"
SAT_SECONDS="${TRACE_BENCH_SAT_SECONDS:-3}"
RATE_SECONDS="${TRACE_BENCH_RATE_SECONDS:-4}"
RATE="${TRACE_BENCH_RATE:-1000}"
NOTE="${TRACE_BENCH_NOTE:-}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
export CARGO_TARGET_DIR="$TARGET_DIR"
RESULTS="${BENCH_RESULTS_DIR:-$ROOT/bench/results}"
STARTED_AT="$(date -u '+%Y-%m-%d %H:%M UTC')"
LOADAVG_AT_START="$(cut -d' ' -f1-3 /proc/loadavg)"
# $WORK, $PIDS and the cleanup on exit.
source "$ROOT/bench/lib.sh"

log() { echo "bench/tracing: $*" >&2; }

for tool in wrk curl python3; do
    command -v "$tool" >/dev/null || {
        echo "bench/tracing.sh needs $tool: run make deps (Debian: wrk curl python3)" >&2
        exit 1
    }
done
export RUST_LOG=warn

log "building (release)..."
cargo build --quiet --release -p ferrule-proxy --bin ferrule-proxy --example bench_backend \
    --example bench_load
cargo build --quiet --release -p ferrule-trace --example otlp_receiver
PROXY="$TARGET_DIR/release/ferrule-proxy"
BACKEND_BIN="$TARGET_DIR/release/examples/bench_backend"
LOAD_BIN="$TARGET_DIR/release/examples/bench_load"
RECEIVER_BIN="$TARGET_DIR/release/examples/otlp_receiver"

# start NAME CMD...: runs CMD in the background, logging to $WORK/NAME.log; sets STARTED_PID.
start() {
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

wait_http() {
    local url=$1 pid=$2 _
    for _ in $(seq 1 100); do
        curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { log "process $pid for $url exited:"; cat "$WORK"/*.log >&2; exit 1; }
        sleep 0.1
    done
    log "not ready: $url"
    exit 1
}

# Fixed loopback ports (apart from bench/run.sh's); a busy one fails loudly at bind.
BACKEND=127.0.0.1:18580
OTLP=127.0.0.1:18517
start backend "$BACKEND_BIN" "$BACKEND" 10
wait_http "http://$BACKEND/" "$STARTED_PID"
start receiver "$RECEIVER_BIN" "$OTLP" 127.0.0.1:18518 100
RECEIVER_PID=$STARTED_PID
wait_http "http://127.0.0.1:18518/traces" "$RECEIVER_PID"

declare -A CLIENT_PID SERVER_PID LISTEN ADMIN_C ADMIN_S
pair() { # key listen inbound admin_client admin_server [extra flags...]
    local key=$1 listen=$2 inbound=$3 admin_c=$4 admin_s=$5
    shift 5
    start "$key-server" "$PROXY" --service=bench --app-addr="$BACKEND" \
        --inbound-addr="$inbound" --admin-addr="$admin_s" "$@"
    SERVER_PID[$key]=$STARTED_PID
    start "$key-client" "$PROXY" --upstream=bench="$listen" \
        --static-endpoint=bench="$inbound/meshed" --admin-addr="$admin_c" "$@"
    CLIENT_PID[$key]=$STARTED_PID
    wait_http "http://$admin_s/ready" "${SERVER_PID[$key]}"
    wait_http "http://$admin_c/ready" "${CLIENT_PID[$key]}"
    wait_http "http://$listen/" "${CLIENT_PID[$key]}"
    LISTEN[$key]=$listen
    ADMIN_C[$key]=$admin_c
    ADMIN_S[$key]=$admin_s
}
pair off 127.0.0.1:18541 127.0.0.1:18543 127.0.0.1:18591 127.0.0.1:18592
pair traced 127.0.0.1:18641 127.0.0.1:18643 127.0.0.1:18691 127.0.0.1:18692 \
    --otlp-endpoint="http://$OTLP" --trace-sample-ratio=0

VARIANTS=(off 0 0.01 1)
declare -A LABEL=([off]="tracing off" [0]="sampled 0 %" [0.01]="sampled 1 %" [1]="sampled 100 %")

# Points the variant at its pair (and the traced pair at its ratio); sets KEY.
select_variant() {
    if [ "$1" = off ]; then
        KEY=off
        return
    fi
    KEY=traced
    local admin
    for admin in "${ADMIN_C[traced]}" "${ADMIN_S[traced]}"; do
        curl -fsS --max-time 5 -X POST "http://$admin/tracing?sample_ratio=$1" >/dev/null
    done
}

CLK_TCK="$(getconf CLK_TCK)"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# The spans both sidecars of the traced pair handed to the exporter (exported + dropped).
spans() {
    local admin total=0 n
    for admin in "${ADMIN_C[traced]}" "${ADMIN_S[traced]}"; do
        n="$(curl -fsS --max-time 5 "http://$admin/metrics" |
            awk '/^trace_spans_(exported|dropped)_total/ {s += $NF} END {printf "%d", s}')"
        total=$((total + n))
    done
    echo "$total"
}

RAW="$WORK/raw.tsv"
printf 'round\tvariant\tload\trps\trequests\terrors\tp50_ms\tp99_ms\tcpu_client_s\tcpu_server_s\tseconds\tspans\n' >"$RAW"

run_one() { # round variant load(sat|rate)
    local round=$1 variant=$2 load=$3 url c0 s0 c1 s1 sp0 sp1 t0 t1 out result
    select_variant "$variant"
    url="http://${LISTEN[$KEY]}/"
    sp0="$(spans)"
    c0="$(cpu_ticks "${CLIENT_PID[$KEY]}")"
    s0="$(cpu_ticks "${SERVER_PID[$KEY]}")"
    t0="$(date +%s.%N)"
    if [ "$load" = sat ]; then
        out="$(timeout $((SAT_SECONDS + 30)) wrk -t1 -c50 -d"${SAT_SECONDS}s" --latency "$url")" || out=""
        result="$(awk '
            /^Requests\/sec:/ {rps = $2}
            / requests in / {n = $1}
            /Non-2xx/ {err += $NF}
            /Socket errors/ {gsub(",", ""); err += $4 + $6 + $8 + $10}
            $1 == "50%" {p50 = $2} $1 == "99%" {p99 = $2}
            function ms(v) {
                if (v ~ /us$/) return sprintf("%.3f", v / 1000)
                if (v ~ /ms$/) return sprintf("%.3f", v + 0)
                if (v ~ /s$/) return sprintf("%.3f", v * 1000)
                return "-"
            }
            END {printf "%.0f %d %d %s %s\n", rps, n, err, ms(p50), ms(p99)}' <<<"$out")"
    else
        out="$(timeout $((RATE_SECONDS + 30)) "$LOAD_BIN" "$url" "$RATE" "$RATE_SECONDS" 50 h1)" || out=""
        result="$(awk '{print $1, $2, $3, $4, $5}' <<<"$out")"
    fi
    t1="$(date +%s.%N)"
    c1="$(cpu_ticks "${CLIENT_PID[$KEY]}")"
    s1="$(cpu_ticks "${SERVER_PID[$KEY]}")"
    sp1="$(spans)"
    [ -n "$result" ] || result="0 0 1 - -"
    read -r rps requests errors p50 p99 <<<"$result"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$variant" "$load" \
        "$rps" "$requests" "$errors" "$p50" "$p99" \
        "$(awk -v t=$((c1 - c0)) -v h="$CLK_TCK" 'BEGIN {printf "%.2f", t / h}')" \
        "$(awk -v t=$((s1 - s0)) -v h="$CLK_TCK" 'BEGIN {printf "%.2f", t / h}')" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')" \
        "$([ "$KEY" = traced ] && echo $((sp1 - sp0)) || echo 0)" >>"$RAW"
    log "round $round ${LABEL[$variant]} $load: $rps req/s, $errors errors, p50/p99 $p50/$p99 ms"
}

for round in $(seq 1 "$ROUNDS"); do
    n=${#VARIANTS[@]}
    for i in $(seq 0 $((n - 1))); do
        variant=${VARIANTS[$(((i + round - 1) % n))]}
        run_one "$round" "$variant" sat
        run_one "$round" "$variant" rate
    done
done

mkdir -p "$RESULTS"
LOADAVG_AT_END="$(cut -d' ' -f1-3 /proc/loadavg)"
TRACE_BENCH_NOTE="$NOTE" python3 - "$RAW" "$RESULTS/tracing-cost.md" <<EOF
import csv, os, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
variants = [("off", "tracing off"), ("0", "sampled 0 %"), ("0.01", "sampled 1 %"), ("1", "sampled 100 %")]
def med(values):
    values = [float(v) for v in values if v not in ("-", "")]
    return statistics.median(values) if values else None
def fmt(v, spec):
    return "–" if v is None else format(v, spec)
out = []
out.append("# What tracing costs: a Ferrule pair, tracing off and sampled 0 %, 1 %, 100 %\n")
out.append("Written by \`bench/tracing.sh\` ($STARTED_AT); $ROUNDS round(s), saturation runs of "
           "${SAT_SECONDS} s (wrk -t1 -c50, HTTP/1.1), fixed-rate runs of ${RATE_SECONDS} s at "
           "$RATE req/s (bench_load, open loop, 50 connections). Medians over the rounds. The "
           "traced pair exports over OTLP/gRPC to a local receiver "
           "(proto/trace/examples/otlp_receiver.rs); its ratio is changed live between runs.\n")
out.append("Load average at start $LOADAVG_AT_START, at end $LOADAVG_AT_END (2 CPUs: the client, "
           "both proxies, the backend and the receiver share them, so absolute numbers are low "
           "and noisy; compare the rows).\n")
if os.environ.get("TRACE_BENCH_NOTE"):
    out.append("Note: " + os.environ["TRACE_BENCH_NOTE"] + "\n")
out.append("| variant | saturation req/s | CPU ms per 1,000 req (client + server) at saturation | "
           "$RATE req/s: client CPU % | server CPU % | p50 ms | p99 ms | spans per request | errors |")
out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for key, label in variants:
    sat = [r for r in rows if r["variant"] == key and r["load"] == "sat"]
    rate = [r for r in rows if r["variant"] == key and r["load"] == "rate"]
    sat_rps = med(r["rps"] for r in sat)
    sat_cpu = med((float(r["cpu_client_s"]) + float(r["cpu_server_s"])) * 1e6 / max(1, int(r["requests"])) for r in sat)
    c_pct = med(float(r["cpu_client_s"]) * 100 / max(0.01, float(r["seconds"])) for r in rate)
    s_pct = med(float(r["cpu_server_s"]) * 100 / max(0.01, float(r["seconds"])) for r in rate)
    p50 = med(r["p50_ms"] for r in rate)
    p99 = med(r["p99_ms"] for r in rate)
    spans = med(int(r["spans"]) / max(1, int(r["requests"])) for r in sat + rate)
    errors = sum(int(r["errors"]) for r in sat + rate)
    out.append(f"| {label} | {fmt(sat_rps, '.0f')} | {fmt(sat_cpu, '.1f')} | {fmt(c_pct, '.1f')} | "
               f"{fmt(s_pct, '.1f')} | {fmt(p50, '.2f')} | {fmt(p99, '.2f')} | {fmt(spans, '.2f')} | {errors} |")
out.append("\nSpans per request: what the pair's two sidecars handed to the exporter "
           "(\`trace_spans_exported_total\` + \`trace_spans_dropped_total\`), per request of the run; "
           "at 100 % a request makes a client span (client sidecar) and a server span (server "
           "sidecar).\n")
out.append("## Raw samples\n")
out.append("| round | variant | load | req/s | requests | errors | p50 ms | p99 ms | CPU client s | CPU server s | seconds | spans |")
out.append("| " + " | ".join(["---"] * 12) + " |")
for r in rows:
    out.append("| " + " | ".join(r[k] for k in ["round", "variant", "load", "rps", "requests", "errors", "p50_ms", "p99_ms", "cpu_client_s", "cpu_server_s", "seconds", "spans"]) + " |")
open(sys.argv[2], "w").write("\n".join(out) + "\n")
EOF
log "wrote $RESULTS/tracing-cost.md"
