use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bytesize::ByteSize;
use clap::Args;

use fasternet_serve::server::auth::ApiKeys;
use fasternet_serve::server::batcher::BatchConfig;
use fasternet_serve::server::input::BodyLimits;
use fasternet_serve::server::listener::ConnectionConfig;
use fasternet_serve::server::memory::default_budget;
use fasternet_serve::server::{serve, ServeConfig, Stopped};
use fasternet_serve::Classifier;

use super::{init_threads, ModelArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, env = "FASTERNET_HOST", default_value = "0.0.0.0")]
    host: IpAddr,
    /// 0 picks a free port (logged at start-up, and written to --address-file).
    #[arg(long, env = "FASTERNET_PORT", default_value_t = 8080)]
    port: u16,
    /// Serve the v2 inference protocol over gRPC on this port too (same host); off unless
    /// set; 0 picks a free port.
    #[arg(long, env = "FASTERNET_GRPC_PORT")]
    grpc_port: Option<u16>,
    /// Serve /metrics on this port (same host) instead of the main one, where it then is not
    /// found: keeps the scrape off the port a load balancer exposes. 0 picks a free port.
    #[arg(long, env = "FASTERNET_METRICS_PORT")]
    metrics_port: Option<u16>,
    /// Once the server accepts connections, write its address (host:port) to this file, the
    /// gRPC address on a second line (empty when gRPC is off) and the metrics address on a
    /// third when --metrics-port is set: how a supervisor or a test learns the ports that
    /// port 0 picked.
    #[arg(long, env = "FASTERNET_ADDRESS_FILE")]
    address_file: Option<PathBuf>,
    /// The name the model is served under: the `model` in answers and the `{name}` of the
    /// v2 routes (default: the checkpoint's, e.g. fasternet_t0.fashion_mnist).
    #[arg(long, env = "FASTERNET_MODEL_NAME", value_parser = model_name)]
    model_name: Option<String>,
    /// Most images in one forward pass.
    #[arg(long, env = "FASTERNET_MAX_BATCH_SIZE", default_value_t = 16)]
    max_batch_size: usize,
    /// How long the worker waits after the first queued image for more to fill the batch.
    #[arg(long, env = "FASTERNET_MAX_BATCH_DELAY_MS", default_value_t = 5)]
    max_batch_delay_ms: u64,
    /// Images that may wait for the worker; beyond that requests get 503 + Retry-After.
    #[arg(long, env = "FASTERNET_QUEUE_CAPACITY", default_value_t = 256)]
    queue_capacity: usize,
    /// Requests not answered within this get 504.
    #[arg(long, env = "FASTERNET_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    request_timeout_ms: u64,
    /// Largest request body (413 above), in bytes or with a unit (16MiB).
    #[arg(long, env = "FASTERNET_BODY_LIMIT", default_value = "16MiB")]
    body_limit: ByteSize,
    /// Most images in one request (413 above); at most the queue capacity (default: 64, or
    /// the queue capacity if smaller).
    #[arg(long, env = "FASTERNET_MAX_IMAGES_PER_REQUEST")]
    max_images_per_request: Option<usize>,
    /// Memory the whole process is held under, in bytes or with a unit (768MiB, 2GiB).
    /// Default: 3/4 of the container's memory limit, else 2 GiB (or 3/4 of the machine's
    /// memory if smaller).
    #[arg(long, env = "FASTERNET_MEMORY_BUDGET")]
    memory_budget: Option<ByteSize>,
    /// Longest wait for memory held by other requests before a 503.
    #[arg(long, env = "FASTERNET_MEMORY_WAIT_MS", default_value_t = 1000)]
    memory_wait_ms: u64,
    /// Open connections at most; more wait in the kernel's accept queue.
    #[arg(long, env = "FASTERNET_MAX_CONNECTIONS", default_value_t = 512)]
    max_connections: usize,
    /// Time a client has to send a request's head once it has started sending it.
    #[arg(long, env = "FASTERNET_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    header_read_timeout_ms: u64,
    /// Time an idle keep-alive connection stays open (longer than the idle timeout of a load
    /// balancer in front, so that it never sends on a connection being closed).
    #[arg(long, env = "FASTERNET_KEEP_ALIVE_TIMEOUT_MS", default_value_t = 75_000)]
    keep_alive_timeout_ms: u64,
    /// Longest pause while a request body arrives (408 after it).
    #[arg(long, env = "FASTERNET_BODY_READ_TIMEOUT_MS", default_value_t = 10_000)]
    body_read_timeout_ms: u64,
    /// API key required as `Authorization: Bearer <key>` on the API routes (repeatable; in
    /// the environment, comma-separated). The probes stay open.
    #[arg(
        long = "api-key",
        env = "FASTERNET_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// File with API keys, one per line (`#` comments), added to --api-key: list the old and
    /// the new key while rotating.
    #[arg(long, env = "FASTERNET_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Require an API key on /metrics too.
    #[arg(long, env = "FASTERNET_PROTECT_METRICS")]
    protect_metrics: bool,
    /// Serve the demo page at /ui/ (and redirect / to it) and Swagger UI at /docs/. They call
    /// the same API as any client, under the same limits and keys; `--ui false` removes both.
    #[arg(long, env = "FASTERNET_UI", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    ui: bool,
    /// Labels per image when the request gives no top_k.
    #[arg(long, env = "FASTERNET_DEFAULT_TOP_K", default_value_t = 5)]
    default_top_k: usize,
    /// Images decoded at once on the blocking pool (default: the compute threads); small ones
    /// (e.g. 28x28 uploads) are decoded right on the HTTP workers.
    #[arg(long, env = "FASTERNET_PREPROCESS_THREADS")]
    preprocess_threads: Option<usize>,
    /// Seconds open requests may take to finish after SIGTERM/SIGINT.
    #[arg(long, env = "FASTERNET_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    shutdown_grace_seconds: u64,
    /// Log format: text or json.
    #[arg(long, env = "FASTERNET_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

const DEFAULT_MAX_IMAGES_PER_REQUEST: usize = 64;

pub fn run(args: ServeArgs) -> anyhow::Result<i32> {
    let threads = init_threads(args.model.threads);
    let http_threads = threads.clamp(1, 4);
    let (memory_budget, budget_source) = match args.memory_budget {
        Some(budget) => (budget.as_u64(), "--memory-budget".to_string()),
        None => default_budget(),
    };
    let api_keys =
        ApiKeys::load(&args.api_keys, args.api_key_file.as_deref()).map_err(anyhow::Error::msg)?;
    let config = ServeConfig {
        addr: SocketAddr::new(args.host, args.port),
        grpc_addr: args.grpc_port.map(|port| SocketAddr::new(args.host, port)),
        metrics_addr: args.metrics_port.map(|port| SocketAddr::new(args.host, port)),
        batch: BatchConfig {
            max_batch_size: args.max_batch_size,
            max_batch_delay: Duration::from_millis(args.max_batch_delay_ms),
            queue_capacity: args.queue_capacity,
        },
        request_timeout: Duration::from_millis(args.request_timeout_ms),
        body: BodyLimits {
            max_bytes: usize::try_from(args.body_limit.as_u64()).context("--body-limit")?,
            read_timeout: Duration::from_millis(args.body_read_timeout_ms),
            memory_wait: Duration::from_millis(args.memory_wait_ms),
        },
        max_images_per_request: args
            .max_images_per_request
            .unwrap_or(DEFAULT_MAX_IMAGES_PER_REQUEST.min(args.queue_capacity)),
        default_top_k: args.default_top_k,
        preprocess_threads: args.preprocess_threads.unwrap_or(threads),
        http_threads,
        shutdown_grace: Duration::from_secs(args.shutdown_grace_seconds),
        connections: ConnectionConfig {
            max_connections: args.max_connections,
            header_read_timeout: Duration::from_millis(args.header_read_timeout_ms),
            keep_alive_timeout: Duration::from_millis(args.keep_alive_timeout_ms),
        },
        memory_budget,
        memory_wait: Duration::from_millis(args.memory_wait_ms),
        api_keys,
        protect_metrics: args.protect_metrics,
        ui: args.ui,
        address_file: args.address_file,
    };
    config.validate().map_err(anyhow::Error::msg)?;
    let classifier = Classifier::load(&args.model.load_options())
        .with_context(|| format!("cannot load model from {}", args.model.source()))?;
    let classifier = match args.model_name {
        Some(name) => classifier.with_name(name),
        None => classifier,
    };
    let model = classifier.model().config();
    tracing::info!(
        model = classifier.name(), weights = %classifier.source().display(), classes = model.num_classes,
        engine = %classifier.model().engine(), kernels = classifier.model().kernels(),
        threads, memory_budget, budget_source, ?config, preprocessing = ?classifier.preprocessor().config, "configuration"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(http_threads)
        .enable_all()
        .build()?;
    let stopped = runtime.block_on(serve(classifier, config, shutdown_signal()))?;
    Ok(if stopped == Stopped::Drained { 0 } else { 1 })
}

/// A model name is one URL path segment: letters, digits, `.`, `_` and `-`.
fn model_name(name: &str) -> Result<String, String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if !name.is_empty() && name.len() <= 128 && name.chars().all(allowed) {
        Ok(name.to_string())
    } else {
        Err("use 1 to 128 letters, digits, `.`, `_` or `-`".into())
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
