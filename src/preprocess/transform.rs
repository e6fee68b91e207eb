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

/// The part of an image a resize reads, in pixels (fractional where the image's edge falls
/// inside a pixel).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Region {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
}

impl Region {
    pub fn whole(image: &RgbImage) -> Self {
        Self { left: 0.0, top: 0.0, width: image.width() as f64, height: image.height() as f64 }
    }

    /// A `width` x `height` region of an oriented image, touching the corner where the
    /// stored image's origin landed: that of an image decoded from whole blocks, where only
    /// the part from the stored origin on is picture.
    pub fn at_origin_corner(
        image: &RgbImage,
        (width, height): (f64, f64),
        orientation: image::metadata::Orientation,
    ) -> Self {
        // Where (0, 0) goes, found by orienting a 2x2 image with that pixel marked.
        let mut probe = image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(2, 2, |x, y| {
            image::Luma([u8::from(x == 0 && y == 0)])
        }));
        probe.apply_orientation(orientation);
        let probe = probe.into_luma8();
        let (x, y) = (0..4).map(|i| (i % 2, i / 2)).find(|&(x, y)| probe[(x, y)][0] == 1).unwrap();
        Self {
            left: if x == 0 { 0.0 } else { image.width() as f64 - width },
            top: if y == 0 { 0.0 } else { image.height() as f64 - height },
            width,
            height,
        }
    }
}

/// Resizes like PIL: a horizontal pass, rounded and clamped to 8 bits, then a vertical pass.
/// Doing the passes separately (each a one-dimensional fast_image_resize convolution)
/// reproduces PIL's intermediate rounding, which a fused two-dimensional resize does not.
pub fn resize(image: &RgbImage, width: u32, height: u32, interpolation: Interpolation) -> RgbImage {
    resize_region(image, Region::whole(image), width, height, interpolation)
}

/// [`resize`] of a region of the image (PIL's `box` argument).
pub fn resize_region(
    image: &RgbImage,
    region: Region,
    width: u32,
    height: u32,
    interpolation: Interpolation,
) -> RgbImage {
    let (width, height) = (width.max(1), height.max(1));
    let filter = match interpolation {
        Interpolation::Bicubic => FilterType::CatmullRom, // PIL's BICUBIC (a = -0.5)
        Interpolation::Bilinear => FilterType::Bilinear,
    };
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter));
    let mut resizer = Resizer::new();
    let mut pass = |src: &[u8], (sw, sh): (u32, u32), (w, h): (u32, u32), crop: ResizeOptions| {
        let src = ImageRef::new(sw, sh, src, PixelType::U8x3)
            .expect("an RGB buffer has exactly width*height*3 bytes");
        let mut dst = Image::new(w, h, PixelType::U8x3);
        resizer.resize(&src, &mut dst, &crop).expect("source and destination are both U8x3");
        dst.into_vec()
    };
    let source = (image.width(), image.height());
    let whole = Region::whole(image);
    // PIL skips a pass whose axis keeps its size; so do we (and copy nothing then).
    let horizontal_needed =
        source.0 != width || region.left != whole.left || region.width != whole.width;
    let horizontal = horizontal_needed.then(|| {
        let crop = options.crop(region.left, 0.0, region.width, source.1 as f64);
        pass(image.as_raw(), source, (width, source.1), crop)
    });
    let rows: &[u8] = horizontal.as_deref().unwrap_or(image.as_raw());
    let vertical_needed =
        source.1 != height || region.top != whole.top || region.height != whole.height;
    let both = if vertical_needed {
        let crop = options.crop(0.0, region.top, width as f64, region.height);
        pass(rows, (width, source.1), (width, height), crop)
    } else {
        horizontal.unwrap_or_else(|| image.as_raw().clone())
    };
    RgbImage::from_raw(width, height, both).expect("destination buffer has the right size")
}

/// Bytes [`unblur_box`] holds beside the image: three rows of its horizontal pass (i16).
pub fn unblur_bytes(width: u32) -> u64 {
    3 * 3 * 2 * width as u64
}

/// Undoes most of the blur of a box filter one pixel wide, as a JPEG decoded at 1/8 scale has
/// (each pixel the mean of its 8x8 block): a separable [-a, 1 + 2a, -a] with a = 1/24, which
/// cancels the box's variance (1/12 pixel squared) so that the resize after it blurs about as
/// much as the full-size path's resize alone. Edges repeat their last pixel.
///
/// In place: the horizontal pass of the rows above, at and below the one being written is
/// kept in a ring of three rows, and a row is overwritten once the pass of the row below it
/// has read it.
pub fn unblur_box(mut image: RgbImage) -> RgbImage {
    let stride = image.width() as usize * 3;
    let height = image.height() as usize;
    if stride == 0 || height == 0 {
        return image;
    }
    let pixels: &mut [u8] = &mut image;
    let mut ring = vec![0i16; 3 * stride];
    let slot = |y: usize| (y % 3) * stride..(y % 3 + 1) * stride;
    unblur_row(&pixels[..stride], &mut ring[slot(0)]);
    for y in 0..height {
        if y + 1 < height {
            unblur_row(&pixels[(y + 1) * stride..][..stride], &mut ring[slot(y + 1)]);
        }
        let (up, down) = (y.saturating_sub(1), (y + 1).min(height - 1));
        let (up, here, down) = (&ring[slot(up)], &ring[slot(y)], &ring[slot(down)]);
        let dst = &mut pixels[y * stride..][..stride];
        for (((out, &u), &h), &d) in dst.iter_mut().zip(up).zip(here).zip(down) {
            // 576 times the result, rounded down once: clamping below first lets the
            // division be an unsigned one by a constant, which vectorises.
            let scaled = (26 * h as i32 - u as i32 - d as i32 + 288).max(0) as u32;
            *out = (scaled / 576).min(255) as u8;
        }
    }
    image
}

/// [-1, 26, -1] along one RGB row, 24 times the horizontal pass's result (-510..=6630, an
/// i16); the first and last pixel repeat themselves as neighbours.
fn unblur_row(src: &[u8], dst: &mut [i16]) {
    let tap = |c: u8, l: u8, r: u8| 26 * c as i16 - l as i16 - r as i16;
    let n = src.len();
    if n == 3 {
        for (out, &c) in dst.iter_mut().zip(src) {
            *out = tap(c, c, c);
        }
        return;
    }
    for i in 0..3 {
        dst[i] = tap(src[i], src[i], src[i + 3]);
        dst[n - 3 + i] = tap(src[n - 3 + i], src[n - 6 + i], src[n - 3 + i]);
    }
    let middle = dst[3..n - 3].iter_mut().zip(&src[3..n - 3]).zip(&src[..n - 6]).zip(&src[6..]);
    for (((out, &c), &l), &r) in middle {
        *out = tap(c, l, r);
    }
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
    fn unblur_box_is_minus_1_26_minus_1_over_24_on_each_axis() {
        let flat = RgbImage::from_pixel(5, 4, image::Rgb([7, 130, 255]));
        assert_eq!(unblur_box(flat.clone()), flat);
        // One bright pixel: 26/24 squared at the centre, -26/576 beside it, 1/576 diagonally.
        let mut dot = RgbImage::from_pixel(5, 5, image::Rgb([50, 100, 100]));
        dot.put_pixel(2, 2, image::Rgb([50 + 144, 100, 100]));
        let out = unblur_box(dot);
        assert_eq!(out.get_pixel(2, 2).0, [50 + 169, 100, 100]); // 144 * 676 / 576 = 169
        assert_eq!(out.get_pixel(1, 2).0, [44, 100, 100]); // 50 - 144 * 26 / 576 = 43.5
        assert_eq!(out.get_pixel(1, 1).0, [50, 100, 100]); // 50 + 144 / 576
                                                           // Edges repeat their last pixel: a ramp's end stays where it was.
        let ramp = RgbImage::from_fn(4, 1, |x, _| image::Rgb([x as u8 * 10, 0, 0]));
        assert_eq!(
            unblur_box(ramp).as_raw().chunks(3).map(|p| p[0]).collect::<Vec<_>>(),
            [0, 10, 20, 30]
        );
    }

    #[test]
    fn unblur_box_matches_its_definition_on_every_shape() {
        // The filter as written: per pixel and channel, with clamped neighbours, in f64, the
        // result rounded half up (576ths are exact in f64).
        fn definition(image: &RgbImage) -> RgbImage {
            let (w, h) = (image.width() as i64, image.height() as i64);
            let at = |x: i64, y: i64, c: usize| {
                image.get_pixel(x.clamp(0, w - 1) as u32, y.clamp(0, h - 1) as u32)[c] as f64
            };
            let row =
                |x: i64, y: i64, c: usize| 26.0 * at(x, y, c) - at(x - 1, y, c) - at(x + 1, y, c);
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let (x, y) = (x as i64, y as i64);
                image::Rgb(std::array::from_fn(|c| {
                    let v = 26.0 * row(x, y, c) - row(x, y - 1, c) - row(x, y + 1, c);
                    (v / 576.0 + 0.5).floor().clamp(0.0, 255.0) as u8
                }))
            })
        }
        let mut state = 0x2545_f491_u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        for (w, h) in [(1, 1), (1, 6), (2, 1), (2, 3), (3, 2), (7, 9), (33, 17)] {
            // Noise with runs of 0 and 255, so that both clamps are reached.
            let image = RgbImage::from_fn(w, h, |_, _| {
                image::Rgb(std::array::from_fn(|_| match next() % 4 {
                    0 => 0,
                    1 => 255,
                    _ => next() as u8,
                }))
            });
            assert_eq!(unblur_box(image.clone()), definition(&image), "{w}x{h}");
        }
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
