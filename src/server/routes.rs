//! The router and the handlers: admission, decoding and the trip through the batcher.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

use super::api::{
    query, BatchingInfo, ClassifyQuery, ClassifyResponse, ClassifyResult, EmbedQuery,
    EmbedResponse, EmbedResult, ModelInfo, ModelsResponse,
};
use super::error::{ApiError, ErrorBody};
use super::inference::{self, Inferred, Inputs};
use super::input::{read_images, ImageFile, ImagesJson, ImagesMultipart};
use super::middleware::{
    cap_request_id, every_response, on_response, record_metrics, request_span, require_api_key,
    REQUEST_ID,
};
use super::AppState;
use crate::classifier::Task;

pub fn router(state: Arc<AppState>) -> Router {
    // Only API calls are logged per request; probes and scrapes would drown them.
    let mut api = Router::new()
        .route("/classify", post(classify))
        .route("/embed", post(embed))
        .route("/v1/models", get(models))
        .merge(super::v2::rest::model_routes());
    if state.config.api_keys.is_some() {
        api = api.layer(from_fn_with_state(state.clone(), require_api_key));
    }
    let api = api
        .route("/openapi.json", get(super::api::openapi))
        .layer(TraceLayer::new_for_http().make_span_with(request_span).on_response(on_response));
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(super::v2::rest::open_routes())
        .merge(api);
    if state.config.metrics_addr.is_none() {
        router = router.merge(metrics_route(&state));
    }
    if state.config.ui {
        router = router.merge(super::ui::routes()).merge(super::docs::routes());
    }
    router
        .fallback(|| async { ApiError::NotFound })
        .layer(from_fn_with_state(state.clone(), every_response))
        .layer(from_fn_with_state(state.clone(), record_metrics))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(axum::middleware::from_fn(cap_request_id))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .with_state(state)
}

/// `/metrics`, behind an API key with `--protect-metrics`.
fn metrics_route(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    let route = Router::new().route("/metrics", get(metrics));
    match state.config.protect_metrics {
        true => route.layer(from_fn_with_state(state.clone(), require_api_key)),
        false => route,
    }
}

/// The metrics listener's router (`--metrics-port`): `/metrics` alone.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    metrics_route(&state)
        .fallback(|| async { ApiError::NotFound })
        .layer(from_fn_with_state(state.clone(), every_response))
        .with_state(state)
}

#[utoipa::path(post, path = "/classify", params(ClassifyQuery),
    request_body(description = "One raw image (image/* or application/octet-stream), multipart/form-data with one or more file parts, or JSON {\"images\": [base64, ...]}",
        content((ImageFile = "image/*"), (ImageFile = "application/octet-stream"), (ImagesMultipart = "multipart/form-data"), (ImagesJson = "application/json"))),
    responses(
        (status = 200, description = "Top-k labels per image, in request order", body = ClassifyResponse),
        (status = 401, description = "API keys are configured and none was given", body = ErrorBody),
        (status = 408, description = "The client paused sending its body for too long", body = ErrorBody),
        (status = 413, description = "Body, image count, image pixels, aspect ratio or memory need over the limit", body = ErrorBody),
        (status = 415, description = "Unsupported content type", body = ErrorBody),
        (status = 422, description = "Undecodable image or malformed request", body = ErrorBody),
        (status = 503, description = "Queue full, memory busy or shutting down; see Retry-After", body = ErrorBody),
        (status = 504, description = "Not answered within the request timeout", body = ErrorBody),
        (status = 500, description = "Inference failed", body = ErrorBody)))]
pub async fn classify(
    State(state): State<Arc<AppState>>,
    q: Result<Query<ClassifyQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let q = query(q)?;
    let classes = state.classifier.labels().len();
    let top_k = match q.top_k.as_deref() {
        None => state.config.default_top_k.min(classes),
        Some(raw) => {
            raw.parse::<usize>().ok().filter(|k| (1..=classes).contains(k)).ok_or_else(|| {
                ApiError::InvalidRequest(format!(
                    "top_k must be an integer in 1..={classes}, got `{raw}`"
                ))
            })?
        }
    };
    let logits = flag("logits", q.logits.as_deref())?;
    let task = Task::Classify { top_k, logits };
    let mut inferred = infer(&state, &headers, body, "/classify", task).await?;
    let results = std::mem::take(&mut inferred.outcomes)
        .into_iter()
        .zip(&inferred.filenames)
        .map(|(outcome, filename)| {
            let (predictions, logits) = outcome.classified().ok_or_else(another_task)?;
            let predictions = predictions.into_iter().map(Into::into).collect();
            Ok(ClassifyResult { filename: filename.clone(), predictions, logits })
        })
        .collect::<Result<_, ApiError>>()?;
    let body = ClassifyResponse { model: state.classifier.name().to_string(), results };
    Ok(with_timings(Json(body).into_response(), &inferred, started))
}

fn another_task() -> ApiError {
    ApiError::Internal("the worker answered another task".into())
}

#[utoipa::path(post, path = "/embed", params(EmbedQuery),
    request_body(description = "Same inputs as /classify",
        content((ImageFile = "image/*"), (ImageFile = "application/octet-stream"), (ImagesMultipart = "multipart/form-data"), (ImagesJson = "application/json"))),
    responses(
        (status = 200, description = "Pre-logits feature vector per image, in request order", body = EmbedResponse),
        (status = 401, body = ErrorBody), (status = 408, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody),
        (status = 504, body = ErrorBody), (status = 500, body = ErrorBody)))]
pub async fn embed(
    State(state): State<Arc<AppState>>,
    q: Result<Query<EmbedQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let q = query(q)?;
    let normalized = flag("normalize", q.normalize.as_deref())?;
    let mut inferred =
        infer(&state, &headers, body, "/embed", Task::Embed { normalize: normalized }).await?;
    let results = std::mem::take(&mut inferred.outcomes)
        .into_iter()
        .zip(&inferred.filenames)
        .map(|(outcome, filename)| {
            let embedding = outcome.embedding().ok_or_else(another_task)?;
            Ok(EmbedResult { filename: filename.clone(), embedding })
        })
        .collect::<Result<_, ApiError>>()?;
    let dimension = state.classifier.model().config().feature_dim;
    let body = EmbedResponse {
        model: state.classifier.name().to_string(),
        dimension,
        normalized,
        results,
    };
    Ok(with_timings(Json(body).into_response(), &inferred, started))
}

/// A true/false query parameter (also 1/0), false when absent.
fn flag(name: &str, value: Option<&str>) -> Result<bool, ApiError> {
    match value {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => {
            Err(ApiError::InvalidRequest(format!("{name} must be true or false, got `{other}`")))
        }
    }
}

/// The JSON routes' inputs: image files in the body (see [`read_images`]).
async fn infer(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    body: Body,
    route: &'static str,
    task: Task,
) -> Result<Inferred, ApiError> {
    let cfg = &state.config;
    let (inferred, ()) = inference::infer(state, route, |deadline| async move {
        let images = read_images(
            headers,
            body,
            &cfg.body,
            cfg.max_images_per_request,
            &state.memory,
            deadline,
        )
        .await?;
        Ok((Inputs::encoded(images, task), ()))
    })
    .await?;
    Ok(inferred)
}

/// The timings in milliseconds, twice: `x-*-time` headers, and `Server-Timing` (W3C), which
/// browsers' developer tools and many proxies show.
pub(super) fn with_timings(
    mut response: Response,
    inferred: &Inferred,
    started: Instant,
) -> Response {
    let timings = [
        ("preprocess", inferred.preprocess),
        ("queue", inferred.queue),
        ("inference", inferred.inference),
        ("total", started.elapsed()),
    ]
    .map(|(name, d)| (name, format!("{:.3}", d.as_secs_f64() * 1e3)));
    let value = |text: String| HeaderValue::from_str(&text).expect("a valid header value");
    let h = response.headers_mut();
    for (name, ms) in &timings {
        h.insert(
            HeaderName::try_from(format!("x-{name}-time")).expect("a valid name"),
            value(ms.clone()),
        );
    }
    let server_timing =
        timings.iter().map(|(name, ms)| format!("{name};dur={ms}")).collect::<Vec<_>>();
    h.insert("server-timing", value(server_timing.join(", ")));
    response
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The process is alive")))]
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// The port is bound only once the model is loaded and warmed up, so answering at all means
/// ready, until the drain.
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "Model loaded and warmed up, accepting work"),
    (status = 503, description = "Draining", body = ErrorBody)))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        ApiError::ShuttingDown.into_response()
    } else {
        "ready\n".into_response()
    }
}

#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelsResponse)))]
pub async fn models(State(state): State<Arc<AppState>>) -> Json<ModelsResponse> {
    let c = &state.classifier;
    let config = c.model().config();
    let pre = c.preprocessor().config.clone();
    Json(ModelsResponse {
        models: vec![ModelInfo {
            name: c.name().to_string(),
            architecture: config.architecture(),
            variant: config.variant().map(|v| v.to_string()),
            num_classes: config.num_classes,
            feature_dim: config.feature_dim,
            input_size: [pre.input_size.0, pre.input_size.1],
            preprocessing: pre,
            batching: BatchingInfo {
                max_batch_size: state.config.batch.max_batch_size,
                max_batch_delay_ms: state.config.batch.max_batch_delay.as_millis() as u64,
                queue_capacity: state.config.batch.queue_capacity,
                max_images_per_request: state.config.max_images_per_request,
            },
            labels: c.labels().names().to_vec(),
            version: env!("CARGO_PKG_VERSION"),
        }],
    })
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    state.metrics.queue_depth.set(state.batcher.depth() as i64);
    state.metrics.memory_reserved.set(state.memory.in_use() as i64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}
