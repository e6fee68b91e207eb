//! Logs and traces.
//!
//! Logs go to stderr as text or JSON lines, filtered by `RUST_LOG` (default `info`).
//!
//! Traces are exported over OTLP when the standard OpenTelemetry environment names an endpoint
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), and only for
//! `serve`. The exporter, sampler and resource read the rest of that environment themselves
//! (`OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_TRACES_SAMPLER`, `OTEL_SERVICE_NAME`, ...). The spans
//! only traces use are at `debug` level and the log filter stops at `info`, so with tracing off
//! they are never created: the callsites are disabled once and cost a load and a branch.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Set once when traces are exported; read on every request.
static TRACING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported: when not, nothing on the request path looks at trace context.
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Keeps the exporter running; dropping it flushes the spans still buffered. Drop it outside
/// any async runtime (the http/protobuf exporter's client blocks).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The gRPC exporter's connection lives on a runtime of its own: the SDK exports from a
    /// plain thread.
    _runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("warning: traces not all exported at exit: {e}");
            }
        }
    }
}

/// Installs the global subscriber: logs always, traces when `traces` is asked for and the
/// environment configures an OTLP endpoint.
pub fn init(json_logs: bool, traces: bool) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let (exporter, runtime) = match traces.then(Protocol::configured).transpose()? {
        Some(Some(protocol)) => {
            let (exporter, runtime) = protocol.exporter()?;
            (Some(exporter), runtime)
        }
        _ => (None, None),
    };
    let provider = exporter.map(|exporter| {
        SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource()).build()
    });
    match &provider {
        // The filter for everything, as when there were only logs.
        None => tracing_subscriber::registry().with(filter).with(logs(json_logs)).try_init()?,
        // Each layer its own filter: the spans' includes this crate's `debug` spans.
        Some(provider) => {
            let spans = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(env!("CARGO_PKG_NAME")))
                .with_filter(
                    Targets::new().with_target(env!("CARGO_CRATE_NAME"), tracing::Level::DEBUG),
                );
            tracing_subscriber::registry()
                .with(logs(json_logs).with_filter(filter))
                .with(spans)
                .try_init()?
        }
    }
    TRACING.store(provider.is_some(), Ordering::Relaxed);
    Ok(Telemetry { provider, _runtime: runtime })
}

/// Log lines to stderr, as text (coloured on a terminal) or JSON.
fn logs<S>(json: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        logs.json().boxed()
    } else {
        logs.boxed()
    }
}

/// The OTLP transports this binary has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    /// The protocol to export with, or `None` when no endpoint is configured (or the SDK is
    /// disabled). As the specification says, `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` comes before
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`, and the default is http/protobuf.
    fn configured() -> anyhow::Result<Option<Self>> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none");
        if endpoint.is_none() || disabled {
            return Ok(None);
        }
        let protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .unwrap_or_else(|| "http/protobuf".into());
        match protocol.as_str() {
            "grpc" => Ok(Some(Self::Grpc)),
            "http/protobuf" => Ok(Some(Self::HttpProtobuf)),
            other => anyhow::bail!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported: use grpc or http/protobuf"
            ),
        }
    }

    /// The span exporter, which reads the endpoint, headers and timeout from the environment,
    /// and for gRPC the runtime its connection runs on.
    fn exporter(
        self,
    ) -> anyhow::Result<(opentelemetry_otlp::SpanExporter, Option<tokio::runtime::Runtime>)> {
        let builder = opentelemetry_otlp::SpanExporter::builder();
        Ok(match self {
            Self::Grpc => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("otlp-grpc")
                    .enable_all()
                    .build()?;
                let exporter = {
                    let _entered = runtime.enter();
                    builder.with_tonic().build().context("OTLP gRPC exporter")?
                };
                (exporter, Some(runtime))
            }
            Self::HttpProtobuf => {
                (builder.with_http().build().context("OTLP http/protobuf exporter")?, None)
            }
        })
    }
}

/// The SDK's resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, ...) with this
/// binary's name as the service name unless the environment gives one, and its version.
fn resource() -> Resource {
    let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| a.contains("service.name="));
    let builder = Resource::builder()
        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if named {
        builder.build()
    } else {
        builder.with_service_name(env!("CARGO_PKG_NAME")).build()
    }
}

/// Makes `span` (a request's, created with empty `otel.name`, `otel.kind` and `trace_id`
/// fields) a server span named `name` that continues the trace of an incoming W3C
/// `traceparent`, and records its trace id, which the JSON log lines then carry. Call it only
/// with tracing on.
pub fn continue_trace(span: &tracing::Span, headers: &axum::http::HeaderMap, name: &str) {
    span.record("otel.kind", "server");
    let parent =
        TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    // Fails only when the span is disabled (filtered out), and then there is nothing to do.
    let _ = span.set_parent(parent);
    span.record("otel.name", name);
    let trace_id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(trace_id));
}

/// The trace position of the current span, for a link from a span in another trace (the
/// forward pass that computes this request's images with others); `None` when tracing is off.
pub fn current_span_context() -> Option<SpanContext> {
    tracing_enabled().then(|| tracing::Span::current().context().span().span_context().clone())
}
