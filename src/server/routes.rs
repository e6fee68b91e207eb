//! HTTP handlers, the router and the OpenAPI document.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::batcher::{Answer, Job};
use super::error::{ApiError, ErrorBody, RejectReason};
use super::input::{
    drain_if_unread, read_images, Base64Image, EncodedImage, ImageFile, ImagesJson, ImagesMultipart,
};
use super::memory::{Refused, Reservation};
use super::AppState;
use crate::preprocess::{ImageError, Plan};
use crate::Prediction;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest `x-request-id` taken from a client; longer ones (or ones with other than visible
/// ASCII) are replaced by a generated id, so a client cannot fill logs with its header.
const MAX_REQUEST_ID_BYTES: usize = 128;

/// Bytes an answer holds per output value until the response is written: the f32 in the
/// worker's answer and its JSON text.
const ANSWER_BYTES_PER_VALUE: u64 = 24;

pub fn router(state: Arc<AppState>) -> Router {
    // Only API calls are logged per request; probes and scrapes would drown them.
    let mut api = Router::new()
        .route("/classify", post(classify))
        .route("/embed", post(embed))
        .route("/v1/models", get(models));
    if state.config.api_keys.is_some() {
        api = api.layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    }
    let api = api
        .route("/openapi.json", get(openapi))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            let id = request.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", method = %request.method(), uri = %request.uri(), request_id = %id)
        }).on_response(DefaultOnResponse::new().level(tracing::Level::INFO)));
    let mut metrics_route = Router::new().route("/metrics", get(metrics));
    if state.config.protect_metrics {
        metrics_route =
            metrics_route.layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    }
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(metrics_route)
        .merge(api);
    if state.config.ui {
        router = router.merge(super::ui::routes());
    }
    router
        .fallback(|| async { ApiError::NotFound })
        .layer(middleware::from_fn_with_state(state.clone(), every_response))
        .layer(middleware::from_fn_with_state(state.clone(), record_metrics))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(middleware::from_fn(cap_request_id))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .with_state(state)
}

/// Drops a client's `x-request-id` that is too long or not plain visible ASCII, so that the
/// next layer generates one instead.
async fn cap_request_id(mut request: Request, next: Next) -> Response {
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
async fn every_response(
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
async fn require_api_key(
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

async fn record_metrics(
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

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query.map(|Query(q)| q).map_err(|e| ApiError::InvalidRequest(e.body_text()))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ClassifyQuery {
    /// Labels per image, 1..=num_classes (default: the server's --default-top-k).
    #[param(value_type = Option<u32>, minimum = 1)]
    top_k: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EmbedQuery {
    /// Scale each vector to unit L2 norm (default false).
    #[param(value_type = Option<bool>)]
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
    /// Held until the response is written.
    _memory: Vec<Reservation>,
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
async fn classify(
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
    let inferred = infer(&state, &headers, body, "/classify").await?;
    let results = inferred
        .filenames
        .iter()
        .zip(&inferred.answers)
        .map(|(filename, a)| ClassifyResult {
            filename: filename.clone(),
            predictions: state.classifier.top_k(&a.probabilities, top_k),
        })
        .collect();
    let body = ClassifyResponse { model: state.classifier.name().to_string(), results };
    Ok(with_timings(Json(body).into_response(), &inferred, started))
}

#[utoipa::path(post, path = "/embed", params(EmbedQuery),
    request_body(description = "Same inputs as /classify",
        content((ImageFile = "image/*"), (ImageFile = "application/octet-stream"), (ImagesMultipart = "multipart/form-data"), (ImagesJson = "application/json"))),
    responses(
        (status = 200, description = "Pre-logits feature vector per image, in request order", body = EmbedResponse),
        (status = 401, body = ErrorBody), (status = 408, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody),
        (status = 504, body = ErrorBody), (status = 500, body = ErrorBody)))]
async fn embed(
    State(state): State<Arc<AppState>>,
    q: Result<Query<EmbedQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let q = query(q)?;
    let normalized = match q.normalize.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => {
            return Err(ApiError::InvalidRequest(format!(
                "normalize must be true or false, got `{other}`"
            )))
        }
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
    let body = EmbedResponse {
        model: state.classifier.name().to_string(),
        dimension,
        normalized,
        results,
    };
    Ok(with_timings(Json(body).into_response(), &inferred, started))
}

/// Admission, decoding and the trip through the batcher, all under the request timeout.
async fn infer(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    body: Body,
    route: &'static str,
) -> Result<Inferred, ApiError> {
    if state.draining.load(Ordering::SeqCst) {
        return Err(ApiError::ShuttingDown);
    }
    let cfg = &state.config;
    let timeout = cfg.request_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let work = async {
        let mut read = read_images(
            headers,
            body,
            &cfg.body,
            cfg.max_images_per_request,
            &state.memory,
            deadline,
        )
        .await?;
        // Reserve queue slots for every image before decoding any: a full queue rejects fast.
        let reservation = state
            .batcher
            .try_reserve(read.images.len())
            .ok_or(ApiError::QueueFull { capacity: state.batcher.capacity() })?;
        let preprocess_start = Instant::now();
        let filenames: Vec<Option<String>> =
            read.images.iter().map(|i| i.filename.clone()).collect();
        let images = std::mem::take(&mut read.images);
        let prepared = futures_util::future::join_all(
            images.into_iter().enumerate().map(|(index, image)| prepare(state, index, image)),
        )
        .await;
        drop(read); // the encoded bytes and their memory
        let preprocess = preprocess_start.elapsed();
        let mut receivers = Vec::with_capacity(prepared.len());
        let mut jobs = Vec::with_capacity(prepared.len());
        let mut answers_memory = Vec::with_capacity(prepared.len());
        for result in prepared {
            let (image, memory, answer_memory) = result?;
            let (reply, rx) = oneshot::channel();
            jobs.push(Job { image, memory, enqueued: Instant::now(), reply });
            receivers.push(rx);
            answers_memory.push(answer_memory);
        }
        for (job, permit) in jobs.into_iter().zip(reservation) {
            state.batcher.send(permit, job);
        }
        let mut answers = Vec::with_capacity(receivers.len());
        for rx in receivers {
            let answer =
                rx.await.map_err(|_| ApiError::Internal("the inference worker stopped".into()))?;
            answers.push(answer.map_err(ApiError::Internal)?);
        }
        state.metrics.images.with_label_values(&[route]).inc_by(answers.len() as u64);
        Ok(Inferred { filenames, answers, preprocess, _memory: answers_memory })
    };
    match tokio::time::timeout_at(deadline, work).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::Timeout(timeout.as_millis() as u64)),
    }
}

/// One image to a tensor: its header is read, the memory its preparation needs is reserved
/// (waiting up to `--memory-wait-ms`), then it is decoded and preprocessed on the blocking
/// pool, at most `preprocess_threads` at once; small images (`Preprocessor::is_small`, e.g.
/// the bundled model's 28x28 uploads) right here, where the two thread hand-offs would cost
/// more CPU than the work. A decoder panic fails only its image, either way. Returns the
/// tensor with the memory it holds until its forward pass, and the memory its answer holds.
async fn prepare(
    state: &Arc<AppState>,
    index: usize,
    image: EncodedImage,
) -> Result<(candle_core::Tensor, Reservation, Reservation), ApiError> {
    let failed = |e: ImageError| image_error(index, &image.filename, e);
    let preprocessor = state.classifier.preprocessor();
    // Reading the header counts as preprocessing time; waiting for memory or a thread not.
    let started = Instant::now();
    let plan = preprocessor.plan(&image.bytes);
    let header_time = started.elapsed();
    let plan = plan.map_err(|e| {
        state.metrics.preprocess_duration.observe(header_time.as_secs_f64());
        failed(e)
    })?;
    let answer_bytes = state.answer_values as u64 * ANSWER_BYTES_PER_VALUE;
    let mut memory = match state
        .memory
        .reserve(plan.peak_bytes + answer_bytes, state.config.memory_wait)
        .await
    {
        Ok(memory) => memory,
        Err(Refused::Busy) => return Err(ApiError::ServerBusy),
        Err(Refused::NeverFits { needed, capacity }) => {
            let reason = format!(
                "preparing it needs {} MiB, more than the {} MiB this server has for requests",
                needed.div_ceil(1 << 20),
                capacity >> 20
            );
            return Err(ApiError::ImageTooLarge {
                index,
                filename: image.filename.clone(),
                reason,
            });
        }
    };
    let run = move |state: &AppState, bytes: &[u8], plan: &Plan| {
        let start = Instant::now();
        let result =
            catch_unwind(AssertUnwindSafe(|| state.classifier.preprocessor().prepare(bytes, plan)))
                .unwrap_or_else(|_| {
                    Err(ImageError::Corrupt("the decoder crashed on this image".into()))
                });
        state.metrics.preprocess_duration.observe((header_time + start.elapsed()).as_secs_f64());
        result
    };
    let tensor = if preprocessor.is_small(&plan) {
        run(state, &image.bytes, &plan)
    } else {
        let _permit =
            state.preprocess_slots.acquire().await.expect("the semaphore is never closed");
        let (state, bytes) = (state.clone(), image.bytes.clone());
        tokio::task::spawn_blocking(move || run(&state, &bytes, &plan)).await.unwrap_or_else(|e| {
            Err(ImageError::Corrupt(format!("preprocessing did not finish: {e}")))
        })
    }
    .map_err(failed)?;
    memory.shrink_to(plan.tensor_bytes + answer_bytes);
    let answer_memory = memory.split_off(answer_bytes);
    Ok((tensor, memory, answer_memory))
}

fn image_error(index: usize, filename: &Option<String>, e: ImageError) -> ApiError {
    let (filename, reason) = (filename.clone(), e.to_string());
    if e.is_too_large() {
        ApiError::ImageTooLarge { index, filename, reason }
    } else {
        ApiError::InvalidImage { index, filename, reason }
    }
}

fn with_timings(mut response: Response, inferred: &Inferred, started: Instant) -> Response {
    let ms = |d: Duration| {
        HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1e3))
            .expect("a number is a valid header value")
    };
    let queue = inferred.answers.iter().map(|a| a.queue_wait).max().unwrap_or_default();
    let inference: Duration =
        inferred.answers.iter().map(|a| a.inference).max().unwrap_or_default();
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

/// The port is bound only once the model is loaded and warmed up, so answering at all means
/// ready, until the drain.
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "Model loaded and warmed up, accepting work"),
    (status = 503, description = "Draining", body = ErrorBody)))]
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        ApiError::ShuttingDown.into_response()
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
    state.metrics.memory_reserved.set(state.memory.in_use() as i64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fasternet-serve",
        description = "FasterNet image classification with dynamic batching."
    ),
    paths(classify, embed, healthz, readyz, models, metrics, openapi),
    components(schemas(
        ClassifyResponse,
        ClassifyResult,
        Prediction,
        EmbedResponse,
        EmbedResult,
        ModelsResponse,
        ModelInfo,
        BatchingInfo,
        ErrorBody,
        ImagesJson,
        ImagesMultipart,
        Base64Image,
        ImageFile
    ))
)]
struct ApiDoc;

#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "This document")))]
async fn openapi(State(state): State<Arc<AppState>>) -> Json<utoipa::openapi::OpenApi> {
    use utoipa::openapi::{schema::Schema, RefOr};
    let mut doc = ApiDoc::openapi();
    // Bounds that depend on the served model and the configuration: top_k up to the class
    // count, at most --max-images-per-request images.
    let classes = state.classifier.labels().len();
    let top_k = doc
        .paths
        .paths
        .get_mut("/classify")
        .and_then(|p| p.post.as_mut())
        .and_then(|op| op.parameters.as_mut());
    for parameter in top_k.into_iter().flatten().filter(|p| p.name == "top_k") {
        if let Some(RefOr::T(Schema::Object(object))) = parameter.schema.as_mut() {
            object.maximum = Some(classes.into());
        }
    }
    for name in ["ImagesJson", "ImagesMultipart"] {
        if let Some(RefOr::T(Schema::Object(object))) =
            doc.components.as_mut().and_then(|c| c.schemas.get_mut(name))
        {
            if let Some(RefOr::T(Schema::Array(array))) = object.properties.get_mut("images") {
                array.max_items = Some(state.config.max_images_per_request);
            }
        }
    }
    Json(doc)
}
