//! Bytes to an 8-bit RGB image: format sniffing, a pixel limit checked from the header before
//! any pixel is decoded, EXIF orientation, and PIL's `convert('RGB')` semantics (grey is
//! replicated, alpha is dropped without compositing, palettes are expanded).

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

/// Largest image accepted by default: 50 megapixels.
pub const DEFAULT_MAX_PIXELS: u64 = 50_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("empty image data")]
    Empty,
    #[error("unsupported image format (expected JPEG, PNG, WebP, GIF, BMP or TIFF)")]
    Unsupported,
    #[error("image declares {width}x{height} = {} pixels, over the limit of {limit}", *.width as u64 * *.height as u64)]
    TooLarge { width: u32, height: u32, limit: u64 },
    #[error("corrupt or truncated image: {0}")]
    Corrupt(String),
}

pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    if reader.format().is_none() {
        return Err(ImageError::Unsupported);
    }
    let mut decoder = reader.into_decoder().map_err(map_error)?;
    let (width, height) = decoder.dimensions();
    if width as u64 * height as u64 > max_pixels {
        return Err(ImageError::TooLarge { width, height, limit: max_pixels });
    }
    if width == 0 || height == 0 {
        return Err(ImageError::Corrupt(format!("image has no pixels ({width}x{height})")));
    }
    let orientation = decoder.orientation().map_err(map_error)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(map_error)?;
    image.apply_orientation(orientation);
    Ok(match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

/// The width and height an image's header declares, without decoding any pixel; `None` when
/// the header cannot be read.
pub fn dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    ImageReader::new(Cursor::new(bytes)).with_guessed_format().ok()?.into_dimensions().ok()
}

fn map_error(e: image::ImageError) -> ImageError {
    match e {
        image::ImageError::Unsupported(_) => ImageError::Unsupported,
        other => ImageError::Corrupt(other.to_string()),
    }
}
