//! OpenTelemetry traces, exported to OTLP collectors that the tests start (gRPC and
//! http/protobuf), built on the collector protocol's own generated code.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, Span};
use prost::Message;
use reqwest::multipart::{Form, Part};

/// What a collector received.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ResourceSpans>>>);

impl Received {
    fn spans(&self) -> Vec<Span> {
        let all = self.0.lock().unwrap();
        all.iter().flat_map(|r| &r.scope_spans).flat_map(|s| s.spans.iter().cloned()).collect()
    }

    fn service_names(&self) -> Vec<String> {
        let all = self.0.lock().unwrap();
        all.iter()
            .filter_map(|r| r.resource.as_ref())
            .filter_map(|r| string(&r.attributes, "service.name"))
            .collect()
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().extend(request.into_inner().resource_spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC collector on a loopback port; returns its endpoint.
async fn grpc_collector(received: Received) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        Some((listener.accept().await.map(|(stream, _)| stream), listener))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .serve_with_incoming(TraceServiceServer::new(received), incoming),
    );
    format!("http://{addr}")
}

/// An OTLP/HTTP (protobuf) collector on a loopback port; returns its endpoint.
async fn http_collector(received: Received) -> String {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let received = received.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                received.0.lock().unwrap().extend(request.resource_spans);
                (
                    [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()
}

fn string(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attribute(attributes, key)? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attribute(attributes, key)? {
        Value::IntValue(v) => Some(*v),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The caller's trace for the HTTP request and for the gRPC one.
const HTTP_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const HTTP_PARENT: &str = "b7ad6b7169203331";
const GRPC_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const GRPC_PARENT: &str = "00f067aa0ba902b7";

/// Whether the received spans hold everything the requests should have made.
fn complete(spans: &[Span], grpc: bool) -> bool {
    let servers = spans.iter().filter(|s| s.kind == SpanKind::Server as i32).count();
    let forwards = spans.iter().filter(|s| s.name == "forward").count();
    servers >= if grpc { 3 } else { 2 } && forwards >= 1 && spans.len() >= 8
}

/// The spans of one request: its server span, and each of its images' preprocessing,
/// decoding and queue wait; the forward passes link to it.
fn check_request(spans: &[Span], name: &str, trace: &str, parent: &str, images: usize) -> Span {
    let request = spans
        .iter()
        .find(|s| s.name == name && hex(&s.trace_id) == trace)
        .unwrap_or_else(|| panic!("no `{name}` span in trace {trace}: {spans:#?}"));
    assert_eq!(request.kind, SpanKind::Server as i32, "{request:#?}");
    assert_eq!(hex(&request.parent_span_id), parent, "the caller's span is the parent");
    let children = |of: &Span, name: &str| -> Vec<Span> {
        spans
            .iter()
            .filter(|s| {
                s.name == name && s.parent_span_id == of.span_id && s.trace_id == of.trace_id
            })
            .cloned()
            .collect()
    };
    let preprocess = children(request, "preprocess");
    let mut indices: Vec<i64> = preprocess
        .iter()
        .map(|s| int(&s.attributes, "image.index").expect("image.index"))
        .collect();
    indices.sort();
    assert_eq!(indices, (0..images as i64).collect::<Vec<_>>(), "one preprocess span per image");
    for p in &preprocess {
        let decode = children(p, "decode_resize");
        assert_eq!(decode.len(), 1, "decoding is a child of preprocessing: {p:#?}");
        assert!(int(&decode[0].attributes, "image.bytes").unwrap() > 0);
        assert!(decode[0].start_time_unix_nano >= p.start_time_unix_nano);
        assert!(decode[0].end_time_unix_nano <= p.end_time_unix_nano);
    }
    let queued = children(request, "queue_wait");
    assert_eq!(queued.len(), images, "one queue-wait span per image");
    // The forward passes are spans of their own traces, linked to the request, once each.
    let forwards: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "forward" && s.links.iter().any(|l| l.span_id == request.span_id))
        .collect();
    assert!(!forwards.is_empty(), "no forward pass links to {name}: {spans:#?}");
    let mut computed = 0;
    for forward in &forwards {
        assert!(forward.parent_span_id.is_empty(), "a forward pass is a root span");
        assert_ne!(forward.trace_id, request.trace_id);
        let batch = int(&forward.attributes, "batch_size").expect("batch_size");
        let links = forward.links.iter().filter(|l| l.span_id == request.span_id).count();
        assert_eq!(links, 1, "one link per request, however many of its images: {forward:#?}");
        assert!(batch as usize >= 1 && batch as usize <= images + 8, "{forward:#?}");
        computed += batch as usize;
        for q in &queued {
            assert!(q.end_time_unix_nano <= forward.end_time_unix_nano);
        }
    }
    assert!(computed >= images, "the linked passes computed every image");
    request.clone()
}

/// JSON log lines written in the span of a request with this trace id.
fn logged_with_trace(logs: &[String], trace: &str) -> usize {
    logs.iter()
        .filter(|l| {
            let line: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            line["span"]["trace_id"] == trace
        })
        .count()
}

async fn exports_request_traces(protocol: &str) {
    let received = Received::default();
    let endpoint = match protocol {
        "grpc" => grpc_collector(received.clone()).await,
        _ => http_collector(received.clone()).await,
    };
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        ("OTEL_SERVICE_NAME", "tracing-test"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let s = Server::start_with_env(&["--grpc-port", "0"], &env).await;
    let client = reqwest::Client::new();
    // Two images in one request, with the caller's trace.
    let form = Form::new()
        .part("a", Part::bytes(small_png(1)).file_name("a.png").mime_str("image/png").unwrap())
        .part("b", Part::bytes(small_png(2)).file_name("b.png").mime_str("image/png").unwrap());
    let r = client
        .post(s.url("/classify"))
        .header("traceparent", format!("00-{HTTP_TRACE}-{HTTP_PARENT}-01"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // One image without a trace: the server starts one.
    let r = client
        .post(s.url("/embed"))
        .header("content-type", "image/png")
        .body(small_png(4))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let grpc =
        tritonclient_model_infer(&s, Some(&format!("00-{GRPC_TRACE}-{GRPC_PARENT}-01"))).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    while !complete(&received.spans(), grpc) {
        assert!(Instant::now() < deadline, "spans missing: {:#?}", received.spans());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Late spans of the same batch.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = received.spans();
    assert!(received.service_names().iter().all(|n| n == "tracing-test"));

    let classify = check_request(&spans, "POST /classify", HTTP_TRACE, HTTP_PARENT, 2);
    assert_eq!(int(&classify.attributes, "http.response.status_code"), Some(200));
    assert!(string(&classify.attributes, "request_id").is_some_and(|id| id.len() > 8));
    let embed = spans
        .iter()
        .find(|s| s.name == "POST /embed")
        .unwrap_or_else(|| panic!("no embed span: {spans:#?}"));
    let embed_trace = hex(&embed.trace_id);
    assert_ne!(embed_trace, HTTP_TRACE);
    check_request(&spans, "POST /embed", &embed_trace, "", 1);
    if grpc {
        let infer = check_request(
            &spans,
            "inference.GRPCInferenceService/ModelInfer",
            GRPC_TRACE,
            GRPC_PARENT,
            1,
        );
        assert_eq!(int(&infer.attributes, "rpc.grpc.status_code"), Some(0));
    }

    // The JSON log lines of each HTTP request carry its trace id.
    let logs: Vec<String> = s.logs.try_iter().collect();
    assert!(logged_with_trace(&logs, HTTP_TRACE) >= 1, "{}", logs.join("\n"));
    assert!(logged_with_trace(&logs, &embed_trace) >= 1, "{}", logs.join("\n"));
}

#[tokio::test]
async fn exports_request_traces_over_otlp_grpc() {
    exports_request_traces("grpc").await;
}

#[tokio::test]
async fn exports_request_traces_over_otlp_http_protobuf() {
    exports_request_traces("http/protobuf").await;
}

/// Without an OTLP endpoint nothing is traced: a `traceparent` changes nothing and the log
/// lines carry no trace id. An unreachable collector does not fail requests either.
#[tokio::test]
async fn tracing_is_off_without_an_endpoint_and_harmless_without_a_collector() {
    for env in [vec![], vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")]] {
        let s = Server::start_with_env(&[], &env).await;
        let r = reqwest::Client::new()
            .post(s.url("/classify"))
            .header("content-type", "image/png")
            .header("traceparent", format!("00-{HTTP_TRACE}-{HTTP_PARENT}-01"))
            .body(small_png(5))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let logs = s.logs_through_responses(1);
        let traced = logged_with_trace(&logs, HTTP_TRACE);
        if env.is_empty() {
            assert_eq!(traced, 0, "{}", logs.join("\n"));
            assert!(!logs.iter().any(|l| l.contains("trace_id")), "{}", logs.join("\n"));
        } else {
            assert!(traced >= 1, "{}", logs.join("\n"));
        }
    }
}
