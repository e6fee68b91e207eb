//! The JSON the HTTP API speaks (queries, responses) and its OpenAPI document.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::input::{Base64Image, ImageFile, ImagesJson, ImagesMultipart};
use super::routes::{
    __path_classify, __path_embed, __path_healthz, __path_metrics, __path_models, __path_readyz,
};
use super::v2::rest::{
    __path_infer, __path_infer_version, __path_live, __path_model_metadata,
    __path_model_metadata_version, __path_model_ready, __path_model_ready_version, __path_ready,
    __path_server_metadata, InferRequest, InferResponse, Live, ModelMetadata, Ready, RequestInput,
    RequestOutput, ResponseOutput, ServerMetadata, V2ErrorBody,
};
use super::v2::TensorMetadata;
use super::AppState;

pub fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query.map(|Query(q)| q).map_err(|e| ApiError::InvalidRequest(e.body_text()))
}

/// Unknown parameters are refused: a misspelt `top_k` must not be silently ignored.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ClassifyQuery {
    /// Labels per image, 1..=num_classes (default: the server's --default-top-k).
    #[param(value_type = Option<u32>, minimum = 1)]
    pub top_k: Option<String>,
    /// Also answer every class's raw logit, before the softmax (default false).
    #[param(value_type = Option<bool>)]
    pub logits: Option<String>,
}

/// Unknown parameters are refused: a misspelt `top_k` must not be silently ignored.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EmbedQuery {
    /// Scale each vector to unit L2 norm (default false).
    #[param(value_type = Option<bool>)]
    pub normalize: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ClassifyResponse {
    pub model: String,
    pub results: Vec<ClassifyResult>,
}

#[derive(Serialize, ToSchema)]
pub struct ClassifyResult {
    /// The multipart file name, null for other inputs.
    pub filename: Option<String>,
    pub predictions: Vec<Prediction>,
    /// Every class's logit in class-index order, when `logits=true` was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub logits: Option<Vec<f32>>,
}

#[derive(Serialize, ToSchema)]
pub struct EmbedResponse {
    pub model: String,
    pub dimension: usize,
    pub normalized: bool,
    pub results: Vec<EmbedResult>,
}

#[derive(Serialize, ToSchema)]
pub struct EmbedResult {
    pub filename: Option<String>,
    pub embedding: Vec<f32>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelsResponse {
    pub models: Vec<ModelInfo>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: String,
    /// t0, t1, t2, s, m or l; null for custom configurations.
    pub variant: Option<String>,
    pub num_classes: usize,
    pub feature_dim: usize,
    /// [height, width]
    pub input_size: [usize; 2],
    #[schema(value_type = Object)]
    pub preprocessing: crate::preprocess::PreprocessConfig,
    pub batching: BatchingInfo,
    pub labels: Vec<String>,
    /// Server version.
    pub version: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct BatchingInfo {
    pub max_batch_size: usize,
    pub max_batch_delay_ms: u64,
    pub queue_capacity: usize,
    pub max_images_per_request: usize,
}

/// One label of an answer.
#[derive(Serialize, ToSchema)]
pub struct Prediction {
    pub label: String,
    pub class_index: usize,
    /// Softmax probability.
    pub score: f32,
}

impl From<crate::Prediction> for Prediction {
    fn from(p: crate::Prediction) -> Self {
        Self { label: p.label, class_index: p.class_index, score: p.score }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fasternet-serve",
        description = "FasterNet image classification with dynamic batching."
    ),
    paths(
        classify, embed, healthz, readyz, models, metrics, openapi,
        server_metadata, live, ready, model_metadata, model_metadata_version, model_ready,
        model_ready_version, infer, infer_version
    ),
    components(schemas(
        ClassifyResponse,
        ClassifyResult,
        Prediction,
        EmbedResponse,
        EmbedResult,
        ModelsResponse,
        ModelInfo,
        BatchingInfo,
        ErrorBody,
        ImagesJson,
        ImagesMultipart,
        Base64Image,
        ImageFile,
        ServerMetadata,
        Live,
        Ready,
        ModelMetadata,
        TensorMetadata,
        InferRequest,
        RequestInput,
        RequestOutput,
        InferResponse,
        ResponseOutput,
        V2ErrorBody
    )),
    tags((name = "v2", description = "The Open Inference Protocol (KServe v2) REST API"))
)]
struct ApiDoc;

#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "This document")))]
pub async fn openapi(State(state): State<Arc<AppState>>) -> Json<utoipa::openapi::OpenApi> {
    use utoipa::openapi::{schema::Schema, RefOr};
    let mut doc = ApiDoc::openapi();
    // Bounds that depend on the served model and the configuration: top_k up to the class
    // count, at most --max-images-per-request images.
    let classes = state.classifier.labels().len();
    let top_k = doc
        .paths
        .paths
        .get_mut("/classify")
        .and_then(|p| p.post.as_mut())
        .and_then(|op| op.parameters.as_mut());
    for parameter in top_k.into_iter().flatten().filter(|p| p.name == "top_k") {
        if let Some(RefOr::T(Schema::Object(object))) = parameter.schema.as_mut() {
            object.maximum = Some(classes.into());
        }
    }
    for name in ["ImagesJson", "ImagesMultipart"] {
        if let Some(RefOr::T(Schema::Object(object))) =
            doc.components.as_mut().and_then(|c| c.schemas.get_mut(name))
        {
            if let Some(RefOr::T(Schema::Array(array))) = object.properties.get_mut("images") {
                array.max_items = Some(state.config.max_images_per_request);
            }
        }
    }
    Json(doc)
}
