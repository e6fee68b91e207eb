//! The v2 REST routes, on the HTTP port beside the JSON API, with the binary tensor data
//! extension: a body whose first `Inference-Header-Content-Length` bytes are the JSON request,
//! followed by the raw data of each input that declares `binary_data_size`, in input order.
//! Errors are the protocol's `{"error": "..."}` with the same status codes as `/classify`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{
    check_model, outputs, plan_outputs, read_inputs, tensors, Data, InputTensor, OutputData,
    Requested, TensorMetadata, EXTENSIONS, MODEL_VERSION, PLATFORM,
};
use crate::server::error::ApiError;
use crate::server::inference::{self, Inputs};
use crate::server::input::read_body_reserved;
use crate::server::routes::with_timings;
use crate::server::AppState;

pub const INFERENCE_HEADER: &str = "inference-header-content-length";
/// What the images counter calls these requests.
const ROUTE: &str = "/v2/models/{name}/infer";
/// Most bytes reading a body holds per body byte: the body, FP32 values parsed from JSON text
/// (4 bytes from at least 2), or images decoded from base64 (3 from 4).
const BODY_COPIES: u64 = 3;

/// Probes and the server's metadata: open like `/healthz`.
pub fn open_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
}

/// The model's routes: behind API keys when they are configured.
pub fn model_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata_version))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_ready_version))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_version))
}

/// An [`ApiError`] with the protocol's body, `{"error": "<message>"}`.
pub struct V2Error(pub ApiError);

impl From<ApiError> for V2Error {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

#[derive(Serialize, ToSchema)]
pub struct V2ErrorBody {
    pub error: String,
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        let body = Json(V2ErrorBody { error: self.0.to_string() }).into_response();
        let (parts, _) = self.0.into_response().into_parts();
        Response::from_parts(parts, body.into_body())
    }
}

#[derive(Serialize, ToSchema)]
pub struct ServerMetadata {
    pub name: &'static str,
    pub version: &'static str,
    pub extensions: &'static [&'static str],
}

#[utoipa::path(get, path = "/v2", tag = "v2", responses((status = 200, body = ServerMetadata)))]
pub async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: env!("CARGO_PKG_NAME"),
        version: env!("CARGO_PKG_VERSION"),
        extensions: EXTENSIONS,
    })
}

#[derive(Serialize, ToSchema)]
pub struct Live {
    pub live: bool,
}

#[utoipa::path(get, path = "/v2/health/live", tag = "v2", responses((status = 200, body = Live)))]
pub async fn live() -> Json<Live> {
    Json(Live { live: true })
}

#[derive(Serialize, ToSchema)]
pub struct Ready {
    pub ready: bool,
}

/// Like `/readyz`: the port opens once the model is warm, and readiness ends with the drain.
#[utoipa::path(get, path = "/v2/health/ready", tag = "v2", responses(
    (status = 200, body = Ready), (status = 503, description = "Draining", body = Ready)))]
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    readiness(&state)
}

fn readiness(state: &AppState) -> Response {
    let ready = !state.draining.load(Ordering::SeqCst);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(Ready { ready })).into_response()
}

#[derive(Serialize, ToSchema)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<&'static str>,
    pub platform: &'static str,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

pub fn metadata(state: &AppState) -> ModelMetadata {
    let (inputs, outputs) = tensors(state);
    ModelMetadata {
        name: state.classifier.name().to_string(),
        versions: vec![MODEL_VERSION],
        platform: PLATFORM,
        inputs,
        outputs,
    }
}

#[utoipa::path(get, path = "/v2/models/{name}", tag = "v2", params(("name" = String, Path)),
    responses((status = 200, body = ModelMetadata), (status = 404, body = V2ErrorBody)))]
pub async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<ModelMetadata>, V2Error> {
    check_model(&state, &name, None)?;
    Ok(Json(metadata(&state)))
}

#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}", tag = "v2",
    params(("name" = String, Path), ("version" = String, Path)),
    responses((status = 200, body = ModelMetadata), (status = 404, body = V2ErrorBody)))]
pub async fn model_metadata_version(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<ModelMetadata>, V2Error> {
    check_model(&state, &name, Some(&version))?;
    Ok(Json(metadata(&state)))
}

#[utoipa::path(get, path = "/v2/models/{name}/ready", tag = "v2", params(("name" = String, Path)),
    responses((status = 200, body = Ready), (status = 503, body = Ready), (status = 404, body = V2ErrorBody)))]
pub async fn model_ready(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Response, V2Error> {
    check_model(&state, &name, None)?;
    Ok(readiness(&state))
}

#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}/ready", tag = "v2",
    params(("name" = String, Path), ("version" = String, Path)),
    responses((status = 200, body = Ready), (status = 503, body = Ready), (status = 404, body = V2ErrorBody)))]
pub async fn model_ready_version(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response, V2Error> {
    check_model(&state, &name, Some(&version))?;
    Ok(readiness(&state))
}

/// An inference request. Parameters other than those named here are ignored.
#[derive(Deserialize, ToSchema)]
pub struct InferRequest<'a> {
    #[serde(default)]
    pub id: Option<String>,
    /// `binary_data_output` (bool): every output as binary data unless it says otherwise.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Map<String, Value>>,
    /// Exactly one.
    #[serde(borrow)]
    #[schema(min_items = 1, max_items = 1)]
    pub inputs: Vec<RequestInput<'a>>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestOutput>>,
}

/// `image` (BYTES, `[N]` or `[N, 1]`; in JSON each element a base64 string) or `pixels`
/// (FP32, `[N, 3, H, W]`, preprocessed).
#[derive(Deserialize, ToSchema)]
pub struct RequestInput<'a> {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    /// `binary_data_size` (integer): the values follow the JSON as binary data.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Map<String, Value>>,
    /// The values, flat or nested in row-major order.
    #[serde(borrow, default)]
    #[schema(value_type = Option<Vec<serde_json::Value>>)]
    pub data: Option<&'a RawValue>,
}

/// `probabilities` or `features`.
#[derive(Deserialize, ToSchema)]
pub struct RequestOutput {
    pub name: String,
    /// `classification` (integer k: the top k as "score:index:label" BYTES; `probabilities`
    /// only) and `binary_data` (bool).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Map<String, Value>>,
}

#[derive(Serialize, ToSchema)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub outputs: Vec<ResponseOutput>,
}

#[derive(Serialize, ToSchema)]
pub struct ResponseOutput {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
    /// `binary_data_size` when the values follow the JSON as binary data.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<serde_json::Value>>)]
    pub data: Option<ResponseData>,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum ResponseData {
    Fp32(Vec<f32>),
    Bytes(Vec<String>),
}

#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "v2", params(("name" = String, Path)),
    request_body(description = "A JSON inference request. With the binary tensor data extension, the body is instead the JSON (its length in the Inference-Header-Content-Length header) followed by the inputs' raw data, in any content type", content = InferRequest),
    responses(
        (status = 200, description = "Output tensors; when outputs are asked for as binary data, the JSON (length in Inference-Header-Content-Length) followed by their raw data, as application/octet-stream", body = InferResponse),
        (status = 401, body = V2ErrorBody), (status = 404, body = V2ErrorBody), (status = 408, body = V2ErrorBody),
        (status = 413, body = V2ErrorBody), (status = 422, body = V2ErrorBody), (status = 503, body = V2ErrorBody),
        (status = 504, body = V2ErrorBody), (status = 500, body = V2ErrorBody)))]
pub async fn infer(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, V2Error> {
    check_model(&state, &name, None)?;
    run(state, headers, body).await
}

#[utoipa::path(post, path = "/v2/models/{name}/versions/{version}/infer", tag = "v2",
    params(("name" = String, Path), ("version" = String, Path)),
    request_body(description = "As for /v2/models/{name}/infer", content = InferRequest),
    responses((status = 200, body = InferResponse), (status = 404, body = V2ErrorBody), (status = 422, body = V2ErrorBody)))]
pub async fn infer_version(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, V2Error> {
    check_model(&state, &name, Some(&version))?;
    run(state, headers, body).await
}

async fn run(state: Arc<AppState>, headers: HeaderMap, body: Body) -> Result<Response, V2Error> {
    let started = Instant::now();
    let json_length = match headers.get(INFERENCE_HEADER) {
        None => None,
        Some(v) => {
            Some(v.to_str().ok().and_then(|s| s.parse::<usize>().ok()).ok_or_else(|| {
                ApiError::InvalidRequest("Inference-Header-Content-Length is not a number".into())
            })?)
        }
    };
    let reader = state.clone();
    let (mut inferred, answer) = inference::infer(&state, ROUTE, |deadline| async move {
        let cfg = &reader.config;
        let (body, memory) =
            read_body_reserved(&headers, body, &cfg.body, &reader.memory, deadline, BODY_COPIES)
                .await?;
        let (items, answer) = parse(&reader, &body, json_length)?;
        Ok((Inputs { items, task: answer.task, memory }, answer))
    })
    .await?;
    let mut raw = Vec::new();
    let outputs = outputs(&state, answer.requested, &mut inferred)?
        .into_iter()
        .map(|o| {
            let datatype = o.data.datatype();
            let (parameters, data) = if o.binary.unwrap_or(answer.binary_output) {
                let bytes = o.data.to_raw();
                let parameters = serde_json::json!({ "binary_data_size": bytes.len() });
                raw.push(bytes);
                (Some(parameters), None)
            } else {
                let data = match o.data {
                    OutputData::Fp32(v) => ResponseData::Fp32(v),
                    OutputData::Bytes(v) => ResponseData::Bytes(v),
                };
                (None, Some(data))
            };
            ResponseOutput { name: o.name, datatype, shape: o.shape, parameters, data }
        })
        .collect();
    let body = InferResponse {
        model_name: state.classifier.name().to_string(),
        model_version: MODEL_VERSION,
        id: answer.id,
        outputs,
    };
    let response = if raw.is_empty() {
        Json(body).into_response()
    } else {
        let mut bytes = serde_json::to_vec(&body).map_err(|e| ApiError::Internal(e.to_string()))?;
        let json_length = bytes.len();
        raw.iter().for_each(|r| bytes.extend_from_slice(r));
        let mut response = Response::new(Body::from(bytes));
        let h = response.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        h.insert(INFERENCE_HEADER, HeaderValue::from(json_length));
        response
    };
    Ok(with_timings(response, &inferred, started))
}

/// What the response needs from the request.
struct Answer {
    id: Option<String>,
    requested: Vec<Requested>,
    task: crate::classifier::Task,
    /// The request's `binary_data_output`.
    binary_output: bool,
}

/// The body (JSON, then binary data if `json_length` says where the JSON ends) to inputs.
fn parse(
    state: &AppState,
    body: &Bytes,
    json_length: Option<usize>,
) -> Result<(Vec<inference::Input>, Answer), ApiError> {
    let bad = |m: String| ApiError::InvalidRequest(m);
    let (json, mut binary) = match json_length {
        None => (body.clone(), Bytes::new()),
        Some(n) if n <= body.len() => (body.slice(..n), body.slice(n..)),
        Some(n) => {
            return Err(bad(format!(
                "Inference-Header-Content-Length is {n} but the body has {} bytes",
                body.len()
            )))
        }
    };
    let request: InferRequest = serde_json::from_slice(&json)
        .map_err(|e| bad(format!("malformed inference request: {e}")))?;
    let requested = request.outputs.map(|outputs| {
        outputs
            .into_iter()
            .map(|o| Requested {
                classification: parameter(&o.parameters, "classification")
                    .and_then(Value::as_u64)
                    .map(|k| k as usize),
                binary: parameter(&o.parameters, "binary_data").and_then(Value::as_bool),
                name: o.name,
            })
            .collect()
    });
    let (requested, task) = plan_outputs(state, requested)?;
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in &request.inputs {
        let size = match parameter(&input.parameters, "binary_data_size") {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                bad(format!("input `{}`: binary_data_size must be an integer", input.name))
            })? as usize),
        };
        let data = match (size, input.data) {
            (Some(n), None) if n <= binary.len() => Data::Raw(binary.split_to(n)),
            (Some(n), None) => {
                return Err(bad(format!(
                    "input `{}`: binary_data_size {n} is more than the {} binary bytes left",
                    input.name,
                    binary.len()
                )))
            }
            (None, Some(json)) => Data::Json(json),
            (Some(_), Some(_)) => {
                return Err(bad(format!("input `{}` has both data and binary data", input.name)))
            }
            (None, None) => return Err(bad(format!("input `{}` has no data", input.name))),
        };
        inputs.push(InputTensor {
            name: &input.name,
            datatype: &input.datatype,
            shape: &input.shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(bad(format!("{} bytes of binary data that no input declares", binary.len())));
    }
    let items = read_inputs(state, inputs)?;
    let binary_output = parameter(&request.parameters, "binary_data_output")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok((items, Answer { id: request.id, requested, task, binary_output }))
}

fn parameter<'p>(parameters: &'p Option<Map<String, Value>>, name: &str) -> Option<&'p Value> {
    parameters.as_ref()?.get(name)
}
