//! The demo page: served with a strict policy, off with `--ui false`, and working in a real
//! browser (Debian's Chromium through Selenium, `tests/browser/demo_page.py`).

mod common;

use std::path::Path;

use common::{require_browser, run_to_end, Server};

#[tokio::test]
async fn the_page_is_served_with_a_strict_policy_and_can_be_turned_off() {
    let s = Server::start(&[]).await;
    let c = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = c.get(s.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], "/ui/");
    let page = c.get(s.url("/ui/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(
        csp.contains("default-src 'none'")
            && csp.contains("connect-src 'self'")
            && !csp.contains("unsafe"),
        "{csp}"
    );
    let html = page.text().await.unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the page loads nothing from elsewhere"
    );
    for asset in ["/ui/app.js", "/ui/style.css"] {
        let r = c.get(s.url(asset)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{asset}");
        let text = r.text().await.unwrap();
        assert!(
            !text.contains("http://") && !text.contains("https://"),
            "{asset} reaches elsewhere"
        );
    }

    let off = Server::start(&["--ui", "false"]).await;
    for path in ["/", "/ui/", "/ui/app.js"] {
        let r = c.get(off.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
}

/// In CI this needs `chromium`, `chromium-driver` (Debian) and `selenium` (PyPI); elsewhere it
/// is skipped with a message when they are missing.
#[tokio::test]
async fn the_page_works_in_a_real_browser() {
    if !require_browser() {
        return;
    }
    let open = Server::start(&[]).await;
    let keyed = Server::start(&["--api-key", "demo-key-3141"]).await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let screenshot = root.join("target/demo-page.png");
    let mut browser = std::process::Command::new("python3");
    browser
        .arg(root.join("tests/browser/demo_page.py"))
        .env("SE_OFFLINE", "true") // Selenium Manager must not look for drivers online
        .args(["--url", &open.base, "--keyed-url", &keyed.base, "--key", "demo-key-3141"])
        .arg("--screenshot")
        .arg(&screenshot)
        .arg(root.join("tests/fixtures/fashion_mnist_t10k_0.png"))
        .arg(root.join("tests/fixtures/preprocess/inputs/chelsea.png"));
    let (status, report) = run_to_end(browser).await;
    eprintln!("{report}");
    assert!(status.success(), "the browser test failed:\n{report}");
}
