//! The demo page (`--ui`): drop or paste images, see the labels and the per-stage timings.
//! Three static files embedded in the binary; the page calls the same API as every other
//! client (`/v1/models`, `/classify`), under the same limits and API keys, so it adds no
//! capability. A strict Content-Security-Policy keeps it to this server.

use std::sync::Arc;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;

const PAGE: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

/// Same-origin scripts, styles and requests only; images from this server and the previews'
/// blob: URLs; no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `/` and `/ui` redirect to `/ui/`, which serves the page.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(|| async { Redirect::temporary("/ui/") }))
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|| async { asset(PAGE, "text/html; charset=utf-8") }))
        .route("/ui/app.js", get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }))
        .route("/ui/style.css", get(|| async { asset(STYLE, "text/css; charset=utf-8") }))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    static_file(body.as_bytes(), content_type, CSP, "no-cache")
}

/// An embedded file with its content type, the Content-Security-Policy of the page it belongs
/// to, and its caching.
pub(super) fn static_file(
    body: &'static [u8],
    content_type: &'static str,
    csp: &'static str,
    cache: &'static str,
) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(csp));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    response
}
