//! Prometheus metrics. Names carry units and counters end in `_total`, so
//! `promtool check metrics` has nothing to warn about.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets from 1 ms to 30 s, growing about x1.5-2.5.
const SECONDS: &[f64] = &[
    0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub images: IntCounterVec,
    pub queue_depth: IntGauge,
    pub queue_wait: Histogram,
    pub batch_size: Histogram,
    pub inference_duration: Histogram,
    pub preprocess_duration: Histogram,
    pub rejections: IntCounterVec,
    pub cancelled_images: IntCounter,
    pub worker_failures: IntCounter,
    pub model_info: IntGaugeVec,
    pub memory_budget: IntGauge,
    pub memory_pool: IntGauge,
    pub memory_reserved: IntGauge,
    pub open_connections: IntGauge,
    pub header_timeouts: IntCounter,
    pub grpc_requests: IntCounterVec,
    pub grpc_request_duration: HistogramVec,
}

impl Metrics {
    pub fn new(max_batch_size: usize) -> Self {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            r.register(Box::new(c.clone())).expect("metric names are unique");
            c
        }
        let secs =
            |name: &str, help: &str| HistogramOpts::new(name, help).buckets(SECONDS.to_vec());
        let mut batch_buckets: Vec<f64> = std::iter::successors(Some(1usize), |b| Some(b * 2))
            .take_while(|&b| b < max_batch_size)
            .map(|b| b as f64)
            .collect();
        batch_buckets.push(max_batch_size as f64);
        let m = Self {
            requests: reg(&registry, IntCounterVec::new(Opts::new("fasternet_http_requests_total", "HTTP requests answered, by route and status code."), &["route", "status"]).unwrap()),
            request_duration: reg(&registry, HistogramVec::new(secs("fasternet_http_request_duration_seconds", "Time from request to response, by route."), &["route"]).unwrap()),
            images: reg(&registry, IntCounterVec::new(Opts::new("fasternet_images_processed_total", "Images that went through the model, by route."), &["route"]).unwrap()),
            queue_depth: reg(&registry, IntGauge::new("fasternet_queue_depth", "Images queued and not yet in a forward pass (the batch being formed included).").unwrap()),
            queue_wait: reg(&registry, Histogram::with_opts(secs("fasternet_queue_wait_seconds", "Time an image waited in the queue before its forward pass.")).unwrap()),
            batch_size: reg(&registry, Histogram::with_opts(HistogramOpts::new("fasternet_batch_size", "Images per forward pass.").buckets(batch_buckets)).unwrap()),
            inference_duration: reg(&registry, Histogram::with_opts(secs("fasternet_inference_duration_seconds", "Duration of one batched forward pass.")).unwrap()),
            preprocess_duration: reg(&registry, Histogram::with_opts(secs("fasternet_preprocess_duration_seconds", "Decode, resize, crop and normalise of one image.")).unwrap()),
            rejections: reg(&registry, IntCounterVec::new(Opts::new("fasternet_rejections_total", "Requests answered with an error, by reason."), &["reason"]).unwrap()),
            cancelled_images: reg(&registry, IntCounter::new("fasternet_cancelled_images_total", "Queued images dropped before compute because their caller had gone.").unwrap()),
            worker_failures: reg(&registry, IntCounter::new("fasternet_worker_failures_total", "Forward passes that failed or panicked.").unwrap()),
            model_info: reg(&registry, IntGaugeVec::new(Opts::new("fasternet_model_info", "The served model (always 1)."), &["model", "architecture", "num_classes", "input_size"]).unwrap()),
            memory_budget: reg(&registry, IntGauge::new("fasternet_memory_budget_bytes", "The memory budget the process is held under (--memory-budget).").unwrap()),
            memory_pool: reg(&registry, IntGauge::new("fasternet_memory_request_pool_bytes", "The part of the budget that requests reserve from.").unwrap()),
            memory_reserved: reg(&registry, IntGauge::new("fasternet_memory_reserved_bytes", "Bytes reserved by requests in progress.").unwrap()),
            open_connections: reg(&registry, IntGauge::new("fasternet_open_connections", "Open HTTP connections.").unwrap()),
            header_timeouts: reg(&registry, IntCounter::new("fasternet_header_timeouts_total", "Connections closed because a request head did not arrive in time.").unwrap()),
            grpc_requests: reg(&registry, IntCounterVec::new(Opts::new("fasternet_grpc_requests_total", "gRPC inference calls answered, by method and status code."), &["method", "code"]).unwrap()),
            grpc_request_duration: reg(&registry, HistogramVec::new(secs("fasternet_grpc_request_duration_seconds", "Time from gRPC inference call to answer, by method."), &["method"]).unwrap()),
            registry,
        };
        let build = IntGaugeVec::new(
            Opts::new("fasternet_build_info", "Build of this server (always 1)."),
            &["version"],
        )
        .unwrap();
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        reg(&m.registry, build);
        m
    }

    pub fn render(&self) -> String {
        TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_default()
    }
}
