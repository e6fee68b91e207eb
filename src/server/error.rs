//! One error type for every HTTP failure, mapped to a status code and a JSON body
//! `{"error": {"code": "...", "message": "..."}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the queue is full ({capacity} images); retry later")]
    QueueFull { capacity: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("request not answered within {0} ms")]
    Timeout(u64),
    #[error("request body is over the limit of {0} bytes")]
    BodyTooLarge(usize),
    #[error("{count} images in one request, over the limit of {limit}")]
    TooManyImages { count: usize, limit: usize },
    #[error("image {index}{}: {reason}", name_suffix(.filename))]
    ImageTooLarge { index: usize, filename: Option<String>, reason: String },
    #[error("image {index}{}: {reason}", name_suffix(.filename))]
    InvalidImage { index: usize, filename: Option<String>, reason: String },
    #[error("unsupported content type `{0}`: send image/*, application/octet-stream, multipart/form-data or application/json")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("no such route")]
    NotFound,
    #[error("inference failed: {0}")]
    Internal(String),
}

fn name_suffix(filename: &Option<String>) -> String {
    filename.as_ref().map(|f| format!(" ({f})")).unwrap_or_default()
}

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `queue_full`, `invalid_image`.
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::QueueFull { .. } | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyTooLarge(_) | Self::TooManyImages { .. } | Self::ImageTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InvalidImage { .. } | Self::InvalidRequest(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Also the `reason` label of the rejection counter.
    pub fn code(&self) -> &'static str {
        match self {
            Self::QueueFull { .. } => "queue_full",
            Self::ShuttingDown => "shutting_down",
            Self::Timeout(_) => "timeout",
            Self::BodyTooLarge(_) => "body_too_large",
            Self::TooManyImages { .. } => "too_many_images",
            Self::ImageTooLarge { .. } => "image_too_large",
            Self::InvalidImage { .. } => "invalid_image",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::InvalidRequest(_) => "invalid_request",
            Self::NotFound => "not_found",
            Self::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = ErrorBody { error: ErrorDetail { code: self.code(), message: self.to_string() } };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response.extensions_mut().insert(RejectReason(self.code()));
        response
    }
}

/// Marks a response as a rejection so the metrics middleware can count it by reason.
#[derive(Clone, Copy)]
pub struct RejectReason(pub &'static str);
