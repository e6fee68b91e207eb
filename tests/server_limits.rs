//! The server under its memory budget: hostile images, concurrent large images and many
//! concurrent large uploads, against a real process whose peak resident memory (VmHWM) is read
//! from /proc afterwards. Every request must get an answer, and the peak must stay under the
//! budget. Loopback only; every loop is bounded.

mod common;

use std::time::{Duration, Instant};

use common::{deflated_zeros, fixture, small_png, zero_png, Server};
use futures_util::future::join_all;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Peak and current resident memory of a process, from /proc (None elsewhere).
fn memory_of(pid: i32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        Some(line[name.len()..].trim().trim_end_matches("kB").trim().parse::<u64>().ok()? * 1024)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

async fn post(c: &reqwest::Client, s: &Server, body: Vec<u8>) -> (u16, Value) {
    let r = c
        .post(s.url("/classify"))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn hostile_and_heavy_requests_are_answered_within_the_memory_budget() {
    let budget = 320 * MIB;
    let s = Server::start(&["--memory-budget", "320MiB", "--max-connections", "64"]).await;
    let c = reqwest::Client::new();
    let Some((start_peak, _)) = memory_of(s.pid()) else {
        eprintln!("skipped: no /proc");
        return;
    };
    let pool = s.metric("fasternet_memory_request_pool_bytes").await as u64;
    eprintln!(
        "budget {} MiB, pool {} MiB, peak after start {} MiB",
        budget / MIB,
        pool / MIB,
        start_peak / MIB
    );

    let mut iccp = b"icc\0\0".to_vec();
    iccp.extend(deflated_zeros(1 << 30));
    let mut jpeg = fixture("coffee.jpg");
    jpeg.truncate(jpeg.len() / 3);
    // (what, body, expected status, expected code)
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("100000x1 PNG", zero_png(100_000, 1, 8, 0, &[]), 413, "image_too_large"),
        ("2000000x1 PNG", zero_png(2_000_000, 1, 8, 0, &[]), 413, "image_too_large"),
        ("iCCP inflating to 1 GiB", zero_png(64, 64, 8, 0, &[(b"iCCP", iccp)]), 200, ""),
        ("50 MP 16-bit RGBA PNG", zero_png(8000, 6250, 16, 6, &[]), 413, "image_too_large"),
        ("JPEG cut to a third", jpeg, 422, "invalid_image"),
    ];
    for (what, body, status, code) in cases {
        let size = body.len();
        let (got, v) = post(&c, &s, body).await;
        eprintln!("{what} ({size} bytes): {got} {}", v["error"]["message"]);
        assert_eq!(got, status, "{what}: {v}");
        if !code.is_empty() {
            assert_eq!(v["error"]["code"], code, "{what}: {v}");
        }
    }

    // Four 12-megapixel 16-bit PNGs at once: each needs over 100 MiB to decode, so they take
    // turns (or get 503 after the memory wait).
    let heavy = zero_png(4000, 3000, 16, 2, &[]);
    let answers = join_all((0..4).map(|_| post(&c, &s, heavy.clone()))).await;
    for (status, v) in &answers {
        assert!(
            *status == 200 || (*status == 503 && v["error"]["code"] == "server_busy"),
            "{status} {v}"
        );
    }
    eprintln!("4 x 12 MP 16-bit PNG: {:?}", answers.iter().map(|a| a.0).collect::<Vec<_>>());

    // 40 uploads of 16 MB at once: their bodies are admitted against the budget before they
    // are read; the rest wait, then get 503.
    let upload = bytes::Bytes::from(vec![7u8; 16 << 20]);
    let uploads = (0..40).map(|_| {
        let (c, url, body) = (c.clone(), s.url("/classify"), upload.clone());
        async move {
            let r = c.post(url).header("content-type", "image/png").body(body).send().await;
            match r {
                Ok(r) => (
                    r.status().as_u16(),
                    r.json::<Value>().await.unwrap_or(Value::Null)["error"]["code"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                ),
                Err(e) => panic!("an upload got no answer: {e}"),
            }
        }
    });
    let answers = tokio::time::timeout(Duration::from_secs(60), join_all(uploads))
        .await
        .expect("every upload answered");
    let busy = answers.iter().filter(|a| a.0 == 503).count();
    for (status, code) in &answers {
        assert!(
            (*status == 422 && code == "invalid_image")
                || (*status == 503 && code == "server_busy"),
            "{status} {code}"
        );
    }
    eprintln!(
        "40 x 16 MB uploads: {} refused as not an image, {busy} told the server is busy",
        answers.len() - busy
    );

    // Still serving, nothing reserved, and the peak never crossed the budget.
    assert_eq!(post(&c, &s, small_png(1)).await.0, 200);
    // A request's memory is given back once its response is written, which the client can see
    // complete a moment before: allow that moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.metric("fasternet_memory_reserved_bytes").await != 0.0 {
        assert!(Instant::now() < deadline, "memory still reserved after every answer");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (peak, resident) = memory_of(s.pid()).unwrap();
    eprintln!(
        "peak resident {} MiB (now {} MiB) under a budget of {} MiB",
        peak / MIB,
        resident / MIB,
        budget / MIB
    );
    assert!(
        peak <= budget,
        "peak resident memory {} MiB over the budget of {} MiB",
        peak / MIB,
        budget / MIB
    );
}

#[tokio::test]
async fn a_request_that_can_never_fit_is_refused_at_once_and_one_that_waits_too_long_gets_503() {
    let s = Server::start(&[
        "--memory-budget",
        "256MiB",
        "--max-connections",
        "16",
        "--memory-wait-ms",
        "0",
        "--body-limit",
        "4MiB",
    ])
    .await;
    let c = reqwest::Client::new();
    let pool = s.metric("fasternet_memory_request_pool_bytes").await as u64;
    // Decoding 8000x6000 RGB8 needs well over the pool: 413, naming both figures.
    let started = Instant::now();
    let (status, v) = post(&c, &s, zero_png(8000, 6000, 8, 2, &[])).await;
    assert_eq!(status, 413, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("more than the {} MiB this server has for requests", pool / MIB)),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused only after {:?}",
        started.elapsed()
    );
    // A 16-bit RGB PNG whose decoding needs about 60% of the pool (12 bytes per pixel: the
    // decoder's output and as much again): two at once do not fit, and with no wait for
    // memory the others get 503 while one decodes.
    let side = (((pool * 6 / 10).saturating_sub(10 * MIB) / 12) as f64).sqrt() as u32;
    let big = zero_png(side, side, 16, 2, &[]);
    let answers = join_all((0..3).map(|_| post(&c, &s, big.clone()))).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    eprintln!("pool {} MiB; three {side}x{side} 16-bit PNGs at once: {statuses:?}", pool / MIB);
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(
        answers.iter().any(|(s, v)| *s == 503 && v["error"]["code"] == "server_busy"),
        "{statuses:?}"
    );
    assert!(s.metric("fasternet_rejections_total{reason=\"server_busy\"}").await >= 1.0);
}

/// The memory a forward pass at the largest batch adds is estimated before warm-up runs (so
/// that an impossible batch size is refused instead of aborting); the estimate must hold for
/// both engines, measured as the peak through warm-up over the resident size before it.
#[tokio::test]
async fn the_forward_pass_estimate_bounds_what_warm_up_really_takes() {
    for engine in ["fast", "reference"] {
        let s =
            Server::start(&["--random-init", "t1", "--engine", engine, "--max-batch-size", "24"])
                .await;
        let plan = s
            .startup_logs
            .iter()
            .map(|line| serde_json::from_str::<Value>(line).unwrap_or_default())
            .find(|v| v["fields"]["message"] == "memory budget")
            .expect("a memory budget log line")["fields"]["plan"]
            .as_str()
            .unwrap()
            .to_string();
        let field = |name: &str| -> u64 {
            let at = plan.find(&format!("{name}: ")).unwrap_or_else(|| panic!("{name} in {plan}"))
                + name.len()
                + 2;
            plan[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
        };
        let (loaded, estimate, baseline) =
            (field("loaded"), field("forward_estimate"), field("baseline"));
        let used = baseline.saturating_sub(loaded);
        eprintln!(
            "{engine}: warm-up took {} MiB over {} MiB loaded; estimated {} MiB",
            used / MIB,
            loaded / MIB,
            estimate / MIB
        );
        assert!(used <= estimate, "{engine}: warm-up took {used} bytes, estimated {estimate}");
    }
}
