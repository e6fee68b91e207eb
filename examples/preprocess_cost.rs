//! CPU cost of one request's preprocessing, by step: decode, resize + center crop, normalise.
//! The service pays this per image on the same cores as the model.
//!
//!     cargo run --release --example preprocess_cost -- IMAGE [INPUT_SIZE] [CROP_PCT]

use std::time::Instant;

use fasternet_serve::preprocess::{decode, transform, PreprocessConfig, Preprocessor};

/// The service's allocator (see src/allocator.rs): glibc's malloc would add page faults per image.
#[global_allocator]
static ALLOCATOR: fasternet_serve::allocator::ServerAllocator =
    fasternet_serve::allocator::ServerAllocator;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: preprocess_cost IMAGE [INPUT_SIZE] [CROP_PCT]");
    let size: usize = args.next().map_or(224, |s| s.parse().expect("INPUT_SIZE"));
    let crop_pct: f64 = args.next().map_or(0.9, |s| s.parse().expect("CROP_PCT"));
    let bytes = std::fs::read(&path).expect("readable image");
    let config =
        PreprocessConfig { input_size: (size, size), crop_pct, ..PreprocessConfig::imagenet() };
    let pre = Preprocessor::new(config.clone(), u64::MAX);
    let image = decode(&bytes, u64::MAX).expect("decodable image");
    let cropped = pre.resize_and_crop(&image);
    let time = |name: &str, f: &mut dyn FnMut()| {
        let (start, mut n) = (Instant::now(), 0u32);
        while n < 10 || start.elapsed().as_secs_f64() < 1.0 {
            f();
            n += 1;
        }
        println!("{name:>16}: {:.3} ms", start.elapsed().as_secs_f64() * 1e3 / n as f64);
    };
    println!(
        "{path}: {} bytes, {}x{} -> {size}x{size} (crop_pct {crop_pct})",
        bytes.len(),
        image.width(),
        image.height()
    );
    time("decode", &mut || drop(decode(&bytes, u64::MAX).unwrap()));
    time("resize + crop", &mut || drop(pre.resize_and_crop(&image)));
    time("normalise", &mut || drop(transform::normalize_chw(&cropped, config.mean, config.std)));
    time("transform", &mut || drop(pre.transform(&image)));
    time("all", &mut || drop(pre.load(&bytes).unwrap()));
}
