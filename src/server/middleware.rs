//! What every request passes through: request ids, the JSON form of errors made outside the
//! handlers, API keys, the request metrics, and the span of each API request.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use tower_http::trace::{DefaultOnResponse, OnResponse};
use tracing::field::Empty;

use super::error::{ApiError, RejectReason};
use super::input::drain_if_unread;
use super::AppState;
use crate::telemetry;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest `x-request-id` taken from a client; longer ones (or ones with other than visible
/// ASCII) are replaced by a generated id, so a client cannot fill logs with its header.
const MAX_REQUEST_ID_BYTES: usize = 128;

/// Drops a client's `x-request-id` that is too long or not plain visible ASCII, so that the
/// next layer generates one instead.
pub async fn cap_request_id(mut request: Request, next: Next) -> Response {
    let acceptable = |v: &HeaderValue| {
        v.len() <= MAX_REQUEST_ID_BYTES && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
    };
    if request.headers().get(&REQUEST_ID).is_some_and(|v| !acceptable(v)) {
        request.headers_mut().remove(&REQUEST_ID);
    }
    next.run(request).await
}

/// What every request and response gets: a body the handler leaves unread is drained
/// (`drain_if_unread`); errors made by the HTTP layers (405, a rejected header, ...) in
/// the same JSON form as the handlers' own, and `Connection: close` while draining so that
/// clients move to another replica.
pub async fn every_response(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = drain_if_unread(&parts.headers, body);
    let mut response = next.run(Request::from_parts(parts, body)).await;
    let status = response.status();
    if (status.is_client_error() || status.is_server_error())
        && response.extensions().get::<RejectReason>().is_none()
    {
        let body = axum::body::to_bytes(std::mem::take(response.body_mut()), 4096)
            .await
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        let message = match text.trim() {
            "" => status.canonical_reason().unwrap_or("error").to_string(),
            text => text.to_string(),
        };
        let mut json = ApiError::Http { status, message }.into_response();
        for name in [header::ALLOW, header::RETRY_AFTER] {
            if let Some(value) = response.headers().get(&name) {
                json.headers_mut().insert(name, value.clone());
            }
        }
        response = json;
    }
    if state.draining.load(Ordering::SeqCst) {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Layered only when keys are configured.
pub async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    match &state.config.api_keys {
        Some(keys)
            if !keys.accepts(
                request.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes),
            ) =>
        {
            ApiError::Unauthorized.into_response()
        }
        _ => next.run(request).await,
    }
}

pub async fn record_metrics(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let mut recording = Recording { state, route, start: Instant::now(), done: false };
    let response = next.run(request).await;
    let reason = response.extensions().get::<RejectReason>().map(|r| r.0);
    recording.record(response.status().as_str(), reason);
    response
}

/// Counts one request; if the connection goes away before there is a response (hyper then
/// drops the handler), it is counted on drop as nginx's 499, the client's own doing.
struct Recording {
    state: Arc<AppState>,
    route: String,
    start: Instant,
    done: bool,
}

impl Recording {
    fn record(&mut self, status: &str, reason: Option<&str>) {
        self.done = true;
        let m = &self.state.metrics;
        m.requests.with_label_values(&[self.route.as_str(), status]).inc();
        m.request_duration
            .with_label_values(&[self.route.as_str()])
            .observe(self.start.elapsed().as_secs_f64());
        if let Some(reason) = reason {
            m.rejections.with_label_values(&[reason]).inc();
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if !self.done {
            let left = ApiError::ClientDisconnected;
            self.record(left.status().as_str(), Some(left.code()));
        }
    }
}

/// The span of one API request, in which its log lines are written. With tracing on it
/// continues the caller's trace (`traceparent`) as a server span named after its route.
pub fn request_span(request: &Request) -> tracing::Span {
    let id = request.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
    let span = tracing::info_span!("request", method = %request.method(), uri = %request.uri(),
        request_id = %id, trace_id = Empty, otel.name = Empty, otel.kind = Empty,
        otel.status_code = Empty, http.response.status_code = Empty);
    if telemetry::tracing_enabled() {
        let route =
            request.extensions().get::<MatchedPath>().map_or(request.uri().path(), |p| p.as_str());
        telemetry::continue_trace(
            &span,
            request.headers(),
            &format!("{} {route}", request.method()),
        );
    }
    span
}

/// Logs the response; with tracing on, also sets its status on the request's span.
pub fn on_response(response: &Response, latency: std::time::Duration, span: &tracing::Span) {
    if telemetry::tracing_enabled() {
        let status = response.status();
        span.record("http.response.status_code", i64::from(status.as_u16()));
        if status.is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
    }
    DefaultOnResponse::new().level(tracing::Level::INFO).on_response(response, latency, span)
}
