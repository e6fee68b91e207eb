//! timm's eval transform, pixel for pixel: resize (antialiased, PIL-style filters), center
//! crop, then ToTensor + Normalize.

use fast_image_resize::{
    images::{Image, ImageRef},
    FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer,
};
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
    let mut pass = |src: &[u8], (sw, sh): (u32, u32), (w, h): (u32, u32)| -> Vec<u8> {
        let src = ImageRef::new(sw, sh, src, PixelType::U8x3)
            .expect("an RGB buffer has exactly width*height*3 bytes");
        let mut dst = Image::new(w, h, PixelType::U8x3);
        resizer.resize(&src, &mut dst, &options).expect("source and destination are both U8x3");
        dst.into_vec()
    };
    let source = (image.width(), image.height());
    // PIL skips a pass whose axis keeps its size; so do we (and copy nothing then).
    let horizontal = (source.0 != width).then(|| pass(image.as_raw(), source, (width, source.1)));
    let rows: &[u8] = horizontal.as_deref().unwrap_or(image.as_raw());
    let both = if source.1 != height {
        pass(rows, (width, source.1), (width, height))
    } else {
        horizontal.unwrap_or_else(|| image.as_raw().clone())
    };
    RgbImage::from_raw(width, height, both).expect("destination buffer has the right size")
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
    let mut out = RgbImage::new(width, height);
    // The overlap of the crop window and the image, copied row by row; the rest stays black.
    let x0 = left.max(0);
    let x1 = (left + width as i64).min(image.width() as i64);
    if x1 <= x0 {
        return out;
    }
    let span = (x1 - x0) as usize * 3;
    let dst_x = (x0 - left) as usize * 3;
    for y in 0..height as i64 {
        let sy = y + top;
        if sy < 0 || sy >= image.height() as i64 {
            continue;
        }
        let src = (sy as usize * image.width() as usize + x0 as usize) * 3;
        let dst = y as usize * width as usize * 3 + dst_x;
        out.as_mut()[dst..dst + span].copy_from_slice(&image.as_raw()[src..src + span]);
    }
    out
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
