//! Swagger UI at `/docs/` (with `--ui`, like the demo page): this server's OpenAPI document
//! (`/openapi.json`) as a browsable page whose "Try it out" calls the API on the same origin.
//! Swagger UI's files are vendored from the npm package `swagger-ui-dist` (`docs/vendor/`,
//! its README says the version and how to update it) and embedded in the binary: nothing is
//! fetched at build time or from the browser. The page's own start-up script is a file of its
//! own, so the same strict kind of Content-Security-Policy as the demo page's holds.

use std::sync::{Arc, LazyLock};

use axum::response::{Redirect, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;

/// The vendored `swagger-ui-dist` release; `docs/vendor/README.md` says how to update it.
pub const SWAGGER_UI_VERSION: &str = "5.35.0";

const PAGE: &str = include_str!("docs/index.html");
const INIT: &str = include_str!("docs/init.js");
const BUNDLE: &[u8] = include_bytes!("docs/vendor/swagger-ui-bundle.js");
const STYLE: &[u8] = include_bytes!("docs/vendor/swagger-ui.css");

/// The page names its assets with `?v=<version>`, so a new release changes their URLs and the
/// assets can be cached.
static PAGE_HTML: LazyLock<String> =
    LazyLock::new(|| PAGE.replace("{{version}}", SWAGGER_UI_VERSION));

/// Same-origin scripts, styles and requests only; images from this server and the `data:`
/// icons in Swagger UI's stylesheet; no framing, no form posts.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Our own files are revalidated on every load; Swagger UI's for a day (the page names them
/// with the version, so an update is picked up at once).
const NO_CACHE: &str = "no-cache";
const CACHED: &str = "public, max-age=86400";

/// `/docs` redirects to `/docs/`, which serves the page; its script and Swagger UI's files
/// are beside it.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        // Relative, so that behind a path prefix it stays under the prefix.
        .route("/docs", get(|| async { Redirect::permanent("docs/") }))
        .route(
            "/docs/",
            get(|| async { asset(PAGE_HTML.as_bytes(), "text/html; charset=utf-8", NO_CACHE) }),
        )
        .route(
            "/docs/init.js",
            get(|| async { asset(INIT.as_bytes(), "text/javascript; charset=utf-8", NO_CACHE) }),
        )
        .route(
            "/docs/swagger-ui-bundle.js",
            get(|| async { asset(BUNDLE, "text/javascript; charset=utf-8", CACHED) }),
        )
        .route(
            "/docs/swagger-ui.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8", CACHED) }),
        )
}

fn asset(body: &'static [u8], content_type: &'static str, cache: &'static str) -> Response {
    super::ui::static_file(body, content_type, CSP, cache)
}
