//! Image decoding and timm's eval preprocessing.

mod decode;
pub mod transform;

use std::str::FromStr;

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::Serialize;

pub use decode::{
    decode, Header, ImageError, DEFAULT_MAX_PIXELS, HEADER_READ_BYTES, METADATA_LIMIT,
};

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
}

impl Preprocessor {
    pub fn new(config: PreprocessConfig, max_pixels: u64) -> Self {
        Self { config, max_pixels }
    }

    /// Resize and center crop: the 8-bit image timm's transform holds just before ToTensor.
    pub fn resize_and_crop(&self, image: &RgbImage) -> RgbImage {
        let (w, h) = transform::resize_target(&self.config, image.width(), image.height());
        let resized = transform::resize(image, w, h, self.config.interpolation);
        let (ch, cw) = self.config.input_size;
        transform::center_crop(&resized, cw as u32, ch as u32)
    }

    /// A decoded image to a normalised (3, H, W) tensor.
    pub fn transform(&self, image: &RgbImage) -> Tensor {
        let cropped = self.resize_and_crop(image);
        let (h, w) = self.config.input_size;
        let data = transform::normalize_chw(&cropped, self.config.mean, self.config.std);
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
        let (h, w) = self.config.input_size;
        let rgb = |(w, h): (u32, u32)| w as u64 * h as u64 * 3;
        // After decoding: the decoded image, the horizontal pass (new width, old height) and
        // the vertical pass are alive together; then the crop and the tensor.
        let resizing = rgb((width, height)) + rgb((resized.0, height)) + rgb(resized);
        let tensor_bytes = (3 * h * w * std::mem::size_of::<f32>()) as u64;
        let peak_bytes = header.decoder_bytes().max(resizing)
            + rgb((w as u32, h as u32))
            + tensor_bytes
            + RESIZER_WORKSPACE;
        Ok(Plan { header, resized, peak_bytes, tensor_bytes })
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
        Ok(self.transform(&plan.header.decode(bytes)?))
    }

    /// Encoded bytes to a normalised (3, H, W) tensor.
    pub fn load(&self, bytes: &[u8]) -> Result<Tensor, ImageError> {
        self.prepare(bytes, &self.plan(bytes)?)
    }
}
