//! The HTTP API through a real client against a real server process.

mod common;

use base64::Engine;
use common::{fixture, require_tool, run_to_end, small_png, Server};
use reqwest::multipart::{Form, Part};
use serde_json::Value;

async fn json(r: reqwest::Response) -> Value {
    r.json().await.unwrap()
}

/// Same classes in the same order, scores within 1e-5 (batch composition changes the
/// floating-point summation order, not the answer).
#[track_caller]
fn assert_same(a: &[(u64, f64)], b: &[(u64, f64)]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.0, y.0, "{a:?} vs {b:?}");
        assert!((x.1 - y.1).abs() <= 1e-5, "{a:?} vs {b:?}");
    }
}

fn scores(v: &Value) -> Vec<(u64, f64)> {
    v["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["class_index"].as_u64().unwrap(), p["score"].as_f64().unwrap()))
        .collect()
}

#[tokio::test]
async fn every_input_form_gives_the_same_answers_in_request_order() {
    let s = Server::start(&[]).await;
    let c = reqwest::Client::new();
    let (a, b) = (fixture("chelsea.png"), small_png(3));

    let raw = c
        .post(s.url("/classify?top_k=3"))
        .header("content-type", "image/png")
        .body(a.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 200);
    assert!(raw.headers()["x-request-id"].len() >= 32, "a request id is generated");
    for h in ["x-queue-time", "x-inference-time", "x-preprocess-time", "x-total-time"] {
        raw.headers()[h].to_str().unwrap().parse::<f64>().unwrap();
    }
    // The same timings as W3C Server-Timing metrics, in the same order, each `name;dur=ms`.
    let server_timing = raw.headers()["server-timing"].to_str().unwrap();
    let metrics: Vec<(&str, f64)> = server_timing
        .split(", ")
        .map(|m| {
            let (name, dur) = m.split_once(";dur=").expect("name;dur=ms");
            (name, dur.parse().unwrap())
        })
        .collect();
    let names: Vec<&str> = metrics.iter().map(|m| m.0).collect();
    assert_eq!(names, ["preprocess", "queue", "inference", "total"], "{server_timing}");
    let total = raw.headers()["x-total-time"].to_str().unwrap().parse::<f64>().unwrap();
    assert_eq!(metrics[3].1, total);
    let raw = json(raw).await;
    assert_eq!(raw["model"], "fasternet_t0.fashion_mnist");
    let single = &raw["results"][0];
    assert_eq!(single["filename"], Value::Null);
    let preds = scores(single);
    assert_eq!(preds.len(), 3);
    assert!(preds.windows(2).all(|w| w[0].1 >= w[1].1), "highest score first");
    assert!(single["predictions"][0]["label"].is_string());

    let octet = json(
        c.post(s.url("/classify?top_k=3"))
            .header("content-type", "application/octet-stream")
            .body(a.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_same(&scores(&octet["results"][0]), &preds);

    let form = Form::new()
        .part("first", Part::bytes(b.clone()).file_name("b.png").mime_str("image/png").unwrap())
        .part(
            "second",
            Part::bytes(a.clone()).file_name("chelsea.png").mime_str("image/png").unwrap(),
        );
    let multi =
        json(c.post(s.url("/classify?top_k=3")).multipart(form).send().await.unwrap()).await;
    let results = multi["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["filename"], "b.png");
    assert_eq!(results[1]["filename"], "chelsea.png");
    assert_same(&scores(&results[1]), &preds);

    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let body = serde_json::json!({"images": [b64(&a), format!("data:image/png;base64,{}", b64(&b)), b64(&a)]});
    let resp = c.post(s.url("/classify")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let results = json(resp).await["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["predictions"].as_array().unwrap().len(), 5, "default top_k is 5");
    assert_same(&scores(&results[0])[..3], &preds);
    assert_same(&scores(&results[1])[..3], &scores(&multi["results"][0]));
    // top_k is capped by nothing but the class count: all ten classes sum to 1.
    let all = json(c.post(s.url("/classify?top_k=10")).body(a.clone()).send().await.unwrap()).await;
    let total: f64 = scores(&all["results"][0]).iter().map(|p| p.1).sum();
    assert!((total - 1.0).abs() < 1e-5, "softmax probabilities sum to {total}");
}

#[tokio::test]
async fn request_ids_are_propagated() {
    let s = Server::start(&[]).await;
    let r = reqwest::Client::new()
        .get(s.url("/healthz"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
}

#[tokio::test]
async fn embed_returns_feature_vectors_optionally_normalised() {
    let s = Server::start(&[]).await;
    let c = reqwest::Client::new();
    let v = json(c.post(s.url("/embed")).body(fixture("chelsea.png")).send().await.unwrap()).await;
    assert_eq!(v["dimension"], 1280);
    let e: Vec<f64> = serde_json::from_value(v["results"][0]["embedding"].clone()).unwrap();
    assert_eq!(e.len(), 1280);
    let norm = e.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(norm > 1.5, "raw features are not unit length ({norm})");
    let n = json(
        c.post(s.url("/embed?normalize=true")).body(fixture("chelsea.png")).send().await.unwrap(),
    )
    .await;
    let u: Vec<f64> = serde_json::from_value(n["results"][0]["embedding"].clone()).unwrap();
    assert!((u.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() < 1e-4);
    assert!((u[7] - e[7] / norm).abs() < 1e-5);
}

/// `logits=true` adds every class's logit: the engine's own, computed here in-process on the
/// same image (the engine's logits are checked against timm in model_parity.rs), whose softmax
/// gives the scores of the predictions.
#[tokio::test]
async fn classify_answers_raw_logits_on_request() {
    let s = Server::start(&[]).await;
    let c = reqwest::Client::new();
    let image = fixture("chelsea.png");
    let url = s.url("/classify?top_k=3&logits=true");
    let v = json(c.post(url).body(image.clone()).send().await.unwrap()).await;
    let result = &v["results"][0];
    let logits: Vec<f32> = serde_json::from_value(result["logits"].clone()).unwrap();
    let classifier = fasternet_serve::Classifier::load(&Default::default()).unwrap();
    let x = classifier.preprocessor().load(&image).unwrap();
    let expected = classifier.forward(&[x]).unwrap().logits.to_vec2::<f32>().unwrap();
    assert_eq!(logits.len(), expected[0].len());
    for (a, b) in logits.iter().zip(&expected[0]) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{logits:?} vs {:?}", expected[0]);
    }
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    for (class, score) in scores(result) {
        let softmax = ((logits[class as usize] - max) as f64).exp() / sum;
        assert!((softmax - score).abs() <= 1e-5, "class {class}: {softmax} vs {score}");
    }
    // Not asked for: not there.
    let v = json(c.post(s.url("/classify")).body(image.clone()).send().await.unwrap()).await;
    assert!(v["results"][0].get("logits").is_none(), "{v}");
    let r = c.post(s.url("/classify?logits=yes")).body(image).send().await.unwrap();
    assert_eq!(r.status(), 422);
}

/// With `--metrics-port`, /metrics moves to a listener of its own, which serves nothing else;
/// the address file names it on its third line (the second is empty without gRPC).
#[tokio::test]
async fn metrics_port_serves_the_metrics_alone() {
    let s = Server::start(&["--metrics-port", "0"]).await;
    let metrics = s.metrics_base.clone().expect("the address file names the metrics address");
    assert!(s.grpc.is_none());
    let c = reqwest::Client::new();
    let r = c.post(s.url("/classify")).body(fixture("chelsea.png")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = c.get(format!("{metrics}/metrics")).send().await.unwrap().text().await.unwrap();
    let classified = text
        .lines()
        .find(|l| l.starts_with("fasternet_images_processed_total{route=\"/classify\"}"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(classified.ends_with(" 1"), "{classified}");
    assert_eq!(c.get(s.url("/metrics")).send().await.unwrap().status(), 404);
    for path in ["/classify", "/healthz", "/v1/models"] {
        let r = c.get(format!("{metrics}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path} on the metrics port");
    }
}

#[tokio::test]
async fn models_health_and_unknown_routes() {
    let s = Server::start(&[]).await;
    let c = reqwest::Client::new();
    let m = json(c.get(s.url("/v1/models")).send().await.unwrap()).await;
    let model = &m["models"][0];
    assert_eq!(model["variant"], "t0");
    assert_eq!(model["num_classes"], 10);
    assert_eq!(model["input_size"], serde_json::json!([64, 64]));
    assert_eq!(model["batching"]["max_batch_size"], 16);
    assert_eq!(model["preprocessing"]["crop_pct"], 1.0);
    assert_eq!(model["labels"][0], "T-shirt/top");
    assert_eq!(c.get(s.url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(s.url("/readyz")).send().await.unwrap().status(), 200);
    let r = c.get(s.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(json(r).await["error"]["code"], "not_found");
}

/// (request, expected status, expected error code, text the message must contain)
#[tokio::test]
async fn bad_input_gets_its_status_and_a_json_error_and_the_server_carries_on() {
    let s = Server::start(&[
        "--body-limit",
        "300000",
        "--max-images-per-request",
        "3",
        "--max-pixels",
        "100000",
    ])
    .await;
    let c = reqwest::Client::new();
    let png = small_png(1);
    let chelsea = fixture("chelsea.png"); // 451x300 = 135,300 pixels, over the 100,000 limit
    let truncated = png[..png.len() / 2].to_vec();
    let many = serde_json::json!({"images": vec![base64::engine::general_purpose::STANDARD.encode(&png); 4]});
    let cases: Vec<(reqwest::RequestBuilder, u16, &str, &str)> = vec![
        (c.post(s.url("/classify")).body(vec![0u8; 400_000]), 413, "body_too_large", "300000"),
        (c.post(s.url("/classify")).json(&many), 413, "too_many_images", "4 images"),
        (c.post(s.url("/classify")).body(chelsea.clone()), 413, "image_too_large", "451x300"),
        (c.post(s.url("/classify")).body(truncated), 422, "invalid_image", "image 0"),
        (c.post(s.url("/classify")).body(Vec::new()), 422, "invalid_image", "empty"),
        (
            c.post(s.url("/classify")).body(b"GIF89a\x02\x00\x02\x00 and then garbage".to_vec()),
            422,
            "invalid_image",
            "image 0",
        ),
        (
            c.post(s.url("/classify")).body(b"plain words".to_vec()),
            422,
            "invalid_image",
            "unsupported image format",
        ),
        (
            c.post(s.url("/classify")).header("content-type", "text/plain").body(png.clone()),
            415,
            "unsupported_media_type",
            "text/plain",
        ),
        (c.post(s.url("/classify?top_k=0")).body(png.clone()), 422, "invalid_request", "top_k"),
        (c.post(s.url("/classify?top_k=11")).body(png.clone()), 422, "invalid_request", "1..=10"),
        (c.post(s.url("/classify?top_k=abc")).body(png.clone()), 422, "invalid_request", "top_k"),
        (c.post(s.url("/classify?topk=3")).body(png.clone()), 422, "invalid_request", "`topk`"),
        (
            c.post(s.url("/classify"))
                .header("content-type", "application/json")
                .body("{\"images\": [1"),
            422,
            "invalid_request",
            "JSON",
        ),
        (
            c.post(s.url("/classify")).json(&serde_json::json!({"images": ["%%%"]})),
            422,
            "invalid_request",
            "base64",
        ),
        (
            c.post(s.url("/classify")).json(&serde_json::json!({"images": []})),
            422,
            "invalid_request",
            "no image",
        ),
        (
            c.post(s.url("/classify"))
                .header("content-type", "multipart/form-data; boundary=xyz")
                .body("--xyz\r\nbroken"),
            422,
            "invalid_request",
            "multipart",
        ),
        (
            c.post(s.url("/classify")).header("content-type", "multipart/form-data").body("x"),
            422,
            "invalid_request",
            "multipart",
        ),
        (
            c.post(s.url("/embed?normalize=maybe")).body(png.clone()),
            422,
            "invalid_request",
            "normalize",
        ),
    ];
    for (i, (request, status, code, text)) in cases.into_iter().enumerate() {
        let r = request.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "case {i} ({code})");
        let v = json(r).await;
        assert_eq!(v["error"]["code"], code, "case {i}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(text), "case {i}: `{text}` not in `{msg}`");
    }
    // Which image was bad is named, also for multipart (by file name).
    let form = Form::new()
        .part("a", Part::bytes(png.clone()).file_name("fine.png"))
        .part("b", Part::bytes(b"junk".to_vec()).file_name("junk.png"));
    let v = json(c.post(s.url("/classify")).multipart(form).send().await.unwrap()).await;
    assert!(v["error"]["message"].as_str().unwrap().starts_with("image 1 (junk.png)"), "{v}");
    // Still serving, and the rejections were counted.
    let ok = c.post(s.url("/classify")).body(png).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(s.metric("fasternet_rejections_total{reason=\"invalid_request\"}").await, 10.0);
    assert!(s.metric("fasternet_rejections_total").await >= 19.0);
}

#[tokio::test]
async fn metrics_pass_promtool_and_the_openapi_document_validates() {
    let s = Server::start(&[]).await;
    let c = reqwest::Client::new();
    assert_eq!(c.post(s.url("/classify")).body(small_png(2)).send().await.unwrap().status(), 200);
    let _ = c.post(s.url("/classify")).body("junk").send().await.unwrap();
    let metrics = c.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in [
        "fasternet_http_requests_total{route=\"/classify\",status=\"200\"} 1",
        "fasternet_images_processed_total{route=\"/classify\"} 1",
        "fasternet_queue_depth 0",
        "fasternet_rejections_total{reason=\"invalid_image\"} 1",
        "fasternet_model_info{architecture=\"fasternet_t0\",input_size=\"64x64\",model=\"fasternet_t0.fashion_mnist\",num_classes=\"10\"} 1",
        "fasternet_build_info{version=",
        "fasternet_queue_wait_seconds_bucket{le=\"0.001\"}",
        "fasternet_inference_duration_seconds_count 1",
        "fasternet_preprocess_duration_seconds_count 2",
        "fasternet_batch_size_bucket{le=\"16\"} 1",
    ] {
        assert!(metrics.contains(name), "missing `{name}` in\n{metrics}");
    }
    let dir = tempfile::tempdir().unwrap();
    if require_tool("promtool", "apt-get install prometheus") {
        let path = dir.path().join("metrics.txt");
        std::fs::write(&path, &metrics).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("promtool check metrics < {}", path.display()))
            .output()
            .unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success() && report.trim().is_empty(), "promtool: {report}");
    }
    let doc: Value = c.get(s.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in
        ["/classify", "/embed", "/healthz", "/readyz", "/v1/models", "/metrics", "/openapi.json"]
    {
        assert!(doc["paths"][path].is_object(), "{path} missing from the OpenAPI document");
    }
    if require_tool("openapi-spec-validator", "pip install openapi-spec-validator") {
        let path = dir.path().join("openapi.json");
        std::fs::write(&path, doc.to_string()).unwrap();
        let out = std::process::Command::new("openapi-spec-validator").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn the_healthcheck_command_follows_readiness() {
    let s = Server::start(&[]).await;
    let port = s.base.rsplit(':').next().unwrap().to_string();
    let check = |port: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_fasternet-serve"))
            .args(["healthcheck"])
            .env("FASTERNET_PORT", port)
            .output()
            .unwrap()
    };
    let ok = tokio::task::spawn_blocking({
        let port = port.clone();
        move || check(port)
    })
    .await
    .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    drop(s);
    let down = tokio::task::spawn_blocking(move || check(port)).await.unwrap();
    assert!(!down.status.success(), "a stopped server must fail the health check");
}

/// Schemathesis (PyPI) fuzzes every operation from /openapi.json as served: schema-valid
/// requests must be accepted (its hooks put real images in the bodies), schema-violating ones
/// refused, and every answer must match its documented status, type and schema.
#[tokio::test]
async fn the_api_keeps_its_openapi_contract_under_schemathesis() {
    if !require_tool("st", "pip install schemathesis") {
        return;
    }
    let s = Server::start(&[]).await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis");
    let url = s.url("/openapi.json");
    let mut st = std::process::Command::new("st");
    st.args(["run", &url, "--max-examples", "100", "--phases", "examples,fuzzing", "--seed", "1"])
        .current_dir(&dir)
        .env("SCHEMATHESIS_HOOKS", "hooks")
        .env("PYTHONPATH", &dir);
    let (status, report) = run_to_end(st).await;
    assert!(status.success(), "schemathesis found problems:\n{report}");
    eprintln!("{}", report.lines().rev().take(3).collect::<Vec<_>>().join("\n"));
}
