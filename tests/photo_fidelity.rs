//! The fast JPEG path (decode at 1/2, 1/4 or 1/8 scale, then the antialiased resize) against
//! the exact one (full decode, then the same resize, which tests/preprocess_parity.rs holds
//! to timm pixel for pixel), on the camera-like photos in tests/fixtures/photos/
//! (tools/make_photos.py) at downscale factors from 2 to 16.
//!
//! Limits, in 0-255 units of the 8-bit network input before normalisation: a mean absolute
//! difference of at most 1 and a 99th percentile of at most 4. The top-5 classes of a random
//! T0 agree on every photo.

mod common;

use std::path::PathBuf;

use fasternet_serve::classifier::{Classifier, LoadOptions};
use fasternet_serve::model::Variant;
use fasternet_serve::preprocess::{DecodeMode, PreprocessConfig, Preprocessor};
use image::RgbImage;

const MEAN_LIMIT: f64 = 1.0;
const P99_LIMIT: u8 = 4;
/// Network inputs at crop 0.9: resize targets from 248 down to 71 pixels, so that the decoded
/// image ends up between 1.5 and 3 times the target at every scale.
const INPUTS: [usize; 8] = [224, 192, 176, 144, 112, 96, 80, 64];

fn photos() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photos");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "jpg"))
        .map(|path| {
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(out.len() >= 7, "tests/fixtures/photos/ holds {} photos", out.len());
    out
}

/// 224 at crop 0.9 resizes the shorter side to 248; 112 at 0.9 to 124.
fn preprocessor(input: usize, decode: DecodeMode) -> Preprocessor {
    let config = PreprocessConfig {
        input_size: (input, input),
        crop_pct: 0.9,
        ..PreprocessConfig::imagenet()
    };
    Preprocessor::new(config, 50_000_000).with_decode(decode)
}

/// Mean and 99th percentile of the absolute differences.
fn difference(a: &RgbImage, b: &RgbImage) -> (f64, u8) {
    assert_eq!(a.dimensions(), b.dimensions());
    let mut histogram = [0usize; 256];
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        histogram[x.abs_diff(*y) as usize] += 1;
    }
    let n = a.as_raw().len();
    let mean = histogram.iter().enumerate().map(|(d, c)| d * c).sum::<usize>() as f64 / n as f64;
    let mut seen = 0;
    let p99 = (0..256)
        .find(|&d| {
            seen += histogram[d];
            seen * 100 >= n * 99
        })
        .unwrap() as u8;
    (mean, p99)
}

struct Case {
    name: String,
    input: usize,
    factor: f64,
    divisor: u32,
    mean: f64,
    p99: u8,
}

fn compare(name: &str, bytes: &[u8], input: usize, divisor_override: Option<u32>) -> Case {
    let exact = preprocessor(input, DecodeMode::Exact);
    let fast = preprocessor(input, DecodeMode::Fast);
    let exact_plan = exact.plan(bytes).unwrap();
    assert_eq!(exact_plan.divisor, 1);
    let mut plan = fast.plan(bytes).unwrap();
    if let Some(divisor) = divisor_override {
        plan.divisor = divisor;
    }
    let reference = exact.prepare_pixels(bytes, &exact_plan).unwrap();
    let scaled = fast.prepare_pixels(bytes, &plan).unwrap();
    let (width, height) = plan.header.oriented_dimensions();
    let factor = width.min(height) as f64 / plan.resized.0.min(plan.resized.1) as f64;
    let (mean, p99) = difference(&reference, &scaled);
    Case { name: name.to_string(), input, factor, divisor: plan.divisor, mean, p99 }
}

fn report(cases: &[Case]) {
    eprintln!(
        "{:38} {:>5} {:>6} {:>7} {:>7} {:>6} {:>4}",
        "photo", "input", "factor", "divisor", "decoded", "mean", "p99"
    );
    for c in cases {
        eprintln!(
            "{:38} {:>5} {:>6.2} {:>7} {:>7.2} {:>6.3} {:>4}",
            c.name,
            c.input,
            c.factor,
            c.divisor,
            c.factor / c.divisor as f64,
            c.mean,
            c.p99
        );
    }
}

#[test]
fn the_fast_path_stays_within_the_limits_at_factors_from_2_to_16() {
    let mut cases = Vec::new();
    for (name, bytes) in photos() {
        for input in INPUTS {
            cases.push(compare(&name, &bytes, input, None));
        }
    }
    report(&cases);
    let factors: Vec<f64> = cases.iter().map(|c| c.factor).collect();
    let (lowest, highest) =
        factors.iter().fold((f64::MAX, 0f64), |(lo, hi), &f| (lo.min(f), hi.max(f)));
    assert!(lowest <= 2.0 && highest >= 16.0, "factors cover {lowest:.1}..{highest:.1}");
    for divisor in [2, 4, 8] {
        assert!(cases.iter().any(|c| c.divisor == divisor), "no photo decoded at 1/{divisor}");
    }
    for c in &cases {
        assert!(
            c.mean <= MEAN_LIMIT && c.p99 <= P99_LIMIT,
            "{} at {}: mean {:.3}, p99 {} over the limits ({MEAN_LIMIT}, {P99_LIMIT})",
            c.name,
            c.input,
            c.mean,
            c.p99
        );
    }
}

#[test]
fn a_decode_scale_below_the_margin_breaks_the_limits() {
    // The check above can fail: decoding one step smaller than the margin allows (the decoded
    // image about as large as the resize target) is over the limits on the same photos.
    let mut cases = Vec::new();
    for (name, bytes) in photos() {
        let case = compare(&name, &bytes, 112, None);
        if case.divisor < 8 && case.divisor > 1 {
            cases.push(compare(&name, &bytes, 112, Some(case.divisor * 2)));
        }
    }
    report(&cases);
    assert!(!cases.is_empty());
    assert!(
        cases.iter().any(|c| c.mean > MEAN_LIMIT || c.p99 > P99_LIMIT),
        "decoding at twice the divisor stays within the limits: the margin is not needed"
    );
}

/// The JPEG without its APP1 (EXIF) segments, which sit between SOI and the frame.
fn without_app1(jpeg: &[u8]) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    let mut at = 2;
    while jpeg[at] == 0xFF && (0xE0..=0xEF).contains(&jpeg[at + 1]) {
        let end = at + 2 + u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]) as usize;
        if jpeg[at + 1] != 0xE1 {
            out.extend_from_slice(&jpeg[at..end]);
        }
        at = end;
    }
    out.extend_from_slice(&jpeg[at..]);
    out
}

#[test]
fn every_exif_orientation_lands_the_padding_outside_the_region() {
    // 1501x1003 is not a multiple of 8: at 1/8 the last block column and row are mostly
    // padding, on whichever side the orientation moves them to.
    let (_, photo) = photos().into_iter().find(|(name, _)| name.contains("exif6")).unwrap();
    let photo = without_app1(&photo);
    for orientation in 1..=8 {
        let bytes = common::with_exif_orientation(&photo, orientation);
        let case = compare(&format!("exif {orientation}"), &bytes, 112, None);
        assert_eq!(case.divisor, 4);
        assert!(
            case.mean <= MEAN_LIMIT && case.p99 <= P99_LIMIT,
            "orientation {orientation}: mean {:.3}, p99 {}",
            case.mean,
            case.p99
        );
    }
}

#[test]
fn a_random_t0_ranks_the_same_top_5_on_both_paths() {
    let load = |decode| {
        Classifier::load(&LoadOptions {
            random_init: Some(Variant::T0),
            decode,
            ..Default::default()
        })
        .unwrap()
    };
    let (fast, exact) = (load(DecodeMode::Fast), load(DecodeMode::Exact));
    let mut scaled = 0;
    for (name, bytes) in photos() {
        let top5 = |classifier: &Classifier| {
            let input = classifier.prepare(&bytes).unwrap();
            let predictions = classifier.classify(&[input], 5).unwrap().remove(0);
            predictions.into_iter().map(|p| p.class_index).collect::<Vec<_>>()
        };
        scaled += usize::from(fast.preprocessor().plan(&bytes).unwrap().divisor > 1);
        assert_eq!(top5(&fast), top5(&exact), "{name}");
    }
    assert!(scaled >= 5, "only {scaled} photos were decoded at a reduced scale");
}
