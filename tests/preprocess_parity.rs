//! Decoding + resize + crop against timm's eval transform (fixtures from
//! tools/gen_preprocess_fixtures.py: real photos through PIL and timm's create_transform).

mod common;

use std::path::{Path, PathBuf};

use fasternet_serve::preprocess::{
    decode, ImageError, Interpolation, PreprocessConfig, Preprocessor,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    input: String,
    expected: String,
    input_size: [usize; 2],
    crop_pct: f64,
    interpolation: String,
    mean: [f32; 3],
    std: [f32; 3],
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess")
}

fn preprocessor(case: &Case) -> Preprocessor {
    let config = PreprocessConfig {
        input_size: (case.input_size[0], case.input_size[1]),
        crop_pct: case.crop_pct,
        interpolation: case.interpolation.parse::<Interpolation>().unwrap(),
        mean: case.mean,
        std: case.std,
    };
    Preprocessor::new(config, 50_000_000)
}

#[test]
fn resize_and_crop_match_timm_on_real_photos() {
    let dir = fixtures();
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for case in &cases {
        let p = preprocessor(case);
        let image = decode(&std::fs::read(dir.join(&case.input)).unwrap(), p.max_pixels).unwrap();
        let ours = p.resize_and_crop(&image);
        let want = image::open(dir.join(&case.expected)).unwrap().to_rgb8();
        assert_eq!(ours.dimensions(), want.dimensions(), "{}", case.expected);
        let diffs: Vec<f64> = ours
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let max = diffs.iter().cloned().fold(0.0, f64::max);
        eprintln!("{:<40} mean |diff| {mean:.3}/255, max {max}/255", case.expected);
        if mean > 0.5 || max > 3.0 {
            failures.push(format!("{}: mean {mean:.3}, max {max}", case.expected));
        }
        // The normalised tensor is exactly (pixel / 255 - mean) / std of that crop.
        let t = p.transform(&image);
        assert_eq!(t.dims(), &[3, case.input_size[0], case.input_size[1]]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let plane = case.input_size[0] * case.input_size[1];
        for (c, &channel) in [0usize, 1, 2].iter().enumerate() {
            let px = ours.as_raw()[channel] as f32;
            let got = v[c * plane];
            assert!((got - (px / 255.0 - case.mean[c]) / case.std[c]).abs() < 1e-5);
        }
    }
    assert!(failures.is_empty(), "over tolerance (mean 0.5/255, max 3/255): {failures:#?}");
}

#[test]
fn bad_image_data_gets_clear_errors() {
    assert!(matches!(decode(b"", 1000), Err(ImageError::Empty)));
    assert!(matches!(decode(b"definitely not an image", 1000), Err(ImageError::Unsupported)));
    let png = std::fs::read(fixtures().join("inputs/chelsea.png")).unwrap();
    let err = decode(&png[..png.len() / 2], 50_000_000).unwrap_err();
    assert!(matches!(err, ImageError::Corrupt(_)), "{err}");
    let jpeg = std::fs::read(fixtures().join("inputs/coffee.jpg")).unwrap();
    // A JPEG cut before its scan data starts.
    let err = decode(&jpeg[..200], 50_000_000).unwrap_err();
    assert!(matches!(err, ImageError::Corrupt(_)), "{err}");
}

#[test]
fn the_pixel_limit_is_checked_from_the_header_before_decoding() {
    // chelsea.png is 451x300 = 135,300 pixels.
    let png = std::fs::read(fixtures().join("inputs/chelsea.png")).unwrap();
    match decode(&png, 100_000) {
        Err(ImageError::TooLarge { width: 451, height: 300, limit: 100_000 }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(decode(&png, 135_300).is_ok());
    // A GIF whose header claims 65535x65535 but carries no pixels at all: rejected from the
    // header alone (decoding would need 17 GB).
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00]);
    gif.extend_from_slice(&[
        0x2c, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
    ]);
    let err = decode(&gif, 50_000_000).unwrap_err();
    assert!(matches!(err, ImageError::TooLarge { width: 65535, height: 65535, .. }), "{err}");
    assert!(err.to_string().contains("over the limit of 50000000"), "{err}");
}

#[test]
fn small_images_are_told_apart_by_their_header() {
    let bundled = Preprocessor::new(
        PreprocessConfig { input_size: (64, 64), crop_pct: 1.0, ..PreprocessConfig::imagenet() },
        50_000_000,
    );
    let imagenet = Preprocessor::new(PreprocessConfig::imagenet(), 50_000_000);
    let small = |p: &Preprocessor, bytes: &[u8]| p.plan(bytes).is_ok_and(|plan| p.is_small(&plan));
    let fashion = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fashion_mnist_t10k_0.png"),
    )
    .unwrap();
    assert!(small(&bundled, &fashion), "28x28 in, 64x64 out");
    assert!(!small(&imagenet, &fashion), "28x28 in, but resized to 248x248");
    let chelsea = std::fs::read(fixtures().join("inputs/chelsea.png")).unwrap();
    assert!(!small(&bundled, &chelsea), "451x300 in");
    assert!(!small(&bundled, b"plain words"), "no header: the error comes from the full decoder");
    // A 29-byte GIF whose header claims 65535x65535.
    let gif = [
        b"GIF89a".as_slice(),
        &[
            0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0x2c, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x02,
            0x02, 0x44, 0x01, 0, 0x3b,
        ],
    ]
    .concat();
    assert!(!small(&bundled, &gif));
}

#[test]
fn exif_orientation_is_applied() {
    // 40x20: left half white, right half black.
    let img = image::RgbImage::from_fn(40, 20, |x, _| {
        if x < 20 {
            image::Rgb([255; 3])
        } else {
            image::Rgb([0; 3])
        }
    });
    let mut jpeg = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
    let plain = decode(&jpeg, 1_000_000).unwrap();
    assert_eq!(plain.dimensions(), (40, 20));
    // Orientation 6: the stored image must be rotated 90 degrees clockwise for display, so
    // the white left half ends up on top.
    let rotated = decode(&common::with_exif_orientation(&jpeg, 6), 1_000_000).unwrap();
    assert_eq!(rotated.dimensions(), (20, 40));
    assert!(rotated.get_pixel(10, 5)[0] > 200, "top should be white");
    assert!(rotated.get_pixel(10, 35)[0] < 50, "bottom should be black");
}

#[test]
fn every_supported_format_decodes_and_grey_and_alpha_convert_like_pil() {
    let rgba = image::RgbaImage::from_fn(33, 17, |x, y| {
        image::Rgba([(x * 7) as u8, (y * 13) as u8, 200, (x * y) as u8])
    });
    let dynamic = image::DynamicImage::ImageRgba8(rgba.clone());
    for format in [image::ImageFormat::Png, image::ImageFormat::WebP, image::ImageFormat::Tiff] {
        let mut bytes = Vec::new();
        dynamic.write_to(&mut std::io::Cursor::new(&mut bytes), format).unwrap();
        let rgb = decode(&bytes, 1_000_000).unwrap();
        // Alpha is dropped, never composited (PIL's convert('RGB')).
        assert_eq!(rgb.get_pixel(5, 3).0, [35, 39, 200], "{format:?}");
        assert_eq!(rgb.get_pixel(0, 0).0, [0, 0, 200], "{format:?}");
    }
    let rgb = image::DynamicImage::ImageRgb8(dynamic.to_rgb8());
    for format in [image::ImageFormat::Bmp, image::ImageFormat::Gif, image::ImageFormat::Jpeg] {
        let mut bytes = Vec::new();
        rgb.write_to(&mut std::io::Cursor::new(&mut bytes), format).unwrap();
        assert_eq!(decode(&bytes, 1_000_000).unwrap().dimensions(), (33, 17), "{format:?}");
    }
    let grey = image::GrayImage::from_fn(9, 9, |x, _| image::Luma([x as u8 * 20]));
    let mut bytes = Vec::new();
    grey.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    assert_eq!(decode(&bytes, 1_000).unwrap().get_pixel(4, 2).0, [80, 80, 80]);
}
