#!/usr/bin/env python3
"""Checks on rendered Kubernetes manifests that a schema cannot express (needs PyYAML).

    manifests.py split RENDERED.yaml CORE.yaml CRD.yaml
        Writes the built-in-API documents to CORE.yaml (for kubernetes-validate) and the custom
        resources (monitoring.coreos.com, ...) to CRD.yaml; prints the CRD kinds.
    manifests.py check RENDERED.yaml
        Cross-object consistency: probes, shutdown timing, threads vs. CPU limit, security
        context, Service/HPA/PDB/ServiceMonitor wiring.
    manifests.py check-adapter ADAPTER_VALUES.yaml RENDERED.yaml
        The prometheus-adapter rule publishes the metric that the rendered HPA scales on.
    manifests.py check-compose COMPOSE.yaml
        compose.yaml, its haproxy.cfg and prometheus.yml agree (service names, ports, /readyz
        health checks, retries, stop grace period longer than the server's drain, the rule files
        prometheus.yml loads are mounted where it looks for them).
    manifests.py prometheusrule RULES.yaml
        Prints the PrometheusRule of deploy/k8s/overlays/prometheusrule: RULES.yaml's groups as
        its spec.groups (the text indented, comments kept).
    manifests.py check-alerts RULES.yaml TESTS.yaml RUNBOOK.md
        Every alert has `for:`, a severity, a summary, a description and a runbook annotation
        naming a heading of RUNBOOK.md; TESTS.yaml (promtool test rules) has, for every alert,
        a case where it fires and one where it does not.
    manifests.py check-kserve RENDERED.yaml
        The KServe ServingRuntime and InferenceService (deploy/kserve): what KServe's admission
        webhooks and controller would refuse or silently get wrong (runtime reference, model
        format, protocol, deployment mode), the server's flags against the container ports,
        probes on real routes, storageUri against the weights path, shutdown timing, threads,
        security context, autoscaling.
"""
import json
import os
import re
import sys

import yaml

# The alerting rules; a rendered PrometheusRule must hold exactly their groups.
ALERTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "monitoring", "alerts.yaml")
BUILTIN_GROUPS = {"", "apps", "autoscaling", "policy", "batch", "networking.k8s.io", "rbac.authorization.k8s.io"}
# Metrics the server exports that an HPA may sensibly scale on (per pod).
SERVER_METRICS = {"fasternet_queue_depth"}

errors = []


def err(msg):
    errors.append(msg)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def group(doc):
    api = doc.get("apiVersion", "")
    return api.split("/")[0] if "/" in api else ""


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def cpu_cores(q):
    q = str(q)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def quantity(q):
    """A Kubernetes resource quantity as a number (cpu in cores, memory in bytes)."""
    m = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(q))
    if not m:
        err(f"cannot read quantity {q!r}")
        return 0.0
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return float(m.group(1)) * scale


def split(src, core, crd):
    docs = load(src)
    core_docs = [d for d in docs if group(d) in BUILTIN_GROUPS]
    crd_docs = [d for d in docs if group(d) not in BUILTIN_GROUPS]
    for path, ds in ((core, core_docs), (crd, crd_docs)):
        with open(path, "w") as f:
            yaml.safe_dump_all(ds, f, sort_keys=False)
    for d in crd_docs:
        print(f"{d['apiVersion']} {d['kind']}/{d['metadata']['name']}")


# Routes the server answers (docs/api.md): readiness is 200 once warmed up and 503 while
# draining; liveness only says the process is alive.
READY_PATHS = {"/readyz", "/v2/health/ready"}
LIVE_PATHS = {"/healthz", "/v2/health/live"}


def check_probes(c, ports, ready=("/readyz",), live=("/healthz",), port_names=None):
    """Startup and readiness probes on a readiness route, liveness on a liveness route, each on
    a container port (one of port_names when given)."""
    for kind, want in (("startupProbe", ready), ("readinessProbe", ready), ("livenessProbe", live)):
        p = c.get(kind)
        if not p:
            err(f"no {kind}")
            continue
        hg = p.get("httpGet", {})
        if hg.get("path") not in want:
            err(f"{kind} checks {hg.get('path')}, expected {' or '.join(sorted(want))}")
        port = hg.get("port")
        if port not in ports and port not in ports.values():
            err(f"{kind} port {port} is not a container port")
        elif port_names is not None and port not in port_names and port not in [ports[n] for n in port_names]:
            err(f"{kind} port {port} is not the HTTP port {sorted(port_names)}")


def prestop_seconds(c):
    pre = c.get("lifecycle", {}).get("preStop", {})
    if "exec" in pre:
        cmd = pre["exec"]["command"]
        if cmd[0].endswith("sleep") and len(cmd) == 2:
            return float(cmd[1])
        return 0
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    err("no preStop delay (endpoints removal races with SIGTERM)")
    return 0


def check_shutdown(c, env, tgp):
    """preStop + the server's drain must fit in the grace period."""
    pre_s = prestop_seconds(c)
    app_grace = float(env.get("FASTERNET_SHUTDOWN_GRACE_SECONDS", {}).get("value", 30))
    if not tgp > pre_s + app_grace:
        err(f"terminationGracePeriodSeconds {tgp} <= preStop {pre_s} + FASTERNET_SHUTDOWN_GRACE_SECONDS {app_grace}")
    print(f"  shutdown: preStop {pre_s:g}s + drain <= {app_grace:g}s < terminationGracePeriodSeconds {tgp}")


def check_threads(c, env):
    """Threads follow the CPU limit."""
    limits = c.get("resources", {}).get("limits", {})
    if "cpu" not in limits:
        err("container has no CPU limit (FASTERNET_THREADS follows limits.cpu)")
    t = env.get("FASTERNET_THREADS", {}).get("valueFrom", {}).get("resourceFieldRef", {})
    if t.get("resource") != "limits.cpu" or t.get("containerName", c["name"]) != c["name"]:
        err("FASTERNET_THREADS is not taken from this container's limits.cpu")
    if str(t.get("divisor", "1")) not in ("1",):
        err("FASTERNET_THREADS divisor must be 1 (whole cores)")
    if "cpu" in limits and cpu_cores(limits["cpu"]) != int(cpu_cores(limits["cpu"])):
        print(f"  note: CPU limit {limits['cpu']} is fractional; FASTERNET_THREADS rounds it up")


def check_security(psc, csc):
    if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
        err("runAsNonRoot is not set")
    if csc.get("readOnlyRootFilesystem") is not True:
        err("readOnlyRootFilesystem is not true")
    if csc.get("allowPrivilegeEscalation") is not False:
        err("allowPrivilegeEscalation is not false")
    if "ALL" not in csc.get("capabilities", {}).get("drop", []):
        err("capabilities do not drop ALL")


def check(path):
    docs = load(path)
    deps = by_kind(docs, "Deployment")
    if len(deps) != 1:
        err(f"expected one Deployment, found {len(deps)}")
        return
    dep = deps[0]
    name = dep["metadata"]["name"]
    tmpl = dep["spec"]["template"]
    pod_labels = tmpl["metadata"].get("labels", {})
    pod = tmpl["spec"]
    if not matches(dep["spec"]["selector"]["matchLabels"], pod_labels):
        err("Deployment selector does not match its pod template labels")
    if "replicas" in dep["spec"] and by_kind(docs, "HorizontalPodAutoscaler"):
        err("Deployment sets spec.replicas although an HPA manages it (apply would fight the HPA)")
    c = pod["containers"][0]
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    env = {e["name"]: e for e in c.get("env", [])}

    check_threads(c, env)
    check_probes(c, ports)
    check_shutdown(c, env, pod.get("terminationGracePeriodSeconds", 30))
    check_security(pod.get("securityContext", {}), c.get("securityContext", {}))

    # Scraping.
    ann = tmpl["metadata"].get("annotations", {})
    monitors = by_kind(docs, "ServiceMonitor")
    if ann.get("prometheus.io/scrape") == "true":
        if int(ann.get("prometheus.io/port", -1)) not in ports.values():
            err("prometheus.io/port is not a container port")
        if monitors:
            err("both a ServiceMonitor and prometheus.io/scrape=true: every series scraped twice")
    elif not monitors:
        err("neither prometheus.io/scrape annotations nor a ServiceMonitor")

    # Service.
    svcs = by_kind(docs, "Service")
    for s in svcs:
        if not matches(s["spec"]["selector"], pod_labels):
            err(f"Service {s['metadata']['name']} selects no pod of the Deployment")
        for p in s["spec"]["ports"]:
            if p["targetPort"] not in ports and p["targetPort"] not in ports.values():
                err(f"Service port {p.get('name')} targets {p['targetPort']}, not a container port")

    # HPA and PDB.
    for h in by_kind(docs, "HorizontalPodAutoscaler"):
        ref = h["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) != ("Deployment", name):
            err(f"HPA targets {ref['kind']}/{ref['name']}, not Deployment/{name}")
        if h["spec"].get("minReplicas", 1) < 2:
            err("HPA minReplicas < 2: a single pod cannot be drained without downtime")
        for m in h["spec"]["metrics"]:
            if m["type"] == "Resource" and m["resource"]["name"] == "cpu" and "cpu" not in c.get("resources", {}).get("requests", {}):
                err("CPU-based HPA without a CPU request")
            if m["type"] == "Pods" and m["pods"]["metric"]["name"] not in SERVER_METRICS:
                err(f"HPA scales on unknown metric {m['pods']['metric']['name']}")
    for p in by_kind(docs, "PodDisruptionBudget"):
        if not matches(p["spec"]["selector"]["matchLabels"], pod_labels):
            err("PodDisruptionBudget selects no pod of the Deployment")

    # ServiceMonitor (a CRD, so no schema: check its wiring by hand).
    for m in monitors:
        if m["apiVersion"] != "monitoring.coreos.com/v1":
            err(f"ServiceMonitor apiVersion {m['apiVersion']}")
        sel = m["spec"]["selector"].get("matchLabels", {})
        targets = [s for s in svcs if matches(sel, s["metadata"].get("labels", {}))]
        if not targets:
            err("ServiceMonitor selects no Service")
        allowed = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels",
                   "sampleLimit", "targetLimit", "attachMetadata"}
        if set(m["spec"]) - allowed:
            err(f"ServiceMonitor spec has unknown fields {sorted(set(m['spec']) - allowed)}")
        for ep in m["spec"]["endpoints"]:
            names = {p.get("name") for s in targets for p in s["spec"]["ports"]}
            if ep.get("port") not in names:
                err(f"ServiceMonitor endpoint port {ep.get('port')} is not a named Service port {sorted(names)}")
            if ep.get("path", "/metrics") != "/metrics":
                err("ServiceMonitor path is not /metrics")
            for k in ("interval", "scrapeTimeout"):
                if k in ep and not re.fullmatch(r"(\d+(ms|s|m|h))+", ep[k]):
                    err(f"ServiceMonitor {k} {ep[k]!r} is not a duration")
        print(f"  ServiceMonitor/{m['metadata']['name']}: selects {[s['metadata']['name'] for s in targets]}, "
              f"ports {[ep.get('port') for ep in m['spec']['endpoints']]}")

    # PrometheusRule (a CRD too): the rule file's groups, picked up by the same Prometheus.
    for r in by_kind(docs, "PrometheusRule"):
        rname = r["metadata"]["name"]
        if r["apiVersion"] != "monitoring.coreos.com/v1":
            err(f"PrometheusRule apiVersion {r['apiVersion']}")
        if set(r["spec"]) != {"groups"}:
            err(f"PrometheusRule spec has fields {sorted(r['spec'])}, expected only groups")
        if r["spec"].get("groups") != yaml.safe_load(open(ALERTS))["groups"]:
            err(f"PrometheusRule/{rname} is not deploy/monitoring/alerts.yaml: regenerate it "
                "(manifests.py prometheusrule)")
        if not monitors:
            err(f"PrometheusRule/{rname} without a ServiceMonitor: the Prometheus Operator's Prometheus would not scrape what it alerts on")
        for m in monitors:
            if m["metadata"].get("labels", {}).get("release") != r["metadata"].get("labels", {}).get("release"):
                err(f"PrometheusRule/{rname} and ServiceMonitor/{m['metadata']['name']} carry different release labels")
        rules = [x for g in r["spec"].get("groups", []) for x in g.get("rules", [])]
        print(f"  PrometheusRule/{rname}: {len(rules)} rules, equal to deploy/monitoring/alerts.yaml")


def prometheusrule(rules_path):
    text = open(rules_path).read()
    body = text[text.index("\ngroups:") + 1:]
    print(f"""# GENERATED from deploy/monitoring/alerts.yaml (described in docs/monitoring.md): edit that file,
# then `python3 deploy/ci/manifests.py prometheusrule deploy/monitoring/alerts.yaml >
# deploy/k8s/overlays/prometheusrule/prometheusrule.yaml`; deploy/ci/lint.sh checks they agree.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: fasternet-serve
  labels:
    app.kubernetes.io/name: fasternet-serve
    # Like the ServiceMonitor's: set it to match your Prometheus' ruleSelector.
    release: prometheus
spec:""")
    print("".join("  " + line if line.strip() else line for line in body.splitlines(True)), end="")


def check_adapter(values_path, rendered):
    v = yaml.safe_load(open(values_path))
    rules = v.get("rules", {}).get("custom", [])
    published = {}
    for r in rules:
        for k in ("seriesQuery", "resources", "name", "metricsQuery"):
            if k not in r:
                err(f"adapter rule lacks {k}")
        for tmpl in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            if tmpl not in r.get("metricsQuery", ""):
                err(f"adapter metricsQuery lacks {tmpl}")
        ov = r.get("resources", {}).get("overrides", {})
        if ov.get("pod", {}).get("resource") != "pod" or ov.get("namespace", {}).get("resource") != "namespace":
            err("adapter rule does not map the pod and namespace labels")
        published[r["name"]["as"]] = r["seriesQuery"]
    wanted = [m["pods"]["metric"]["name"] for h in by_kind(load(rendered), "HorizontalPodAutoscaler")
              for m in h["spec"]["metrics"] if m["type"] == "Pods"]
    if not wanted:
        err("the rendered overlay has no Pods metric")
    for w in wanted:
        if w not in published:
            err(f"HPA wants {w}; the adapter publishes {sorted(published)}")
        elif w not in published[w]:
            err(f"adapter's seriesQuery for {w} does not read {w}")
    print(f"  adapter publishes {sorted(published)}; HPA scales on {wanted}")


def seconds(v):
    m = re.fullmatch(r"(\d+)(ms|s|m)?", str(v))
    if not m:
        err(f"cannot read duration {v!r}")
        return 0.0
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[m.group(2)]


def check_compose(path):
    base = os.path.dirname(os.path.abspath(path))
    c = yaml.safe_load(open(path))
    svcs = c.get("services", {})
    for s in ("fasternet", "haproxy", "prometheus"):
        if s not in svcs:
            err(f"compose has no service {s}")
    if errors:
        return
    app = svcs["fasternet"]
    grace = float(app.get("environment", {}).get("FASTERNET_SHUTDOWN_GRACE_SECONDS", 30))
    stop = seconds(app.get("stop_grace_period", "10s"))
    if not stop > grace:
        err(f"fasternet stop_grace_period {stop}s <= FASTERNET_SHUTDOWN_GRACE_SECONDS {grace}s")
    if app.get("deploy", {}).get("replicas", 1) < 2:
        err("fasternet runs fewer than 2 replicas")
    if "8080" not in [str(p) for p in app.get("expose", [])]:
        err("fasternet does not expose 8080")

    def mounted(svc, name):
        for v in svcs[svc].get("volumes", []):
            src = v.split(":")[0]
            if os.path.basename(src) == name:
                full = os.path.join(base, src)
                if not os.path.isfile(full):
                    err(f"{svc} mounts {src}, which does not exist")
                return full
        err(f"{svc} does not mount {name}")
        return None

    cfg = mounted("haproxy", "haproxy.cfg")
    if cfg:
        text = open(cfg).read()
        tmpl = re.search(r"^\s*server-template\s+\S+\s+\d+\s+(\S+):(\d+)", text, re.M)
        if not tmpl or tmpl.group(1) not in svcs or tmpl.group(2) != "8080":
            err("haproxy server-template does not point at the fasternet service's port 8080")
        for needle in (r"uri /readyz", r"http-check expect status 200", r"^\s*retries\s+[1-9]",
                       r"option redispatch", r"retry-on\s+all-retryable-errors", r"resolvers docker"):
            if not re.search(needle, text, re.M):
                err(f"haproxy.cfg lacks {needle!r}")
    prom = mounted("prometheus", "prometheus.yml")
    if prom:
        p = yaml.safe_load(open(prom))
        names = [n for j in p.get("scrape_configs", []) for sd in j.get("dns_sd_configs", []) for n in sd.get("names", [])]
        if "fasternet" not in names:
            err("prometheus.yml does not discover the fasternet replicas via dns_sd_configs")
        # Rule files are relative to the config file: the same relative path must lead to the
        # same file in the repository and, through the mounts, in the container.
        svc = svcs["prometheus"]
        config = next((a.split("=", 1)[1] for a in svc.get("command", []) if a.startswith("--config.file=")),
                      "/etc/prometheus/prometheus.yml")
        mounts = {}
        for v in svc.get("volumes", []):
            src, dst = v.split(":")[:2]
            mounts[os.path.normpath(dst)] = os.path.normpath(os.path.join(base, src))
        if mounts.get(os.path.normpath(config)) != os.path.normpath(prom):
            err(f"prometheus reads {config}, which is not where prometheus.yml is mounted")
        rule_files = p.get("rule_files") or []
        if not rule_files:
            err("prometheus.yml loads no rule_files (deploy/monitoring/alerts.yaml)")
        for rf in rule_files:
            here = os.path.normpath(os.path.join(os.path.dirname(prom), rf))
            there = os.path.normpath(os.path.join(os.path.dirname(config), rf))
            if not os.path.isfile(here):
                err(f"prometheus.yml rule_files {rf}: {here} does not exist")
            elif mounts.get(there) != here:
                err(f"prometheus.yml rule_files {rf} is {there} in the container, where compose.yaml "
                    f"mounts {mounts.get(there, 'nothing')} instead of {here}")
            else:
                print(f"  prometheus rule_files {rf}: {os.path.relpath(here)} mounted at {there}")
    print(f"  compose: {app.get('deploy', {}).get('replicas')} replicas, stop_grace_period {stop:g}s > drain {grace:g}s")


def anchor(heading):
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def check_alerts(rules_path, tests_path, runbook_path):
    rules = [r for g in yaml.safe_load(open(rules_path))["groups"] for r in g["rules"] if "alert" in r]
    tests = yaml.safe_load(open(tests_path))
    anchors = {anchor(m) for m in re.findall(r"^#+\s+(.*)$", open(runbook_path).read(), re.M)}
    fires, silent = set(), set()
    for t in tests.get("tests", []):
        for case in t.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    names = set()
    for r in rules:
        name = r["alert"]
        if name in names:
            err(f"alert {name} defined twice")
        names.add(name)
        if not r.get("for"):
            err(f"alert {name} has no for:")
        if r.get("labels", {}).get("severity") not in ("warning", "critical"):
            err(f"alert {name}: severity {r.get('labels', {}).get('severity')!r} is not warning or critical")
        ann = r.get("annotations", {})
        for k in ("summary", "description", "runbook"):
            if not ann.get(k):
                err(f"alert {name} has no {k} annotation")
        book = ann.get("runbook", "")
        if "#" not in book or book.split("#", 1)[1] not in anchors:
            err(f"alert {name}: runbook {book!r} is not a heading of {runbook_path}")
        if name not in fires:
            err(f"alert {name}: no test in {tests_path} where it fires")
        if name not in silent:
            err(f"alert {name}: no test in {tests_path} where it stays silent")
    for name in (fires | silent) - names:
        err(f"{tests_path} tests {name}, which {rules_path} does not define")
    if not errors:
        print(f"  {len(names)} alerts: each with for:, severity, summary, description, runbook in "
              f"{runbook_path}; each tested firing and silent")


# KServe (v0.20; pkg/constants and the v1beta1 validation webhook).
KSERVE_CONTAINER = "kserve-container"    # the runtime container the predictor.model merges into
KSERVE_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
KSERVE_STORAGE_PREFIXES = ("gs://", "s3://", "pvc://", "file://", "https://", "http://", "hdfs://",
                           "webhdfs://", "oci://", "oci+native://", "hf://")
KSERVE_MODEL_DIR = "/mnt/models"         # where the storage initializer puts storageUri
# Facts about the server (docs/api.md): it speaks the Open Inference Protocol over REST and
# gRPC, nothing older; these flags read FASTERNET_<NAME> when not given.
SERVER_PROTOCOLS = {"v2", "grpc-v2"}
IMAGE_ENV = {"FASTERNET_PORT": "8080"}   # the Dockerfile's ENV; no weights: the binary has the bundled model


def flags(args):
    """--name=value and --name value pairs of a `serve` command line."""
    out, i = {}, 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            out[k] = v
        elif a.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[a[2:]] = args[i + 1]
            i += 1
        elif a.startswith("--"):
            out[a[2:]] = "true"
        i += 1
    return out


def setting(fl, env, name):
    """What the server gets for --name: the flag, else FASTERNET_NAME, else the image's ENV."""
    key = "FASTERNET_" + name.upper().replace("-", "_")
    if name in fl:
        return fl[name]
    if key in env:
        return env[key].get("value")
    return IMAGE_ENV.get(key)


def is_grpc_port_name(name):
    # KServe's test for a gRPC port (service_reconciler.go, httproute_reconciler.go).
    return "grpc" in (name or "").lower() or "h2c" in (name or "").lower()


def merged_container(rt_c, model):
    """The predictor container KServe builds: the runtime's, with predictor.model's fields
    merged (env by name, resources by key) and its args appended. Other fields replace the
    runtime's here (KServe's strategic merge goes deeper; none of the checks depend on it)."""
    c = dict(rt_c)
    for k, v in model.items():
        if k in ("modelFormat", "runtime", "protocolVersion", "storageUri", "storage", "runtimeVersion"):
            continue
        if k == "args":
            c["args"] = list(rt_c.get("args", [])) + list(v)
        elif k == "env":
            env = {e["name"]: e for e in rt_c.get("env", [])}
            env.update({e["name"]: e for e in v})
            c["env"] = list(env.values())
        elif k == "resources":
            c["resources"] = {part: dict(rt_c.get("resources", {}).get(part, {}), **v.get(part, {}))
                              for part in set(rt_c.get("resources", {})) | set(v)}
        else:
            c[k] = v
    return c


def check_serving_runtime(rt):
    name = rt["metadata"]["name"]
    spec = rt["spec"]
    formats = {f["name"] for f in spec.get("supportedModelFormats", [])}
    if "fasternet" not in formats:
        err(f"ServingRuntime {name}: supportedModelFormats {sorted(formats)} lack fasternet")
    protos = set(spec.get("protocolVersions", []))
    if "v2" not in protos or protos - SERVER_PROTOCOLS:
        err(f"ServingRuntime {name}: protocolVersions {sorted(protos)}: the server speaks {sorted(SERVER_PROTOCOLS)}, v2 included")
    cs = [c for c in spec.get("containers", []) if c["name"] == KSERVE_CONTAINER]
    if len(cs) != 1:
        err(f"ServingRuntime {name}: no container named {KSERVE_CONTAINER} (KServe merges the predictor into it)")
        return None
    c = cs[0]
    text = json.dumps(c)
    for t in re.findall(r"{{.*?}}", text):
        # KServe renders the container as a Go template over the InferenceService's ObjectMeta.
        if not re.fullmatch(r"{{\s*\.(Name|Namespace|Labels\.\w+|Annotations\.\w+)\s*}}", t):
            err(f"ServingRuntime {name}: placeholder {t} is not a field of the InferenceService's metadata")
    image = c.get("image", "")
    if "@sha256:" not in image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
        err(f"ServingRuntime {name}: image {image} has no release tag (the kustomization's images: sets it)")
    args = c.get("args", [])
    if not args or args[0] != "serve":
        err(f"ServingRuntime {name}: args {args} do not start with the serve command")
    fl = flags(args[1:])
    env = {e["name"]: e for e in c.get("env", [])}
    if fl.get("model-name") != "{{.Name}}":
        err(f"ServingRuntime {name}: --model-name is {fl.get('model-name')!r}, not {{{{.Name}}}} "
            "(the v2 routes would not answer to the InferenceService's name)")
    if "weights" in fl or "FASTERNET_WEIGHTS" in env:
        err(f"ServingRuntime {name}: sets the weights; a flag here would override the InferenceService's "
            "FASTERNET_WEIGHTS for its storageUri")

    # Ports: the first is the REST port (KServe makes it the Service's port 80), a port named
    # grpc/h2c is the gRPC one, and the server's --port/--grpc-port must be exactly those.
    cports = c.get("ports", [])
    ports = {p.get("name"): p["containerPort"] for p in cports}
    http = [p for p in cports if not is_grpc_port_name(p.get("name"))]
    grpc = [p for p in cports if is_grpc_port_name(p.get("name"))]
    rest_port, grpc_port = setting(fl, env, "port"), setting(fl, env, "grpc-port")
    if not cports or is_grpc_port_name(cports[0].get("name")):
        err(f"ServingRuntime {name}: the first container port must be the REST one (KServe maps it to port 80)")
    if len(http) != 1 or str(http[0]["containerPort"]) != str(rest_port):
        err(f"ServingRuntime {name}: HTTP container ports {[p['containerPort'] for p in http]} != --port {rest_port}")
    if grpc_port in (None, "", "0"):
        if grpc or "grpc-v2" in protos:
            err(f"ServingRuntime {name}: gRPC port declared or grpc-v2 listed, but --grpc-port is not set")
    elif len(grpc) != 1 or str(grpc[0]["containerPort"]) != str(grpc_port):
        err(f"ServingRuntime {name}: --grpc-port {grpc_port} is not the one container port named grpc/h2c "
            f"{[(p.get('name'), p['containerPort']) for p in grpc]}")
    if grpc_port not in (None, "", "0") and str(grpc_port) == str(rest_port):
        err(f"ServingRuntime {name}: REST and gRPC on the same port {rest_port}")
    http_names = {p.get("name") for p in http}

    check_probes(c, ports, READY_PATHS, LIVE_PATHS, port_names=http_names)
    check_threads(c, env)
    csc = c.get("securityContext", {})
    if csc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        err(f"ServingRuntime {name}: no seccompProfile on the container (a ServingRuntime has no pod securityContext)")
    vols = {v["name"] for v in spec.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        if m["name"] not in vols:
            err(f"ServingRuntime {name}: volumeMount {m['name']} has no volume")
    if not any(m.get("mountPath") == "/tmp" for m in c.get("volumeMounts", [])) and csc.get("readOnlyRootFilesystem"):
        err(f"ServingRuntime {name}: read-only root filesystem without a writable /tmp")

    ann = spec.get("annotations", {})
    if ann.get("prometheus.io/scrape") == "true":
        if str(ann.get("prometheus.io/port")) != str(rest_port) or ann.get("prometheus.io/path", "/metrics") != "/metrics":
            err(f"ServingRuntime {name}: prometheus.io/port {ann.get('prometheus.io/port')} is not the REST port {rest_port}")
        if ann.get("serving.kserve.io/enable-prometheus-scraping") != "false":
            err(f"ServingRuntime {name}: serving.kserve.io/enable-prometheus-scraping is not \"false\": "
                "KServe would repoint prometheus.io/port at Knative's queue-proxy")
    print(f"  ServingRuntime/{name}: formats {sorted(formats)}, protocols {sorted(protos)}, "
          f"REST :{rest_port}, gRPC :{grpc_port}, --model-name={fl.get('model-name')}")
    return c


def runtime_supports(rt, fmt, explicit):
    # KServe's RuntimeSupportsModel: the format's name, or name:version when the model gives one;
    # without an explicit runtime only autoSelect formats count.
    labels = set()
    for f in rt["spec"].get("supportedModelFormats", []):
        if explicit or f.get("autoSelect"):
            labels.add(f["name"])
            if f.get("version") is not None:
                labels.add(f"{f['name']}:{f['version']}")
    want = fmt["name"] + (f":{fmt['version']}" if fmt.get("version") is not None else "")
    return want in labels


def check_inference_service(isvc, runtimes, runtime_containers):
    name = isvc["metadata"]["name"]
    ns = isvc["metadata"].get("namespace")
    if not KSERVE_NAME.fullmatch(name) or len(name) > 63 - len("-predictor"):
        err(f"InferenceService {name}: KServe wants [a-z]([-a-z0-9]*[a-z0-9])? and room for -predictor in 63 characters")
    pred = isvc["spec"]["predictor"]
    model = pred.get("model")
    if model is None:
        err(f"InferenceService {name}: no predictor.model (the runtime is selected through it)")
        return
    if "name" in model:
        err(f"InferenceService {name}: predictor.model.name is refused by KServe's webhook")
    fmt = model.get("modelFormat")
    if not fmt:
        err(f"InferenceService {name}: predictor.model has no modelFormat")
        return
    explicit = model.get("runtime")
    candidates = [r for r in runtimes if r["metadata"].get("namespace") == ns
                  and (explicit is None or r["metadata"]["name"] == explicit)]
    if explicit and not candidates:
        err(f"InferenceService {name}: runtime {explicit} is not a ServingRuntime here {sorted(r['metadata']['name'] for r in runtimes)}")
        return
    supporting = [r for r in candidates if runtime_supports(r, fmt, explicit is not None)
                  and not r["spec"].get("disabled")]
    if not supporting:
        err(f"InferenceService {name}: runtime {explicit or '(auto)'} does not support modelFormat {fmt}")
        return
    rt = supporting[0]
    rname = rt["metadata"]["name"]
    proto = model.get("protocolVersion")
    if proto and proto not in rt["spec"].get("protocolVersions", [proto]):
        err(f"InferenceService {name}: protocolVersion {proto} is not among runtime {rname}'s {rt['spec'].get('protocolVersions')}")
    rt_c = runtime_containers.get(rname)
    if rt_c is None:
        return

    mode = isvc["metadata"].get("annotations", {}).get("serving.kserve.io/deploymentMode")
    if len(rt_c.get("ports", [])) > 1 and mode not in ("Standard", "RawDeployment"):
        err(f"InferenceService {name}: runtime {rname} has {len(rt_c['ports'])} container ports; "
            f"Knative allows one, so serving.kserve.io/deploymentMode must be Standard (is {mode})")

    c = merged_container(rt_c, model)
    env = {e["name"]: e for e in c.get("env", [])}
    fl = flags(c.get("args", [])[1:])
    weights = setting(fl, env, "weights") or "(the bundled model)"
    uri = model.get("storageUri")
    if uri:
        if not uri.startswith(KSERVE_STORAGE_PREFIXES):
            err(f"InferenceService {name}: storageUri {uri} has a scheme KServe does not download")
        if not (weights == KSERVE_MODEL_DIR or weights.startswith(KSERVE_MODEL_DIR + "/")):
            err(f"InferenceService {name}: storageUri is set but the server loads {weights}, not {KSERVE_MODEL_DIR}")
    elif weights.startswith(KSERVE_MODEL_DIR):
        err(f"InferenceService {name}: the server loads {weights} but no storageUri fills {KSERVE_MODEL_DIR}")

    res = c.get("resources", {})
    for r, lim in res.get("limits", {}).items():
        if r in res.get("requests", {}) and quantity(res["requests"][r]) > quantity(lim):
            err(f"InferenceService {name}: {r} request {res['requests'][r]} > limit {lim} once merged with the runtime's")
    check_threads(c, env)
    check_shutdown(c, env, pred.get("terminationGracePeriodSeconds", 30))
    psc = pred.get("securityContext", {})
    check_security(psc, c.get("securityContext", {}))

    lo, hi = pred.get("minReplicas", 1), pred.get("maxReplicas", 0)
    if lo < 2:
        err(f"InferenceService {name}: minReplicas {lo} < 2: a single pod cannot be drained without downtime")
    if hi and hi < lo:
        err(f"InferenceService {name}: maxReplicas {hi} < minReplicas {lo}")
    metric, target = pred.get("scaleMetric", "cpu"), pred.get("scaleTarget")
    if metric == "cpu":
        if target is not None and not 1 <= target <= 100:
            err(f"InferenceService {name}: scaleTarget {target} is not a CPU percentage")
        if "cpu" not in c.get("resources", {}).get("requests", {}):
            err(f"InferenceService {name}: CPU autoscaling without a CPU request")
    for t in pred.get("topologySpreadConstraints", []):
        sel = t.get("labelSelector", {}).get("matchLabels", {})
        if sel.get("serving.kserve.io/inferenceservice", name) != name:
            err(f"InferenceService {name}: topologySpreadConstraints select another InferenceService's pods")
    print(f"  InferenceService/{name}: runtime {rname}, format {fmt['name']}, protocol {proto}, mode {mode}, "
          f"weights {weights}{' from ' + uri if uri else ' (bundled)'}, replicas {lo}-{hi}")


def check_kserve(path):
    docs = load(path)
    runtimes = by_kind(docs, "ServingRuntime")
    isvcs = by_kind(docs, "InferenceService")
    if not runtimes or not isvcs:
        err(f"expected a ServingRuntime and an InferenceService, found {len(runtimes)} and {len(isvcs)}")
    containers = {}
    for rt in runtimes:
        c = check_serving_runtime(rt)
        if c is not None:
            containers[rt["metadata"]["name"]] = c
    for isvc in isvcs:
        check_inference_service(isvc, runtimes, containers)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "split":
        split(*args)
    elif cmd == "check":
        check(*args)
    elif cmd == "check-adapter":
        check_adapter(*args)
    elif cmd == "check-compose":
        check_compose(*args)
    elif cmd == "check-alerts":
        check_alerts(*args)
    elif cmd == "prometheusrule":
        prometheusrule(*args)
    elif cmd == "check-kserve":
        check_kserve(*args)
    else:
        raise SystemExit(__doc__)
    for e in errors:
        print(f"  ERROR: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
