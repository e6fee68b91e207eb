//! Batching, overload, timeouts and shutdown, under real concurrent load (loopback only,
//! bounded in count and time).

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::{fixture, small_png, Server};
use futures_util::future::join_all;

async fn classify(c: &reqwest::Client, s: &Server, body: Vec<u8>) -> reqwest::Response {
    c.post(s.url("/classify?top_k=10")).body(body).send().await.unwrap()
}

fn scores(v: &serde_json::Value) -> Vec<f64> {
    let mut by_class = vec![0.0; 10];
    for p in v["results"][0]["predictions"].as_array().unwrap() {
        by_class[p["class_index"].as_u64().unwrap() as usize] = p["score"].as_f64().unwrap();
    }
    by_class
}

#[tokio::test]
async fn concurrent_clients_are_batched_and_get_the_same_scores_as_alone() {
    let s = Server::start(&["--max-batch-size", "16", "--max-batch-delay-ms", "20"]).await;
    let c = reqwest::Client::new();
    let probe = fixture("chelsea.png");
    let alone = scores(&classify(&c, &s, probe.clone()).await.json().await.unwrap());
    assert_eq!(s.metric("fasternet_batch_size_sum").await, 1.0);
    // 32 clients x 4 requests each; client 0 sends the probe image every time.
    let clients = (0..32).map(|i| {
        let (c, s, probe) = (c.clone(), &s, probe.clone());
        async move {
            let mut out = Vec::new();
            for j in 0..4u8 {
                let body = if i == 0 { probe.clone() } else { small_png(i as u8 * 4 + j) };
                let r = classify(&c, s, body).await;
                assert_eq!(r.status(), 200);
                out.push(scores(&r.json().await.unwrap()));
            }
            out
        }
    });
    let results = join_all(clients).await;
    for busy in &results[0] {
        for (a, b) in alone.iter().zip(busy) {
            assert!((a - b).abs() <= 1e-5, "alone {alone:?} vs in a batch {busy:?}");
        }
    }
    let passes = s.metric("fasternet_batch_size_count").await;
    let images = s.metric("fasternet_batch_size_sum").await;
    assert_eq!(images, 1.0 + 128.0);
    let singles = s.metric("fasternet_batch_size_bucket{le=\"1\"}").await;
    eprintln!("{images} images in {passes} forward passes ({singles} of one image)");
    assert!(singles < passes, "no batch larger than one image was recorded");
    assert!(passes < 100.0, "{passes} passes for 129 images: batching did not happen");
}

#[tokio::test]
async fn a_full_queue_rejects_fast_with_retry_after_and_every_request_is_answered() {
    // At most 4 images admitted; batches of up to 8 can never fill, so every admitted image
    // waits the whole 300 ms delay. A rejection must come back well before that.
    let s = Server::start(&[
        "--queue-capacity",
        "4",
        "--max-batch-size",
        "8",
        "--max-batch-delay-ms",
        "300",
        "--max-images-per-request",
        "2",
    ])
    .await;
    let c = reqwest::Client::new();
    let started = Instant::now();
    let requests = (0..40).map(|i| {
        let c = c.clone();
        let url = s.url("/classify");
        async move {
            let t = Instant::now();
            let r = c.post(url).body(small_png(i)).send().await.unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            let body: serde_json::Value = r.json().await.unwrap();
            (status, retry, body, t.elapsed())
        }
    });
    let answers = tokio::time::timeout(Duration::from_secs(30), join_all(requests))
        .await
        .expect("every request answered in time");
    let (mut ok, mut rejected) = (0, 0);
    for (status, retry, body, took) in answers {
        match status {
            200 => ok += 1,
            503 => {
                rejected += 1;
                assert_eq!(retry.as_deref(), Some("1"));
                assert_eq!(body["error"]["code"], "queue_full");
                assert!(
                    took < Duration::from_millis(250),
                    "rejection took {took:?}: not before the queued ones were computed"
                );
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    eprintln!("{ok} answered, {rejected} rejected in {:?}", started.elapsed());
    assert!(ok >= 4 && rejected >= 1, "{ok} ok, {rejected} rejected");
    assert_eq!(
        s.metric("fasternet_rejections_total{reason=\"queue_full\"}").await,
        rejected as f64
    );
    assert_eq!(s.metric("fasternet_queue_depth").await, 0.0);
    // And it still serves.
    assert_eq!(classify(&c, &s, small_png(1)).await.status(), 200);
}

#[tokio::test]
async fn timed_out_requests_get_504_and_their_images_are_never_computed() {
    // The reference engine takes seconds for a batch of 32 T1 images at 224x224 on two cores:
    // a request queued behind such a batch gives up (1 s) before the worker gets to it. The
    // timeout also covers the filler's upload and preprocessing, which must end before it
    // does even on a machine busy with other tests, or the worker would drop the filler.
    let s = Server::start(&[
        "--random-init",
        "t1",
        "--engine",
        "reference",
        "--max-batch-size",
        "32",
        "--max-batch-delay-ms",
        "0",
        "--request-timeout-ms",
        "1000",
    ])
    .await;
    let c = reqwest::Client::new();
    let busy = serde_json::json!({"images": (0..32).map(|i| base64::engine::general_purpose::STANDARD.encode(small_png(i))).collect::<Vec<_>>()});
    let filler = tokio::spawn({
        let (c, url) = (c.clone(), s.url("/classify"));
        async move { c.post(url).json(&busy).send().await.unwrap().status().as_u16() }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.metric("fasternet_queue_depth").await > 0.0
        || s.metric("fasternet_preprocess_duration_seconds_count").await < 32.0
    {
        assert!(Instant::now() < deadline, "the filler batch never reached the worker");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await; // from preprocessed to queued
    let dropped = s.metric("fasternet_cancelled_images_total").await;
    assert_eq!(dropped, 0.0, "the filler timed out before the worker took it");
    let r = classify(&c, &s, small_png(99)).await;
    assert_eq!(r.status(), 504);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "timeout");
    assert_eq!(filler.await.unwrap(), 504, "the filler batch outlasts the timeout too");
    while s.metric("fasternet_batch_size_count").await < 1.0
        || s.metric("fasternet_cancelled_images_total").await < 1.0
    {
        assert!(Instant::now() < deadline, "the worker never finished the filler batch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Warm-up passes are not counted; the abandoned image was dropped, not computed.
    assert_eq!(s.metric("fasternet_cancelled_images_total").await, 1.0);
    assert_eq!(s.metric("fasternet_batch_size_count").await, 1.0);
    assert_eq!(s.metric("fasternet_batch_size_sum").await, 32.0);
}

#[tokio::test]
async fn sigterm_completes_in_flight_requests_and_exits_zero() {
    let s = Server::start(&[
        "--max-batch-delay-ms",
        "1000",
        "--max-batch-size",
        "64",
        "--shutdown-grace-seconds",
        "10",
    ])
    .await;
    let c = reqwest::Client::new();
    let in_flight = (0..12).map(|i| {
        let (c, url) = (c.clone(), s.url("/classify"));
        async move { c.post(url).body(small_png(i)).send().await.map(|r| r.status().as_u16()) }
    });
    let pending = tokio::spawn(join_all(in_flight));
    // Wait until all 12 are queued or answered (the worker holds them for up to a second).
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.metric("fasternet_queue_depth").await
        + s.metric("fasternet_images_processed_total").await
        < 12.0
    {
        assert!(Instant::now() < deadline, "requests never reached the queue");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status =
        std::process::Command::new("kill").args(["-TERM", &s.pid().to_string()]).status().unwrap();
    assert!(status.success());
    let statuses = tokio::time::timeout(Duration::from_secs(10), pending).await.unwrap().unwrap();
    for st in &statuses {
        assert_eq!(st.as_ref().ok(), Some(&200), "{statuses:?}");
    }
    let exit = s.wait_for_exit(Duration::from_secs(10)).await;
    assert_eq!(exit.code(), Some(0));
}
