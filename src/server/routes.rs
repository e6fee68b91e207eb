//! The router and the handlers: admission, decoding and the trip through the batcher.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::oneshot;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use super::api::{
    query, BatchingInfo, ClassifyQuery, ClassifyResponse, ClassifyResult, EmbedQuery,
    EmbedResponse, EmbedResult, ModelInfo, ModelsResponse,
};
use super::batcher::Job;
use super::error::{ApiError, ErrorBody};
use super::input::{read_images, EncodedImage, ImageFile, ImagesJson, ImagesMultipart};
use super::memory::{Refused, Reservation};
use super::middleware::{
    cap_request_id, every_response, record_metrics, require_api_key, REQUEST_ID,
};
use super::AppState;
use crate::classifier::{Outcome, Task};
use crate::preprocess::{ImageError, Plan};

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
        api = api.layer(from_fn_with_state(state.clone(), require_api_key));
    }
    let api = api
        .route("/openapi.json", get(super::api::openapi))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            let id = request.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", method = %request.method(), uri = %request.uri(), request_id = %id)
        }).on_response(DefaultOnResponse::new().level(tracing::Level::INFO)));
    let mut metrics_route = Router::new().route("/metrics", get(metrics));
    if state.config.protect_metrics {
        metrics_route = metrics_route.layer(from_fn_with_state(state.clone(), require_api_key));
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

/// Images answered by the worker, with the timings that go into response headers.
struct Inferred {
    filenames: Vec<Option<String>>,
    outcomes: Vec<Outcome>,
    preprocess: Duration,
    /// The longest of the images' waits in the queue, and of their forward passes.
    queue: Duration,
    inference: Duration,
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
    let mut inferred = infer(&state, &headers, body, "/classify", Task::Classify { top_k }).await?;
    let results = std::mem::take(&mut inferred.outcomes)
        .into_iter()
        .zip(&inferred.filenames)
        .map(|(outcome, filename)| {
            let predictions = outcome.predictions().ok_or_else(another_task)?;
            let predictions = predictions.into_iter().map(Into::into).collect();
            Ok(ClassifyResult { filename: filename.clone(), predictions })
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
    let normalized = match q.normalize.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => {
            return Err(ApiError::InvalidRequest(format!(
                "normalize must be true or false, got `{other}`"
            )))
        }
    };
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

/// Admission, decoding and the trip through the batcher, all under the request timeout.
async fn infer(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    body: Body,
    route: &'static str,
    task: Task,
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
            jobs.push(Job { image, task, memory, enqueued: Instant::now(), reply });
            receivers.push(rx);
            answers_memory.push(answer_memory);
        }
        for (job, permit) in jobs.into_iter().zip(reservation) {
            state.batcher.send(permit, job);
        }
        let (mut outcomes, mut queue, mut inference) =
            (Vec::with_capacity(receivers.len()), Duration::ZERO, Duration::ZERO);
        for rx in receivers {
            let answer =
                rx.await.map_err(|_| ApiError::Internal("the inference worker stopped".into()))?;
            let answer = answer.map_err(ApiError::Internal)?;
            queue = queue.max(answer.queue_wait);
            inference = inference.max(answer.inference);
            outcomes.push(answer.outcome);
        }
        state.metrics.images.with_label_values(&[route]).inc_by(outcomes.len() as u64);
        Ok(Inferred { filenames, outcomes, preprocess, queue, inference, _memory: answers_memory })
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
    let h = response.headers_mut();
    h.insert("x-queue-time", ms(inferred.queue));
    h.insert("x-inference-time", ms(inferred.inference));
    h.insert("x-preprocess-time", ms(inferred.preprocess));
    h.insert("x-total-time", ms(started.elapsed()));
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
