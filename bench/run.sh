#!/usr/bin/env bash
# Side-by-side data-plane benchmark (issue #9, item 1): writes bench/results/latest.md, the raw
# samples bench/results/latest.tsv and the chart bench/results/latest.png.
#
# Every path is a client-side proxy and a server-side proxy in front of the same backend
# (proxy/app/examples/bench_backend.rs, hyper: HTTP/1.1, h2c, unary and server-streaming gRPC):
#   direct          client -> backend
#   nginx pair      client -> nginx -> nginx -> backend          (one worker each)
#   HAProxy pair    client -> haproxy -> h2 -> haproxy -> backend (nbthread 1 each)
#   Ferrule pair    client -> client sidecar -> mesh h2 -> server sidecar -> backend
#                   (static discovery, no controller)
#   Ferrule mTLS pair (path ferrule-mtls): the same with mutual TLS between the sidecars: a
#                   controller (embedded store) is the mesh CA and discovery, each sidecar gets
#                   its certificate with a join token
#   Ferrule pair (KEY), with BENCH_VARIANTS="KEY=FLAGS ...": the same binary with FLAGS (comma
#                   separated) added to both sidecars, e.g. BENCH_VARIANTS="mt=--threads=0";
#                   KEY:BINARY=FLAGS runs another build, e.g. "glibc:/tmp/ferrule-proxy="
#   Ferrule pair (baseline REV), with BENCH_BASELINE_REV=REV: the same, ferrule-proxy built at
#                   REV in a git worktree under target-baseline/ (kept for the next run; remove
#                   with `git worktree remove --force target-baseline/src-REV`).
# Scenarios: HTTP/1.1 GET, HTTP/2 GET, unary gRPC, server-streaming gRPC (BENCH_STREAM_MESSAGES
# messages per call). Each scenario is run at saturation (wrk for HTTP/1.1, h2load for the
# others) and at fixed rates with proxy/app/examples/bench_load.rs (open loop: the rate is held
# whatever the answers do, and latency counts from each request's dispatch, waiting for a free
# connection included, so coordinated omission is corrected). Rounds are
# interleaved: every round runs every scenario on every path, the path order rotating per round,
# so machine noise hits every path alike; the report gives medians and the min-max spread.
# Around each run the CPU time (utime+stime from /proc/PID/stat) of each proxy process is read,
# giving CPU-seconds per 1,000 requests. Before the load each pair gets 1,000 idle keep-alive
# client connections (bench/idle_conns.py) and the proxies' VmRSS is read with them open.
#
# Everything listens on 127.0.0.1; every load run is bounded by its duration (and `timeout`);
# every process started here is killed on exit, also on failure.
#
# Environment (defaults in brackets):
#   BENCH_ROUNDS [3]  BENCH_SAT_SECONDS [3]  BENCH_RATE_SECONDS [4]  BENCH_RATES ["1000 5000"]
#   BENCH_SCENARIOS ["h1 h2 grpc grpc-stream"]
#   BENCH_PATHS ["direct nginx haproxy ferrule ferrule-mtls"]
#   BENCH_BASELINE_REV [unset]  BENCH_BASELINE_BIN, BENCH_BASELINE_NAME [unset: a prebuilt
#   ferrule-proxy as the baseline, instead of a REV]  BENCH_VARIANTS [unset]  BENCH_STREAM_MESSAGES [10]
#   BENCH_IDLE_CONNS [1000]
#   BENCH_RESULTS_DIR [bench/results] (where the report, samples and chart go)
#   BENCH_SKIP_BUILD [unset] (set: run the release binaries already in CARGO_TARGET_DIR)
#   CARGO_TARGET_DIR [./target]; matplotlib is installed into the venv $CARGO_TARGET_DIR/venv
#   (for the chart).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
ROUNDS="${BENCH_ROUNDS:-3}"
SAT_SECONDS="${BENCH_SAT_SECONDS:-3}"
RATE_SECONDS="${BENCH_RATE_SECONDS:-4}"
RATES="${BENCH_RATES:-1000 5000}"
SCENARIOS="${BENCH_SCENARIOS:-h1 h2 grpc grpc-stream}"
PATHS="${BENCH_PATHS:-direct nginx haproxy ferrule ferrule-mtls}"
BASELINE_REV="${BENCH_BASELINE_REV:-}"
VARIANTS="${BENCH_VARIANTS:-}"
STREAM_MESSAGES="${BENCH_STREAM_MESSAGES:-10}"
IDLE_CONNS="${BENCH_IDLE_CONNS:-1000}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
export CARGO_TARGET_DIR="$TARGET_DIR"
RESULTS="${BENCH_RESULTS_DIR:-$ROOT/bench/results}"
STARTED_AT="$(date -u '+%Y-%m-%d %H:%M UTC')"
START_SECONDS=$SECONDS
LOADAVG_AT_START="$(cut -d' ' -f1-3 /proc/loadavg)"
# $WORK, $PIDS and the cleanup on exit.
source "$ROOT/bench/lib.sh"

log() { echo "bench: $*" >&2; }

for tool in wrk h2load curl nginx haproxy python3; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || {
        echo "bench needs $tool: run make deps (Debian: wrk nghttp2-client curl nginx haproxy python3)" >&2
        exit 1
    }
done
export PATH="$PATH:/usr/sbin"
export RUST_LOG=warn

# matplotlib for the chart, in a venv of its own; the report is written without it if pip fails.
VENV="$TARGET_DIR/venv"
PYTHON=python3
if "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
    PYTHON="$VENV/bin/python"
elif python3 -m venv "$VENV" && "$VENV/bin/pip" install --quiet matplotlib; then
    PYTHON="$VENV/bin/python"
else
    log "matplotlib could not be installed: the report will have no chart"
fi

if [ -n "${BENCH_SKIP_BUILD:-}" ]; then
    log "not building (BENCH_SKIP_BUILD): the release binaries in $TARGET_DIR as they are"
else
    log "building (release)..."
    cargo build --quiet --release -p ferrule-proxy --bin ferrule-proxy --example bench_backend \
        --example bench_load
    # The mTLS pair's controller (mesh CA and discovery) and the CLI that makes its files and
    # tokens.
    if [[ " $PATHS " == *" ferrule-mtls "* ]]; then
        cargo build --quiet --release -p ferrule-controller -p ferrule-cli --bins
    fi
fi
PROXY="$TARGET_DIR/release/ferrule-proxy"
BACKEND_BIN="$TARGET_DIR/release/examples/bench_backend"
LOAD_BIN="$TARGET_DIR/release/examples/bench_load"

BASELINE_LABEL=""
if [ -n "${BENCH_BASELINE_BIN:-}" ]; then
    # A ferrule-proxy built by hand (other features, say), run as the baseline.
    BASELINE_LABEL="Ferrule pair (${BENCH_BASELINE_NAME:-$BENCH_BASELINE_BIN})"
    BASE_PROXY="$BENCH_BASELINE_BIN"
    PATHS="$PATHS baseline"
elif [ -n "$BASELINE_REV" ]; then
    BASELINE_SHORT="$(git rev-parse --short "$BASELINE_REV^{commit}")"
    BASELINE_LABEL="Ferrule pair (baseline $BASELINE_SHORT)"
    BASE_DIR="$ROOT/target-baseline"
    BASE_SRC="$BASE_DIR/src-$BASELINE_SHORT"
    if [ ! -d "$BASE_SRC" ]; then
        git worktree add --detach "$BASE_SRC" "$BASELINE_SHORT" >&2
    fi
    log "building the baseline proxy at $BASELINE_SHORT (release, $BASE_DIR/target)..."
    (cd "$BASE_SRC" && CARGO_TARGET_DIR="$BASE_DIR/target" cargo build --quiet --release \
        -p ferrule-proxy --bin ferrule-proxy)
    BASE_PROXY="$BASE_DIR/target/release/ferrule-proxy"
    PATHS="$PATHS baseline"
fi

# 1,000 idle connections on a proxy, plus the load's.
ulimit -n 16384 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# Fixed loopback ports; a busy one fails loudly at bind.
BACKEND=127.0.0.1:18080
declare -A ADDR_H1 ADDR_H2 CLIENT_PID SERVER_PID LABEL
LABEL[direct]="direct"
LABEL[nginx]="nginx pair"
LABEL[haproxy]="HAProxy pair"
LABEL[ferrule]="Ferrule pair"
LABEL[ferrule-mtls]="Ferrule mTLS pair"
LABEL[baseline]="$BASELINE_LABEL"
# A variant is KEY=FLAGS, or KEY:BINARY=FLAGS for another ferrule-proxy build (FLAGS may be
# empty); its path is ferrule-KEY.
variant_key() { local k=${1%%=*}; echo "ferrule-${k%%:*}"; }
variant_bin() { local k=${1%%=*}; [[ $k == *:* ]] && echo "${k#*:}" || echo "$PROXY"; }
for variant in $VARIANTS; do
    key="$(variant_key "$variant")"
    flags="${variant#*=}"
    LABEL[$key]="Ferrule pair (${flags:-${key#ferrule-}})"
    PATHS="$PATHS $key"
done

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

start backend "$BACKEND_BIN" "$BACKEND" "$STREAM_MESSAGES"
BACKEND_PID=$STARTED_PID
wait_http "http://$BACKEND/" "$BACKEND_PID"
ADDR_H1[direct]=$BACKEND
ADDR_H2[direct]=$BACKEND

# nginx: one process (master_process off, one worker's worth), HTTP/1.1 and h2c listeners.
# nginx proxies HTTP only over HTTP/1.1 upstream, so its pair's hop is HTTP/1.1 for HTTP/1.1
# and HTTP/2 requests and HTTP/2 (grpc_pass) for gRPC.
nginx_conf() { # dir listen_h1 listen_h2 upstream_h1 upstream_grpc
    local dir=$1
    mkdir -p "$dir/logs"
    cat >"$dir/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
error_log $dir/logs/error.log warn;
pid $dir/nginx.pid;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $dir/tmp-body;
    proxy_temp_path $dir/tmp-proxy;
    fastcgi_temp_path $dir/tmp-fastcgi;
    uwsgi_temp_path $dir/tmp-uwsgi;
    scgi_temp_path $dir/tmp-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    upstream up_h1 { server $4; keepalive 256; keepalive_requests 10000000; }
    upstream up_grpc { server $5; keepalive 256; keepalive_requests 10000000; }
    server {
        listen $2;
        location / { proxy_pass http://up_h1; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
    server {
        listen $3 http2;
        location / { proxy_pass http://up_h1; proxy_http_version 1.1; proxy_set_header Connection ""; }
        location /bench.Echo/ { grpc_pass grpc://up_grpc; }
    }
}
EOF
}

# HAProxy: one thread each, HTTP/2 between the two (as the mesh's hop), HTTP/1.1 to the
# backend for HTTP and HTTP/2 for gRPC.
haproxy_common() {
    cat <<EOF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
EOF
}

if [[ " $PATHS " == *" nginx "* ]]; then
    nginx_conf "$WORK/nginx-server" 127.0.0.1:18250 127.0.0.1:18251 "$BACKEND" "$BACKEND"
    start nginx-server nginx -p "$WORK/nginx-server" -c "$WORK/nginx-server/nginx.conf"
    SERVER_PID[nginx]=$STARTED_PID
    nginx_conf "$WORK/nginx-client" 127.0.0.1:18240 127.0.0.1:18241 127.0.0.1:18250 127.0.0.1:18251
    start nginx-client nginx -p "$WORK/nginx-client" -c "$WORK/nginx-client/nginx.conf"
    CLIENT_PID[nginx]=$STARTED_PID
    ADDR_H1[nginx]=127.0.0.1:18240
    ADDR_H2[nginx]=127.0.0.1:18241
fi

if [[ " $PATHS " == *" haproxy "* ]]; then
    {
        haproxy_common
        cat <<EOF
frontend mesh_in
    bind 127.0.0.1:18270 proto h2
    use_backend app_h2 if { req.hdr(content-type) -m beg application/grpc }
    default_backend app_h1
backend app_h1
    http-reuse always
    server app $BACKEND
backend app_h2
    http-reuse always
    server app $BACKEND proto h2
EOF
    } >"$WORK/haproxy-server.cfg"
    {
        haproxy_common
        cat <<EOF
frontend app_h1
    bind 127.0.0.1:18260
    default_backend peer
frontend app_h2
    bind 127.0.0.1:18261 proto h2
    default_backend peer
backend peer
    http-reuse always
    server peer 127.0.0.1:18270 proto h2
EOF
    } >"$WORK/haproxy-client.cfg"
    start haproxy-server haproxy -db -f "$WORK/haproxy-server.cfg"
    SERVER_PID[haproxy]=$STARTED_PID
    start haproxy-client haproxy -db -f "$WORK/haproxy-client.cfg"
    CLIENT_PID[haproxy]=$STARTED_PID
    ADDR_H1[haproxy]=127.0.0.1:18260
    ADDR_H2[haproxy]=127.0.0.1:18261
fi

# A Ferrule pair: the server sidecar fronts the backend, the client sidecar has a local
# listener for the service with the server sidecar as its one static, meshed endpoint.
# The same flags exist at 4ee83cb (the baseline) and now.
ferrule_pair() { # key binary listen inbound admin_client admin_server [extra flags...]
    local key=$1 bin=$2 listen=$3 inbound=$4 admin_client=$5 admin_server=$6
    shift 6
    start "$key-server" "$bin" --service=bench --app-addr="$BACKEND" \
        --inbound-addr="$inbound" --admin-addr="$admin_server" "$@"
    SERVER_PID[$key]=$STARTED_PID
    start "$key-client" "$bin" --upstream=bench="$listen" \
        --static-endpoint=bench="$inbound/meshed" --admin-addr="$admin_client" "$@"
    CLIENT_PID[$key]=$STARTED_PID
    wait_http "http://$admin_server/ready" "${SERVER_PID[$key]}"
    wait_http "http://$admin_client/ready" "${CLIENT_PID[$key]}"
    ADDR_H1[$key]=$listen
    ADDR_H2[$key]=$listen
}
if [[ " $PATHS " == *" ferrule "* ]]; then
    ferrule_pair ferrule "$PROXY" 127.0.0.1:18141 127.0.0.1:18143 127.0.0.1:18191 127.0.0.1:18192
fi
# The mTLS pair: a controller as CA and discovery; the client sidecar finds the server sidecar
# through discovery, with the identity its certificate must prove.
if [[ " $PATHS " == *" ferrule-mtls "* ]]; then
    CTL_ADDR=127.0.0.1:18486
    "$TARGET_DIR/release/ferrule" identity init --dir "$WORK/ca" >/dev/null
    start mtls-controller "$TARGET_DIR/release/ferrule-controller" --store memory \
        --grpc-addr "$CTL_ADDR" --admin-addr 127.0.0.1:18490 --identity-dir "$WORK/ca"
    wait_http "http://127.0.0.1:18490/ready" "$STARTED_PID"
    # The controller's API is protected: the admin's credentials for the CLI, the trust
    # anchors for the proxies.
    token() { "$TARGET_DIR/release/ferrule" --controller "$CTL_ADDR" --ca-file "$WORK/ca/trust-anchors.pem" \
        --cert "$WORK/ca/admin.pem" --key "$WORK/ca/admin.key" identity token create --service "$1"; }
    start ferrule-mtls-server "$PROXY" --service=bench --app-addr="$BACKEND" \
        --inbound-addr=127.0.0.1:18443 --admin-addr=127.0.0.1:18492 --controller="$CTL_ADDR" \
        --identity-token="$(token bench)" --require-mtls \
        --identity-trust-anchors="$WORK/ca/trust-anchors.pem"
    SERVER_PID[ferrule-mtls]=$STARTED_PID
    wait_http "http://127.0.0.1:18492/ready" "${SERVER_PID[ferrule-mtls]}"
    start ferrule-mtls-client "$PROXY" --upstream=bench=127.0.0.1:18441 \
        --admin-addr=127.0.0.1:18491 --controller="$CTL_ADDR" --service-account=client \
        --identity-token="$(token client)" --identity-trust-anchors="$WORK/ca/trust-anchors.pem"
    CLIENT_PID[ferrule-mtls]=$STARTED_PID
    wait_http "http://127.0.0.1:18491/ready" "${CLIENT_PID[ferrule-mtls]}"
    ADDR_H1[ferrule-mtls]=127.0.0.1:18441
    ADDR_H2[ferrule-mtls]=127.0.0.1:18441
fi
# Variants: the same binary with other flags, ports 186N1.. for the Nth.
variant_index=0
for variant in $VARIANTS; do
    key="$(variant_key "$variant")"
    IFS=, read -ra flags <<<"${variant#*=}"
    base=$((18600 + 10 * variant_index))
    ferrule_pair "$key" "$(variant_bin "$variant")" "127.0.0.1:$((base + 1))" "127.0.0.1:$((base + 3))" \
        "127.0.0.1:$((base + 5))" "127.0.0.1:$((base + 6))" "${flags[@]}"
    variant_index=$((variant_index + 1))
done
if [[ " $PATHS " == *" baseline "* ]]; then
    ferrule_pair baseline "$BASE_PROXY" 127.0.0.1:18341 127.0.0.1:18343 127.0.0.1:18391 127.0.0.1:18392
fi

url_for() { # path scenario
    case $2 in
        h1) echo "http://${ADDR_H1[$1]}/" ;;
        h2) echo "http://${ADDR_H2[$1]}/" ;;
        grpc) echo "http://${ADDR_H2[$1]}/bench.Echo/Unary" ;;
        grpc-stream) echo "http://${ADDR_H2[$1]}/bench.Echo/Stream" ;;
    esac
}

for path in $PATHS; do
    [ "$path" = direct ] && continue
    wait_http "http://${ADDR_H1[$path]}/" "${CLIENT_PID[$path]}"
done

# Each path must carry each scenario whole before it is measured: the answer, and for gRPC
# every message and grpc-status 0 in the trailers. A path that does not is skipped for that
# scenario and the report says so.
printf '\x00\x00\x00\x00\x00' >"$WORK/grpc-req.bin"
declare -A CARRIES
carries() { # path scenario
    local url
    url="$(url_for "$1" "$2")"
    case $2 in
        h1) curl -fsS --max-time 5 "$url" 2>&1 | grep -qx ok ;;
        h2) curl -fsS --max-time 5 --http2-prior-knowledge "$url" 2>&1 | grep -qx ok ;;
        grpc | grpc-stream)
            local want=5
            [ "$2" = grpc-stream ] && want=$((5 * STREAM_MESSAGES))
            curl -sS --max-time 5 --http2-prior-knowledge -v -X POST \
                -H 'content-type: application/grpc' -H 'te: trailers' \
                --data-binary @"$WORK/grpc-req.bin" -o "$WORK/carry.bin" "$url" 2>"$WORK/carry.log" &&
                grep -qi '^< grpc-status: 0' "$WORK/carry.log" &&
                [ "$(wc -c <"$WORK/carry.bin")" -eq "$want" ]
            ;;
    esac
}
for path in $PATHS; do
    for scenario in $SCENARIOS; do
        if carries "$path" "$scenario"; then
            CARRIES[$path,$scenario]=yes
        else
            CARRIES[$path,$scenario]=no
            log "${LABEL[$path]} does not carry $scenario whole: skipped for it"
        fi
    done
done

CLK_TCK="$(getconf CLK_TCK)"
RSS_TSV="$WORK/rss.tsv"
RAW="$WORK/raw.tsv"
printf 'path\trole\tidle_kib\tpeak_kib\tconns_kib\n' >"$RSS_TSV"
printf 'round\tscenario\tload\tpath\trps\trequests\terrors\tp50_ms\tp99_ms\tp999_ms\tpacer_lag_ms\tcpu_client_s\tcpu_server_s\n' >"$RAW"

status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
cpu_ticks() { # utime + stime of the whole process (all threads)
    if [ -z "${1:-}" ]; then echo 0; return; fi
    awk '{print $14 + $15}' "/proc/$1/stat"
}

declare -A IDLE_KIB
for path in $PATHS; do
    [ "$path" = direct ] && continue
    IDLE_KIB[$path,client]="$(status_kib "${CLIENT_PID[$path]}" VmRSS)"
    IDLE_KIB[$path,server]="$(status_kib "${SERVER_PID[$path]}" VmRSS)"
done

# RSS with idle client connections held open, before any load, so that it is not mixed with
# what a process kept from a load peak.
declare -A CONNS_KIB
for path in $PATHS; do
    [ "$path" = direct ] && continue
    client=${CLIENT_PID[$path]}
    server=${SERVER_PID[$path]}
    rm -f "$WORK/idle.ready"
    timeout 120 python3 "$ROOT/bench/idle_conns.py" "${ADDR_H1[$path]}" "$IDLE_CONNS" 60 \
        "$WORK/idle.ready" >"$WORK/idle-$path.log" 2>&1 &
    idle_pid=$!
    PIDS+=("$idle_pid")
    for _ in $(seq 1 600); do
        [ -f "$WORK/idle.ready" ] && break
        kill -0 "$idle_pid" 2>/dev/null || break
        sleep 0.1
    done
    if [ -f "$WORK/idle.ready" ]; then
        sleep 1
        CONNS_KIB[$path,client]="$(status_kib "$client" VmRSS)"
        CONNS_KIB[$path,server]="$(status_kib "$server" VmRSS)"
        log "${LABEL[$path]}: $(cat "$WORK/idle.ready"); client VmRSS ${CONNS_KIB[$path,client]} KiB"
    else
        log "${LABEL[$path]}: idle connections not established: $(cat "$WORK/idle-$path.log")"
        CONNS_KIB[$path,client]=-
        CONNS_KIB[$path,server]=-
    fi
    kill "$idle_pid" 2>/dev/null || true
    wait "$idle_pid" 2>/dev/null || true
done


# Each measuring function prints: rps requests errors p50_ms p99_ms p999_ms pacer_lag_ms
# ("-" if none).
saturate() { # scenario url
    local out
    if [ "$1" = h1 ]; then
        out="$(timeout $((SAT_SECONDS + 30)) wrk -t1 -c50 -d"${SAT_SECONDS}s" --latency "$2")"
        awk '
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
            END {printf "%.0f %d %d %s %s - -\n", rps, n, err, ms(p50), ms(p99)}' <<<"$out"
    else
        local grpc=()
        [ "$1" = h2 ] || grpc=(-H 'content-type: application/grpc' -H 'te: trailers' -d "$WORK/grpc-req.bin")
        out="$(timeout $((SAT_SECONDS + 30)) h2load -t1 -c10 -m10 -D "$SAT_SECONDS" "${grpc[@]}" "$2")"
        awk '
            /^finished in/ {gsub(",", "", $4); rps = $4}
            /^requests:/ {n = $8; err = $10 + $12 + $14}
            /^status codes:/ {gsub(",", ""); err += $5 + $7 + $9}
            END {printf "%.0f %d %d - - - -\n", rps, n, err}' <<<"$out"
    fi
}

at_rate() { # scenario url rate
    local conns=10 mode=h2
    case $1 in
        h1) conns=50 mode=h1 ;;
        grpc | grpc-stream) mode=grpc ;;
    esac
    timeout $((RATE_SECONDS + 30)) "$LOAD_BIN" "$2" "$3" "$RATE_SECONDS" "$conns" "$mode"
}

run_one() { # round scenario load path
    local round=$1 scenario=$2 load=$3 path=$4 url c0 s0 c1 s1 result
    url="$(url_for "$path" "$scenario")"
    c0="$(cpu_ticks "${CLIENT_PID[$path]:-}")"
    s0="$(cpu_ticks "${SERVER_PID[$path]:-}")"
    # A failed load run is recorded as such (and its output shown) rather than ending the bench.
    if [ "$load" = sat ]; then
        result="$(saturate "$scenario" "$url" 2>"$WORK/load.err")" || result=""
    else
        result="$(at_rate "$scenario" "$url" "$load" 2>"$WORK/load.err")" || result=""
    fi
    if [ -z "$result" ]; then
        log "round $round $scenario $load ${LABEL[$path]}: the load run failed: $(tail -n 3 "$WORK/load.err")"
        result="0 0 1 - - - -"
    fi
    c1="$(cpu_ticks "${CLIENT_PID[$path]:-}")"
    s1="$(cpu_ticks "${SERVER_PID[$path]:-}")"
    read -r rps requests errors p50 p99 p999 lag <<<"$result"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$scenario" "$load" \
        "$path" "$rps" "$requests" "$errors" "$p50" "$p99" "$p999" "$lag" \
        "$(awk -v t=$((c1 - c0)) -v h="$CLK_TCK" 'BEGIN {printf "%.2f", t / h}')" \
        "$(awk -v t=$((s1 - s0)) -v h="$CLK_TCK" 'BEGIN {printf "%.2f", t / h}')" >>"$RAW"
    log "round $round $scenario $load ${LABEL[$path]}: $rps req/s, $errors errors, p50/p99 $p50/$p99 ms"
}

read -ra PATH_LIST <<<"$PATHS"
for round in $(seq 1 "$ROUNDS"); do
    # Rotate the path order each round so that no path always runs first after a change.
    n=${#PATH_LIST[@]}
    order=()
    for i in $(seq 0 $((n - 1))); do order+=("${PATH_LIST[$(((i + round - 1) % n))]}"); done
    for scenario in $SCENARIOS; do
        for load in sat $RATES; do
            for path in "${order[@]}"; do
                [ "${CARRIES[$path,$scenario]}" = yes ] || continue
                run_one "$round" "$scenario" "$load" "$path"
            done
        done
    done
done

# Peak RSS over everything above.
for path in $PATHS; do
    [ "$path" = direct ] && continue
    printf '%s\tclient\t%s\t%s\t%s\n' "$path" "${IDLE_KIB[$path,client]}" \
        "$(status_kib "${CLIENT_PID[$path]}" VmHWM)" "${CONNS_KIB[$path,client]}" >>"$RSS_TSV"
    printf '%s\tserver\t%s\t%s\t%s\n' "$path" "${IDLE_KIB[$path,server]}" \
        "$(status_kib "${SERVER_PID[$path]}" VmHWM)" "${CONNS_KIB[$path,server]}" >>"$RSS_TSV"
done

# Everything the report prints about how it was made.
META="$WORK/meta.tsv"
{
    printf 'started\t%s\n' "$STARTED_AT"
    printf 'wall\t%s s\n' "$((SECONDS - START_SECONDS))"
    printf 'command\t%s\n' "$(env | grep -E '^BENCH_' | sort | tr '\n' ' ')bash bench/run.sh"
    printf 'settings\t%s rounds; saturation %s s per run; fixed rates %s req/s for %s s per run; scenarios %s\n' \
        "$ROUNDS" "$SAT_SECONDS" "$RATES" "$RATE_SECONDS" "$SCENARIOS"
    printf 'nproc\t%s\n' "$(nproc)"
    printf 'cpu\t%s\n' "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
    printf 'kernel\t%s\n' "$(uname -sr)"
    printf 'loadavg\t%s at the start, %s at the end\n' "$LOADAVG_AT_START" "$(cut -d' ' -f1-3 /proc/loadavg)"
    printf 'git\t%s\n' "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- proxy || echo ' (proxy/ modified)')"
    printf 'baseline\t%s\n' "$BASELINE_LABEL"
    printf 'wrk\t%s\n' "$(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)"
    printf 'h2load\t%s\n' "$(h2load --version | head -1)"
    printf 'nginx\t%s\n' "$(nginx -v 2>&1 | head -1)"
    printf 'haproxy\t%s\n' "$(haproxy -v | head -1 | cut -d' ' -f1-3)"
    printf 'rustc\t%s\n' "$(rustc --version)"
    printf 'stream_messages\t%s\n' "$STREAM_MESSAGES"
    printf 'idle_conns\t%s\n' "$IDLE_CONNS"
    for path in $PATHS; do
        printf 'label.%s\t%s\n' "$path" "${LABEL[$path]}"
        for scenario in $SCENARIOS; do
            printf 'carries.%s.%s\t%s\n' "$path" "$scenario" "${CARRIES[$path,$scenario]}"
        done
    done
} >"$META"

mkdir -p "$RESULTS"
cp "$RAW" "$RESULTS/latest.tsv"
"$PYTHON" "$ROOT/bench/report.py" --raw "$RAW" --rss "$RSS_TSV" --meta "$META" \
    --out "$RESULTS/latest.md" --chart "$RESULTS/latest.png"
log "results in $RESULTS/latest.md (wall time $((SECONDS - START_SECONDS)) s)"
