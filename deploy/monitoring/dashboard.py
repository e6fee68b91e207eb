#!/usr/bin/env python3
"""The fasternet-serve Grafana dashboard (dashboard.json beside this file), made with grafanalib.

    python3 dashboard.py generate > dashboard.json    # needs grafanalib (version pinned below)
    python3 dashboard.py lint dashboard.json          # stdlib only
    python3 dashboard.py promql dashboard.json OUT    # stdlib only

Edit this file, not the JSON, then regenerate; deploy/ci/lint.sh fails when the committed JSON
differs byte for byte from what `generate` prints with the pinned versions:

    python3 -m venv /tmp/grafanalib && /tmp/grafanalib/bin/pip install grafanalib==0.7.1 attrs==26.1.0
    /tmp/grafanalib/bin/python deploy/monitoring/dashboard.py generate > deploy/monitoring/dashboard.json

`lint` checks the JSON: every panel has the templated Prometheus datasource and queries with a
non-empty expression, every `$variable` is defined, panels do not overlap. `promql` writes every
panel query and variable query as a recording rule (Grafana's variables replaced by plain values)
so that `promtool check rules OUT` parses each one. tests/monitoring.rs checks that every metric
and label the queries use exists on a running server.

Every panel is described in docs/monitoring.md.
"""
import json
import re
import sys

# Pinned for `generate`; lint.sh installs exactly these (pip_venv).
GRAFANALIB_VERSION = "0.7.1"
ATTRS_VERSION = "26.1.0"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The series of the selected scrape targets.
SEL = 'job=~"$job", instance=~"$instance"'
# API traffic: without the probes and the scrapes (they answer 503 on purpose while draining).
API = 'route!~"/healthz|/readyz|/metrics|/v2/health/.+|/v2/models/.+/ready"'
# The routes that run the model.
INFER = 'route=~"/classify|/embed|/v2/models/.+/infer"'
# cAdvisor and kube-state-metrics series of the selected pods (by the namespace and pod labels the
# Kubernetes scrape puts on the server's series); no pod-level (container="") or pause container.
POD = 'namespace=~"$namespace", pod=~"$pod", container!="", container!="POD"'
RATE = "$__rate_interval"

# Grafana's own variables, and what `promql` puts in their place.
BUILTIN_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


def rate(metric, selector, by=None):
    inner = f"rate({metric}{{{selector}}}[{RATE}])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def quantile(q, histogram, selector, by=""):
    keep = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({keep}) (rate({histogram}_bucket{{{selector}}}[{RATE}])))"


def build():
    from grafanalib.core import (
        GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR,
        Dashboard,
        GridPos,
        RowPanel,
        Stat,
        Target,
        Template,
        Templating,
        Time,
        TimeSeries,
    )

    def targets(*queries):
        """(expr, legend) pairs as targets A, B, C, ..."""
        return [
            Target(expr=e, legendFormat=legend, refId=chr(ord("A") + i), datasource=DATASOURCE,
                   intervalFactor=1)
            for i, (e, legend) in enumerate(queries)
        ]

    def series(title, description, queries, unit="short", label="", thresholds=None, stack=False):
        steps = [{"color": "green", "value": None}] + [{"color": "red", "value": t} for t in thresholds or []]
        return TimeSeries(
            title=title, description=description, dataSource=DATASOURCE, targets=targets(*queries),
            unit=unit, axisLabel=label, maxDataPoints=None, legendDisplayMode="table",
            legendCalcs=["mean", "max", "lastNotNull"], tooltipMode="multi", tooltipSort="desc",
            thresholds=steps, thresholdsStyleMode="dashed" if thresholds else "off",
            stacking={"mode": "normal", "group": "A"} if stack else {},
            fillOpacity=20 if stack else 0)

    def stat(title, description, queries, unit="short", thresholds=None, text_mode="auto",
             reduce="lastNotNull"):
        steps = [{"color": "green", "value": None}] + [{"color": "red", "value": t} for t in thresholds or []]
        return Stat(
            title=title, description=description, dataSource=DATASOURCE, targets=targets(*queries),
            format=unit, thresholds=steps, textMode=text_mode, reduceCalc=reduce,
            color={"mode": "thresholds"} if thresholds else {"mode": "fixed", "fixedColor": "text"},
            graphMode="none" if text_mode == "name" else "area", maxDataPoints=None,
            colorMode="value" if thresholds else "none", noValue="no data")

    def query_variable(name, label, query):
        return Template(name=name, label=label, query=query, dataSource=DATASOURCE,
                        includeAll=True, multi=True, refresh=2, sort=1)

    req = "fasternet_http_requests_total"
    dur = "fasternet_http_request_duration_seconds"
    api_total = rate(req, f"{SEL}, {API}")
    api_5xx = rate(req, f'{SEL}, {API}, status=~"5..", status!="503"')
    api_503 = rate(req, f'{SEL}, {API}, status="503"')
    rows = [
        ("Overview", 4, [
            (4, stat("Requests/s", "HTTP API requests answered per second, all replicas selected "
                     "(probes and /metrics scrapes left out).",
                     [(api_total, "req/s")], unit="reqps")),
            (4, stat("5xx share (503 apart)", "Share of API requests answered 500 (inference failed) "
                     "or 504 (request timeout). Alert FasternetHighErrorRate above 1%.",
                     [(f"{api_5xx} / {api_total}", "5xx")], unit="percentunit", thresholds=[0.01])),
            (4, stat("503 share", "Share of API requests answered 503: queue full, memory busy or "
                     "draining. Alert FasternetServiceUnavailable above 5%.",
                     [(f"{api_503} / {api_total}", "503")], unit="percentunit", thresholds=[0.05])),
            (4, stat("p99 latency, inference", "99th percentile of the time from request to response "
                     "on /classify, /embed and the v2 infer routes. Alert FasternetHighLatencyP99 above 1 s.",
                     [(quantile(0.99, dur, f"{SEL}, {INFER}"), "p99")], unit="s", thresholds=[1])),
            (3, stat("Targets up", "Scrape targets of the selected jobs and instances that "
                     "Prometheus reached at the last scrape (its `up` series).",
                     [(f"sum(up{{{SEL}}})", "up")])),
            (5, stat("Model and version", "The served model (fasternet_model_info) and the server's "
                     "version (fasternet_build_info) on the selected replicas.",
                     [(f"max by (model, architecture, input_size) (fasternet_model_info{{{SEL}}})",
                       "{{model}} ({{architecture}}, {{input_size}})"),
                      (f"max by (version) (fasternet_build_info{{{SEL}}})", "fasternet-serve {{version}}")],
                     text_mode="name")),
        ]),
        ("Traffic", 8, [
            (12, series("API request rate by status", "HTTP API requests per second by status code "
                        "(probes and scrapes left out). 503: overload or draining; 499: the client "
                        "hung up; 4xx: the client's mistake.",
                        [(rate(req, f"{SEL}, {API}", "status"), "{{status}}")], unit="reqps", stack=True)),
            (12, series("Request rate by route", "HTTP requests per second by route, probes and "
                        "scrapes included (`unmatched`: no route, answered 404).",
                        [(rate(req, SEL, "route"), "{{route}}")], unit="reqps", stack=True)),
            (12, series("Images processed by route", "Images that went through the model per second, "
                        "by route or gRPC method (a request may carry several).",
                        [(rate("fasternet_images_processed_total", SEL, "route"), "{{route}}")],
                        label="images/s", stack=True)),
            (12, series("gRPC calls by code", "gRPC ModelInfer calls answered per second, by gRPC "
                        "status (empty unless the server runs with --grpc-port).",
                        [(rate("fasternet_grpc_requests_total", SEL, "method, code"), "{{code}}")],
                        unit="reqps", stack=True)),
        ]),
        ("Latency", 8, [
            (12, series("Request latency, inference routes", "Time from request to response on "
                        "/classify, /embed and the v2 infer routes: p50, p90, p99 over the selected "
                        "replicas (histogram buckets 1 ms to 30 s). Dashed: the alert's 1 s.",
                        [(quantile(q, dur, f"{SEL}, {INFER}"), f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)],
                        unit="s", thresholds=[1])),
            (12, series("p99 latency by route", "99th percentile of the request latency per route, "
                        "probes and scrapes included.",
                        [(quantile(0.99, dur, SEL, "route"), "{{route}}")], unit="s")),
            (6, series("Queue wait", "Time an image waited in the queue before its forward pass: "
                       "grows when the replica is short of compute.",
                       [(quantile(q, "fasternet_queue_wait_seconds", SEL), f"p{round(q * 100)}") for q in (0.5, 0.99)],
                       unit="s")),
            (6, series("Forward pass", "Duration of one batched forward pass (the model's compute), "
                       "p50, p99 and mean.",
                       [(quantile(q, "fasternet_inference_duration_seconds", SEL), f"p{round(q * 100)}") for q in (0.5, 0.99)]
                       + [(f"sum(rate(fasternet_inference_duration_seconds_sum{{{SEL}}}[{RATE}])) / "
                           f"sum(rate(fasternet_inference_duration_seconds_count{{{SEL}}}[{RATE}]))", "mean")],
                       unit="s")),
            (6, series("Preprocessing per image", "Decode, resize, crop and normalise of one image, "
                       "p50 and p99: grows with the uploads' size.",
                       [(quantile(q, "fasternet_preprocess_duration_seconds", SEL), f"p{round(q * 100)}") for q in (0.5, 0.99)],
                       unit="s")),
            (6, series("gRPC latency", "Time from gRPC ModelInfer call to answer, p50 and p99.",
                       [(quantile(q, "fasternet_grpc_request_duration_seconds", SEL, "method"), f"p{round(q * 100)}")
                        for q in (0.5, 0.99)], unit="s")),
        ]),
        ("Queue and batching", 8, [
            (12, series("Queue depth", "Images admitted and not yet in a forward pass, per replica, "
                        "at each scrape. Past --queue-capacity (256 by default) requests get 503 "
                        "queue_full; dashed: the FasternetQueueNearlyFull threshold (192).",
                        [(f"fasternet_queue_depth{{{SEL}}}", "{{instance}}")], label="images",
                        thresholds=[192])),
            (12, series("Batch size", "Images per forward pass: mean, p50 and p90. Near "
                        "--max-batch-size under load; 1 when idle.",
                        [(f"sum(rate(fasternet_batch_size_sum{{{SEL}}}[{RATE}])) / "
                          f"sum(rate(fasternet_batch_size_count{{{SEL}}}[{RATE}]))", "mean")]
                        + [(quantile(q, "fasternet_batch_size", SEL), f"p{round(q * 100)}") for q in (0.5, 0.9)],
                        label="images")),
            (12, series("Rejections by reason", "Requests answered with an error per second, by "
                        "reason (the error code): queue_full, server_busy, shutting_down are the 503s; "
                        "gRPC rejections included.",
                        [(rate("fasternet_rejections_total", SEL, "reason"), "{{reason}}")], unit="reqps",
                        stack=True)),
            (12, series("Dropped work", "Per second: queued images dropped before compute because "
                        "their caller had gone (cancelled), forward passes that failed or panicked "
                        "(worker failures), connections closed for a request head that came too slowly "
                        "(header timeouts).",
                        [(rate("fasternet_cancelled_images_total", SEL), "cancelled images"),
                         (rate("fasternet_worker_failures_total", SEL), "worker failures"),
                         (rate("fasternet_header_timeouts_total", SEL), "header timeouts")], label="per second")),
        ]),
        ("Replicas, memory and connections", 8, [
            (8, series("Replicas", "Scrape targets up and in all (Prometheus' `up`); pods ready "
                       "from kube-state-metrics (kube_pod_status_ready; Kubernetes only).",
                       [(f"sum by (job) (up{{{SEL}}})", "{{job}}: targets up"),
                        (f"count by (job) (up{{{SEL}}})", "{{job}}: targets"),
                        ('sum(kube_pod_status_ready{namespace=~"$namespace", pod=~"$pod", condition="true"})',
                         "pods ready")], label="replicas")),
            (8, series("Memory for requests", "Per replica: bytes reserved by requests in progress, "
                       "the request pool they reserve from (a 503 server_busy when it stays full), "
                       "and the process' whole budget (--memory-budget).",
                       [(f"fasternet_memory_reserved_bytes{{{SEL}}}", "{{instance}} reserved"),
                        (f"fasternet_memory_request_pool_bytes{{{SEL}}}", "{{instance}} pool"),
                        (f"fasternet_memory_budget_bytes{{{SEL}}}", "{{instance}} budget")], unit="bytes")),
            (8, series("Open connections", "Open HTTP connections per replica (at most "
                       "--max-connections, 512 by default).",
                       [(f"fasternet_open_connections{{{SEL}}}", "{{instance}}")], label="connections")),
        ]),
        ("Pod resources (cAdvisor, kube-state-metrics)", 8, [
            (12, series("Pod CPU", "CPU cores used per container (cAdvisor's "
                        "container_cpu_usage_seconds_total) against the container's limit "
                        "(kube-state-metrics' kube_pod_container_resource_limits). Kubernetes only; "
                        "not exported by the server.",
                        [(f"sum by (pod, container) (rate(container_cpu_usage_seconds_total{{{POD}}}[{RATE}]))",
                          "{{pod}}/{{container}}"),
                         (f'max by (pod, container) (kube_pod_container_resource_limits{{{POD}, resource="cpu"}})',
                          "{{pod}}/{{container}} limit")], label="cores")),
            (12, series("Pod memory", "Working set per container (cAdvisor's "
                        "container_memory_working_set_bytes, what the OOM killer compares with the "
                        "limit) against its limit (kube-state-metrics). Alert FasternetMemoryNearLimit "
                        "at 90%. Kubernetes only; not exported by the server.",
                        [(f"max by (pod, container) (container_memory_working_set_bytes{{{POD}}})",
                          "{{pod}}/{{container}}"),
                         (f'max by (pod, container) (kube_pod_container_resource_limits{{{POD}, resource="memory"}})',
                          "{{pod}}/{{container}} limit")], unit="bytes")),
        ]),
    ]

    panels, y = [], 0
    for title, height, row in rows:
        panels.append(RowPanel(title=title, gridPos=GridPos(h=1, w=24, x=0, y=y)))
        y += 1
        x = 0
        for width, panel in row:
            if x + width > 24:
                x, y = 0, y + height
            panels.append(panel)
            panel.gridPos = GridPos(h=height, w=width, x=x, y=y)
            x += width
        y += height

    build_info = 'fasternet_build_info{job=~"$job", instance=~"$instance"}'
    return Dashboard(
        title="fasternet-serve",
        uid="fasternet-serve",
        description="fasternet-serve: traffic, latency, queue and batching, rejections, replicas, "
                    "memory; pod CPU and memory from cAdvisor and kube-state-metrics. "
                    "Generated by deploy/monitoring/dashboard.py; described in docs/monitoring.md.",
        tags=["fasternet-serve", "prometheus"],
        timezone="browser",
        refresh="30s",
        time=Time("now-3h", "now"),
        graphTooltip=GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR,
        schemaVersion=39,
        templating=Templating(list=[
            Template(name="datasource", label="Data source", query="prometheus", type="datasource"),
            query_variable("job", "Job", "label_values(fasternet_build_info, job)"),
            query_variable("instance", "Instance", 'label_values(fasternet_build_info{job=~"$job"}, instance)'),
            query_variable("namespace", "Namespace", f"label_values({build_info}, namespace)"),
            query_variable("pod", "Pod",
                           'label_values(fasternet_build_info{job=~"$job", instance=~"$instance", '
                           'namespace=~"$namespace"}, pod)'),
        ]),
        panels=panels,
    ).auto_panel_ids()


def generate():
    import importlib.metadata as md

    for package, want in (("grafanalib", GRAFANALIB_VERSION), ("attrs", ATTRS_VERSION)):
        if md.version(package) != want:
            sys.exit(f"{package} {md.version(package)} is installed; the committed JSON is made with {want}")
    from grafanalib._gen import write_dashboard

    write_dashboard(build(), sys.stdout)


# ---- checks on the JSON (stdlib only) ------------------------------------------------------

def panels_of(dashboard):
    """Every panel, those inside collapsed rows too."""
    for p in dashboard.get("panels", []):
        yield p
        yield from p.get("panels", [])


def queries(dashboard):
    """(where, PromQL) for every panel target and every query variable."""
    for p in panels_of(dashboard):
        for t in p.get("targets", []):
            yield f"panel {p.get('title')!r} target {t.get('refId')}", t.get("expr", "")
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"] if isinstance(v["query"], str) else v["query"].get("query", "")
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", q, re.S)
            # label_values(selector, label) is Grafana's; the selector inside is PromQL.
            yield f"variable {v['name']}", m.group(1) if m else q


def lint(path):
    errors = []
    with open(path) as f:
        dashboard = json.load(f)
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        errors.append("no `datasource` variable of type datasource for Prometheus")
    for name in ("job", "instance"):
        if variables.get(name, {}).get("type") != "query":
            errors.append(f"no `{name}` query variable")
    for name, v in variables.items():
        if v.get("type") == "query" and v.get("datasource") != DATASOURCE:
            errors.append(f"variable {name}: datasource {v.get('datasource')} is not {DATASOURCE}")
    ids, cells, n = set(), {}, 0
    for p in panels_of(dashboard):
        title = p.get("title") or "(untitled)"
        if p.get("id") in ids:
            errors.append(f"panel {title!r}: id {p.get('id')} used twice")
        ids.add(p.get("id"))
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in "hwxy") or g["x"] + g["w"] > 24:
            errors.append(f"panel {title!r}: gridPos {g} is not within the 24 columns")
        else:
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    if (x, y) in cells:
                        errors.append(f"panel {title!r} overlaps {cells[(x, y)]!r} at {x},{y}")
                    cells[(x, y)] = title
        if p.get("type") == "row":
            continue
        n += 1
        if not p.get("title") or not p.get("description"):
            errors.append(f"panel {title!r}: no title or no description")
        if p.get("datasource") != DATASOURCE:
            errors.append(f"panel {title!r}: datasource {p.get('datasource')} is not {DATASOURCE}")
        if not p.get("targets"):
            errors.append(f"panel {title!r}: no targets")
        for t in p.get("targets", []):
            if not (t.get("expr") or "").strip():
                errors.append(f"panel {title!r} target {t.get('refId')}: empty expr")
            if t.get("datasource") != DATASOURCE:
                errors.append(f"panel {title!r} target {t.get('refId')}: datasource {t.get('datasource')}")
    for where, q in queries(dashboard):
        for name in re.findall(r"\$\{?(\w+)", q):
            if name not in variables and name not in BUILTIN_VARIABLES:
                errors.append(f"{where}: ${name} is not a variable of the dashboard")
    for e in errors:
        print(f"  ERROR: {e}")
    if not errors:
        print(f"  {path}: {n} panels, {len(variables)} variables, {sum(1 for _ in queries(dashboard))} queries: OK")
    return 1 if errors else 0


def promql(path, out):
    """Every query as a recording rule, the variables replaced, for `promtool check rules`."""
    with open(path) as f:
        dashboard = json.load(f)
    values = dict(BUILTIN_VARIABLES, datasource="prometheus")
    values.update({v["name"]: ".*" for v in dashboard["templating"]["list"] if v["type"] == "query"})
    rules = []
    for i, (where, q) in enumerate(queries(dashboard)):
        expr = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], q)
        rules.append({"record": f"dashboard:query:{i}", "expr": expr, "labels": {"where": where}})
    with open(out, "w") as f:
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, indent=1)    # JSON is YAML
    print(f"  {len(rules)} queries written to {out}")
    return 0


def main():
    cmd, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if cmd == "generate" and not args:
        return generate()
    if cmd == "lint" and len(args) == 1:
        return lint(*args)
    if cmd == "promql" and len(args) == 2:
        return promql(*args)
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main())
