#!/usr/bin/env bash
# End to end on a real Kubernetes: creates a kind cluster, builds the images and loads them
# into it, installs Ferrule (`ferrule check --pre`, `ferrule install --identity-dir | kubectl apply -f -`,
# `ferrule check`), deploys the shop in its injection-labelled namespace, checks that every
# shop pod got its proxy, runs the shop's walkthrough through the gateway's NodePort, then
# uninstalls and deletes the cluster.
#
# Needs Docker (with BuildKit), kind, kubectl and curl. Where one is missing it says which and
# exits with status 77 (skipped: never a pass). It is not part of `make test`: no container
# runtime runs where that does.
#
# Usage: tests/kind/e2e.sh    env: KEEP_CLUSTER=1 keeps the cluster afterwards,
#                                  CLUSTER=name (default ferrule-e2e)
set -euo pipefail

SKIP=77
CLUSTER=${CLUSTER:-ferrule-e2e}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
GATEWAY=http://127.0.0.1:30080

log() { printf '\n== %s\n' "$*"; }
skip() { echo "tests/kind/e2e.sh: SKIPPED: $*" >&2; exit "$SKIP"; }
fail() { echo "tests/kind/e2e.sh: FAILED: $*" >&2; exit 1; }

for tool in docker kind kubectl curl cargo; do
    command -v "$tool" >/dev/null 2>&1 || skip "$tool is not installed"
done
docker info >/dev/null 2>&1 || skip "docker is installed but its daemon does not answer (docker info)"

log "building the ferrule CLI"
cargo build --release --quiet -p ferrule-cli --bin ferrule
FERRULE="${CARGO_TARGET_DIR:-$ROOT/target}/release/ferrule"
VERSION=$("$FERRULE" --version | awk '{print $2}')

log "building images (tag $VERSION)"
export DOCKER_BUILDKIT=1
images=("ferrule/proxy:$VERSION" "ferrule/controller:$VERSION")
docker build -q -f "$ROOT/k8s/images/proxy.Dockerfile" -t "ferrule/proxy:$VERSION" "$ROOT"
docker build -q -f "$ROOT/k8s/images/controller.Dockerfile" -t "ferrule/controller:$VERSION" "$ROOT"
for app in user order payment; do
    docker build -q -f "$ROOT/k8s/images/shop.Dockerfile" --build-arg "APP=$app" \
        -t "ferrule/shop-$app:$VERSION" "$ROOT"
    images+=("ferrule/shop-$app:$VERSION")
done

log "creating kind cluster $CLUSTER"
if kind get clusters | grep -qx "$CLUSTER"; then
    fail "a kind cluster named $CLUSTER exists already: delete it (kind delete cluster --name $CLUSTER) or set CLUSTER"
fi
cleanup() {
    if [ "${KEEP_CLUSTER:-}" = 1 ]; then
        echo "keeping cluster $CLUSTER (kind delete cluster --name $CLUSTER removes it)"
    else
        kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT
kind create cluster --name "$CLUSTER" --config "$ROOT/tests/kind/kind-config.yaml" --wait 120s
export KUBECONFIG
KUBECONFIG=$(mktemp)
kind get kubeconfig --name "$CLUSTER" > "$KUBECONFIG"
kind load docker-image --name "$CLUSTER" "${images[@]}"

log "ferrule check --pre"
"$FERRULE" check --pre

log "ferrule install (with a mesh CA made by ferrule identity init)"
CA_DIR=$(mktemp -d)
"$FERRULE" identity init --dir "$CA_DIR/mesh-ca"
"$FERRULE" install --identity-dir "$CA_DIR/mesh-ca" | kubectl apply -f -
rm -rf "$CA_DIR"
kubectl -n ferrule-system rollout status statefulset/ferrule-etcd --timeout=300s
kubectl -n ferrule-system rollout status deployment/ferrule-controller --timeout=300s

log "deploying the shop (namespace shop, labelled ferrule.io/inject=enabled)"
kubectl apply -k "$ROOT/k8s/shop"
kubectl -n shop rollout status statefulset/postgres --timeout=300s
for d in user payment order gateway; do
    kubectl -n shop rollout status "deployment/$d" --timeout=300s
done

log "every shop pod but the gateway has its proxy; every proxy, the gateway too, has the anchors"
for pod in $(kubectl -n shop get pods -o name); do
    containers=$(kubectl -n shop get "$pod" -o jsonpath='{.spec.initContainers[*].name}')
    env=$(kubectl -n shop get "$pod" -o jsonpath='{.spec.initContainers[*].env[*].name} {.spec.containers[*].env[*].name}')
    case "$pod" in
        pod/gateway-*) [[ "$containers" != *ferrule-proxy* ]] || fail "$pod (the gateway) got a sidecar" ;;
        *) [[ "$containers" == *ferrule-init*ferrule-proxy* ]] || fail "$pod has no proxy: init containers '$containers'" ;;
    esac
    [[ "$env" == *FERRULE_IDENTITY_TRUST_ANCHORS_PEM* ]] || fail "$pod has no trust anchors"
done

log "ferrule check"
"$FERRULE" check

log "the walkthrough through the gateway ($GATEWAY)"
token=""
for _ in $(seq 60); do
    token=$(curl -s --max-time 5 "$GATEWAY/login" -H 'content-type: application/json' \
        -d '{"username":"alice","password":"wonderland"}' | sed -nE 's/.*"token":"([^"]+)".*/\1/p') || true
    [ -n "$token" ] && break
    sleep 2
done
[ -n "$token" ] || fail "no login token from $GATEWAY/login within 2 minutes"
status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$GATEWAY/api/users/123" \
    -H "authorization: Bearer $token")
[ "$status" = 200 ] || fail "GET /api/users/123 answered $status"
status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$GATEWAY/api/users/123")
[ "$status" = 401 ] || fail "GET /api/users/123 without a token answered $status, not 401"
order=$(curl -s --max-time 10 "$GATEWAY/api/orders" -H "authorization: Bearer $token" \
    -H 'content-type: application/json' \
    -d '{"user_id":"123","items":[{"sku":"book","quantity":2,"unit_price_cents":1299}]}')
id=$(printf '%s' "$order" | sed -nE 's/.*"id":"?([^",}]+)"?.*/\1/p')
[ -n "$id" ] || fail "POST /api/orders answered $order"
status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$GATEWAY/api/orders/$id" \
    -H "authorization: Bearer $token")
[ "$status" = 200 ] || fail "GET /api/orders/$id answered $status"

log "ferrule uninstall"
kubectl delete -k "$ROOT/k8s/shop" --wait=true --timeout=120s
"$FERRULE" uninstall | kubectl delete -f - --wait=true --timeout=180s

echo
echo "tests/kind/e2e.sh: PASSED"
