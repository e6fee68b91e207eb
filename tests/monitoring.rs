//! The monitoring files against a running server: every metric that the Grafana dashboard
//! (deploy/monitoring/dashboard.json) and the alerting rules (deploy/monitoring/alerts.yaml)
//! query must be one that `/metrics` exports, with the labels their selectors, `by (...)` /
//! `on (...)` clauses and legends use. Series from other exporters are allowed only when listed
//! in [`EXTERNAL`], with where they come from. A renamed metric or label then fails here instead
//! of leaving an empty panel or an alert that can never fire.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::{small_png, Server};

/// Series the queries use that the server does not export: (name, where it comes from, the
/// labels it carries that the queries may use).
const EXTERNAL: &[(&str, &str, &[&str])] = &[
    ("up", "Prometheus itself: 1 when the last scrape of a target succeeded", &[]),
    (
        "container_cpu_usage_seconds_total",
        "cAdvisor (the kubelet's /metrics/cadvisor)",
        &["namespace", "pod", "container"],
    ),
    (
        "container_memory_working_set_bytes",
        "cAdvisor (the kubelet's /metrics/cadvisor)",
        &["namespace", "pod", "container"],
    ),
    (
        "kube_pod_container_resource_limits",
        "kube-state-metrics",
        &["namespace", "pod", "container", "resource", "unit"],
    ),
    ("kube_pod_status_ready", "kube-state-metrics", &["namespace", "pod", "condition"]),
    ("kube_deployment_spec_replicas", "kube-state-metrics", &["namespace", "deployment"]),
    (
        "kube_deployment_status_replicas_available",
        "kube-state-metrics",
        &["namespace", "deployment"],
    ),
];

/// Labels a scrape puts on every series of a target: `job` and `instance` always; `namespace`
/// and `pod` from the Kubernetes scrape configs (the ServiceMonitor and the usual
/// annotation-based job), which the pod panels and the memory alert join on.
const TARGET_LABELS: &[&str] = &["job", "instance", "namespace", "pod"];

/// PromQL's aggregation operators and keywords: never metric names.
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
];
/// Keywords followed by a list of label names.
const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str,
    Punct(char),
    Other,
}

fn tokens(q: &str) -> Vec<Tok> {
    let c: Vec<char> = q.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let word = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '#' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if matches!(ch, '"' | '\'' | '`') {
            i += 1;
            while i < c.len() && c[i] != ch {
                i += if c[i] == '\\' && ch != '`' { 2 } else { 1 };
            }
            i += 1;
            out.push(Tok::Str);
        } else if ch == '[' {
            // A range or a subquery: durations and Grafana's $__rate_interval.
            while i < c.len() && c[i] != ']' {
                i += 1;
            }
            i += 1;
            out.push(Tok::Other);
        } else if ch == '$' {
            // A Grafana variable, $name or ${name}.
            i += 1;
            if c.get(i) == Some(&'{') {
                while i < c.len() && c[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < c.len() && word(c[i]) {
                    i += 1;
                }
            }
            out.push(Tok::Other);
        } else if ch.is_ascii_digit() || ch == '.' {
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                i += 1;
            }
            out.push(Tok::Other);
        } else if word(ch) {
            let start = i;
            while i < c.len() && word(c[i]) {
                i += 1;
            }
            out.push(Tok::Ident(c[start..i].iter().collect()));
        } else {
            out.push(Tok::Punct(ch));
            i += 1;
        }
    }
    out
}

/// What one query uses: each metric with the labels its selector matches on, and the labels
/// of its grouping clauses.
#[derive(Debug, Default)]
struct Uses {
    metrics: Vec<(String, Vec<String>)>,
    grouping: BTreeSet<String>,
}

fn uses(q: &str) -> Uses {
    let t = tokens(q);
    let mut u = Uses::default();
    let open = Tok::Punct('(');
    let mut i = 0;
    // Label names in `{...}` from t[i] = '{'; returns them and the index after '}'.
    let matchers = |mut i: usize| {
        let mut labels = Vec::new();
        i += 1;
        let mut expect_name = true;
        while i < t.len() && t[i] != Tok::Punct('}') {
            match &t[i] {
                Tok::Ident(name) if expect_name => {
                    labels.push(name.clone());
                    expect_name = false;
                }
                Tok::Punct(',') => expect_name = true,
                _ => {}
            }
            i += 1;
        }
        (labels, i + 1)
    };
    while i < t.len() {
        match &t[i] {
            Tok::Ident(id) if GROUPING.contains(&id.to_lowercase().as_str()) => {
                i += 1;
                if t.get(i) == Some(&open) {
                    while i < t.len() && t[i] != Tok::Punct(')') {
                        if let Tok::Ident(label) = &t[i] {
                            u.grouping.insert(label.clone());
                        }
                        i += 1;
                    }
                }
            }
            Tok::Ident(id) if KEYWORDS.contains(&id.to_lowercase().as_str()) => i += 1,
            // A function call.
            Tok::Ident(_) if t.get(i + 1) == Some(&open) => i += 1,
            Tok::Ident(metric) => {
                let (labels, next) = if t.get(i + 1) == Some(&Tok::Punct('{')) {
                    matchers(i + 1)
                } else {
                    (Vec::new(), i + 1)
                };
                u.metrics.push((metric.clone(), labels));
                i = next;
            }
            // A selector without a metric name.
            Tok::Punct('{') => i = matchers(i).1,
            _ => i += 1,
        }
    }
    u
}

/// The metric families of a /metrics text and their label names (`le` for histograms).
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let histograms: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" histogram"))
        .collect();
    let mut families: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|base| histograms.contains(base))
            .unwrap_or(name);
        let labels = families.entry(family.to_string()).or_default();
        if line[end..].starts_with('{') {
            // name="value",...} with escapes in the values.
            let mut rest = &line[end + 1..];
            while let Some(eq) = rest.find("=\"") {
                labels.insert(rest[..eq].trim_start_matches(',').trim().to_string());
                let mut j = eq + 2;
                let bytes = rest.as_bytes();
                while bytes[j] != b'"' {
                    j += if bytes[j] == b'\\' { 2 } else { 1 };
                }
                rest = &rest[j + 1..];
                if rest.starts_with('}') {
                    break;
                }
            }
        }
    }
    families
}

/// The family a queried name belongs to (`x_bucket` of a histogram is `x`).
fn family<'a>(name: &'a str, exported: &BTreeMap<String, BTreeSet<String>>) -> &'a str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|s| name.strip_suffix(s))
        .find(|base| exported.get(*base).is_some_and(|labels| labels.contains("le")))
        .unwrap_or(name)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// (where, PromQL, legend) of every panel target and the selector of every variable query.
fn dashboard_queries(json: &serde_json::Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut panels: Vec<&serde_json::Value> = Vec::new();
    for p in json["panels"].as_array().expect("panels") {
        panels.push(p);
        panels.extend(p["panels"].as_array().into_iter().flatten());
    }
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or_default();
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "panel {title:?}: a target without expr");
            let legend = t["legendFormat"].as_str().unwrap_or_default();
            out.push((format!("dashboard panel {title:?}"), expr.to_string(), legend.to_string()));
        }
    }
    for v in json["templating"]["list"].as_array().expect("templating") {
        if v["type"] == "query" {
            let q = v["query"].as_str().or(v["query"]["query"].as_str()).unwrap_or_default();
            // Grafana's label_values(SELECTOR, LABEL): the label counts as a legend label.
            let inner = q.trim().strip_prefix("label_values(").and_then(|r| r.strip_suffix(')'));
            let (selector, label) = inner
                .and_then(|r| r.rsplit_once(','))
                .map(|(s, l)| (s.to_string(), format!("{{{{{}}}}}", l.trim())))
                .unwrap_or((q.to_string(), String::new()));
            out.push((format!("dashboard variable {}", v["name"]), selector, label));
        }
    }
    out
}

/// (where, PromQL) of every rule and the names the rules record. The rule file keeps to a
/// subset of YAML that this reads line by line: `expr: |` blocks or one-line plain expressions.
fn rule_queries(yaml: &str) -> (Vec<(String, String)>, BTreeSet<String>) {
    let lines: Vec<&str> = yaml.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let (mut out, mut recorded, mut rules) = (Vec::new(), BTreeSet::new(), 0);
    let mut name = String::new();
    for (n, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start().trim_start_matches("- ");
        if let Some(alert) = trimmed.strip_prefix("alert:") {
            name = format!("alert {}", alert.trim());
            rules += 1;
        } else if let Some(record) = trimmed.strip_prefix("record:") {
            name = format!("recording rule {}", record.trim());
            recorded.insert(record.trim().to_string());
            rules += 1;
        } else if let Some(expr) = trimmed.strip_prefix("expr:") {
            let expr = expr.trim();
            let text = if expr.starts_with(['|', '>']) {
                let block: Vec<&str> = lines[n + 1..]
                    .iter()
                    .take_while(|l| l.trim().is_empty() || indent(l) > indent(line))
                    .copied()
                    .collect();
                block.join("\n")
            } else {
                assert!(!expr.starts_with(['"', '\'']), "{name}: write expr as a block or plain");
                expr.to_string()
            };
            assert!(!text.trim().is_empty(), "{name}: empty expr");
            out.push((format!("rules: {name}"), text));
        }
    }
    assert_eq!(out.len(), rules, "every alert and recording rule has one expr");
    (out, recorded)
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_exported_metrics_and_labels() {
    let s = Server::start(&["--grpc-port", "0"]).await;
    let client = reqwest::Client::new();
    // Labelled series exist only once something was counted under the label: a classified
    // image (route, status, images), a rejected one (reason), a gRPC call (method, code).
    let ok = client
        .post(s.url("/classify"))
        .header("content-type", "image/png")
        .body(small_png(3))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let bad = client
        .post(s.url("/classify"))
        .header("content-type", "image/png")
        .body(&b"not an image"[..])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    let grpc_called = common::tritonclient_model_infer(&s, None).await;

    let text = client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let exported = exported(&text);
    let mut excused = BTreeSet::new();
    if !grpc_called {
        excused
            .extend(["fasternet_grpc_requests_total", "fasternet_grpc_request_duration_seconds"]);
    }

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/monitoring/dashboard.json")).expect("valid JSON");
    let (rules, recorded) = rule_queries(&read("deploy/monitoring/alerts.yaml"));
    let mut queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "only {} dashboard queries found", queries.len());
    assert!(rules.len() >= 9, "only {} rules found", rules.len());
    queries.extend(rules.into_iter().map(|(w, q)| (w, q, String::new())));

    let external: BTreeMap<&str, &[&str]> = EXTERNAL.iter().map(|(n, _, l)| (*n, *l)).collect();
    let (mut problems, mut used) = (Vec::new(), BTreeSet::new());
    let mut used_external: BTreeSet<String> = BTreeSet::new();
    for (place, q, legend) in &queries {
        let u = uses(q);
        if u.metrics.is_empty() {
            problems.push(format!("{place}: no metric found in {q:?}"));
        }
        // Labels a grouping clause or legend may name: those of the query's metrics.
        let mut available: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
        for (metric, selector) in &u.metrics {
            let labels: BTreeSet<String> = if recorded.contains(metric) {
                continue;
            } else if metric.starts_with("fasternet_") {
                let f = family(metric, &exported);
                used.insert(f.to_string());
                if excused.contains(f) {
                    continue;
                }
                match exported.get(f) {
                    Some(labels) => labels.clone(),
                    None => {
                        problems.push(format!("{place}: {metric} is not in /metrics"));
                        continue;
                    }
                }
            } else if let Some(labels) = external.get(metric.as_str()) {
                used_external.insert(metric.clone());
                labels.iter().map(|l| l.to_string()).collect()
            } else {
                problems.push(format!(
                    "{place}: {metric} is neither the server's nor listed in EXTERNAL (with its exporter)"
                ));
                continue;
            };
            for label in selector {
                if !labels.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                    problems.push(format!("{place}: {metric} has no label {label:?} ({labels:?})"));
                }
            }
            available.extend(labels);
        }
        let legend_labels = legend.split("{{").skip(1).filter_map(|p| p.split_once("}}"));
        for label in u.grouping.iter().cloned().chain(legend_labels.map(|(l, _)| l.trim().into())) {
            if !available.contains(&label) && !u.metrics.iter().any(|(m, _)| recorded.contains(m)) {
                problems.push(format!(
                    "{place}: label {label:?} is on none of its metrics ({available:?})"
                ));
            }
        }
    }
    for (name, source, _) in EXTERNAL {
        if !used_external.contains(*name) {
            problems.push(format!("EXTERNAL lists {name} ({source}), which no query uses"));
        }
    }
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
    // Not vacuous: the queries cover most of what the server exports.
    assert!(used.len() >= 15, "only {} fasternet metrics used: {used:?}", used.len());
    let unused: Vec<&String> = exported.keys().filter(|f| !used.contains(*f)).collect();
    eprintln!(
        "{} queries use {} of the server's {} metric families (unused: {unused:?}) and {} from other exporters",
        queries.len(),
        used.len(),
        exported.len(),
        used_external.len()
    );
}

#[test]
fn the_query_reader_finds_metrics_and_labels() {
    let u = uses(
        "histogram_quantile(0.99, sum by (job, le) (rate(x_bucket{route=~\"/a|/b\", job=~\"$job\"}[$__rate_interval])))\n\
         > 1 and on (job) sum without (instance) (up{job=\"a,b\"} offset 5m) # a comment: y\n\
         / ignoring (pod) group_left (extra) max_over_time(z[1h:5m]) unless {__name__=\"w\"}",
    );
    let metrics: Vec<(&str, Vec<&str>)> = u
        .metrics
        .iter()
        .map(|(m, l)| (m.as_str(), l.iter().map(String::as_str).collect()))
        .collect();
    assert_eq!(metrics, [("x_bucket", vec!["route", "job"]), ("up", vec!["job"]), ("z", vec![])]);
    let grouping: Vec<&str> = u.grouping.iter().map(String::as_str).collect();
    assert_eq!(grouping, ["extra", "instance", "job", "le", "pod"]);

    let text = "# TYPE h histogram\nh_bucket{route=\"/v2/{name}\",le=\"0.1\"} 1\nh_sum{route=\"a\\\"b\"} 2\n\
                h_count{route=\"a\"} 1\n# TYPE c_total counter\nc_total 3\nc_count 1\n";
    let e = exported(text);
    assert_eq!(e.keys().collect::<Vec<_>>(), ["c_count", "c_total", "h"]);
    assert_eq!(e["h"].iter().collect::<Vec<_>>(), ["le", "route"]);
    assert_eq!(family("h_bucket", &e), "h");
    assert_eq!(family("c_count", &e), "c_count");

    let (rules, recorded) = rule_queries(
        "groups:\n  - name: g\n    rules:\n      - record: a:b\n        expr: sum(x)\n      - alert: A\n        expr: |\n          a:b\n            > 1\n        for: 1m\n",
    );
    assert_eq!(rules[0].1, "sum(x)");
    assert_eq!(rules[1].1, "          a:b\n            > 1");
    assert!(recorded.contains("a:b"));
}
