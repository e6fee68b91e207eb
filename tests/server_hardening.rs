//! Connection hygiene, the error form of every failure, start-up checks and API keys, against
//! a real server process; raw TCP where the exact bytes matter. Loopback only, bounded.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{small_png, Server};
use reqwest::multipart::{Form, Part};
use serde_json::Value;

fn addr(s: &Server) -> String {
    s.base.trim_start_matches("http://").to_string()
}

/// Sends `request` on a new connection and reads until the server closes it or `wait` passes.
fn exchange(target: &str, request: &[u8], wait: Duration) -> (String, Duration) {
    let mut stream = TcpStream::connect(target).unwrap();
    stream.set_read_timeout(Some(wait)).unwrap();
    stream.write_all(request).unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), started.elapsed())
}

fn json_body(response: &str) -> Value {
    serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap_or("")).unwrap_or(Value::Null)
}

#[tokio::test]
async fn slow_and_idle_connections_are_closed_and_cannot_hold_the_server() {
    let s = Server::start(&[
        "--header-read-timeout-ms",
        "300",
        "--keep-alive-timeout-ms",
        "1500",
        "--body-read-timeout-ms",
        "400",
    ])
    .await;
    let target = addr(&s);
    tokio::task::spawn_blocking(move || {
        let s = target.as_str();
        // Half a request head, then nothing: closed after the header-read timeout.
        let (reply, took) = exchange(s, b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Ty", Duration::from_secs(5));
        assert!(reply.is_empty(), "{reply}");
        assert!(took >= Duration::from_millis(250) && took < Duration::from_millis(1000), "closed after {took:?}");

        // A finished request, then silence: the keep-alive connection closes after its timeout.
        let (reply, took) = exchange(s, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", Duration::from_secs(5));
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(3), "closed after {took:?}");

        // A body that stops half-way: 408 after the body-read timeout.
        let (reply, took) = exchange(s, b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n0123456789", Duration::from_secs(5));
        assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
        assert_eq!(json_body(&reply)["error"]["code"], "body_timeout");
        assert!(took < Duration::from_secs(2), "answered after {took:?}");

        // A declared body over the limit is refused at once: no 100 Continue, nothing read.
        let (reply, took) = exchange(
            s,
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000000\r\nExpect: 100-continue\r\n\r\n",
            Duration::from_secs(5),
        );
        assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
        assert!(!reply.contains("100 Continue"), "{reply}");
        assert_eq!(json_body(&reply)["error"]["code"], "body_too_large");
        assert!(took < Duration::from_millis(350), "answered after {took:?}");
    })
    .await
    .unwrap();
    assert_eq!(s.metric("fasternet_header_timeouts_total").await, 1.0);
    assert_eq!(s.metric("fasternet_rejections_total{reason=\"body_timeout\"}").await, 1.0);
}

#[tokio::test]
async fn connections_over_the_cap_wait_until_one_closes() {
    let s = Server::start(&["--max-connections", "2"]).await;
    let a = TcpStream::connect(addr(&s)).unwrap();
    let _b = TcpStream::connect(addr(&s)).unwrap();
    // Give the server a moment to accept both.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let url = s.url("/healthz");
    let third = tokio::spawn(async move {
        let started = Instant::now();
        let status = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap()
            .status();
        (status, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "a third connection was served while two were open");
    drop(a);
    let (status, waited) = third.await.unwrap();
    assert_eq!(status, 200);
    assert!(waited >= Duration::from_millis(450), "{waited:?}");
}

/// Reads one HTTP response (head and Content-Length body) from a kept-open connection.
fn read_response(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).unwrap() == 0 {
            break;
        }
        out.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&out).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    out.extend(body);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn shutdown_answers_accepted_requests_and_is_not_held_by_idle_or_half_open_connections() {
    let s = Server::start(&["--shutdown-grace-seconds", "20", "--header-read-timeout-ms", "15000"])
        .await;
    let target = addr(&s);
    let mut half = TcpStream::connect(&target).unwrap();
    half.write_all(b"POST /classify HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut idle = TcpStream::connect(&target).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(read_response(&mut idle).starts_with("HTTP/1.1 200"));
    // A request in progress when the signal comes: its body arrives in two halves, the second
    // after the signal. The body's memory is reserved once the handler has the request.
    let body = small_png(4);
    let mut slow = TcpStream::connect(&target).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).unwrap();
    slow.write_all(&body[..body.len() / 2]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.metric("fasternet_memory_reserved_bytes").await == 0.0 {
        assert!(Instant::now() < deadline, "the request never reached its handler");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &s.pid().to_string()]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A request on an open connection during the drain: 503 and the connection closes.
    let png = small_png(5);
    let reply = tokio::task::spawn_blocking(move || {
        let mut request = format!("POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n", png.len()).into_bytes();
        request.extend_from_slice(&png);
        idle.write_all(&request).unwrap();
        let reply = read_response(&mut idle);
        let mut rest = Vec::new();
        let _ = idle.read_to_end(&mut rest);
        (reply, rest.is_empty())
    })
    .await
    .unwrap();
    assert!(reply.0.starts_with("HTTP/1.1 503"), "{}", reply.0);
    assert!(reply.0.to_ascii_lowercase().contains("connection: close"), "{}", reply.0);
    assert!(reply.0.contains("shutting_down"), "{}", reply.0);
    assert!(reply.1, "the connection stayed open");
    let answer = tokio::task::spawn_blocking(move || {
        slow.write_all(&body[body.len() / 2..]).unwrap();
        read_response(&mut slow)
    })
    .await
    .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "a request accepted before the signal is answered: {answer}"
    );
    let exit = s.wait_for_exit(Duration::from_secs(20)).await;
    assert_eq!(exit.code(), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "the half-open connection held the drain for {:?}",
        signalled.elapsed()
    );
    drop(half);
}

#[tokio::test]
async fn every_error_has_the_json_form_and_security_headers() {
    let s = Server::start(&["--max-images-per-request", "2"]).await;
    let c = reqwest::Client::new();
    // 405 keeps its Allow header.
    let r = c.get(s.url("/classify")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "method_not_allowed", "{v}");
    // A repeated query parameter.
    let r = c.post(s.url("/classify?top_k=1&top_k=2")).body(small_png(1)).send().await.unwrap();
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_request", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("top_k"), "{v}");
    // Multipart with more parts than the limit: 413 with the real count.
    let mut form = Form::new();
    for i in 0..5 {
        form = form.part(format!("f{i}"), Part::bytes(small_png(i)).file_name(format!("{i}.png")));
    }
    let r = c.post(s.url("/classify")).multipart(form).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "too_many_images", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().starts_with("5 images"), "{v}");
    // A request id over 128 bytes is replaced; a fair one is kept.
    let long = "x".repeat(4000);
    let r = c.get(s.url("/healthz")).header("x-request-id", &long).send().await.unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap();
    assert!(id.len() <= 128 && id != long, "{id}");
    assert!(r.headers().contains_key("x-content-type-options"));
    // Errors from the HTTP layer itself (a malformed Content-Length) are JSON too.
    let (reply, _) = tokio::task::spawn_blocking({
        let s = addr(&s);
        move || {
            let mut stream = TcpStream::connect(s).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            stream.write_all(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 12\r\nContent-Length: 13\r\n\r\n").unwrap();
            let mut out = String::new();
            let _ = stream.read_to_string(&mut out);
            (out, ())
        }
    })
    .await
    .unwrap();
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
}

#[tokio::test]
async fn a_client_that_leaves_mid_upload_is_counted_apart_from_bad_requests() {
    let s = Server::start(&[]).await;
    let target = addr(&s);
    tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(target).unwrap();
        stream.write_all(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n").unwrap();
        stream.write_all(&[0u8; 5000]).unwrap();
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.metric("fasternet_rejections_total{reason=\"client_closed_request\"}").await < 1.0 {
        assert!(Instant::now() < deadline, "the disconnect was not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.metric("fasternet_rejections_total{reason=\"invalid_request\"}").await, 0.0);
    assert_eq!(
        s.metric("fasternet_http_requests_total{route=\"/classify\",status=\"499\"}").await,
        1.0
    );
}

/// Runs `fasternet-serve serve ARGS` and returns its exit status and stderr, or panics if it
/// is still running after `wait` (it was expected to refuse to start).
fn refuse_to_start(args: &[&str], wait: Duration) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fasternet-serve"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["serve", "--threads", "2"])
        .args(args)
        .env("FASTERNET_HOST", "127.0.0.1")
        .env("FASTERNET_PORT", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + wait;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running with {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!stderr.contains("listening"), "bound before refusing: {stderr}");
    (output.status.code().unwrap_or(-1), stderr)
}

fn hub_dir(edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let weights = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    std::fs::copy(weights.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(weights.join("config.json")).unwrap())
            .unwrap();
    edit(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn bad_configurations_are_refused_before_the_port_is_bound() {
    let wait = Duration::from_secs(30);
    let arch = hub_dir(|c| c["architecture"] = "fasternet_t2".into());
    let classes = hub_dir(|c| c["num_classes"] = 11.into());
    let huge =
        hub_dir(|c| c["pretrained_cfg"]["input_size"] = serde_json::json!([3, 30000, 30000]));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--weights", arch.path().to_str().unwrap()], "fasternet_t2"),
        (vec!["--weights", classes.path().to_str().unwrap()], "num_classes = 11"),
        (vec!["--weights", huge.path().to_str().unwrap()], "30000x30000"),
        (vec!["--max-batch-size", "100000"], "--max-batch-size 100000"),
        (vec!["--max-batch-delay-ms", "40000"], "shorter than the request timeout"),
        (vec!["--memory-budget", "64MiB"], "memory budget"),
        (vec!["--protect-metrics"], "API keys"),
        (vec!["--api-key", "has space"], "printable ASCII"),
    ];
    for (args, expected) in cases {
        let started = Instant::now();
        let (code, stderr) = refuse_to_start(&args, wait);
        assert_ne!(code, 0, "{args:?}");
        assert!(stderr.contains(expected), "{args:?}: `{expected}` not in {stderr}");
        eprintln!(
            "{args:?}: refused in {:?}: {}",
            started.elapsed(),
            stderr.lines().last().unwrap_or("")
        );
    }
}

#[tokio::test]
async fn a_small_queue_alone_is_a_valid_configuration_and_a_taken_port_is_named() {
    let s = Server::start(&["--queue-capacity", "2"]).await;
    let models: Value = reqwest::get(s.url("/v1/models")).await.unwrap().json().await.unwrap();
    assert_eq!(models["models"][0]["batching"]["max_images_per_request"], 2);
    let port = s.base.rsplit(':').next().unwrap().to_string();
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        refuse_to_start(&["--port", &port], Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert_ne!(code, 0);
    assert!(
        stderr.contains(&format!(
            "cannot listen on 127.0.0.1:{}",
            s.base.rsplit(':').next().unwrap()
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn api_keys_guard_the_api_but_not_the_probes_and_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "# next key\nsecond-key-7f3a\n").unwrap();
    let s =
        Server::start(&["--api-key", "first-key-91bc", "--api-key-file", file.to_str().unwrap()])
            .await;
    let c = reqwest::Client::new();
    let r = c.post(s.url("/classify")).body(small_png(1)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "unauthorized");
    let wrong = c
        .post(s.url("/classify"))
        .bearer_auth("first-key-91bd")
        .body(small_png(1))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let text = wrong.text().await.unwrap();
    assert!(!text.contains("91bd"), "the presented key is echoed: {text}");
    for key in ["first-key-91bc", "second-key-7f3a"] {
        let r =
            c.post(s.url("/classify")).bearer_auth(key).body(small_png(1)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{key}");
    }
    assert_eq!(c.get(s.url("/v1/models")).send().await.unwrap().status(), 401);
    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(c.get(s.url(open)).send().await.unwrap().status(), 200, "{open}");
    }
    let logs: Vec<String> = s.startup_logs.iter().cloned().chain(s.logs.try_iter()).collect();
    assert!(!logs.is_empty());
    for line in &logs {
        assert!(
            !line.contains("first-key") && !line.contains("second-key"),
            "a key in the logs: {line}"
        );
    }

    let protected = Server::start(&["--api-key", "k-1", "--protect-metrics"]).await;
    assert_eq!(c.get(protected.url("/metrics")).send().await.unwrap().status(), 401);
    assert_eq!(
        c.get(protected.url("/metrics")).bearer_auth("k-1").send().await.unwrap().status(),
        200
    );
    assert_eq!(c.get(protected.url("/readyz")).send().await.unwrap().status(), 200);
}
