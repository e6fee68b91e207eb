use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use fasternet_serve::server::batcher::BatchConfig;
use fasternet_serve::server::{serve, ServeConfig, Stopped};
use fasternet_serve::Classifier;

use super::{init_threads, ModelArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, env = "FASTERNET_HOST", default_value = "0.0.0.0")]
    host: IpAddr,
    /// 0 picks a free port (logged at start-up).
    #[arg(long, env = "FASTERNET_PORT", default_value_t = 8080)]
    port: u16,
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
    /// Largest request body in bytes (413 above).
    #[arg(long, env = "FASTERNET_BODY_LIMIT", default_value_t = 16 * 1024 * 1024)]
    body_limit: usize,
    /// Most images in one request (413 above); at most the queue capacity.
    #[arg(long, env = "FASTERNET_MAX_IMAGES_PER_REQUEST", default_value_t = 64)]
    max_images_per_request: usize,
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

pub fn run(args: ServeArgs) -> anyhow::Result<i32> {
    let threads = init_threads(args.model.threads);
    let config = ServeConfig {
        addr: SocketAddr::new(args.host, args.port),
        batch: BatchConfig {
            max_batch_size: args.max_batch_size,
            max_batch_delay: Duration::from_millis(args.max_batch_delay_ms),
            queue_capacity: args.queue_capacity,
        },
        request_timeout: Duration::from_millis(args.request_timeout_ms),
        body_limit: args.body_limit,
        max_images_per_request: args.max_images_per_request,
        default_top_k: args.default_top_k,
        preprocess_threads: args.preprocess_threads.unwrap_or(threads),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_seconds),
    };
    config.validate().map_err(anyhow::Error::msg)?;
    let classifier = Classifier::load(&args.model.load_options())
        .with_context(|| format!("cannot load model from {}", args.model.weights.display()))?;
    let model = classifier.model().config();
    tracing::info!(
        model = classifier.name(), weights = %classifier.source().display(), classes = model.num_classes,
        engine = %classifier.model().engine(), kernels = classifier.model().kernels(),
        threads, ?config, preprocessing = ?classifier.preprocessor().config, "configuration"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.clamp(1, 4))
        .enable_all()
        .build()?;
    let stopped = runtime.block_on(serve(classifier, config, shutdown_signal(), |_| {}))?;
    Ok(if stopped == Stopped::Drained { 0 } else { 1 })
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
