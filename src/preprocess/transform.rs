//! timm's eval transform, pixel for pixel: resize (antialiased, PIL-style filters), center
//! crop, then ToTensor + Normalize.

use fast_image_resize::{images::Image, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;

use super::{Interpolation, PreprocessConfig};

/// The size the image is resized to before cropping, as timm computes it.
///
/// timm scales the target by 1/crop_pct (floored). A square target resizes the shorter side
/// (torchvision `Resize(int)`: the longer side is truncated); a non-square target goes through
/// timm's `ResizeKeepRatio`, which scales by the smaller ratio and rounds half to even.
pub fn resize_target(config: &PreprocessConfig, width: u32, height: u32) -> (u32, u32) {
    let (th, tw) = config.input_size;
    let scale_h = (th as f64 / config.crop_pct).floor();
    let scale_w = (tw as f64 / config.crop_pct).floor();
    let (w, h) = (width as f64, height as f64);
    if scale_h == scale_w {
        let short = scale_h;
        if width <= height {
            (short as u32, (short * h / w).trunc() as u32)
        } else {
            ((short * w / h).trunc() as u32, short as u32)
        }
    } else {
        let ratio = (h / scale_h).min(w / scale_w);
        ((w / ratio).round_ties_even() as u32, (h / ratio).round_ties_even() as u32)
    }
}

/// Resizes like PIL: a horizontal pass, rounded and clamped to 8 bits, then a vertical pass.
/// Doing the passes separately (each a one-dimensional fast_image_resize convolution)
/// reproduces PIL's intermediate rounding, which a fused two-dimensional resize does not.
pub fn resize(image: &RgbImage, width: u32, height: u32, interpolation: Interpolation) -> RgbImage {
    let (width, height) = (width.max(1), height.max(1));
    let filter = match interpolation {
        Interpolation::Bicubic => FilterType::CatmullRom, // PIL's BICUBIC (a = -0.5)
        Interpolation::Bilinear => FilterType::Bilinear,
    };
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter));
    let mut resizer = Resizer::new();
    let mut pass = |src: Image<'static>, w: u32, h: u32| -> Image<'static> {
        if (src.width(), src.height()) == (w, h) {
            return src;
        }
        let mut dst = Image::new(w, h, PixelType::U8x3);
        resizer.resize(&src, &mut dst, &options).expect("source and destination are both U8x3");
        dst
    };
    let src = Image::from_vec_u8(image.width(), image.height(), image.as_raw().clone(), PixelType::U8x3)
        .expect("an RgbImage buffer has exactly width*height*3 bytes");
    let horizontal = pass(src, width, image.height());
    let both = pass(horizontal, width, height);
    RgbImage::from_raw(width, height, both.into_vec()).expect("destination buffer has the right size")
}

/// torchvision's CenterCrop: offsets round half to even; a crop larger than the image pads
/// with black.
pub fn center_crop(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    fn offset(src: u32, dst: u32) -> i64 {
        if dst > src {
            -(((dst - src) / 2) as i64)
        } else {
            ((src - dst) as f64 / 2.0).round_ties_even() as i64
        }
    }
    let (left, top) = (offset(image.width(), width), offset(image.height(), height));
    RgbImage::from_fn(width, height, |x, y| {
        let (sx, sy) = (x as i64 + left, y as i64 + top);
        if sx < 0 || sy < 0 || sx >= image.width() as i64 || sy >= image.height() as i64 {
            image::Rgb([0, 0, 0])
        } else {
            *image.get_pixel(sx as u32, sy as u32)
        }
    })
}

/// ToTensor + Normalize into a CHW f32 buffer.
pub fn normalize_chw(image: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let plane = (image.width() * image.height()) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in image.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (px[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(size: (usize, usize), crop_pct: f64) -> PreprocessConfig {
        PreprocessConfig { input_size: size, crop_pct, ..PreprocessConfig::imagenet() }
    }

    #[test]
    fn square_target_resizes_the_shorter_side_and_truncates() {
        // 451x300 at 224 / 0.9: shorter side 248, longer int(248 * 451 / 300) = 372.
        assert_eq!(resize_target(&cfg((224, 224), 0.9), 451, 300), (372, 248));
        assert_eq!(resize_target(&cfg((224, 224), 0.9), 300, 451), (248, 372));
        assert_eq!(resize_target(&cfg((64, 64), 1.0), 28, 28), (64, 64));
    }

    #[test]
    fn crop_offsets_round_half_to_even() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 + 10, y as u8, 0]));
        // (7 - 4) / 2 = 1.5 -> 2; (5 - 2) / 2 = 1.5 -> 2
        let c = center_crop(&img, 4, 2);
        assert_eq!(c.get_pixel(0, 0).0, [12, 2, 0]);
        // (7 - 2) / 2 = 2.5 -> 2
        assert_eq!(center_crop(&img, 2, 5).get_pixel(0, 0).0, [12, 0, 0]);
        // larger than the image: padded with black, image centred
        let p = center_crop(&img, 9, 5);
        assert_eq!(p.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(p.get_pixel(1, 0).0, [10, 0, 0]);
        assert_eq!(p.get_pixel(8, 0).0, [0, 0, 0]);
    }
}
