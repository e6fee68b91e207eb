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
    #[error("the server's memory for requests is taken by requests in progress; retry later")]
    ServerBusy,
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
    #[error("no request body data for {0} ms")]
    BodyTimeout(u64),
    #[error("the client closed the connection before sending the whole body")]
    ClientDisconnected,
    #[error("missing or unknown API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("no such route")]
    NotFound,
    /// The v2 protocol's model name or version names another model.
    #[error("{0}")]
    UnknownModel(String),
    /// An error response made by the HTTP layers rather than a handler (405, a malformed
    /// header, ...), rewritten into the JSON form.
    #[error("{message}")]
    Http { status: StatusCode, message: String },
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
            Self::QueueFull { .. } | Self::ServerBusy | Self::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::ClientDisconnected => client_closed_request(),
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Http { status, .. } => *status,
            Self::BodyTooLarge(_) | Self::TooManyImages { .. } | Self::ImageTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::InvalidImage { .. } | Self::InvalidRequest(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotFound | Self::UnknownModel(_) => StatusCode::NOT_FOUND,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Also the `reason` label of the rejection counter.
    pub fn code(&self) -> &'static str {
        match self {
            Self::QueueFull { .. } => "queue_full",
            Self::ServerBusy => "server_busy",
            Self::ShuttingDown => "shutting_down",
            Self::BodyTimeout(_) => "body_timeout",
            Self::ClientDisconnected => "client_closed_request",
            Self::Unauthorized => "unauthorized",
            Self::Http { status, .. } => match *status {
                StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
                StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
                StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
                s if s.is_server_error() => "internal",
                _ => "bad_request",
            },
            Self::Timeout(_) => "timeout",
            Self::BodyTooLarge(_) => "body_too_large",
            Self::TooManyImages { .. } => "too_many_images",
            Self::ImageTooLarge { .. } => "image_too_large",
            Self::InvalidImage { .. } => "invalid_image",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::InvalidRequest(_) => "invalid_request",
            Self::NotFound => "not_found",
            Self::UnknownModel(_) => "unknown_model",
            Self::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body =
            ErrorBody { error: ErrorDetail { code: self.code(), message: self.to_string() } };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, Self::BodyTimeout(_)) {
            // A client that stalled mid-body does not get to keep the connection.
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response.extensions_mut().insert(RejectReason(self.code()));
        response
    }
}

/// nginx's status for a client that went away before its request was read; the client never
/// sees it, but metrics and logs tell it apart from requests that were wrong.
fn client_closed_request() -> StatusCode {
    StatusCode::from_u16(499).expect("499 is a valid status code")
}

/// Marks a response as a rejection so the metrics middleware can count it by reason.
#[derive(Clone, Copy)]
pub struct RejectReason(pub &'static str);
