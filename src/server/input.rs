//! Request bodies to encoded images: raw bytes, multipart/form-data or JSON with base64.

use axum::body::Body;
use axum::http::{header, HeaderMap};
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use utoipa::ToSchema;

use super::error::ApiError;

pub struct EncodedImage {
    pub filename: Option<String>,
    pub bytes: Bytes,
}

/// `application/json` request body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImagesJson {
    /// Base64-encoded image files (JPEG, PNG, WebP, GIF, BMP, TIFF); a `data:` URL prefix is allowed.
    pub images: Vec<String>,
}

/// Reads the body (at most `body_limit` bytes) and splits it into images.
pub async fn read_images(headers: &HeaderMap, body: Body, body_limit: usize, max_images: usize) -> Result<Vec<EncodedImage>, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let body = axum::body::to_bytes(body, body_limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) {
            ApiError::BodyTooLarge(body_limit)
        } else {
            ApiError::InvalidRequest(format!("could not read the request body: {e}"))
        }
    })?;
    let images = if mime.starts_with("image/") || mime == "application/octet-stream" {
        vec![EncodedImage { filename: None, bytes: body }]
    } else if mime == "multipart/form-data" {
        read_multipart(&content_type, body, max_images).await?
    } else if mime == "application/json" {
        read_json(&body, max_images)?
    } else {
        return Err(ApiError::UnsupportedMediaType(mime));
    };
    if images.is_empty() {
        return Err(ApiError::InvalidRequest("the request holds no image".into()));
    }
    if images.len() > max_images {
        return Err(ApiError::TooManyImages { count: images.len(), limit: max_images });
    }
    Ok(images)
}

async fn read_multipart(content_type: &str, body: Bytes, max_images: usize) -> Result<Vec<EncodedImage>, ApiError> {
    let bad = |e: multer::Error| ApiError::InvalidRequest(format!("malformed multipart body: {e}"));
    let boundary = multer::parse_boundary(content_type).map_err(bad)?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut images = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        if images.len() == max_images {
            // Count the rest without keeping them, to report the real number.
            images.push(EncodedImage { filename: None, bytes: Bytes::new() });
            let mut count = images.len();
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
    let parsed: ImagesJson = serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidRequest(format!("malformed JSON body (expected {{\"images\": [\"<base64>\", ...]}}): {e}")))?;
    if parsed.images.len() > max_images {
        return Err(ApiError::TooManyImages { count: parsed.images.len(), limit: max_images });
    }
    parsed
        .images
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let data = match text.strip_prefix("data:") {
                Some(url) => url.split_once(',').map(|(_, d)| d).unwrap_or(""),
                None => text.as_str(),
            };
            let data: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            base64::engine::general_purpose::STANDARD
                .decode(data.as_bytes())
                .map(|b| EncodedImage { filename: None, bytes: Bytes::from(b) })
                .map_err(|e| ApiError::InvalidRequest(format!("images[{index}] is not valid base64: {e}")))
        })
        .collect()
}
