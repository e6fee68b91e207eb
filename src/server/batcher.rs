//! Dynamic batching: a bounded queue of images feeding one inference worker on its own OS
//! thread. The worker takes up to `max_batch_size` images, runs one forward pass and answers
//! every image through its oneshot channel. It waits for more images (at most
//! `max_batch_delay` after the first) only while some are on their way: admitted, with queue
//! slots reserved, and still being decoded. A lone request is computed at once; under load the
//! queue fills batches, also while a forward pass runs.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use tokio::sync::{mpsc, oneshot};

use super::memory::Reservation;
use super::metrics::Metrics;
use crate::classifier::{Outcome, Task};
use crate::Classifier;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The worker's view of a model: a batch of prepared images and their tasks in, one outcome
/// per image out.
pub trait Backend: Send + Sync + 'static {
    fn infer(&self, images: &[Tensor], tasks: &[Task]) -> Result<Vec<Outcome>, String>;
    /// The (3, H, W) shape the model takes, for warm-up batches.
    fn input_shape(&self) -> (usize, usize, usize);
}

impl Backend for Classifier {
    fn infer(&self, images: &[Tensor], tasks: &[Task]) -> Result<Vec<Outcome>, String> {
        self.run(images, tasks).map_err(|e| e.to_string())
    }

    fn input_shape(&self) -> (usize, usize, usize) {
        let (h, w) = self.preprocessor().config.input_size;
        (3, h, w)
    }
}

/// One image's result.
#[derive(Debug)]
pub struct Answer {
    pub outcome: Outcome,
    pub queue_wait: Duration,
    pub inference: Duration,
}

pub struct Job {
    pub image: Tensor,
    pub task: Task,
    /// The image's memory, given back when the job is dropped (after its forward pass, or
    /// unrun when its caller has gone).
    pub memory: Reservation,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<Answer, String>>,
    /// Set when traces are exported.
    pub trace: Option<JobTrace>,
}

/// Where a queued image is in its request's trace.
pub struct JobTrace {
    /// Open while the image waits; it ends when the image's forward pass starts.
    pub queue: tracing::Span,
    /// The request's own span, which the forward pass links to.
    pub request: opentelemetry::trace::SpanContext,
}

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    /// Images that may wait in the queue.
    pub queue_capacity: usize,
}

/// The queue's sending side; cheap to clone. The worker stops once every clone is dropped
/// and the queue is empty.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
    capacity: usize,
    /// Images sent and not yet started (queued, or in the batch being formed).
    waiting: Arc<AtomicUsize>,
    /// Images with a reserved slot that have not been sent yet (being prepared).
    incoming: Arc<AtomicUsize>,
}

/// Slots reserved in the queue for one request's images; the ones not used are given back
/// when it is dropped.
pub struct QueueSlots<'a> {
    permits: mpsc::PermitIterator<'a, Job>,
    waiting: &'a AtomicUsize,
    incoming: &'a AtomicUsize,
    left: usize,
}

impl QueueSlots<'_> {
    /// Queues one image in one of the slots.
    pub fn send(&mut self, job: Job) {
        let permit = self.permits.next().expect("one slot per image was reserved");
        self.waiting.fetch_add(1, Ordering::SeqCst);
        permit.send(job);
        // After the send: a worker that sees nothing incoming finds the image queued.
        self.left -= 1;
        self.incoming.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for QueueSlots<'_> {
    fn drop(&mut self) {
        self.incoming.fetch_sub(self.left, Ordering::SeqCst);
    }
}

impl Batcher {
    /// Starts the worker thread (warm the model up first: [`warm_up`]).
    pub fn start(
        backend: Arc<dyn Backend>,
        config: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let waiting = Arc::new(AtomicUsize::new(0));
        let incoming = Arc::new(AtomicUsize::new(0));
        let (worker_waiting, worker_incoming) = (waiting.clone(), incoming.clone());
        let worker = std::thread::Builder::new().name("inference".into()).spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a current-thread runtime always builds");
            let queue = Queue { rx, waiting: worker_waiting, incoming: worker_incoming };
            runtime.block_on(run_worker(queue, backend, config, metrics));
        })?;
        Ok((Self { tx, capacity: config.queue_capacity, waiting, incoming }, worker))
    }

    /// Reserves `n` queue slots at once or none: a full queue rejects before any decoding.
    pub fn try_reserve(&self, n: usize) -> Option<QueueSlots<'_>> {
        let permits = self.tx.try_reserve_many(n).ok()?;
        self.incoming.fetch_add(n, Ordering::SeqCst);
        Some(QueueSlots { permits, waiting: &self.waiting, incoming: &self.incoming, left: n })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Images queued and not yet in a forward pass (the batch being formed included).
    pub fn depth(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

/// One pass at each power-of-two batch size up to the maximum, so that the engine's buffers
/// reach their full size and the first requests are not slow. A failed pass is an error: the
/// model cannot serve batches of that size.
pub fn warm_up(backend: &dyn Backend, max_batch_size: usize) -> Result<(), String> {
    let (c, h, w) = backend.input_shape();
    let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |b| Some(b * 2))
        .take_while(|&b| b < max_batch_size)
        .collect();
    sizes.push(max_batch_size);
    let image = Tensor::zeros((c, h, w), candle_core::DType::F32, &Device::Cpu)
        .map_err(|e| e.to_string())?;
    for batch in sizes {
        // Both outputs: one image is embedded, the others classified.
        let mut tasks = vec![Task::Classify { top_k: 1, logits: false }; batch];
        tasks[0] = Task::Embed { normalize: false };
        let start = Instant::now();
        let images = vec![image.clone(); batch];
        match catch_unwind(AssertUnwindSafe(|| backend.infer(&images, &tasks))) {
            Ok(Ok(_)) => {
                tracing::info!(batch, ms = start.elapsed().as_millis() as u64, "warm-up pass")
            }
            Ok(Err(e)) => return Err(format!("warm-up pass at batch {batch} failed: {e}")),
            Err(panic) => {
                return Err(format!(
                    "warm-up pass at batch {batch} panicked: {}",
                    panic_message(&panic)
                ))
            }
        }
    }
    Ok(())
}

/// The worker's end of the queue, and the counts it shares with the senders.
struct Queue {
    rx: mpsc::Receiver<Job>,
    waiting: Arc<AtomicUsize>,
    incoming: Arc<AtomicUsize>,
}

async fn run_worker(
    mut queue: Queue,
    backend: Arc<dyn Backend>,
    config: BatchConfig,
    metrics: Arc<Metrics>,
) {
    let Queue { rx, waiting, incoming } = &mut queue;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + config.max_batch_delay;
        while batch.len() < config.max_batch_size {
            if let Ok(job) = rx.try_recv() {
                batch.push(job);
                continue;
            }
            // Nothing queued: wait only for images already on their way.
            if incoming.load(Ordering::SeqCst) == 0 {
                break;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) => batch.push(job),
                Ok(None) | Err(_) => break,
            }
        }
        let before = batch.len();
        waiting.fetch_sub(before, Ordering::SeqCst);
        batch.retain(|job| !job.reply.is_closed());
        metrics.cancelled_images.inc_by((before - batch.len()) as u64);
        if !batch.is_empty() {
            run_batch(backend.as_ref(), batch, &metrics);
        }
    }
    tracing::info!("inference worker stopped: queue closed and empty");
}

fn run_batch(backend: &dyn Backend, mut batch: Vec<Job>, metrics: &Metrics) {
    // One span for the pass, in a trace of its own, linked to every request it computes for.
    let forward = tracing::debug_span!(parent: None, "forward", batch_size = batch.len() as i64);
    let mut linked: Vec<opentelemetry::trace::SpanId> = Vec::new();
    for trace in batch.iter_mut().filter_map(|job| job.trace.take()) {
        // Ending the image's queue-wait span (dropped here); one link per request.
        if !linked.contains(&trace.request.span_id()) {
            linked.push(trace.request.span_id());
            forward.add_link(trace.request);
        }
    }
    let started = Instant::now();
    let images: Vec<Tensor> = batch.iter().map(|job| job.image.clone()).collect();
    let tasks: Vec<Task> = batch.iter().map(|job| job.task).collect();
    let result = forward
        .in_scope(|| catch_unwind(AssertUnwindSafe(|| backend.infer(&images, &tasks))))
        .unwrap_or_else(|panic| Err(format!("inference panicked: {}", panic_message(&panic))));
    drop(forward);
    let inference = started.elapsed();
    metrics.batch_size.observe(batch.len() as f64);
    metrics.inference_duration.observe(inference.as_secs_f64());
    match result {
        Ok(outcomes) if outcomes.len() == batch.len() => {
            for (job, outcome) in batch.into_iter().zip(outcomes) {
                let queue_wait = started.saturating_duration_since(job.enqueued);
                metrics.queue_wait.observe(queue_wait.as_secs_f64());
                let _ = job.reply.send(Ok(Answer { outcome, queue_wait, inference }));
            }
        }
        other => {
            let message = match other {
                Err(e) => e,
                Ok(_) => "the model returned the wrong number of rows".to_string(),
            };
            metrics.worker_failures.inc();
            tracing::error!(batch = batch.len(), error = %message, "forward pass failed");
            for job in batch {
                let _ = job.reply.send(Err(message.clone()));
            }
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// What [`Fake`] answers for an image whose first value is `v`.
    fn echo(v: f32, task: Task) -> Outcome {
        match task {
            Task::Classify { top_k, .. } => Outcome::Predictions {
                predictions: vec![
                    crate::Prediction {
                        label: v.to_string(),
                        class_index: top_k,
                        score: v
                    };
                    top_k
                ],
                logits: None,
            },
            Task::Embed { .. } => Outcome::Embedding(vec![v, v]),
            Task::Tensors { .. } => {
                Outcome::Tensors { probabilities: Some(vec![v]), features: None }
            }
        }
    }

    /// Echoes each image's first value for its task; panics on a batch holding the value 13.
    struct Fake {
        calls: AtomicUsize,
    }

    impl Backend for Fake {
        fn infer(&self, images: &[Tensor], tasks: &[Task]) -> Result<Vec<Outcome>, String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let firsts: Vec<f32> = images
                .iter()
                .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0])
                .collect();
            if firsts.contains(&13.0) {
                panic!("unlucky batch");
            }
            Ok(firsts.iter().zip(tasks).map(|(&v, task)| echo(v, *task)).collect())
        }
        fn input_shape(&self) -> (usize, usize, usize) {
            (1, 1, 1)
        }
    }

    fn start(max_batch_size: usize, delay_ms: u64) -> (Batcher, JoinHandle<()>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new(max_batch_size));
        let config = BatchConfig {
            max_batch_size,
            max_batch_delay: Duration::from_millis(delay_ms),
            queue_capacity: 64,
        };
        let (b, h) =
            Batcher::start(Arc::new(Fake { calls: AtomicUsize::new(0) }), config, metrics.clone())
                .unwrap();
        (b, h, metrics)
    }

    /// Odd values are classified (top 2), even ones embedded.
    fn task_for(v: f32) -> Task {
        match v as usize % 2 {
            1 => Task::Classify { top_k: 2, logits: false },
            _ => Task::Embed { normalize: false },
        }
    }

    fn submit(b: &Batcher, values: &[f32]) -> Vec<oneshot::Receiver<Result<Answer, String>>> {
        let mut slots = b.try_reserve(values.len()).expect("room in the queue");
        values
            .iter()
            .map(|&v| {
                let (tx, rx) = oneshot::channel();
                let memory = Reservation::default();
                slots.send(Job {
                    image: Tensor::new(&[[[v]]], &Device::Cpu).unwrap(),
                    task: task_for(v),
                    memory,
                    enqueued: Instant::now(),
                    reply: tx,
                    trace: None,
                });
                rx
            })
            .collect()
    }

    #[tokio::test]
    async fn batches_answer_each_image_in_order_and_split_above_the_maximum() {
        let (b, worker, metrics) = start(4, 50);
        let values: Vec<f32> = (0..10).map(|v| v as f32).collect();
        let receivers = submit(&b, &values);
        for (v, rx) in values.iter().zip(receivers) {
            let answer = rx.await.unwrap().unwrap();
            assert_eq!(answer.outcome, echo(*v, task_for(*v)));
        }
        // 10 images with a maximum of 4: three forward passes (4 + 4 + 2).
        assert_eq!(metrics.batch_size.get_sample_count(), 3);
        assert_eq!(metrics.batch_size.get_sample_sum(), 10.0);
        drop(b);
        worker.join().unwrap();
    }

    /// With nothing else on its way an image is computed at once, however long the batch
    /// delay; an image whose slot is reserved and that is still being prepared is waited for.
    #[tokio::test]
    async fn the_worker_waits_only_for_images_on_their_way() {
        let (b, worker, metrics) = start(8, 3_000);
        let started = Instant::now();
        let lone = submit(&b, &[1.0]).remove(0);
        lone.await.unwrap().unwrap();
        assert!(started.elapsed() < Duration::from_millis(1_500), "a lone image waited");
        assert_eq!(metrics.batch_size.get_sample_count(), 1);

        let mut slots = b.try_reserve(2).expect("room in the queue");
        let job = |v: f32| {
            let (reply, rx) = oneshot::channel();
            let image = Tensor::new(&[[[v]]], &Device::Cpu).unwrap();
            let memory = Reservation::default();
            (
                Job {
                    image,
                    task: task_for(v),
                    memory,
                    enqueued: Instant::now(),
                    reply,
                    trace: None,
                },
                rx,
            )
        };
        let (first, first_rx) = job(2.0);
        slots.send(first);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (second, second_rx) = job(3.0);
        slots.send(second);
        drop(slots);
        first_rx.await.unwrap().unwrap();
        second_rx.await.unwrap().unwrap();
        assert_eq!(metrics.batch_size.get_sample_count(), 2, "one batch for the two");
        assert_eq!(metrics.batch_size.get_sample_sum(), 3.0);
        drop(b);
        worker.join().unwrap();
    }

    #[tokio::test]
    async fn a_panicking_batch_fails_only_its_images_and_the_worker_carries_on() {
        let (b, worker, metrics) = start(8, 20);
        let bad = submit(&b, &[1.0, 13.0]);
        for rx in bad {
            assert!(rx.await.unwrap().unwrap_err().contains("unlucky batch"));
        }
        let good = submit(&b, &[2.0]);
        assert_eq!(
            good.into_iter().next().unwrap().await.unwrap().unwrap().outcome,
            Outcome::Embedding(vec![2.0, 2.0])
        );
        assert_eq!(metrics.worker_failures.get(), 1);
        drop(b);
        worker.join().unwrap();
    }

    #[tokio::test]
    async fn images_whose_caller_left_are_not_computed_and_a_full_queue_rejects() {
        let (b, worker, metrics) = start(8, 200);
        let mut receivers = submit(&b, &[1.0, 2.0, 3.0]);
        receivers.remove(1); // the caller of the second image hangs up while it is queued
        for rx in receivers {
            assert!(rx.await.unwrap().is_ok());
        }
        assert_eq!(metrics.cancelled_images.get(), 1);
        assert_eq!(metrics.batch_size.get_sample_sum(), 2.0);
        assert_eq!(b.depth(), 0);
        let held = b.try_reserve(64).expect("the queue is empty again");
        assert!(b.try_reserve(1).is_none(), "a full queue must refuse");
        drop(held);
        assert!(b.try_reserve(64).is_some(), "dropped reservations free their slots");
        drop(b);
        worker.join().unwrap();
    }
}
