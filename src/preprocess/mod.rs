//! Image decoding and timm's eval preprocessing.

mod decode;
mod jpeg;
pub mod transform;

use std::str::FromStr;

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::Serialize;

pub use decode::{
    decode, Header, ImageError, DEFAULT_MAX_PIXELS, HEADER_READ_BYTES, METADATA_LIMIT,
};
pub use jpeg::Layout as JpegLayout;

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// The official FasterNet evaluation crop (timm's `test_crop_pct`): 224 px from a 248 px resize.
pub const IMAGENET_EVAL_CROP_PCT: f64 = 0.9;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Bicubic,
    Bilinear,
}

impl FromStr for Interpolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bicubic" => Ok(Self::Bicubic),
            "bilinear" => Ok(Self::Bilinear),
            other => {
                Err(format!("unsupported interpolation `{other}` (expected bicubic or bilinear)"))
            }
        }
    }
}

/// How a JPEG much larger than the network input is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DecodeMode {
    /// At the smallest of 1/2, 1/4 or 1/8 scale (in the DCT domain) that keeps the image at
    /// least [`scaled_decode_margin`] times the resize target, then the same resize. Its
    /// difference from `Exact` is measured in tests/photo_fidelity.rs.
    #[default]
    Fast,
    /// Full-size decode, then the resize: timm's pipeline pixel for pixel.
    Exact,
}

impl FromStr for DecodeMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fast" => Ok(Self::Fast),
            "exact" => Ok(Self::Exact),
            other => Err(format!("unsupported decode mode `{other}` (expected fast or exact)")),
        }
    }
}

/// How many times the resize target a JPEG decoded at 1/`divisor` must stay on each side, so
/// that the antialiased resize still does part of the shrinking. At 1/8 each pixel is its 8x8
/// block's mean (the DC coefficient): a box filter, whose blur [`transform::unblur_box`]
/// undoes, and 1.5 times the target suffices. The 1/2 and 1/4 inverse DCTs keep a block's
/// low frequencies but ring at block edges, and need twice the target. Both measured in
/// tests/photo_fidelity.rs: one step below either is over its limits.
pub fn scaled_decode_margin(divisor: u32) -> f64 {
    if divisor == 8 {
        1.5
    } else {
        2.0
    }
}

/// What timm's pretrained_cfg says about eval preprocessing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PreprocessConfig {
    /// (height, width) of the network input.
    pub input_size: (usize, usize),
    pub crop_pct: f64,
    pub interpolation: Interpolation,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl PreprocessConfig {
    /// Defaults for ImageNet checkpoints that come without a config.json (the official
    /// releases): 224x224, crop_pct 0.9 (the paper's evaluation), bicubic, ImageNet mean/std.
    pub fn imagenet() -> Self {
        Self {
            input_size: (224, 224),
            crop_pct: IMAGENET_EVAL_CROP_PCT,
            interpolation: Interpolation::Bicubic,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// Checks what preprocessing alone requires; the model bounds the input size
    /// (see `Classifier::load`).
    pub fn validate(&self) -> Result<(), String> {
        let (h, w) = self.input_size;
        if h == 0 || w == 0 {
            return Err(format!("input size {h}x{w} is empty"));
        }
        if !(self.crop_pct > 0.0 && self.crop_pct <= 2.0) {
            return Err(format!("crop_pct {} must be in (0, 2]", self.crop_pct));
        }
        if self.std.iter().any(|&s| s <= 0.0) {
            return Err("std values must be positive".into());
        }
        Ok(())
    }
}

/// Images whose longer side is more than this many times their shorter side are refused: the
/// aspect-preserving resize would turn the shorter side into the model's input size and the
/// longer one into tens of thousands of pixels (100000x1 into 6.4 million x 64).
pub const MAX_ASPECT_RATIO: u32 = 32;

/// Coefficient tables and row buffers of one resize, above the images themselves.
const RESIZER_WORKSPACE: u64 = 1 << 20;

/// What preparing one image takes, worked out from its header before any pixel is decoded.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub header: Header,
    /// The size the image is resized to before the crop.
    pub resized: (u32, u32),
    /// A JPEG is decoded at 1/`divisor` of its size (1: full size, by the general decoder).
    pub divisor: u32,
    /// Most bytes preparing it holds at once (decoder, resize, crop and tensor).
    pub peak_bytes: u64,
    /// Bytes of the finished (3, H, W) f32 tensor.
    pub tensor_bytes: u64,
}

/// Decodes and transforms images into network inputs.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    pub config: PreprocessConfig,
    pub max_pixels: u64,
    pub decode: DecodeMode,
}

impl Preprocessor {
    pub fn new(config: PreprocessConfig, max_pixels: u64) -> Self {
        Self { config, max_pixels, decode: DecodeMode::default() }
    }

    pub fn with_decode(self, decode: DecodeMode) -> Self {
        Self { decode, ..self }
    }

    /// Resize and center crop: the 8-bit image timm's transform holds just before ToTensor.
    pub fn resize_and_crop(&self, image: &RgbImage) -> RgbImage {
        let (w, h) = transform::resize_target(&self.config, image.width(), image.height());
        self.resize_region_and_crop(image, transform::Region::whole(image), (w, h))
    }

    fn resize_region_and_crop(
        &self,
        image: &RgbImage,
        region: transform::Region,
        (w, h): (u32, u32),
    ) -> RgbImage {
        let resized = transform::resize_region(image, region, w, h, self.config.interpolation);
        let (ch, cw) = self.config.input_size;
        transform::center_crop(&resized, cw as u32, ch as u32)
    }

    /// A decoded image to a normalised (3, H, W) tensor.
    pub fn transform(&self, image: &RgbImage) -> Tensor {
        self.to_tensor(&self.resize_and_crop(image))
    }

    fn to_tensor(&self, cropped: &RgbImage) -> Tensor {
        let (h, w) = self.config.input_size;
        let data = transform::normalize_chw(cropped, self.config.mean, self.config.std);
        Tensor::from_vec(data, (3, h, w), &Device::Cpu).expect("buffer length is 3*H*W")
    }

    /// Reads an image's header and works out what preparing it takes, refusing it if it is
    /// over the pixel limit, has an extreme aspect ratio or is a truncated JPEG.
    pub fn plan(&self, bytes: &[u8]) -> Result<Plan, ImageError> {
        let header = Header::read(bytes, self.max_pixels)?;
        let (width, height) = header.oriented_dimensions();
        if width.max(height) as u64 > MAX_ASPECT_RATIO as u64 * width.min(height) as u64 {
            return Err(ImageError::ExtremeAspectRatio { width, height, limit: MAX_ASPECT_RATIO });
        }
        let resized = transform::resize_target(&self.config, width, height);
        let divisor = self.jpeg_divisor(&header, resized);
        let decoded = (width.div_ceil(divisor), height.div_ceil(divisor));
        let (h, w) = self.config.input_size;
        let rgb = |(w, h): (u32, u32)| w as u64 * h as u64 * 3;
        let decoding = match header.jpeg {
            Some(layout) if divisor > 1 => {
                let pixels = decoded.0 as u64 * decoded.1 as u64;
                // libjpeg's buffers with its output (4 bytes a pixel for CMYK) and the RGB
                // conversion; then the image with the unblurring's rows (at 1/8, in place),
                // or the image and the orientation's copy.
                let libjpeg = layout.working_bytes(header.width) + 7 * pixels;
                let unblur = 3 * pixels + transform::unblur_bytes(decoded.0);
                libjpeg.max(unblur).max(6 * pixels)
            }
            _ => header.decoder_bytes(),
        };
        // After decoding: the decoded image, the horizontal pass (new width, old height) and
        // the vertical pass are alive together; then the crop and the tensor.
        let resizing = rgb(decoded) + rgb((resized.0, decoded.1)) + rgb(resized);
        let tensor_bytes = (3 * h * w * std::mem::size_of::<f32>()) as u64;
        let peak_bytes =
            decoding.max(resizing) + rgb((w as u32, h as u32)) + tensor_bytes + RESIZER_WORKSPACE;
        Ok(Plan { header, resized, divisor, peak_bytes, tensor_bytes })
    }

    /// The largest of the JPEG scale divisors (8, 4, 2) that keeps both oriented sides at
    /// least [`scaled_decode_margin`] times their resize target; 1 for every other image.
    fn jpeg_divisor(&self, header: &Header, resized: (u32, u32)) -> u32 {
        if self.decode != DecodeMode::Fast || !header.jpeg.is_some_and(|layout| layout.scalable) {
            return 1;
        }
        let (width, height) = header.oriented_dimensions();
        let fits = |d: u32| {
            let needed = |side: u32| d as f64 * scaled_decode_margin(d) * side as f64;
            width as f64 >= needed(resized.0) && height as f64 >= needed(resized.1)
        };
        jpeg::SCALE_DIVISORS.into_iter().find(|&d| fits(d)).unwrap_or(1)
    }

    /// Whether preparing this image is a few tens of microseconds of work: a small upload that
    /// declares few pixels, and few after the resize too. The service prepares such images on
    /// the async worker instead of handing them to another thread and back, which costs more
    /// CPU than the work itself.
    pub fn is_small(&self, plan: &Plan) -> bool {
        const SMALL_UPLOAD_BYTES: usize = 64 * 1024;
        const SMALL_IMAGE_PIXELS: u64 = 16 * 1024;
        let (rw, rh) = plan.resized;
        plan.header.encoded_bytes <= SMALL_UPLOAD_BYTES
            && plan.header.pixels().saturating_add(rw as u64 * rh as u64) <= SMALL_IMAGE_PIXELS
    }

    /// Decodes and transforms the image `plan` was made for.
    pub fn prepare(&self, bytes: &[u8], plan: &Plan) -> Result<Tensor, ImageError> {
        Ok(self.to_tensor(&self.prepare_pixels(bytes, plan)?))
    }

    /// Decodes, resizes and crops the image `plan` was made for: the 8-bit network input.
    pub fn prepare_pixels(&self, bytes: &[u8], plan: &Plan) -> Result<RgbImage, ImageError> {
        let header = &plan.header;
        let Some(layout) = header.jpeg.filter(|_| plan.divisor > 1) else {
            return Ok(self.resize_and_crop(&header.decode(bytes)?));
        };
        let limit = layout.working_bytes(header.width);
        let stored = jpeg::decode_scaled(bytes, plan.divisor, limit)?;
        let expected = (header.width.div_ceil(plan.divisor), header.height.div_ceil(plan.divisor));
        if stored.dimensions() != expected {
            return Err(ImageError::Corrupt("the header changed between two reads".into()));
        }
        let stored = if plan.divisor == 8 { transform::unblur_box(stored) } else { stored };
        let image = decode::orient(stored, header.orientation);
        // The last block row and column can be partly padding: only W/d x H/d of the decoded
        // pixels are image, at the corner where the stored origin lands once oriented.
        let (width, height) = header.oriented_dimensions();
        let extent = (width as f64 / plan.divisor as f64, height as f64 / plan.divisor as f64);
        let region = transform::Region::at_origin_corner(&image, extent, header.orientation);
        Ok(self.resize_region_and_crop(&image, region, plan.resized))
    }

    /// Encoded bytes to a normalised (3, H, W) tensor.
    pub fn load(&self, bytes: &[u8]) -> Result<Tensor, ImageError> {
        self.prepare(bytes, &self.plan(bytes)?)
    }
}
