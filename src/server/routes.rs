//! HTTP handlers, the router and the OpenAPI document.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::batcher::{Answer, Job};
use super::error::{ApiError, ErrorBody, RejectReason};
use super::input::{read_images, EncodedImage, ImagesJson};
use super::AppState;
use crate::preprocess::ImageError;
use crate::Prediction;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: Arc<AppState>) -> Router {
    // Only API calls are logged per request; probes and scrapes would drown them.
    let api = Router::new()
        .route("/classify", post(classify))
        .route("/embed", post(embed))
        .route("/v1/models", get(models))
        .route("/openapi.json", get(openapi))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            let id = request.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", method = %request.method(), uri = %request.uri(), request_id = %id)
        }).on_response(DefaultOnResponse::new().level(tracing::Level::INFO)));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(|| async { ApiError::NotFound })
        .layer(middleware::from_fn_with_state(state.clone(), record_metrics))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

async fn record_metrics(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let start = Instant::now();
    let response = next.run(request).await;
    let m = &state.metrics;
    m.requests.with_label_values(&[route.as_str(), response.status().as_str()]).inc();
    m.request_duration.with_label_values(&[route.as_str()]).observe(start.elapsed().as_secs_f64());
    if let Some(RejectReason(reason)) = response.extensions().get::<RejectReason>() {
        m.rejections.with_label_values(&[reason]).inc();
    }
    response
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ClassifyQuery {
    /// Labels per image, 1..=num_classes (default: the server's --default-top-k).
    top_k: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EmbedQuery {
    /// Scale each vector to unit L2 norm (default false).
    normalize: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ClassifyResponse {
    model: String,
    results: Vec<ClassifyResult>,
}

#[derive(Serialize, ToSchema)]
pub struct ClassifyResult {
    /// The multipart file name, null for other inputs.
    filename: Option<String>,
    predictions: Vec<Prediction>,
}

#[derive(Serialize, ToSchema)]
pub struct EmbedResponse {
    model: String,
    dimension: usize,
    normalized: bool,
    results: Vec<EmbedResult>,
}

#[derive(Serialize, ToSchema)]
pub struct EmbedResult {
    filename: Option<String>,
    embedding: Vec<f32>,
}

/// Images answered by the worker, with the timings that go into response headers.
struct Inferred {
    filenames: Vec<Option<String>>,
    answers: Vec<Answer>,
    preprocess: Duration,
}

#[utoipa::path(post, path = "/classify", params(ClassifyQuery),
    request_body(description = "One raw image (image/* or application/octet-stream), multipart/form-data with one or more file parts, or JSON {\"images\": [base64, ...]}",
        content((Vec<u8> = "image/*"), (Vec<u8> = "application/octet-stream"), (Vec<u8> = "multipart/form-data"), (ImagesJson = "application/json"))),
    responses(
        (status = 200, description = "Top-k labels per image, in request order", body = ClassifyResponse),
        (status = 413, description = "Body, image count or image pixels over the limit", body = ErrorBody),
        (status = 415, description = "Unsupported content type", body = ErrorBody),
        (status = 422, description = "Undecodable image or malformed request", body = ErrorBody),
        (status = 503, description = "Queue full or shutting down; see Retry-After", body = ErrorBody),
        (status = 504, description = "Not answered within the request timeout", body = ErrorBody),
        (status = 500, description = "Inference failed", body = ErrorBody)))]
async fn classify(State(state): State<Arc<AppState>>, Query(q): Query<ClassifyQuery>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let started = Instant::now();
    let classes = state.classifier.labels().len();
    let top_k = match q.top_k.as_deref() {
        None => state.config.default_top_k.min(classes),
        Some(raw) => raw.parse::<usize>().ok().filter(|k| (1..=classes).contains(k)).ok_or_else(|| {
            ApiError::InvalidRequest(format!("top_k must be an integer in 1..={classes}, got `{raw}`"))
        })?,
    };
    let inferred = infer(&state, &headers, body, "/classify").await?;
    let results = inferred
        .filenames
        .iter()
        .zip(&inferred.answers)
        .map(|(filename, a)| ClassifyResult { filename: filename.clone(), predictions: state.classifier.top_k(&a.probabilities, top_k) })
        .collect();
    let body = ClassifyResponse { model: state.classifier.name().to_string(), results };
    Ok(with_timings(Json(body).into_response(), &inferred, started))
}

#[utoipa::path(post, path = "/embed", params(EmbedQuery),
    request_body(description = "Same inputs as /classify",
        content((Vec<u8> = "image/*"), (Vec<u8> = "application/octet-stream"), (Vec<u8> = "multipart/form-data"), (ImagesJson = "application/json"))),
    responses(
        (status = 200, description = "Pre-logits feature vector per image, in request order", body = EmbedResponse),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 503, body = ErrorBody), (status = 504, body = ErrorBody), (status = 500, body = ErrorBody)))]
async fn embed(State(state): State<Arc<AppState>>, Query(q): Query<EmbedQuery>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let started = Instant::now();
    let normalized = match q.normalize.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => return Err(ApiError::InvalidRequest(format!("normalize must be true or false, got `{other}`"))),
    };
    let inferred = infer(&state, &headers, body, "/embed").await?;
    let results: Vec<EmbedResult> = inferred
        .filenames
        .iter()
        .zip(&inferred.answers)
        .map(|(filename, a)| {
            let mut embedding = a.features.clone();
            if normalized {
                crate::classifier::normalize_l2(&mut embedding);
            }
            EmbedResult { filename: filename.clone(), embedding }
        })
        .collect();
    let dimension = state.classifier.model().config().feature_dim;
    let body = EmbedResponse { model: state.classifier.name().to_string(), dimension, normalized, results };
    Ok(with_timings(Json(body).into_response(), &inferred, started))
}

/// Admission, decoding and the trip through the batcher, all under the request timeout.
async fn infer(state: &Arc<AppState>, headers: &HeaderMap, body: Body, route: &'static str) -> Result<Inferred, ApiError> {
    if state.draining.load(Ordering::SeqCst) {
        return Err(ApiError::ShuttingDown);
    }
    let timeout = state.config.request_timeout;
    let work = async {
        let cfg = &state.config;
        let images = read_images(headers, body, cfg.body_limit, cfg.max_images_per_request).await?;
        // Reserve queue slots for every image before decoding any: a full queue rejects fast.
        let reservation = state.batcher.try_reserve(images.len()).ok_or(ApiError::QueueFull { capacity: state.batcher.capacity() })?;
        let preprocess_start = Instant::now();
        let filenames: Vec<Option<String>> = images.iter().map(|i| i.filename.clone()).collect();
        let tensors = futures_util::future::join_all(images.into_iter().map(|image| prepare(state, image))).await;
        let preprocess = preprocess_start.elapsed();
        let mut receivers = Vec::with_capacity(tensors.len());
        let mut jobs = Vec::with_capacity(tensors.len());
        for (index, result) in tensors.into_iter().enumerate() {
            let image = result.map_err(|e| image_error(index, &filenames[index], e))?;
            let (reply, rx) = oneshot::channel();
            jobs.push(Job { image, enqueued: Instant::now(), reply });
            receivers.push(rx);
        }
        for (job, permit) in jobs.into_iter().zip(reservation) {
            state.batcher.send(permit, job);
        }
        let mut answers = Vec::with_capacity(receivers.len());
        for rx in receivers {
            let answer = rx.await.map_err(|_| ApiError::Internal("the inference worker stopped".into()))?;
            answers.push(answer.map_err(ApiError::Internal)?);
        }
        state.metrics.images.with_label_values(&[route]).inc_by(answers.len() as u64);
        Ok(Inferred { filenames, answers, preprocess })
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| ApiError::Timeout(timeout.as_millis() as u64))?
}

/// Decoding and preprocessing run on the blocking pool, at most `preprocess_threads` at once;
/// small images (`Preprocessor::is_small`, e.g. the bundled model's 28x28 uploads) right here,
/// where the two thread hand-offs would cost more CPU than the work. A decoder panic fails
/// only its image, either way.
async fn prepare(state: &Arc<AppState>, image: EncodedImage) -> Result<candle_core::Tensor, ImageError> {
    let run = |state: &AppState, bytes: &[u8]| {
        let start = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| state.classifier.prepare(bytes)))
            .unwrap_or_else(|_| Err(ImageError::Corrupt("the decoder crashed on this image".into())));
        state.metrics.preprocess_duration.observe(start.elapsed().as_secs_f64());
        result
    };
    if state.classifier.preprocessor().is_small(&image.bytes) {
        return run(state, &image.bytes);
    }
    let _permit = state.preprocess_slots.acquire().await.expect("the semaphore is never closed");
    let state = state.clone();
    tokio::task::spawn_blocking(move || run(&state, &image.bytes))
        .await
        .unwrap_or_else(|e| Err(ImageError::Corrupt(format!("preprocessing did not finish: {e}"))))
}

fn image_error(index: usize, filename: &Option<String>, e: ImageError) -> ApiError {
    let (filename, reason) = (filename.clone(), e.to_string());
    match e {
        ImageError::TooLarge { .. } => ApiError::ImageTooLarge { index, filename, reason },
        _ => ApiError::InvalidImage { index, filename, reason },
    }
}

fn with_timings(mut response: Response, inferred: &Inferred, started: Instant) -> Response {
    let ms = |d: Duration| HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1e3)).expect("a number is a valid header value");
    let queue = inferred.answers.iter().map(|a| a.queue_wait).max().unwrap_or_default();
    let inference: Duration = inferred.answers.iter().map(|a| a.inference).max().unwrap_or_default();
    let h = response.headers_mut();
    h.insert("x-queue-time", ms(queue));
    h.insert("x-inference-time", ms(inference));
    h.insert("x-preprocess-time", ms(inferred.preprocess));
    h.insert("x-total-time", ms(started.elapsed()));
    response
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The process is alive")))]
async fn healthz() -> &'static str {
    "ok\n"
}

#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "Model loaded and warmed up, accepting work"),
    (status = 503, description = "Warming up or draining", body = ErrorBody)))]
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        ApiError::ShuttingDown.into_response()
    } else if !state.ready.load(Ordering::SeqCst) {
        let body = ErrorBody { error: super::error::ErrorDetail { code: "warming_up", message: "the model is warming up".into() } };
        (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], Json(body)).into_response()
    } else {
        "ready\n".into_response()
    }
}

#[derive(Serialize, ToSchema)]
pub struct ModelsResponse {
    models: Vec<ModelInfo>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelInfo {
    name: String,
    architecture: String,
    /// t0, t1, t2, s, m or l; null for custom configurations.
    variant: Option<String>,
    num_classes: usize,
    feature_dim: usize,
    /// [height, width]
    input_size: [usize; 2],
    #[schema(value_type = Object)]
    preprocessing: crate::preprocess::PreprocessConfig,
    batching: BatchingInfo,
    labels: Vec<String>,
    /// Server version.
    version: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct BatchingInfo {
    max_batch_size: usize,
    max_batch_delay_ms: u64,
    queue_capacity: usize,
    max_images_per_request: usize,
}

#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelsResponse)))]
async fn models(State(state): State<Arc<AppState>>) -> Json<ModelsResponse> {
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
async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    state.metrics.queue_depth.set(state.batcher.depth() as i64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}

#[derive(OpenApi)]
#[openapi(
    info(title = "fasternet-serve", description = "FasterNet image classification with dynamic batching."),
    paths(classify, embed, healthz, readyz, models, metrics, openapi),
    components(schemas(ClassifyResponse, ClassifyResult, Prediction, EmbedResponse, EmbedResult, ModelsResponse, ModelInfo, BatchingInfo, ErrorBody, ImagesJson))
)]
struct ApiDoc;

#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "This document")))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
