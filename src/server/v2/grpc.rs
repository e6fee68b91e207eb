//! The v2 protocol over gRPC (`inference.GRPCInferenceService`, generated from
//! proto/grpc_predict_v2.proto) on its own port, `--grpc-port`. Requests take the same path
//! as REST ones; outputs always come back as `raw_output_contents`. The largest message is
//! the body limit, and its memory is reserved before it is read (see `ReserveMessage`); open
//! connections are capped at `--max-connections`, like HTTP's (see `capped`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Code, Request, Response, Status};
use tracing::field::Empty;
use tracing::Instrument;

use super::{
    check_model, outputs, plan_outputs, read_inputs, tensors, Data, InputTensor, Requested,
    EXTENSIONS, MODEL_VERSION, PLATFORM,
};
use crate::server::error::ApiError;
use crate::server::inference::{self, Inputs};
use crate::server::memory::{Refused, Reservation};
use crate::server::AppState;
use crate::telemetry;

#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use proto::infer_parameter::ParameterChoice;
use proto::model_infer_response::InferOutputTensor;
use proto::model_metadata_response::TensorMetadata;
use proto::*;

/// The method path the images counter and the request metrics name.
const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";
/// Most bytes one ModelInfer message holds per byte on the wire: tonic's buffer, the decoded
/// message (its `bytes` fields are slices of the buffer; typed FP32 contents are not) and the
/// FP32 values split into per-image buffers.
const MESSAGE_COPIES: u64 = 3;
/// Streams one connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Serves gRPC on `listener` until `shutdown` resolves; requests in progress then finish.
pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let limit = state.config.body.max_bytes;
    let service = GrpcInferenceServiceServer::new(Service { state: state.clone() })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    let incoming = capped(listener, state.config.connections.max_connections);
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .layer(tower::layer::layer_fn(move |inner| ReserveMessage { inner, state: state.clone() }))
        .serve_with_incoming_shutdown(service, incoming, shutdown)
        .await
}

/// Accepted connections, at most `max` open at once (beyond it new ones wait in the kernel's
/// accept queue), with Nagle's algorithm off: tonic sets neither on connections it is given.
/// Accept errors (out of file descriptors, say) are logged and paused on.
fn capped(listener: TcpListener, max: usize) -> impl Stream<Item = std::io::Result<Capped>> {
    let slots = Arc::new(Semaphore::new(max.max(1)));
    futures_util::stream::unfold((listener, slots), |(listener, slots)| async move {
        loop {
            let slot = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((Ok(Capped { stream, _slot: slot }), (listener, slots)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "gRPC accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// A connection holding one of the open-connection slots until it closes.
struct Capped {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Capped {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

struct Service {
    state: Arc<AppState>,
}

impl Service {
    /// The model's calls need an API key when keys are configured, as over HTTP.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        match &self.state.config.api_keys {
            Some(keys)
                if !keys.accepts(request.metadata().get("authorization").map(|v| v.as_bytes())) =>
            {
                Err(self.status(ApiError::Unauthorized))
            }
            _ => Ok(()),
        }
    }

    /// The gRPC status for an error, counted like an HTTP rejection.
    fn status(&self, e: ApiError) -> Status {
        self.state.metrics.rejections.with_label_values(&[e.code()]).inc();
        Status::new(code(&e), e.to_string())
    }

    fn ready(&self) -> bool {
        !self.state.draining.load(Ordering::SeqCst)
    }

    async fn infer(
        &self,
        mut request: Request<ModelInferRequest>,
    ) -> Result<ModelInferResponse, ApiError> {
        let mut memory = request
            .extensions_mut()
            .remove::<MessageMemory>()
            .and_then(|m| m.0.lock().unwrap_or_else(|e| e.into_inner()).take())
            .unwrap_or_default();
        let request = request.into_inner();
        memory.shrink_to(prost::Message::encoded_len(&request) as u64 * MESSAGE_COPIES);
        check_model(&self.state, &request.model_name, Some(&request.model_version))?;
        let state = &self.state;
        let (mut inferred, (requested, id)) =
            inference::infer(state, MODEL_INFER, |_| async move {
                let requested = request.outputs.into_iter().map(|o| Requested {
                    classification: match o
                        .parameters
                        .get("classification")
                        .and_then(|p| p.parameter_choice.as_ref())
                    {
                        Some(ParameterChoice::Int64Param(k)) => {
                            Some(usize::try_from(*k).unwrap_or(0))
                        }
                        _ => None,
                    },
                    binary: None,
                    name: o.name,
                });
                let (requested, task) = plan_outputs(state, Some(requested.collect()))?;
                let mut raw = request.raw_input_contents.into_iter();
                let (h, w) = state.classifier.preprocessor().config.input_size;
                let mut inputs = request.inputs;
                let contents: Vec<_> =
                    inputs.iter_mut().map(|i| i.contents.take().unwrap_or_default()).collect();
                let inputs = inputs
                    .iter()
                    .zip(contents)
                    .map(|(input, contents)| {
                        let data = match raw.next() {
                            Some(raw) => Data::Raw(raw),
                            None if input.datatype == "BYTES" => {
                                Data::Bytes(contents.bytes_contents)
                            }
                            // Per-image buffers, which become the tensors.
                            None => Data::Fp32(
                                contents
                                    .fp32_contents
                                    .chunks(3 * h * w)
                                    .map(<[f32]>::to_vec)
                                    .collect(),
                            ),
                        };
                        InputTensor {
                            name: &input.name,
                            datatype: &input.datatype,
                            shape: &input.shape,
                            data,
                        }
                    })
                    .collect();
                let items = read_inputs(state, inputs)?;
                Ok((Inputs { items, task, memory }, (requested, request.id)))
            })
            .await?;
        let mut response = ModelInferResponse {
            model_name: state.classifier.name().to_string(),
            model_version: MODEL_VERSION.into(),
            id,
            ..Default::default()
        };
        for output in outputs(state, requested, &mut inferred)? {
            response.raw_output_contents.push(output.data.to_raw().into());
            response.outputs.push(InferOutputTensor {
                name: output.name,
                datatype: output.data.datatype().into(),
                shape: output.shape,
                ..Default::default()
            });
        }
        Ok(response)
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Service {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: self.ready() }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        self.authorize(&request)?;
        let r = request.get_ref();
        check_model(&self.state, &r.name, Some(&r.version)).map_err(|e| self.status(e))?;
        Ok(Response::new(ModelReadyResponse { ready: self.ready() }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.authorize(&request)?;
        let r = request.get_ref();
        check_model(&self.state, &r.name, Some(&r.version)).map_err(|e| self.status(e))?;
        let (inputs, outputs) = tensors(&self.state);
        let convert = |t: Vec<super::TensorMetadata>| {
            t.into_iter()
                .map(|t| TensorMetadata {
                    name: t.name.into(),
                    datatype: t.datatype.into(),
                    shape: t.shape,
                })
                .collect()
        };
        Ok(Response::new(ModelMetadataResponse {
            name: self.state.classifier.name().into(),
            versions: vec![MODEL_VERSION.into()],
            platform: PLATFORM.into(),
            inputs: convert(inputs),
            outputs: convert(outputs),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let started = Instant::now();
        self.authorize(&request)?;
        let span = tracing::debug_span!(
            "request",
            rpc = "ModelInfer",
            trace_id = Empty,
            otel.name = Empty,
            otel.kind = Empty,
            otel.status_code = Empty,
            rpc.grpc.status_code = Empty
        );
        if telemetry::tracing_enabled() {
            let headers = request.metadata().clone().into_headers();
            telemetry::continue_trace(&span, &headers, &MODEL_INFER[1..]);
        }
        let result = self.infer(request).instrument(span.clone()).await;
        let metrics = &self.state.metrics;
        let code = result.as_ref().map_or_else(code, |_| Code::Ok);
        if telemetry::tracing_enabled() {
            span.record("rpc.grpc.status_code", code as i32);
            if matches!(code, Code::Internal | Code::Unavailable | Code::DeadlineExceeded) {
                span.record("otel.status_code", "ERROR");
            }
        }
        metrics.grpc_requests.with_label_values(&[MODEL_INFER, code.description()]).inc();
        metrics
            .grpc_request_duration
            .with_label_values(&[MODEL_INFER])
            .observe(started.elapsed().as_secs_f64());
        result.map(Response::new).map_err(|e| self.status(e))
    }
}

/// The gRPC code for the HTTP status an error has on the REST routes.
fn code(e: &ApiError) -> Code {
    match e.status().as_u16() {
        401 => Code::Unauthenticated,
        404 => Code::NotFound,
        408 | 504 => Code::DeadlineExceeded,
        413 => Code::ResourceExhausted,
        499 => Code::Cancelled,
        503 => Code::Unavailable,
        500..=599 => Code::Internal,
        _ => Code::InvalidArgument,
    }
}

/// The memory a ModelInfer message was read into, reserved by [`ReserveMessage`] and handed
/// to the request (extensions must be `Clone`, hence the shared cell).
#[derive(Clone)]
struct MessageMemory(Arc<Mutex<Option<Reservation>>>);

/// Reserves the memory of the largest ModelInfer message before tonic reads one, so that
/// concurrent calls cannot hold more than the budget: a call that cannot get it within
/// `--memory-wait-ms` is UNAVAILABLE without its message being read.
#[derive(Clone)]
struct ReserveMessage<S> {
    inner: S,
    state: Arc<AppState>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<axum::http::Request<B>> for ReserveMessage<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: axum::http::Request<B>) -> Self::Future {
        // The clone is the one polled ready: swap it in (tower's documented pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        Box::pin(async move {
            if request.uri().path() == MODEL_INFER {
                let bytes = state.config.body.max_bytes as u64 * MESSAGE_COPIES;
                match state.memory.reserve(bytes, state.config.body.memory_wait).await {
                    Ok(memory) => {
                        request
                            .extensions_mut()
                            .insert(MessageMemory(Arc::new(Mutex::new(Some(memory)))));
                    }
                    Err(Refused::Busy | Refused::NeverFits { .. }) => {
                        let service = Service { state };
                        return Ok(service.status(ApiError::ServerBusy).into_http());
                    }
                }
            }
            inner.call(request).await
        })
    }
}
