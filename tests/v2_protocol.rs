//! The Open Inference Protocol (KServe v2) over REST and gRPC: plain-HTTP checks of the
//! protocol's shapes, errors and limits here, and real clients (tritonclient over HTTP and
//! gRPC, the KServe SDK) in tests/v2/clients.py, whose answers must equal /classify's.

mod common;

use base64::Engine;
use common::{run_to_end, small_png, Server};
use serde_json::{json, Value};

const MODEL: &str = "fasternet_t0.fashion_mnist";

async fn infer(s: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(s.url(path)).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn fashion_mnist() -> Vec<u8> {
    std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fashion_mnist_t10k_0.png"))
        .unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// /classify's probability of every class for one image.
async fn classify_all(s: &Server, image: &[u8]) -> Vec<f64> {
    let r = reqwest::Client::new()
        .post(s.url("/classify?top_k=10"))
        .header("content-type", "application/octet-stream")
        .body(image.to_vec())
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    let mut p = vec![0.0; 10];
    for prediction in body["results"][0]["predictions"].as_array().unwrap() {
        p[prediction["class_index"].as_u64().unwrap() as usize] =
            prediction["score"].as_f64().unwrap();
    }
    p
}

#[tokio::test]
async fn health_and_metadata_follow_the_protocol() {
    let s = Server::start(&[]).await;
    let get = |path: &'static str| {
        let url = s.url(path);
        async move {
            let r = reqwest::get(url).await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(get("/v2/health/live").await, (200, json!({"live": true})));
    assert_eq!(get("/v2/health/ready").await, (200, json!({"ready": true})));
    let (status, server) = get("/v2").await;
    assert_eq!(status, 200);
    assert_eq!(server["name"], "fasternet-serve");
    assert_eq!(server["extensions"], json!(["classification", "binary_tensor_data"]));
    let (status, model) = get("/v2/models/fasternet_t0.fashion_mnist").await;
    assert_eq!(status, 200);
    assert_eq!(model["versions"], json!(["1"]));
    assert_eq!(
        model["inputs"],
        json!([{"name": "image", "datatype": "BYTES", "shape": [-1]},
               {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 64, 64]}])
    );
    assert_eq!(
        model["outputs"],
        json!([{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
               {"name": "features", "datatype": "FP32", "shape": [-1, 1280]}])
    );
    assert_eq!(get("/v2/models/fasternet_t0.fashion_mnist/versions/1").await.1, model);
    assert_eq!(get("/v2/models/fasternet_t0.fashion_mnist/ready").await.0, 200);
    for path in ["/v2/models/other", "/v2/models/fasternet_t0.fashion_mnist/versions/2/ready"] {
        let (status, body) = get(path).await;
        assert_eq!(status, 404, "{path}");
        let message = body["error"].as_str().expect("the protocol's error body");
        assert!(message.contains("unknown model"), "{message}");
    }
}

#[tokio::test]
async fn json_inference_equals_classify_with_nested_data_and_classification() {
    let s = Server::start(&["--model-name", "shoes"]).await;
    let images = [fashion_mnist(), small_png(3)];
    let body = json!({
        "id": "req-1",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1],
                    "data": [[b64(&images[0])], [b64(&images[1])]]}],
        "outputs": [{"name": "probabilities"},
                    {"name": "probabilities", "parameters": {"classification": 2}}]
    });
    let (status, answer) = infer(&s, "/v2/models/shoes/infer", body.clone()).await;
    assert_eq!(status, 422, "an output named twice: {answer}");
    let mut body = body;
    body["outputs"] = json!([{"name": "probabilities", "parameters": {"classification": 2}},
                             {"name": "features"}]);
    let (status, answer) = infer(&s, "/v2/models/shoes/versions/1/infer", body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["model_name"], "shoes");
    assert_eq!(answer["id"], "req-1");
    let classes = &answer["outputs"][0];
    assert_eq!((classes["datatype"].as_str(), &classes["shape"]), (Some("BYTES"), &json!([2, 2])));
    for (i, image) in images.iter().enumerate() {
        let expected = classify_all(&s, image).await;
        for j in 0..2 {
            let text = classes["data"][i * 2 + j].as_str().unwrap();
            let mut parts = text.splitn(3, ':');
            let score: f64 = parts.next().unwrap().parse().unwrap();
            let index: usize = parts.next().unwrap().parse().unwrap();
            assert!((score - expected[index]).abs() < 1e-6, "{text} vs {expected:?}");
            let rank = expected.iter().filter(|&&p| p > expected[index]).count();
            assert_eq!(rank, j, "{text} is not ranked {j} in {expected:?}");
        }
    }
    assert_eq!(answer["outputs"][1]["shape"], json!([2, 1280]));
    assert_eq!(answer["outputs"][1]["data"].as_array().unwrap().len(), 2 * 1280);
}

/// The binary tensor data extension, both ways, with the JSON header's length in
/// `Inference-Header-Content-Length`.
#[tokio::test]
async fn binary_data_in_and_out() {
    let s = Server::start(&[]).await;
    let image = fashion_mnist();
    let header = json!({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                    "parameters": {"binary_data_size": image.len() + 4}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}]
    })
    .to_string();
    let send = |body: Vec<u8>, json_length: usize| {
        reqwest::Client::new()
            .post(s.url(&format!("/v2/models/{MODEL}/infer")))
            .header("inference-header-content-length", json_length.to_string())
            .body(body)
            .send()
    };
    let mut body = header.as_bytes().to_vec();
    body.extend_from_slice(&(image.len() as u32).to_le_bytes());
    body.extend_from_slice(&image);
    let r = send(body.clone(), header.len()).await.unwrap();
    assert_eq!(r.status(), 200);
    let json_length: usize =
        r.headers()["inference-header-content-length"].to_str().unwrap().parse().unwrap();
    let bytes = r.bytes().await.unwrap();
    let answer: Value = serde_json::from_slice(&bytes[..json_length]).unwrap();
    assert_eq!(answer["outputs"][0]["parameters"]["binary_data_size"], 40);
    let raw = &bytes[json_length..];
    assert_eq!(raw.len(), 40);
    let expected = classify_all(&s, &image).await;
    for (i, chunk) in raw.chunks_exact(4).enumerate() {
        let p = f32::from_le_bytes(chunk.try_into().unwrap()) as f64;
        assert!((p - expected[i]).abs() < 1e-6, "class {i}: {p} vs {}", expected[i]);
    }
    // Broken framing: each refused with the protocol's error and 422.
    let cut = body[..body.len() - 1].to_vec();
    let mut trailing = body.clone();
    trailing.push(0);
    let mut lying = body.clone();
    lying[header.len()..header.len() + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    for (what, body, json_length) in [
        ("binary data cut short", cut, header.len()),
        ("a byte no input declares", trailing, header.len()),
        ("an element length past the end", lying, header.len()),
        ("a header length past the body", body.clone(), body.len() + 1),
        ("a header length inside the JSON", body, 10),
    ] {
        let r = send(body, json_length).await.unwrap();
        assert_eq!(r.status(), 422, "{what}");
        let answer: Value = r.json().await.unwrap();
        assert!(answer["error"].is_string(), "{what}: {answer}");
    }
}

#[tokio::test]
async fn bad_requests_get_the_protocols_error_and_todays_status_codes() {
    let s = Server::start(&["--max-images-per-request", "4"]).await;
    let path = format!("/v2/models/{MODEL}/infer");
    let pixels = |shape: Value, data: Value| json!({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": shape, "data": data}]});
    let image = b64(&small_png(1));
    for (what, body, status) in [
        (
            "unknown input",
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}),
            422,
        ),
        (
            "two inputs",
            json!({"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]},
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}]}),
            422,
        ),
        (
            "wrong datatype",
            json!({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1]}]}),
            422,
        ),
        ("wrong pixel size", pixels(json!([1, 3, 32, 32]), json!([0.0])), 422),
        ("too few values", pixels(json!([1, 3, 64, 64]), json!([0.0, 1.0])), 422),
        ("too many values", pixels(json!([1, 3, 64, 64]), json!(vec![0.5; 3 * 64 * 64 + 1])), 422),
        ("strings for FP32", pixels(json!([1, 3, 64, 64]), json!(["a"])), 422),
        (
            "more images than allowed",
            json!({"inputs": [{"name": "image", "datatype": "BYTES",
            "shape": [5], "data": vec![image.clone(); 5]}]}),
            413,
        ),
        (
            "a batch of zero",
            json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [0], "data": []}]}),
            422,
        ),
        (
            "not base64",
            json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%"]}]}),
            422,
        ),
        (
            "not an image",
            json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(b"hello")]}]}),
            422,
        ),
        (
            "classification on features",
            json!({
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}],
            "outputs": [{"name": "features", "parameters": {"classification": 1}}]}),
            422,
        ),
        (
            "classification over the class count",
            json!({
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 11}}]}),
            422,
        ),
        ("no inputs key", json!({"outputs": []}), 422),
    ] {
        let (got, answer) = infer(&s, &path, body).await;
        assert_eq!(got, status, "{what}: {answer}");
        assert!(
            answer["error"].is_string() && answer.as_object().unwrap().len() == 1,
            "{what}: {answer}"
        );
    }
    let (status, answer) = infer(&s, "/v2/models/other/infer", json!({"inputs": []})).await;
    assert_eq!(status, 404, "{answer}");
    let valid = vec![0.25f32; 3 * 64 * 64];
    let (status, answer) = infer(&s, &path, pixels(json!([1, 3, 64, 64]), json!(valid))).await;
    assert_eq!(status, 200, "{answer}");
}

/// Python's tritonclient (HTTP and gRPC) and KServe's SDK against both ports.
#[tokio::test]
async fn real_clients_agree_with_classify() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import importlib.util as u; assert all(map(u.find_spec, ['tritonclient.http', 'tritonclient.grpc', 'kserve']))"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        let install = "pip install 'tritonclient[http,grpc]' kserve";
        assert!(std::env::var_os("CI").is_none(), "CI must install the v2 clients ({install})");
        eprintln!("skipped: the v2 clients are not installed ({install})");
        return;
    }
    let s = Server::start(&["--grpc-port", "0"]).await;
    let grpc = s.grpc.clone().expect("the address file names the gRPC address");
    let http = s.base.trim_start_matches("http://").to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/v2/clients.py");
    let mut python = std::process::Command::new("python3");
    python.args([script, &http, &grpc, MODEL]);
    let (status, report) = run_to_end(python).await;
    assert!(status.success(), "the v2 clients failed:\n{report}");
    eprintln!("{report}");
    // The images went through the same batcher: counted under each front door.
    let metrics = reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap();
    for route in
        ["/v2/models/{name}/infer", "/inference.GRPCInferenceService/ModelInfer", "/classify"]
    {
        let line = format!("fasternet_images_processed_total{{route=\"{route}\"}}");
        assert!(metrics.contains(&line), "no {line} in /metrics");
    }

    // A gRPC client that keeps its connection open does not hold the drain: SIGTERM, and the
    // server exits 0 well within its 30 s grace period.
    let hold = "import sys, time, tritonclient.grpc as g\n\
                c = g.InferenceServerClient(sys.argv[1])\n\
                assert c.is_server_ready()\n\
                print('connected', flush=True)\n\
                time.sleep(60)\n";
    let mut holder = std::process::Command::new("python3")
        .args(["-c", hold, &grpc])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let stdout = holder.stdout.take().unwrap();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    assert_eq!(line.trim(), "connected");
    std::process::Command::new("kill").args(["-TERM", &s.pid().to_string()]).status().unwrap();
    let status = s.wait_for_exit(std::time::Duration::from_secs(10)).await;
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(status.success(), "the drain with an idle gRPC connection ended in {status}");
}
