//! Bytes to an 8-bit RGB image: format sniffing, limits checked from the header before any
//! pixel is decoded, EXIF orientation, and PIL's `convert('RGB')` semantics (grey is
//! replicated, alpha is dropped without compositing, palettes are expanded).
//!
//! Decoding is two steps so that a caller can admit the memory first: [`Header::read`] parses
//! only the header (its metadata allocations capped at [`METADATA_LIMIT`]) and says what the
//! decoder will need ([`Header::decoder_bytes`]); [`Header::decode`] then decodes with the
//! decoder's own allocation limit set to that figure.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{ColorType, DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

use super::jpeg;

/// Largest image accepted by default: 50 megapixels.
pub const DEFAULT_MAX_PIXELS: u64 = 50_000_000;

/// Most bytes a decoder may keep for metadata (ICC profiles, text chunks) while it reads a
/// header. Compressed PNG chunks can inflate a thousandfold, so this is what keeps a small
/// upload from becoming a large allocation. Real ICC profiles and XMP packets are well under
/// 1 MiB. Compressed metadata that inflates past it is cut off and dropped (colour profiles are
/// not applied anyway, as in PIL); an uncompressed chunk over it refuses the image.
pub const METADATA_LIMIT: u64 = 2 << 20;

/// Most bytes reading one header allocates at once: the chunk's compressed bytes and the
/// inflated metadata, both under [`METADATA_LIMIT`], and the inflate buffer's last growth
/// (old and new buffer together). Measured in `tests/hostile_inputs.rs`.
pub const HEADER_READ_BYTES: u64 = 4 * METADATA_LIMIT;

/// Working memory a decoder may use beyond its output buffer, as a multiple of the output's
/// bytes and of the encoded input's, plus a constant. Upper bounds measured with a counting
/// allocator over every format, bit depth and JPEG mode (`tests/hostile_inputs.rs` fails if a
/// decoder ever needs more than its [`Header::decoder_bytes`]).
struct DecoderCost {
    per_output_byte: u64,
    per_input_byte: u64,
    constant: u64,
}

fn decoder_cost(format: ImageFormat) -> DecoderCost {
    const MIB: u64 = 1 << 20;
    match format {
        // image's JpegDecoder copies the input; zune-jpeg keeps the coefficients of progressive
        // scans (2 bytes per sample) and component planes before colour conversion.
        ImageFormat::Jpeg => DecoderCost { per_output_byte: 4, per_input_byte: 2, constant: MIB },
        // Rows and the inflate window; metadata is capped separately.
        ImageFormat::Png => {
            DecoderCost { per_output_byte: 1, per_input_byte: 0, constant: HEADER_READ_BYTES + MIB }
        }
        // Lossless WebP decodes into 32-bit ARGB before the output; lossy into YUV planes.
        ImageFormat::WebP => DecoderCost { per_output_byte: 3, per_input_byte: 1, constant: MIB },
        // The canvas and the frame's indices.
        ImageFormat::Gif => DecoderCost { per_output_byte: 2, per_input_byte: 0, constant: MIB },
        // Strips or tiles are decompressed into intermediate buffers.
        ImageFormat::Tiff => DecoderCost { per_output_byte: 2, per_input_byte: 1, constant: MIB },
        _ => DecoderCost { per_output_byte: 2, per_input_byte: 1, constant: MIB },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("empty image data")]
    Empty,
    #[error("unsupported image format (expected JPEG, PNG, WebP, GIF, BMP or TIFF)")]
    Unsupported,
    #[error("image declares {width}x{height} = {} pixels, over the limit of {limit}", *.width as u64 * *.height as u64)]
    TooLarge { width: u32, height: u32, limit: u64 },
    #[error(
        "image is {width}x{height}: its longer side is more than {limit} times its shorter side"
    )]
    ExtremeAspectRatio { width: u32, height: u32, limit: u32 },
    #[error("image exceeds the decoder's limits ({0}); metadata such as ICC profiles and text may hold at most {METADATA_LIMIT} bytes")]
    OverLimits(String),
    #[error("corrupt or truncated image: {0}")]
    Corrupt(String),
}

impl ImageError {
    /// Whether the image was refused for its size rather than for its content.
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            Self::TooLarge { .. } | Self::ExtremeAspectRatio { .. } | Self::OverLimits(_)
        )
    }
}

/// What an image's header declares, read without decoding any pixel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Header {
    pub format: ImageFormat,
    /// As stored, before EXIF orientation.
    pub width: u32,
    pub height: u32,
    /// What the decoder will write.
    pub color: ColorType,
    pub orientation: Orientation,
    /// Size of the encoded image.
    pub encoded_bytes: usize,
    /// A JPEG's structure, from its markers.
    pub jpeg: Option<jpeg::Layout>,
}

impl Header {
    /// Reads the header, checking the pixel limit and, for JPEG, that the data is complete.
    pub fn read(bytes: &[u8], max_pixels: u64) -> Result<Self, ImageError> {
        if bytes.is_empty() {
            return Err(ImageError::Empty);
        }
        let reader = reader(bytes, METADATA_LIMIT)?;
        let format = reader.format().ok_or(ImageError::Unsupported)?;
        let (width, height, color, orientation) = if format == ImageFormat::Jpeg {
            jpeg_header(bytes)?
        } else {
            let mut decoder = reader.into_decoder().map_err(map_error)?;
            let (width, height) = decoder.dimensions();
            let orientation = decoder.orientation().map_err(map_error)?;
            (width, height, decoder.color_type(), orientation)
        };
        if width as u64 * height as u64 > max_pixels {
            return Err(ImageError::TooLarge { width, height, limit: max_pixels });
        }
        if width == 0 || height == 0 {
            return Err(ImageError::Corrupt(format!("image has no pixels ({width}x{height})")));
        }
        let jpeg = if format == ImageFormat::Jpeg { Some(jpeg::read_layout(bytes)?) } else { None };
        Ok(Self { format, width, height, color, orientation, encoded_bytes: bytes.len(), jpeg })
    }

    /// Pixels as stored.
    pub fn pixels(&self) -> u64 {
        self.width as u64 * self.height as u64
    }

    /// Width and height once the EXIF orientation is applied.
    pub fn oriented_dimensions(&self) -> (u32, u32) {
        use Orientation::*;
        match self.orientation {
            Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH => (self.height, self.width),
            _ => (self.width, self.height),
        }
    }

    /// Bytes of the decoder's output buffer.
    pub fn output_bytes(&self) -> u64 {
        self.pixels() * self.color.bytes_per_pixel() as u64
    }

    /// Most bytes decoding allocates at once: the decoder's output and working memory, then
    /// the RGB conversion and the orientation's copy, whichever step holds most.
    pub fn decoder_bytes(&self) -> u64 {
        let cost = decoder_cost(self.format);
        let output = self.output_bytes();
        let rgb = self.pixels() * 3;
        let decoding = output * (1 + cost.per_output_byte)
            + self.encoded_bytes as u64 * cost.per_input_byte
            + cost.constant;
        let converting = if self.color == ColorType::Rgb8 { 0 } else { output + rgb };
        let orienting =
            if self.oriented_dimensions() == (self.width, self.height) { 0 } else { 2 * rgb };
        decoding.max(converting).max(orienting)
    }

    /// Decodes `bytes`, which must be the image this header was read from.
    pub fn decode(&self, bytes: &[u8]) -> Result<RgbImage, ImageError> {
        // PNG's decoder applies the limit to its metadata alone (the output buffer is
        // allocated outside it), and reads text chunks that follow the pixel data too.
        let alloc =
            if self.format == ImageFormat::Png { METADATA_LIMIT } else { self.decoder_bytes() };
        let mut limits = Limits::default();
        limits.max_image_width = Some(self.width);
        limits.max_image_height = Some(self.height);
        limits.max_alloc = Some(alloc);
        let mut reader = ImageReader::new(Cursor::new(bytes));
        reader.set_format(self.format);
        reader.limits(limits);
        let decoder = reader.into_decoder().map_err(map_error)?;
        if decoder.dimensions() != (self.width, self.height) || decoder.color_type() != self.color {
            return Err(ImageError::Corrupt("the header changed between two reads".into()));
        }
        let rgb = match DynamicImage::from_decoder(decoder).map_err(map_error)? {
            DynamicImage::ImageRgb8(rgb) => rgb,
            other => other.to_rgb8(),
        };
        Ok(orient(rgb, self.orientation))
    }
}

/// Applies an EXIF orientation.
pub fn orient(rgb: RgbImage, orientation: Orientation) -> RgbImage {
    if orientation == Orientation::NoTransforms {
        return rgb;
    }
    let mut oriented = DynamicImage::ImageRgb8(rgb);
    oriented.apply_orientation(orientation);
    oriented.into_rgb8()
}

/// Header and decode in one call, for callers that need no admission step.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    Header::read(bytes, max_pixels)?.decode(bytes)
}

/// A JPEG's dimensions, colour type and EXIF orientation as image's JPEG decoder reports them,
/// from zune-jpeg (which that decoder wraps) with the same options and mappings, reading the
/// borrowed bytes: image's wrapper copies the whole file before it reads the header (3.8 MB
/// and about 1 ms for a 12 MP photo), and parses the header twice for the orientation.
fn jpeg_header(bytes: &[u8]) -> Result<(u32, u32, ColorType, Orientation), ImageError> {
    use zune_core::colorspace::ColorSpace;
    let options = zune_core::options::DecoderOptions::default()
        .set_strict_mode(false)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(
        zune_core::bytestream::ZCursor::new(bytes),
        options,
    );
    decoder.decode_headers().map_err(|e| match e {
        zune_jpeg::errors::DecodeErrors::Unsupported(_) => ImageError::Unsupported,
        other => ImageError::Corrupt(format!("Format error decoding Jpeg: {other}")),
    })?;
    let (width, height) = decoder.dimensions().expect("headers were decoded");
    // image decodes every other colour space (YCbCr, CMYK, YCCK) to RGB.
    let color = match decoder.input_colorspace().expect("headers were decoded") {
        ColorSpace::Luma => ColorType::L8,
        ColorSpace::LumaA => ColorType::La8,
        ColorSpace::RGBA => ColorType::Rgba8,
        _ => ColorType::Rgb8,
    };
    let orientation = decoder
        .exif()
        .and_then(|exif| Orientation::from_exif_chunk(exif))
        .unwrap_or(Orientation::NoTransforms);
    Ok((width as u32, height as u32, color, orientation))
}

fn reader(bytes: &[u8], max_alloc: u64) -> Result<ImageReader<Cursor<&[u8]>>, ImageError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_alloc);
    reader.limits(limits);
    Ok(reader)
}

fn map_error(e: image::ImageError) -> ImageError {
    match e {
        image::ImageError::Unsupported(_) => ImageError::Unsupported,
        image::ImageError::Limits(limit) => ImageError::OverLimits(limit.to_string()),
        other => ImageError::Corrupt(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_headers_read_in_place_match_images_decoder() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut orientations = Vec::new();
        for dir in ["photos", "formats"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_none_or(|e| e != "jpg") {
                    continue;
                }
                let bytes = std::fs::read(&path).unwrap();
                let mut decoder = ImageReader::new(Cursor::new(&bytes))
                    .with_guessed_format()
                    .unwrap()
                    .into_decoder()
                    .unwrap();
                let (width, height) = decoder.dimensions();
                let expected =
                    (width, height, decoder.color_type(), decoder.orientation().unwrap());
                assert_eq!(jpeg_header(&bytes).unwrap(), expected, "{}", path.display());
                orientations.push(expected.3);
            }
        }
        // The fixtures include a rotated photo, greyscale and CMYK.
        assert!(orientations.contains(&Orientation::Rotate90), "{orientations:?}");
        assert!(orientations.len() >= 9);
        // And corrupt headers are refused as corrupt, not accepted.
        let mut cut = std::fs::read(root.join("photos/coffee_744x496.jpg")).unwrap();
        cut.truncate(100);
        assert!(matches!(jpeg_header(&cut), Err(ImageError::Corrupt(_))));
    }
}
