//! What every front door shares (the JSON routes, the v2 REST routes, v2 gRPC): admission,
//! preprocessing under the memory budget, and the trip through the batcher, all under the
//! request timeout.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::oneshot;
use tracing::Instrument;

use super::batcher::{Job, JobTrace};
use super::error::ApiError;
use super::input::{EncodedImage, Images};
use super::memory::{Refused, Reservation};
use super::AppState;
use crate::classifier::{Outcome, Task};
use crate::preprocess::{ImageError, Plan};
use crate::telemetry;

/// Bytes an answer holds per output value until the response is written: the f32 in the
/// worker's answer and its text (JSON) or raw bytes.
const ANSWER_BYTES_PER_VALUE: u64 = 24;

/// One image as a request brings it.
pub enum Input {
    /// An image file, decoded and preprocessed here.
    Encoded(EncodedImage),
    /// A (3, H, W) tensor already preprocessed by the client.
    Pixels(Tensor),
}

/// A request's images, what it wants of them, and the memory its body holds until they are
/// prepared.
pub struct Inputs {
    pub items: Vec<Input>,
    pub task: Task,
    pub memory: Reservation,
}

impl Inputs {
    pub fn encoded(images: Images, task: Task) -> Self {
        let items = images.images.into_iter().map(Input::Encoded).collect();
        Self { items, task, memory: images.memory }
    }
}

/// Images answered by the worker, with the timings that go into response headers.
pub struct Inferred {
    pub filenames: Vec<Option<String>>,
    pub outcomes: Vec<Outcome>,
    pub preprocess: Duration,
    /// The longest of the images' waits in the queue, and of their forward passes.
    pub queue: Duration,
    pub inference: Duration,
    /// Held until the response is written.
    pub memory: Vec<Reservation>,
}

/// Reads a request's inputs with `read` (given the deadline; it also returns whatever else
/// the caller needs from the request), then admits, prepares and queues them, all within the
/// request timeout. `route` labels the images counter.
pub async fn infer<R, F, X>(
    state: &Arc<AppState>,
    route: &str,
    read: R,
) -> Result<(Inferred, X), ApiError>
where
    R: FnOnce(tokio::time::Instant) -> F,
    F: Future<Output = Result<(Inputs, X), ApiError>>,
{
    if state.draining.load(Ordering::SeqCst) {
        return Err(ApiError::ShuttingDown);
    }
    let timeout = state.config.request_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let work = async {
        let request_span = telemetry::current_span_context();
        let (mut read, extra) = read(deadline).await?;
        let task = read.task;
        // Reserve queue slots for every image before decoding any: a full queue rejects fast.
        let mut slots = state
            .batcher
            .try_reserve(read.items.len())
            .ok_or(ApiError::QueueFull { capacity: state.batcher.capacity() })?;
        let preprocess_start = Instant::now();
        let items = std::mem::take(&mut read.items);
        let filenames: Vec<Option<String>> = items
            .iter()
            .map(|i| match i {
                Input::Encoded(image) => image.filename.clone(),
                Input::Pixels(_) => None,
            })
            .collect();
        let prepared =
            futures_util::future::join_all(items.into_iter().enumerate().map(|(index, input)| {
                prepare(state, index, input)
                    .instrument(tracing::debug_span!("preprocess", image.index = index as i64))
            }))
            .await;
        drop(read); // the body and its memory
        let preprocess = preprocess_start.elapsed();
        let mut receivers = Vec::with_capacity(prepared.len());
        let mut jobs = Vec::with_capacity(prepared.len());
        let mut answers_memory = Vec::with_capacity(prepared.len());
        for result in prepared {
            let (image, memory, answer_memory) = result?;
            let (reply, rx) = oneshot::channel();
            let trace = request_span
                .clone()
                .map(|request| JobTrace { queue: tracing::debug_span!("queue_wait"), request });
            jobs.push(Job { image, task, memory, enqueued: Instant::now(), reply, trace });
            receivers.push(rx);
            answers_memory.push(answer_memory);
        }
        for job in jobs {
            slots.send(job);
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
        let inferred =
            Inferred { filenames, outcomes, preprocess, queue, inference, memory: answers_memory };
        Ok((inferred, extra))
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
/// more CPU than the work. A decoder panic fails only its image, either way. A tensor sent
/// preprocessed only reserves its memory. Returns the tensor with the memory it holds until
/// its forward pass, and the memory its answer holds.
async fn prepare(
    state: &Arc<AppState>,
    index: usize,
    input: Input,
) -> Result<(Tensor, Reservation, Reservation), ApiError> {
    let answer_bytes = state.answer_values as u64 * ANSWER_BYTES_PER_VALUE;
    let image = match input {
        Input::Encoded(image) => image,
        Input::Pixels(tensor) => {
            let tensor_bytes = (tensor.elem_count() * tensor.dtype().size_in_bytes()) as u64;
            let mut memory = reserve(state, tensor_bytes + answer_bytes, index, &None).await?;
            let answer_memory = memory.split_off(answer_bytes);
            return Ok((tensor, memory, answer_memory));
        }
    };
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
    let mut memory = reserve(state, plan.peak_bytes + answer_bytes, index, &image.filename).await?;
    let span = tracing::debug_span!("decode_resize", image.bytes = image.bytes.len() as i64);
    let run = move |state: &AppState, bytes: &[u8], plan: &Plan| {
        let _entered = span.enter();
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

/// Reserves one image's memory, waiting up to `--memory-wait-ms`.
async fn reserve(
    state: &AppState,
    bytes: u64,
    index: usize,
    filename: &Option<String>,
) -> Result<Reservation, ApiError> {
    match state.memory.reserve(bytes, state.config.memory_wait).await {
        Ok(memory) => Ok(memory),
        Err(Refused::Busy) => Err(ApiError::ServerBusy),
        Err(Refused::NeverFits { needed, capacity }) => {
            let reason = format!(
                "preparing it needs {} MiB, more than the {} MiB this server has for requests",
                needed.div_ceil(1 << 20),
                capacity >> 20
            );
            Err(ApiError::ImageTooLarge { index, filename: filename.clone(), reason })
        }
    }
}

fn image_error(index: usize, filename: &Option<String>, e: ImageError) -> ApiError {
    let (filename, reason) = (filename.clone(), e.to_string());
    if e.is_too_large() {
        ApiError::ImageTooLarge { index, filename, reason }
    } else {
        ApiError::InvalidImage { index, filename, reason }
    }
}
