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
        health checks, retries, stop grace period longer than the server's drain).
"""
import os
import re
import sys

import yaml

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


def split(src, core, crd):
    docs = load(src)
    core_docs = [d for d in docs if group(d) in BUILTIN_GROUPS]
    crd_docs = [d for d in docs if group(d) not in BUILTIN_GROUPS]
    for path, ds in ((core, core_docs), (crd, crd_docs)):
        with open(path, "w") as f:
            yaml.safe_dump_all(ds, f, sort_keys=False)
    for d in crd_docs:
        print(f"{d['apiVersion']} {d['kind']}/{d['metadata']['name']}")


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

    # Threads follow the CPU limit.
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

    # Probes.
    def probe(kind, want_path):
        p = c.get(kind)
        if not p:
            err(f"no {kind}")
            return
        hg = p.get("httpGet", {})
        if hg.get("path") != want_path:
            err(f"{kind} checks {hg.get('path')}, expected {want_path}")
        if hg.get("port") not in ports and hg.get("port") not in ports.values():
            err(f"{kind} port {hg.get('port')} is not a container port")
    probe("startupProbe", "/readyz")
    probe("readinessProbe", "/readyz")
    probe("livenessProbe", "/healthz")

    # Shutdown: preStop + the server's drain must fit in the grace period.
    pre = c.get("lifecycle", {}).get("preStop", {})
    pre_s = 0
    if "exec" in pre:
        cmd = pre["exec"]["command"]
        if cmd[0].endswith("sleep") and len(cmd) == 2:
            pre_s = float(cmd[1])
    elif "sleep" in pre:
        pre_s = float(pre["sleep"]["seconds"])
    else:
        err("no preStop delay (endpoints removal races with SIGTERM)")
    app_grace = float(env.get("FASTERNET_SHUTDOWN_GRACE_SECONDS", {}).get("value", 30))
    tgp = pod.get("terminationGracePeriodSeconds", 30)
    if not tgp > pre_s + app_grace:
        err(f"terminationGracePeriodSeconds {tgp} <= preStop {pre_s} + FASTERNET_SHUTDOWN_GRACE_SECONDS {app_grace}")
    print(f"  shutdown: preStop {pre_s:g}s + drain <= {app_grace:g}s < terminationGracePeriodSeconds {tgp}")

    # Security.
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
        err("runAsNonRoot is not set")
    if csc.get("readOnlyRootFilesystem") is not True:
        err("readOnlyRootFilesystem is not true")
    if csc.get("allowPrivilegeEscalation") is not False:
        err("allowPrivilegeEscalation is not false")
    if "ALL" not in csc.get("capabilities", {}).get("drop", []):
        err("capabilities do not drop ALL")

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
    print(f"  compose: {app.get('deploy', {}).get('replicas')} replicas, stop_grace_period {stop:g}s > drain {grace:g}s")


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
    else:
        raise SystemExit(__doc__)
    for e in errors:
        print(f"  ERROR: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
