//! The HTTP service: axum routes in front of a bounded queue and one inference worker.
//!
//! - [`listener`]: connections: their cap, timeouts and the drain on shutdown.
//! - [`routes`]: the router and the handlers.
//! - [`middleware`]: request ids, JSON errors from the HTTP layers, API keys, request metrics.
//! - [`api`]: the JSON types of the API and its OpenAPI document.
//! - [`auth`]: optional API keys.
//! - [`ui`]: the demo page.
//! - [`docs`]: Swagger UI for the OpenAPI document.
//! - [`v2`]: the Open Inference Protocol (KServe v2), over REST and gRPC.
//! - [`inference`]: admission, preprocessing and the batcher: what every front door shares.
//! - [`input`]: request bodies to encoded images.
//! - [`memory`]: the memory budget every request reserves from.
//! - [`batcher`]: the queue and the inference worker thread.
//! - [`metrics`]: Prometheus metrics.
//! - [`error`]: the error enum and its status codes.

pub mod api;
pub mod auth;
pub mod batcher;
pub mod docs;
pub mod error;
pub mod inference;
pub mod input;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod middleware;
pub mod routes;
pub mod ui;
pub mod v2;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::preprocess::HEADER_READ_BYTES;
use crate::Classifier;
use auth::ApiKeys;
use batcher::{BatchConfig, Batcher};
use input::BodyLimits;
use listener::ConnectionConfig;
use memory::{MemoryPool, ProcessMemory, CONNECTION_BYTES};
use metrics::Metrics;

/// Open connections the metrics listener (`--metrics-port`) takes: a few scrapers.
const METRICS_CONNECTIONS: usize = 16;
/// How long a scrape in progress may take to finish once the server has drained.
const SCRAPE_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    /// Where the v2 gRPC service listens; `None`: off.
    pub grpc_addr: Option<SocketAddr>,
    /// Where /metrics is served on a listener of its own; `None`: on the main port.
    pub metrics_addr: Option<SocketAddr>,
    pub batch: BatchConfig,
    pub request_timeout: Duration,
    pub body: BodyLimits,
    pub max_images_per_request: usize,
    pub default_top_k: usize,
    /// Images decoded and preprocessed at once.
    pub preprocess_threads: usize,
    /// Threads of the async runtime that serves HTTP.
    pub http_threads: usize,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    pub connections: ConnectionConfig,
    /// Bytes the whole process is held under.
    pub memory_budget: u64,
    /// Longest wait for memory before a 503.
    pub memory_wait: Duration,
    /// `None`: the API is open.
    pub api_keys: Option<ApiKeys>,
    /// Whether /metrics needs an API key too.
    pub protect_metrics: bool,
    /// Whether the demo page is served at /ui/ (and / redirects there), and Swagger UI at /docs/.
    pub ui: bool,
    /// Where to write the bound address once the server accepts connections.
    pub address_file: Option<PathBuf>,
}

impl ServeConfig {
    pub fn validate(&self) -> Result<(), String> {
        let b = &self.batch;
        if b.max_batch_size == 0
            || b.queue_capacity == 0
            || self.max_images_per_request == 0
            || self.default_top_k == 0
        {
            return Err(
                "batch size, queue capacity, images per request and top-k must be positive".into(),
            );
        }
        if self.max_images_per_request > b.queue_capacity {
            return Err(format!(
                "max images per request ({}) cannot exceed the queue capacity ({}): such requests could never be admitted",
                self.max_images_per_request, b.queue_capacity
            ));
        }
        if b.max_batch_delay >= self.request_timeout {
            return Err(format!(
                "the batch delay ({} ms) must be shorter than the request timeout ({} ms)",
                b.max_batch_delay.as_millis(),
                self.request_timeout.as_millis()
            ));
        }
        if self.body.max_bytes == 0 || self.connections.max_connections == 0 {
            return Err("the body limit and the connection limit must be positive".into());
        }
        if self.protect_metrics && self.api_keys.is_none() {
            return Err("--protect-metrics needs API keys (--api-key or --api-key-file)".into());
        }
        Ok(())
    }
}

pub struct AppState {
    pub classifier: Arc<Classifier>,
    pub config: ServeConfig,
    pub batcher: Batcher,
    pub metrics: Arc<Metrics>,
    pub memory: MemoryPool,
    pub draining: AtomicBool,
    pub preprocess_slots: Semaphore,
    /// Values in one image's answer (probabilities and features).
    pub answer_values: usize,
}

/// Why `serve` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Every in-flight request was answered.
    Drained,
    /// The grace period ran out with requests still open.
    GraceExpired,
}

/// How the memory budget is spent; see [`memory`].
#[derive(Debug, Clone, Copy)]
pub struct MemoryPlan {
    pub budget: u64,
    /// The process with the model loaded, before warm-up, measured.
    pub loaded: u64,
    /// What the warm-up at the largest batch was estimated to add (checked before it ran).
    pub forward_estimate: u64,
    /// The process's peak through warm-up, measured.
    pub baseline: u64,
    pub connections: u64,
    pub headers: u64,
    pub slack: u64,
    pub requests: u64,
}

impl MemoryPlan {
    fn new(
        config: &ServeConfig,
        loaded: u64,
        forward_estimate: u64,
        baseline: u64,
    ) -> Result<Self, String> {
        let budget = config.memory_budget;
        // gRPC has a cap of its own; an h2 connection holds about what an HTTP/1 one does (its
        // flow-control window of 64 KiB unread, header and write buffers).
        let listeners = 1 + config.grpc_addr.is_some() as u64;
        let scrapers = config.metrics_addr.map_or(0, |_| METRICS_CONNECTIONS) as u64;
        let connections =
            (listeners * config.connections.max_connections as u64 + scrapers) * CONNECTION_BYTES;
        let headers = config.http_threads as u64 * HEADER_READ_BYTES;
        let slack = budget / 16;
        let fixed = baseline + connections + headers + slack;
        let requests = budget.saturating_sub(fixed);
        // The largest body must fit, whatever its type, or such requests could never be served.
        let needed = 4 * config.body.max_bytes as u64;
        if requests < needed {
            return Err(format!(
                "the memory budget of {} MiB leaves {} MiB for requests, less than the {} MiB that one request at the body limit may need \
                 (the model after warm-up holds {} MiB, {} connections up to {} MiB): raise --memory-budget, or lower --body-limit, \
                 --max-connections or --max-batch-size",
                budget >> 20, requests >> 20, needed >> 20, baseline >> 20, config.connections.max_connections, connections >> 20
            ));
        }
        Ok(Self {
            budget,
            loaded,
            forward_estimate,
            baseline,
            connections,
            headers,
            slack,
            requests,
        })
    }
}

/// Listens on `addr`; `what` names the listener in the error (`"for gRPC "`).
async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen {what}on {addr}"))
}

async fn bind_optional(
    addr: Option<SocketAddr>,
    what: &str,
) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => bind(addr, what).await.map(Some),
        None => Ok(None),
    }
}

/// Checks the configuration against the model and the memory budget, warms the model up,
/// binds, then serves until `shutdown` resolves and drains: readiness turns 503, the listener
/// closes, open requests finish (up to the grace period) and the worker empties its queue.
/// Everything that can refuse to start does so before the port is bound.
pub async fn serve(
    classifier: Classifier,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Stopped> {
    config.validate().map_err(anyhow::Error::msg)?;
    let (h, w) = classifier.preprocessor().config.input_size;
    let max_batch = config.batch.max_batch_size;
    let resident = ProcessMemory::read().map_or(0, |m| m.resident);
    let forward = classifier.model().forward_bytes(max_batch, (h, w));
    if resident + forward > config.memory_budget {
        anyhow::bail!(
            "a forward pass at --max-batch-size {max_batch} needs about {} MiB on top of the {} MiB the loaded model holds, over the memory budget of {} MiB: \
             lower --max-batch-size or raise --memory-budget",
            forward >> 20, resident >> 20, config.memory_budget >> 20
        );
    }
    let classifier = Arc::new(classifier);
    memory::reset_peak();
    let warm = classifier.clone();
    tokio::task::spawn_blocking(move || batcher::warm_up(warm.as_ref(), max_batch))
        .await?
        .map_err(anyhow::Error::msg)?;
    let baseline = ProcessMemory::read().map_or(resident + forward, |m| m.peak);
    let plan = MemoryPlan::new(&config, resident, forward, baseline).map_err(anyhow::Error::msg)?;
    tracing::info!(?plan, "memory budget");

    let metrics = Arc::new(Metrics::new(max_batch));
    let model = classifier.model().config();
    metrics
        .model_info
        .with_label_values(&[
            classifier.name(),
            &model.architecture(),
            &model.num_classes.to_string(),
            &format!("{h}x{w}"),
        ])
        .set(1);
    metrics.memory_budget.set(plan.budget as i64);
    metrics.memory_pool.set(plan.requests as i64);
    let listener = bind(config.addr, "").await?;
    let addr = listener.local_addr()?;
    let grpc_listener = bind_optional(config.grpc_addr, "for gRPC ").await?;
    let grpc_addr = grpc_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let metrics_listener = bind_optional(config.metrics_addr, "for metrics ").await?;
    let metrics_addr = metrics_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let (batcher, worker) = Batcher::start(classifier.clone(), config.batch, metrics.clone())?;
    let state = Arc::new(AppState {
        answer_values: model.num_classes + model.feature_dim,
        classifier,
        preprocess_slots: Semaphore::new(config.preprocess_threads.max(1)),
        memory: MemoryPool::new(plan.requests),
        batcher,
        metrics: metrics.clone(),
        draining: AtomicBool::new(false),
        config,
    });
    // When the shutdown signal came: the gRPC server's signal, and the start of its grace.
    let (grpc_stop, grpc_stopped) = tokio::sync::watch::channel(None);
    let grpc = grpc_listener.map(|listener| {
        let mut stopped = grpc_stopped.clone();
        let signal = async move {
            let _ = stopped.wait_for(Option::is_some).await;
        };
        tokio::spawn(v2::grpc::serve(state.clone(), listener, signal))
    });
    // Scrapes are answered until the end, the drain included.
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_server = metrics_listener.map(|listener| {
        let config =
            ConnectionConfig { max_connections: METRICS_CONNECTIONS, ..state.config.connections };
        let signal = async move {
            let _ = metrics_stopped.await;
        };
        let router = routes::metrics_router(state.clone());
        let metrics = metrics.clone();
        tokio::spawn(listener::run(listener, router, config, metrics, signal, || {}, SCRAPE_GRACE))
    });
    tracing::info!(
        %addr,
        grpc = grpc_addr.map(|a| a.to_string()),
        metrics = metrics_addr.map(|a| a.to_string()),
        "listening"
    );
    if let Some(path) = &state.config.address_file {
        write_address(path, addr, grpc_addr, metrics_addr)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }

    let (connections, grace) = (state.config.connections, state.config.shutdown_grace);
    let drain_state = state.clone();
    let on_shutdown = move || {
        drain_state.draining.store(true, Ordering::SeqCst);
        let _ = grpc_stop.send(Some(tokio::time::Instant::now()));
        tracing::info!(grace_seconds = grace.as_secs_f64(), "shutdown signal: draining");
    };
    let stopped = listener::run(
        listener,
        routes::router(state.clone()),
        connections,
        metrics,
        shutdown,
        on_shutdown,
        grace,
    )
    .await;
    let stopped = match grpc {
        None => stopped,
        // gRPC calls in progress get what is left of the grace period.
        Some(mut task) => {
            let since = grpc_stopped.borrow().unwrap_or_else(tokio::time::Instant::now);
            match tokio::time::timeout_at(since + grace, &mut task).await {
                Ok(Ok(Err(e))) => {
                    tracing::warn!(error = %e, "the gRPC server failed");
                    stopped
                }
                Ok(_) => stopped,
                Err(_) => {
                    task.abort();
                    Stopped::GraceExpired
                }
            }
        }
    };
    if stopped == Stopped::GraceExpired {
        tracing::warn!("grace period over with requests still open");
    }
    if let Some(task) = metrics_server {
        let _ = metrics_stop.send(());
        let _ = task.await;
    }
    // The last sender goes with the state: the worker finishes what is queued, then stops.
    drop(state);
    if stopped == Stopped::Drained {
        tokio::task::spawn_blocking(move || worker.join()).await.ok();
    }
    tracing::info!(?stopped, "server stopped");
    Ok(stopped)
}

/// Writes the bound addresses to `path`, one per line: HTTP, then gRPC when gRPC is on (an
/// empty line when it is off but metrics follow), then metrics when on their own port. Through
/// a rename, so that a reader never sees a partial file: whoever waits for it (a supervisor, a
/// test) can connect once it exists.
fn write_address(
    path: &Path,
    addr: SocketAddr,
    grpc: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
) -> std::io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let mut text = format!("{addr}\n");
    if grpc.is_some() || metrics.is_some() {
        text += &grpc.map(|a| a.to_string()).unwrap_or_default();
        text += "\n";
    }
    if let Some(metrics) = metrics {
        text += &format!("{metrics}\n");
    }
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, path)
}
