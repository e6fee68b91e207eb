//! The HTTP service: axum routes in front of a bounded queue and one inference worker.
//!
//! - [`routes`]: handlers, middleware, OpenAPI.
//! - [`input`]: request bodies to encoded images.
//! - [`batcher`]: the queue and the inference worker thread.
//! - [`metrics`]: Prometheus metrics.
//! - [`error`]: the error enum and its status codes.

pub mod batcher;
pub mod error;
pub mod input;
pub mod metrics;
pub mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::Classifier;
use batcher::{BatchConfig, Batcher};
use metrics::Metrics;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    pub batch: BatchConfig,
    pub request_timeout: Duration,
    pub body_limit: usize,
    pub max_images_per_request: usize,
    pub default_top_k: usize,
    /// Images decoded and preprocessed at once.
    pub preprocess_threads: usize,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
}

impl ServeConfig {
    pub fn validate(&self) -> Result<(), String> {
        let b = &self.batch;
        if b.max_batch_size == 0 || b.queue_capacity == 0 || self.max_images_per_request == 0 || self.default_top_k == 0 {
            return Err("batch size, queue capacity, images per request and top-k must be positive".into());
        }
        if self.max_images_per_request > b.queue_capacity {
            return Err(format!(
                "max images per request ({}) cannot exceed the queue capacity ({}): such requests could never be admitted",
                self.max_images_per_request, b.queue_capacity
            ));
        }
        Ok(())
    }
}

pub struct AppState {
    pub classifier: Arc<Classifier>,
    pub config: ServeConfig,
    pub batcher: Batcher,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    pub draining: AtomicBool,
    pub preprocess_slots: Semaphore,
}

/// Why `serve` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Every in-flight request was answered.
    Drained,
    /// The grace period ran out with requests still open.
    GraceExpired,
}

/// Binds, serves until `shutdown` resolves, then drains: readiness turns 503, the listener
/// closes, open requests finish (up to the grace period) and the worker empties its queue.
/// `on_bound` hears the real address (useful with port 0).
pub async fn serve(
    classifier: Classifier,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(SocketAddr),
) -> anyhow::Result<Stopped> {
    config.validate().map_err(anyhow::Error::msg)?;
    let classifier = Arc::new(classifier);
    let metrics = Arc::new(Metrics::new(config.batch.max_batch_size));
    let (h, w) = classifier.preprocessor().config.input_size;
    let model = classifier.model().config();
    metrics
        .model_info
        .with_label_values(&[classifier.name(), &model.architecture(), &model.num_classes.to_string(), &format!("{h}x{w}")])
        .set(1);
    let ready = Arc::new(AtomicBool::new(false));
    let (batcher, worker) = Batcher::start(classifier.clone(), config.batch, metrics.clone(), ready.clone())?;
    let listener = TcpListener::bind(config.addr).await?;
    let addr = listener.local_addr()?;
    let grace = config.shutdown_grace;
    let state = Arc::new(AppState {
        classifier,
        preprocess_slots: Semaphore::new(config.preprocess_threads.max(1)),
        config,
        batcher,
        metrics,
        ready,
        draining: AtomicBool::new(false),
    });
    tracing::info!(%addr, "listening");
    on_bound(addr);

    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_state = state.clone();
    let on_signal = async move {
        shutdown.await;
        drain_state.draining.store(true, Ordering::SeqCst);
        tracing::info!(grace_seconds = grace.as_secs_f64(), "shutdown signal: draining");
        let _ = signalled_tx.send(());
    };
    let server = axum::serve(listener, routes::router(state.clone())).with_graceful_shutdown(on_signal);
    let stopped = tokio::select! {
        result = server => { result?; Stopped::Drained }
        _ = async { if signalled_rx.await.is_ok() { tokio::time::sleep(grace).await } else { std::future::pending().await } } => {
            tracing::warn!("grace period over with requests still open");
            Stopped::GraceExpired
        }
    };
    // The last sender goes with the state: the worker finishes what is queued, then stops.
    drop(state);
    if stopped == Stopped::Drained {
        tokio::task::spawn_blocking(move || worker.join()).await.ok();
    }
    tracing::info!(?stopped, "server stopped");
    Ok(stopped)
}
