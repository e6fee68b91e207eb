//! Request bodies to encoded images: raw bytes, multipart/form-data or JSON with base64.
//!
//! The body's memory is reserved before a byte of it is read: `Content-Length` bytes (or the
//! body limit when the length is not declared) times what parsing the body type may hold at
//! once. A declared length over the limit is refused without reading anything, so a client
//! that sent `Expect: 100-continue` never gets the go-ahead.

use std::borrow::Cow;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use serde::Deserialize;
use tokio::time::Instant;
use utoipa::ToSchema;

use super::error::ApiError;
use super::memory::{MemoryPool, Refused, Reservation};

pub struct EncodedImage {
    pub filename: Option<String>,
    pub bytes: Bytes,
}

/// `application/json` request body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImagesJson<'a> {
    /// Base64-encoded image files (JPEG, PNG, WebP, GIF, BMP, TIFF); a `data:` URL prefix is allowed.
    /// Strings without JSON escapes are read in place.
    #[schema(value_type = Vec<Base64Image>, min_items = 1)]
    #[serde(borrow)]
    pub images: Vec<Cow<'a, str>>,
}

/// One base64-encoded image file (OpenAPI only).
#[derive(ToSchema)]
#[schema(value_type = String, format = Byte)]
pub struct Base64Image(pub String);

/// `multipart/form-data` request body (OpenAPI only): one file part per image; any part names,
/// and each part's file name comes back as its result's `filename`.
#[derive(ToSchema)]
pub struct ImagesMultipart {
    #[schema(value_type = Vec<ImageFile>, min_items = 1)]
    pub images: Vec<Vec<u8>>,
}

/// One image file (OpenAPI only).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct ImageFile(pub Vec<u8>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Raw,
    Multipart,
    Json,
}

impl BodyKind {
    /// Most bytes parsing holds per body byte: multipart copies the body into its parser's
    /// buffer; JSON holds the body, the strings serde had to unescape, a copy of one string
    /// without its whitespace and the decoded images (3/4 of the base64).
    fn copies(self) -> u64 {
        match self {
            Self::Raw => 1,
            Self::Multipart => 2,
            Self::Json => 4,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body in bytes.
    pub max_bytes: usize,
    /// Longest pause between two pieces of the body.
    pub read_timeout: Duration,
    /// Longest wait for memory to read it into.
    pub memory_wait: Duration,
}

/// The request's images, and the memory their bytes hold until the caller drops it.
pub struct Images {
    pub images: Vec<EncodedImage>,
    pub memory: Reservation,
}

/// Reads the body into images, under `limits`, by `deadline`.
pub async fn read_images(
    headers: &HeaderMap,
    body: Body,
    limits: &BodyLimits,
    max_images: usize,
    pool: &MemoryPool,
    deadline: Instant,
) -> Result<Images, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream");
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let kind = if mime.starts_with("image/") || mime == "application/octet-stream" {
        BodyKind::Raw
    } else if mime == "multipart/form-data" {
        BodyKind::Multipart
    } else if mime == "application/json" {
        BodyKind::Json
    } else {
        return Err(ApiError::UnsupportedMediaType(mime));
    };
    let (body, memory) =
        read_body_reserved(headers, body, limits, pool, deadline, kind.copies()).await?;
    let images = match kind {
        BodyKind::Raw => vec![EncodedImage { filename: None, bytes: body }],
        BodyKind::Multipart => read_multipart(content_type, body, max_images).await?,
        BodyKind::Json => read_json(&body, max_images)?,
    };
    if images.is_empty() {
        return Err(ApiError::InvalidRequest("the request holds no image".into()));
    }
    Ok(Images { images, memory })
}

/// Reserves `copies` times the body's declared length (or the body limit when undeclared),
/// then reads it; the reservation shrinks to `copies` times what arrived.
pub async fn read_body_reserved(
    headers: &HeaderMap,
    body: Body,
    limits: &BodyLimits,
    pool: &MemoryPool,
    deadline: Instant,
    copies: u64,
) -> Result<(Bytes, Reservation), ApiError> {
    let declared = match headers.get(header::CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| ApiError::InvalidRequest("Content-Length is not a number".into()))?,
        ),
    };
    if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        return Err(ApiError::BodyTooLarge(limits.max_bytes));
    }
    let expected = declared.unwrap_or(limits.max_bytes as u64);
    let mut memory = match pool.reserve(expected * copies, limits.memory_wait).await {
        Ok(memory) => memory,
        Err(Refused::Busy) => return Err(ApiError::ServerBusy),
        // The server refuses to start unless a body of the limit fits the pool.
        Err(Refused::NeverFits { .. }) => return Err(ApiError::BodyTooLarge(limits.max_bytes)),
    };
    let body = read_body(body, expected as usize, limits, deadline).await?;
    memory.shrink_to(body.len() as u64 * copies);
    Ok((body, memory))
}

/// Collects the body into one buffer of `capacity` bytes (grown only past a declared length,
/// which hyper does not allow), failing at `limits.max_bytes`, after `limits.read_timeout`
/// without data, or at `deadline`.
async fn read_body(
    mut body: Body,
    capacity: usize,
    limits: &BodyLimits,
    deadline: Instant,
) -> Result<Bytes, ApiError> {
    let mut buffer = BytesMut::with_capacity(capacity);
    loop {
        let pause = Instant::now() + limits.read_timeout;
        let frame = match tokio::time::timeout_at(pause.min(deadline), body.frame()).await {
            Err(_) => return Err(ApiError::BodyTimeout(limits.read_timeout.as_millis() as u64)),
            Ok(None) => return Ok(buffer.freeze()),
            Ok(Some(Err(e))) => return Err(body_error(e)),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if buffer.len() + data.len() > limits.max_bytes {
                return Err(ApiError::BodyTooLarge(limits.max_bytes));
            }
            buffer.extend_from_slice(&data);
        }
    }
}

/// A body that breaks off (end of stream or a reset before the declared length) is the
/// client going away; anything else is a framing error.
fn body_error(e: axum::Error) -> ApiError {
    use std::io::ErrorKind::*;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(error) = cause {
        let left = error
            .downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message() || h.is_closed() || h.is_canceled())
            || error.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
                )
            });
        if left {
            return ApiError::ClientDisconnected;
        }
        cause = error.source();
    }
    ApiError::InvalidRequest(format!("could not read the request body: {e}"))
}

async fn read_multipart(
    content_type: &str,
    body: Bytes,
    max_images: usize,
) -> Result<Vec<EncodedImage>, ApiError> {
    let bad = |e: multer::Error| ApiError::InvalidRequest(format!("malformed multipart body: {e}"));
    let boundary = multer::parse_boundary(content_type).map_err(bad)?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut images = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        if images.len() == max_images {
            // Count the rest without keeping them, to report the real number.
            drop(field);
            let mut count = images.len() + 1;
            while multipart.next_field().await.map_err(bad)?.is_some() {
                count += 1;
            }
            return Err(ApiError::TooManyImages { count, limit: max_images });
        }
        let filename = field.file_name().map(str::to_string);
        let bytes = field.bytes().await.map_err(bad)?;
        images.push(EncodedImage { filename, bytes });
    }
    Ok(images)
}

fn read_json(body: &[u8], max_images: usize) -> Result<Vec<EncodedImage>, ApiError> {
    let parsed: ImagesJson = serde_json::from_slice(body).map_err(|e| {
        ApiError::InvalidRequest(format!(
            "malformed JSON body (expected {{\"images\": [\"<base64>\", ...]}}): {e}"
        ))
    })?;
    if parsed.images.len() > max_images {
        return Err(ApiError::TooManyImages { count: parsed.images.len(), limit: max_images });
    }
    parsed
        .images
        .iter()
        .enumerate()
        .map(|(index, text)| {
            decode_base64(text).map(|bytes| EncodedImage { filename: None, bytes }).map_err(|e| {
                ApiError::InvalidRequest(format!("images[{index}] is not valid base64: {e}"))
            })
        })
        .collect()
}

/// A base64-encoded file, optionally as a `data:` URL, whitespace allowed.
pub fn decode_base64(text: &str) -> Result<Bytes, base64::DecodeError> {
    let data = match text.strip_prefix("data:") {
        Some(url) => url.split_once(',').map(|(_, d)| d).unwrap_or(""),
        None => text,
    };
    let data: Cow<str> = if data.bytes().any(|b| b.is_ascii_whitespace()) {
        Cow::Owned(data.chars().filter(|c| !c.is_ascii_whitespace()).collect())
    } else {
        Cow::Borrowed(data)
    };
    base64::engine::general_purpose::STANDARD.decode(data.as_bytes()).map(Bytes::from)
}

/// Most bytes of an unread body read and thrown away (see [`drain_if_unread`]).
const DRAIN_BYTES: u64 = 64 << 20;
/// Longest time spent on that.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Wraps a request body so that, if the handler answers without reading all of it (a 413 from
/// `Content-Length`, a 401, a 415), the rest is read and thrown away in the background. A
/// client still sending its body then reads the answer and can reuse the connection, where
/// closing the connection under it would break its send and, with many clients, lose the
/// answer. Bodies behind `Expect: 100-continue` are never drained: the client waits for a go
/// it does not get. Bodies declared over `DRAIN_BYTES` are not either: the connection closes.
pub fn drain_if_unread(headers: &HeaderMap, body: Body) -> Body {
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if expects_continue || declared.is_some_and(|n| n > DRAIN_BYTES) {
        return body;
    }
    Body::new(DrainOnDrop { body: Some(body), finished: false })
}

struct DrainOnDrop {
    body: Option<Body>,
    finished: bool,
}

impl http_body::Body for DrainOnDrop {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let Some(body) = self.body.as_mut() else { return std::task::Poll::Ready(None) };
        let frame = std::pin::Pin::new(body).poll_frame(cx);
        if matches!(frame, std::task::Poll::Ready(None | Some(Err(_)))) {
            self.finished = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.as_ref().map(http_body::Body::size_hint).unwrap_or_default()
    }
}

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        let Some(mut body) = self.body.take() else { return };
        if self.finished
            || http_body::Body::is_end_stream(&body)
            || tokio::runtime::Handle::try_current().is_err()
        {
            return;
        }
        tokio::spawn(async move {
            let drain = async {
                let mut read = 0u64;
                while let Some(Ok(frame)) = body.frame().await {
                    read += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if read > DRAIN_BYTES {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
        });
    }
}
