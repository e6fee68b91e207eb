//! Swagger UI at `/docs/`: the page and its vendored assets are served with a strict policy,
//! stay open when API keys are configured, go with `--ui false`, and work in a real browser
//! (Debian's Chromium through Selenium, `tests/browser/swagger_ui.py`).

mod common;

use std::path::Path;

use common::{require_browser, require_tool, run_to_end, Server};

const ASSETS: [(&str, &str, usize); 3] = [
    // path, content type, at least this many bytes
    ("/docs/swagger-ui-bundle.js", "text/javascript", 1_000_000),
    ("/docs/swagger-ui.css", "text/css", 100_000),
    ("/docs/init.js", "text/javascript", 200),
];

#[tokio::test]
async fn the_page_and_its_assets_are_served_and_can_be_turned_off() {
    let s = Server::start(&[]).await;
    let c = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = c.get(s.url("/docs")).send().await.unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "docs/", "relative, so it keeps a path prefix");

    let page = c.get(s.url("/docs/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.headers()["cache-control"], "no-cache");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(
        csp.contains("default-src 'none'")
            && csp.contains("script-src 'self';")
            && csp.contains("connect-src 'self';")
            && !csp.contains("unsafe"),
        "{csp}"
    );
    let html = page.text().await.unwrap();
    assert!(!html.contains("<script>") && !html.contains("style="), "nothing inline: {html}");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the page loads nothing from elsewhere"
    );
    // The assets are named relative to /docs/, with the vendored version to bust caches.
    let version = html
        .split("swagger-ui-bundle.js?v=")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("the page loads swagger-ui-bundle.js?v=...: {html}"));
    for reference in [
        format!("src=\"swagger-ui-bundle.js?v={version}\""),
        format!("href=\"swagger-ui.css?v={version}\""),
        "src=\"init.js\"".to_string(),
    ] {
        assert!(html.contains(&reference), "the page has {reference}: {html}");
    }

    for (path, content_type, at_least) in ASSETS {
        let r = c.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], format!("{content_type}; charset=utf-8"), "{path}");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff", "{path}");
        let cache = r.headers()["cache-control"].to_str().unwrap().to_string();
        if path.ends_with("init.js") {
            assert_eq!(cache, "no-cache");
        } else {
            assert!(cache.starts_with("public, max-age="), "{path}: {cache}");
        }
        let body = r.bytes().await.unwrap();
        assert!(body.len() >= at_least, "{path}: {} bytes", body.len());
        let text = String::from_utf8(body.to_vec()).expect("UTF-8");
        match path {
            "/docs/swagger-ui-bundle.js" => assert!(
                text.contains("SwaggerUIBundle")
                    && text.contains(&format!("PACKAGE_VERSION:\"{version}\"")),
                "the bundle is Swagger UI {version}, the version the page names"
            ),
            "/docs/swagger-ui.css" => assert!(text.contains(".swagger-ui")),
            _ => assert!(
                text.contains("SwaggerUIBundle(")
                    && text.contains("../openapi.json")
                    && text.contains("validatorUrl: null")
                    && !text.contains("http://")
                    && !text.contains("https://"),
                "{text}"
            ),
        }
    }
    // Querying the versioned URL gives the same file.
    let versioned =
        c.get(s.url(&format!("/docs/swagger-ui.css?v={version}"))).send().await.unwrap();
    assert_eq!(versioned.status(), 200);
    assert_eq!(versioned.headers()["content-type"], "text/css; charset=utf-8");

    // API keys guard the API, not its description: the page and /openapi.json stay open.
    let keyed = Server::start(&["--api-key", "docs-key-2718"]).await;
    for path in ["/docs/", "/docs/swagger-ui-bundle.js", "/docs/init.js", "/openapi.json"] {
        let r = c.get(keyed.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path} without a key");
    }
    assert_eq!(c.get(keyed.url("/v1/models")).send().await.unwrap().status(), 401);

    let off = Server::start(&["--ui", "false"]).await;
    for path in ["/docs", "/docs/"].into_iter().chain(ASSETS.map(|(path, ..)| path)) {
        let r = c.get(off.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path} with --ui false");
    }
    assert_eq!(c.get(off.url("/openapi.json")).send().await.unwrap().status(), 200);
}

/// The vendored files are the ones `src/server/docs/vendor/README.md` names (`SHA256SUMS`).
#[test]
fn the_vendored_files_match_their_checksums() {
    if !require_tool("sha256sum", "coreutils") {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/server/docs/vendor");
    let out = std::process::Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(report.lines().count(), 5, "{report}");
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let version = fasternet_serve::server::docs::SWAGGER_UI_VERSION;
    assert!(readme.contains(&format!("**{version}**")), "the README names version {version}");
}

/// In CI this needs `chromium`, `chromium-driver` (Debian) and `selenium` (PyPI); elsewhere it
/// is skipped with a message when they are missing.
#[tokio::test]
async fn swagger_ui_works_in_a_real_browser() {
    if !require_browser() {
        return;
    }
    let open = Server::start(&[]).await;
    let keyed = Server::start(&["--api-key", "docs-key-2718"]).await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let screenshot = root.join("target/swagger-ui.png");
    let mut browser = std::process::Command::new("python3");
    browser
        .arg(root.join("tests/browser/swagger_ui.py"))
        .env("SE_OFFLINE", "true") // Selenium Manager must not look for drivers online
        .args(["--url", &open.base, "--keyed-url", &keyed.base])
        .arg("--screenshot")
        .arg(&screenshot);
    let (status, report) = run_to_end(browser).await;
    eprintln!("{report}");
    assert!(status.success(), "the browser test failed:\n{report}");
}
