#!/bin/sh
# Validates every manifest Ferrule ships against the Kubernetes schemas of three versions
# (kubernetes-validate --strict, from PyPI, in a venv made here): what `kubectl kustomize`
# renders of k8s/base, k8s/shop, each overlay and each component, the golden files of
# `ferrule inject`, and, with FERRULE=path/to/ferrule, the output of `ferrule install` and the
# shop as `ferrule inject` rewrites it. `make test` runs it (make k8s-validate).
#
# Usage: k8s/validate.sh VENV_DIR    (env: FERRULE, K8S_VERSIONS)
set -eu

VENV=${1:?usage: k8s/validate.sh VENV_DIR}
VERSIONS=${K8S_VERSIONS:-1.29.0,1.31.0,1.33.0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
K8S="$ROOT/k8s"

# kubectl renders the kustomizations. Debian and Ubuntu do not package it, so `make test` on a
# fresh machine would otherwise stop here: without it the resource files each kustomization
# lists are validated as they are (patches, components and overlays are not applied), and the
# script says so loudly. Install kubectl to validate what kustomize renders.
KUBECTL=yes
if ! command -v kubectl >/dev/null 2>&1; then
    KUBECTL=
    echo "k8s/validate.sh: WARNING: kubectl is missing: validating the listed resource files without" >&2
    echo "k8s/validate.sh: WARNING: kustomize rendering (install kubectl to validate overlays and components)" >&2
fi
if ! "$VENV/bin/python" -c 'import kubernetes_validate' 2>/dev/null; then
    echo "k8s/validate.sh: installing kubernetes-validate into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet 'kubernetes-validate==1.37.0'
fi

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT INT TERM

# Every kustomization's files must exist (kubectl kustomize also fails on a missing one, but
# this names the file).
status=0
for k in $(find "$K8S" -name kustomization.yaml); do
    dir=$(dirname "$k")
    for r in $(sed -n '/^resources:/,/^[a-z]/s/^  - //p' "$k"); do
        [ -e "$dir/$r" ] || { echo "FAIL $k: resource $r does not exist" >&2; status=1; }
    done
done
[ "$status" -eq 0 ] || exit 1

render() { # DIR NAME
    kubectl kustomize "$1" > "$OUT/$2.yaml" || { echo "FAIL: kubectl kustomize $1" >&2; exit 1; }
}
# Without kubectl: the kustomization's own resource files (recursing into listed directories),
# as one multi-document file.
concat() { # DIR NAME
    for r in $(sed -n '/^resources:/,/^[a-z]/s/^  - //p' "$1/kustomization.yaml"); do
        if [ -d "$1/$r" ]; then
            concat "$1/$r" "$2"
        else
            printf -- '---\n' >> "$OUT/$2.yaml"
            cat "$1/$r" >> "$OUT/$2.yaml"
        fi
    done
}
if [ -z "$KUBECTL" ]; then
    : > "$OUT/base.yaml"; concat "$K8S/base" base
    : > "$OUT/shop.yaml"; concat "$K8S/shop" shop
else
render "$K8S/base" base
render "$K8S/shop" shop
for o in "$K8S"/overlays/*/; do render "$o" "overlay-$(basename "$o")"; done
# Components only render inside a kustomization: each one on top of the kind overlay.
for c in "$K8S"/components/*/; do
    name=$(basename "$c")
    mkdir -p "$OUT/with-$name"
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %s\ncomponents:\n  - %s\n' \
        "$(realpath --relative-to="$OUT/with-$name" "$K8S/overlays/kind")" \
        "$(realpath --relative-to="$OUT/with-$name" "$c")" > "$OUT/with-$name/kustomization.yaml"
    render "$OUT/with-$name" "component-$name"
done
fi
if [ -n "${FERRULE:-}" ]; then
    # install takes the mesh CA `identity init` makes, and never makes one itself.
    "$FERRULE" identity init --dir "$OUT/mesh-ca" > /dev/null
    "$FERRULE" install --identity-dir "$OUT/mesh-ca" > "$OUT/install.yaml"
    "$FERRULE" install --identity-dir "$OUT/mesh-ca" --sidecar classic > "$OUT/install-classic.yaml"
    "$FERRULE" install --identity=none > "$OUT/install-no-identity.yaml"
    grep -q 'name: ferrule-identity' "$OUT/install.yaml" || {
        echo "FAIL: ferrule install printed no identity Secret" >&2; exit 1; }
    if "$FERRULE" install > /dev/null 2> "$OUT/no-ca.log"; then
        echo "FAIL: ferrule install without --identity-dir made a control plane" >&2
        exit 1
    fi
    grep -q 'ferrule identity init' "$OUT/no-ca.log" || {
        echo "FAIL: ferrule install without a CA does not say how to make one:" >&2
        cat "$OUT/no-ca.log" >&2
        exit 1
    }
    rm -f "$OUT/no-ca.log"
    "$FERRULE" uninstall > "$OUT/uninstall.yaml"
    "$FERRULE" inject --identity-dir "$OUT/mesh-ca" "$OUT/shop.yaml" > "$OUT/shop-injected.yaml" 2> "$OUT/inject.log"
    "$FERRULE" inject --trust-anchors "$OUT/mesh-ca/trust-anchors.pem" --classic - < "$OUT/shop.yaml" \
        > "$OUT/shop-injected-classic.yaml" 2>/dev/null
    "$FERRULE" inject --no-identity - < "$OUT/shop.yaml" > "$OUT/shop-injected-no-identity.yaml" 2>/dev/null
    # With identity on and no anchors, inject refuses and says where to get them.
    if "$FERRULE" inject "$OUT/shop.yaml" > /dev/null 2> "$OUT/no-anchors.log"; then
        echo "FAIL: ferrule inject gave proxies identity without trust anchors" >&2; exit 1
    fi
    grep -q -- '--trust-anchors FILE' "$OUT/no-anchors.log" || {
        echo "FAIL: ferrule inject without anchors does not say how to give them:" >&2
        cat "$OUT/no-anchors.log" >&2; exit 1; }
    rm -rf "$OUT/mesh-ca" "$OUT/no-anchors.log"
    # Injected with identity: the projected token reaches the proxy, for the controller's
    # audience, and the trust anchors it verifies the controller with.
    grep -q 'audience: ferrule' "$OUT/shop-injected.yaml" || {
        echo "FAIL: ferrule inject mounted no service-account token for the proxy" >&2; exit 1; }
    grep -q 'FERRULE_IDENTITY_TRUST_ANCHORS_PEM' "$OUT/shop-injected.yaml" || {
        echo "FAIL: ferrule inject gave the proxies no trust anchors" >&2; exit 1; }
    # The shop's apps and database get a proxy; the gateway (a proxy itself) its identity only.
    for want in 'deployment/user injected' 'deployment/order injected' \
        'deployment/payment injected' 'statefulset/postgres injected' \
        'deployment/gateway injected'; do
        grep -qxF "$want" "$OUT/inject.log" || {
            echo "FAIL: ferrule inject of k8s/shop did not report '$want':" >&2
            cat "$OUT/inject.log" >&2
            exit 1
        }
    done
    # Bad input: a clear error naming the annotation, and a failing exit status.
    bad='{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","annotations":{"ferrule.io/inject":"yes"}},"spec":{"containers":[{"name":"a","image":"b"}]}}'
    if printf '%s\n' "$bad" | "$FERRULE" inject --no-identity - > /dev/null 2> "$OUT/bad.log"; then
        echo "FAIL: ferrule inject accepted ferrule.io/inject: yes" >&2
        exit 1
    fi
    grep -q 'ferrule.io/inject: "yes": unknown value' "$OUT/bad.log" || {
        echo "FAIL: ferrule inject's error does not name the annotation:" >&2
        cat "$OUT/bad.log" >&2
        exit 1
    }
    rm -f "$OUT/inject.log" "$OUT/bad.log"
fi

"$VENV/bin/python" "$K8S/validate.py" --versions "$VERSIONS" "$OUT"/*.yaml \
    "$ROOT"/control-plane/inject/tests/golden/expected/*.yaml
