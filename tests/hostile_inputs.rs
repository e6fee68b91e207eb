//! Decoders and body parsers against hostile and malformed input, with every allocation
//! counted: preparing an image must never allocate more than the plan made from its header
//! says (the figure the server reserves from its memory budget), reading a body never more
//! than its reservation, and nothing may panic.
//!
//! The fuzz tests mutate real images and requests (bit flips, truncation, interesting bytes,
//! header fields rewritten with valid checksums, repeated ranges). A bounded run is part of
//! `cargo test`; a longer one:
//!
//!     FUZZ_ITERATIONS=200000 cargo test --release --test hostile_inputs -- --nocapture fuzz
//!
//! (`FUZZ_SEED` picks another sequence; a failure prints the seed and the iteration, and
//! `FUZZ_SAVE=dir` writes the failing input there.) Every crash or overrun found becomes a
//! case in `tests/fixtures/regressions/`, which runs on every `cargo test`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use fasternet_serve::preprocess::{
    ImageError, Plan, PreprocessConfig, Preprocessor, HEADER_READ_BYTES,
};
use fasternet_serve::server::input::{read_images, BodyLimits};
use fasternet_serve::server::memory::MemoryPool;
use image::{DynamicImage, ImageFormat};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::{deflated_zeros, zero_png};

/// Counts the bytes allocated and the most allocated at once.
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Both blocks may exist during the move.
            let now = CURRENT.fetch_add(new_size, Ordering::SeqCst) + new_size;
            PEAK.fetch_max(now, Ordering::SeqCst);
            CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The counters are process-wide: tests in this file run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` and returns its result with the most bytes it held at once.
fn measure<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let start = CURRENT.load(Ordering::SeqCst);
    PEAK.store(start, Ordering::SeqCst);
    let result = f();
    (result, (PEAK.load(Ordering::SeqCst) - start) as u64)
}

fn imagenet() -> Preprocessor {
    Preprocessor::new(PreprocessConfig::imagenet(), 50_000_000)
}

fn bundled() -> Preprocessor {
    Preprocessor::new(
        PreprocessConfig { input_size: (64, 64), crop_pct: 1.0, ..PreprocessConfig::imagenet() },
        50_000_000,
    )
}

/// A 32-pixel input: JPEGs of a few hundred pixels are decoded at 1/2 to 1/8 scale.
fn tiny() -> Preprocessor {
    Preprocessor::new(
        PreprocessConfig { input_size: (32, 32), crop_pct: 1.0, ..PreprocessConfig::imagenet() },
        50_000_000,
    )
}

fn fixtures(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "md" && e != "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect()
}

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut out), format).unwrap();
    out
}

/// Images the image crate can write itself, in the colour types the photos do not cover.
fn generated() -> Vec<(String, Vec<u8>)> {
    let rgb = image::RgbImage::from_fn(900, 600, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x * y) % 239) as u8])
    });
    let photo = DynamicImage::ImageRgb8(rgb);
    let rgba16 = DynamicImage::ImageRgba16(photo.to_rgba16());
    let mut out = vec![
        ("rgb8.png".to_string(), encode(&photo, ImageFormat::Png)),
        (
            "rgb16.png".to_string(),
            encode(&DynamicImage::ImageRgb16(photo.to_rgb16()), ImageFormat::Png),
        ),
        ("rgba16.png".to_string(), encode(&rgba16, ImageFormat::Png)),
        ("rgb.gif".to_string(), encode(&photo, ImageFormat::Gif)),
        ("rgb.bmp".to_string(), encode(&photo, ImageFormat::Bmp)),
        (
            "rgba.bmp".to_string(),
            encode(&DynamicImage::ImageRgba8(photo.to_rgba8()), ImageFormat::Bmp),
        ),
        ("rgb.tiff".to_string(), encode(&photo, ImageFormat::Tiff)),
        ("rgba16.tiff".to_string(), encode(&rgba16, ImageFormat::Tiff)),
        (
            "lossless.webp".to_string(),
            encode(&DynamicImage::ImageRgba8(photo.to_rgba8()), ImageFormat::WebP),
        ),
        ("baseline.jpg".to_string(), encode(&photo, ImageFormat::Jpeg)),
    ];
    let rotated = common::with_exif_orientation(&out.last().unwrap().1, 6);
    out.push(("rotated.jpg".to_string(), rotated));
    // As tall as the aspect-ratio limit allows and narrow: libjpeg's width-bound buffers are
    // small, so the plan for its 1/8 decode at a 32-pixel input rests on the pixel terms.
    let tall = image::RgbImage::from_fn(400, 12_800, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x ^ y) % 239) as u8])
    });
    out.push(("tall.jpg".to_string(), encode(&DynamicImage::ImageRgb8(tall), ImageFormat::Jpeg)));
    out
}

/// An animation of 200 frames: only its first frame is decoded, so it costs what one does.
/// (Cut after its first frame it is still a valid image, so it is not among `generated`.)
fn animation() -> (String, Vec<u8>) {
    let photo = image::RgbaImage::from_fn(100, 75, |x, y| image::Rgba([x as u8, y as u8, 90, 255]));
    let mut animation = Vec::new();
    image::codecs::gif::GifEncoder::new(&mut animation)
        .encode_frames(std::iter::repeat_n(image::Frame::new(photo), 200))
        .unwrap();
    ("200 frames.gif".to_string(), animation)
}

#[test]
fn preparing_an_image_never_allocates_more_than_its_plan() {
    let _serial = serial();
    let mut report = Vec::new();
    let images: Vec<_> = fixtures("formats")
        .into_iter()
        .chain(fixtures("preprocess/inputs"))
        .chain(fixtures("photos"))
        .chain(generated())
        .chain([animation()])
        .collect();
    for (name, bytes) in &images {
        for (config, pre) in [("224", imagenet()), ("64", bundled()), ("32", tiny())] {
            let plan = pre.plan(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            let (tensor, used) = measure(|| pre.prepare(bytes, &plan));
            tensor.unwrap_or_else(|e| panic!("{name}: {e}"));
            let counted = counted_bytes(&plan);
            report.push(format!(
                "{name:<28} {config:>3}: {:>9} bytes used, plan {:>9} ({:.2}x), 1/{}",
                used,
                counted,
                counted as f64 / used as f64,
                plan.divisor
            ));
            assert!(
                used <= counted,
                "{name} at {config}: used {used} bytes, its plan says {counted}\n{}",
                report.join("\n")
            );
        }
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn hostile_headers_are_refused_before_any_large_allocation() {
    let _serial = serial();
    let pre = bundled();
    let thin = |width: u32| zero_png(width, 1, 8, 0, &[]);
    let mut iccp = b"bomb\0\0".to_vec();
    iccp.extend(deflated_zeros(256 << 20));
    let mut ztxt = b"Comment\0\0".to_vec();
    ztxt.extend(deflated_zeros(256 << 20));
    for (name, bytes) in [("100000x1", thin(100_000)), ("2000000x1", thin(2_000_000))] {
        let (plan, used) = measure(|| pre.plan(&bytes));
        let err = plan.expect_err(name);
        assert!(err.is_too_large(), "{name}: {err}");
        assert!(err.to_string().contains("more than 32 times"), "{name}: {err}");
        assert!(used < 1 << 20, "{name}: reading the header took {used} bytes");
        eprintln!("{name} ({} bytes): {err} ({used} bytes allocated)", bytes.len());
    }
    // Metadata that inflates past the limit is cut off there: the PNG decoder then drops the
    // chunk (an ICC profile) or refuses the image (text); either way it allocates no more.
    for (name, bytes) in [
        ("iCCP", zero_png(1, 1, 8, 0, &[(b"iCCP", iccp)])),
        ("zTXt", zero_png(1, 1, 8, 0, &[(b"zTXt", ztxt)])),
    ] {
        let (plan, used) = measure(|| pre.plan(&bytes));
        assert!(
            used <= HEADER_READ_BYTES,
            "{name} inflating to 256 MiB: reading the header took {used} bytes"
        );
        let (result, used) = measure(|| plan.and_then(|plan| pre.prepare(&bytes, &plan)));
        assert!(
            used <= HEADER_READ_BYTES + (1 << 20),
            "{name} inflating to 256 MiB: {used} bytes allocated"
        );
        eprintln!(
            "{name} inflating to 256 MiB ({} bytes): {:?} ({used} bytes allocated)",
            bytes.len(),
            result.map(|t| t.dims().to_vec())
        );
    }
    // Plain text over the limit is refused outright: the decoder would have to hold it.
    let text = [b"Comment\0".as_slice(), &vec![b'x'; 3 << 20]].concat();
    let bytes = zero_png(1, 1, 8, 0, &[(b"tEXt", text)]);
    let (plan, used) = measure(|| pre.plan(&bytes));
    let err = plan.expect_err("3 MiB of tEXt");
    assert!(err.is_too_large() && err.to_string().contains("metadata"), "{err}");
    assert!(used <= HEADER_READ_BYTES, "3 MiB of tEXt: {used} bytes allocated");
    // A 50-megapixel 16-bit RGBA PNG in 380 KB: the plan is cheap and says what decoding it
    // needs (about 400 MB of decoder output alone), so the server can refuse it unread.
    let (w, h) = (8000u32, 6250u32);
    let big = zero_png(w, h, 16, 6, &[]);
    let (plan, used) = measure(|| pre.plan(&big));
    let plan = plan.unwrap();
    assert!(plan.peak_bytes >= w as u64 * h as u64 * 8, "{}", plan.peak_bytes);
    assert!(used < 1 << 20, "planning took {used} bytes");
    // And the pixel limit still comes first.
    let over = Preprocessor::new(PreprocessConfig::imagenet(), 40_000_000).plan(&big).unwrap_err();
    assert!(matches!(over, ImageError::TooLarge { .. }), "{over}");
}

#[test]
fn truncated_images_are_errors_in_every_format() {
    let _serial = serial();
    let pre = imagenet();
    let mut accepted = Vec::new();
    for (name, bytes) in
        fixtures("formats").into_iter().chain(fixtures("preprocess/inputs")).chain(generated())
    {
        // Cuts through the pixel data; a JPEG also loses its end marker at the last byte.
        let last = if name.ends_with(".jpg") { vec![bytes.len() - 1] } else { vec![] };
        for cut in [bytes.len() / 3, bytes.len() * 2 / 3].into_iter().chain(last) {
            let result = pre.plan(&bytes[..cut]).and_then(|plan| pre.prepare(&bytes[..cut], &plan));
            if result.is_ok() {
                accepted.push(format!("{name} cut to {cut} of {} bytes", bytes.len()));
            }
        }
    }
    assert!(accepted.is_empty(), "accepted: {accepted:#?}");
}

// ---- fuzzing ----------------------------------------------------------------------------

fn fuzz_iterations(default: usize) -> usize {
    std::env::var("FUZZ_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn fuzz_seed() -> u64 {
    std::env::var("FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed)
}

/// Where a failing input is written, if FUZZ_SAVE names a directory.
fn save_failure(name: &str, bytes: &[u8]) {
    if let Some(dir) = std::env::var_os("FUZZ_SAVE") {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(Path::new(&dir).join(name), bytes);
    }
}

/// One structure-aware mutation of `input`.
fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    if out.is_empty() {
        return vec![rng.random()];
    }
    let rounds = rng.random_range(1..=4);
    for _ in 0..rounds {
        if out.is_empty() {
            out.push(rng.random());
        }
        let at = rng.random_range(0..out.len());
        match rng.random_range(0..8) {
            0 => out[at] ^= 1 << rng.random_range(0..8),
            1 => out[at] = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE][rng.random_range(0..6)],
            2 => out.truncate(at.max(1)),
            3 => {
                // Repeat a range (chunks, segments, parts).
                let len = rng.random_range(1..=64.min(out.len() - at));
                let range = out[at..at + len].to_vec();
                let to = rng.random_range(0..=out.len());
                out.splice(to..to, range);
            }
            4 => {
                let len = rng.random_range(1..=16.min(out.len() - at));
                out.drain(at..at + len);
            }
            5 => {
                let to = rng.random_range(0..=out.len());
                let junk: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
                out.splice(to..to, junk);
            }
            6 => {
                // A 16- or 32-bit big-endian field (dimensions, lengths) set to an extreme.
                let width = if rng.random() { 2 } else { 4 };
                if at + width <= out.len() {
                    let value: [u8; 4] =
                        [[0xFF; 4], [0; 4], [0x7F, 0xFF, 0xFF, 0xFF], [0, 0, 0, 1], [0, 1, 0, 0]]
                            [rng.random_range(0..5)];
                    out[at..at + width].copy_from_slice(&value[4 - width..]);
                }
            }
            _ => fix_png_crcs(&mut out),
        }
    }
    if rng.random_bool(0.5) {
        fix_png_crcs(&mut out);
    }
    out
}

/// Recomputes every PNG chunk's CRC, so that mutations reach the parsers behind the checksum.
fn fix_png_crcs(data: &mut [u8]) {
    if !data.starts_with(b"\x89PNG\r\n\x1a\n") {
        return;
    }
    let mut at = 8;
    while at + 12 <= data.len() {
        let len = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let Some(end) = (at + 8).checked_add(len).filter(|&e| e + 4 <= data.len()) else { return };
        let crc = crc32(&data[at + 4..end]);
        data[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(data);
    crc.sum()
}

/// Small seeds of every format, so that each iteration is quick.
fn image_seeds() -> Vec<(String, Vec<u8>)> {
    let photo = DynamicImage::ImageRgb8(image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, 128])
    }));
    let mut seeds: Vec<(String, Vec<u8>)> = [
        ImageFormat::Png,
        ImageFormat::Jpeg,
        ImageFormat::Gif,
        ImageFormat::Bmp,
        ImageFormat::Tiff,
        ImageFormat::WebP,
    ]
    .into_iter()
    .map(|f| (format!("seed.{}", f.extensions_str()[0]), encode(&photo, f)))
    .collect();
    seeds.push((
        "seed16.png".into(),
        encode(&DynamicImage::ImageRgba16(photo.to_rgba16()), ImageFormat::Png),
    ));
    seeds.push(("small_png".into(), common::small_png(7)));
    let progressive = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/preprocess/inputs/imagenet_11_630.jpg"),
    )
    .unwrap();
    seeds.push(("progressive.jpg".into(), progressive));
    let camera = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photos/coffee_744x496.jpg"),
    )
    .unwrap();
    seeds.push(("camera_420.jpg".into(), camera));
    seeds.push((
        "rotated.jpg".into(),
        common::with_exif_orientation(&encode(&photo, ImageFormat::Jpeg), 8),
    ));
    seeds
}

/// The part of the plan this allocator sees. libjpeg's own buffers, in the plan of a JPEG
/// decoded at reduced scale, are C mallocs it does not count (they are capped inside libjpeg,
/// see src/preprocess/jpeg.rs): the Rust side is held to the rest.
fn counted_bytes(plan: &Plan) -> u64 {
    match plan.header.jpeg {
        Some(layout) if plan.divisor > 1 => {
            plan.peak_bytes - layout.working_bytes(plan.header.width)
        }
        _ => plan.peak_bytes,
    }
}

/// Plans and prepares one input: panics and allocations beyond the plan are failures.
fn check_image(pre: &Preprocessor, bytes: &[u8]) -> Result<(), String> {
    let plan = match catch_unwind(AssertUnwindSafe(|| pre.plan(bytes))) {
        Err(_) => return Err("plan panicked".into()),
        Ok(Err(_)) => return Ok(()),
        Ok(Ok(plan)) => plan,
    };
    let (result, used) = measure(|| catch_unwind(AssertUnwindSafe(|| pre.prepare(bytes, &plan))));
    match result {
        Err(_) => Err("prepare panicked".into()),
        Ok(_) if used > counted_bytes(&plan) => Err(format!(
            "used {used} bytes, plan {} ({} counted)",
            plan.peak_bytes,
            counted_bytes(&plan)
        )),
        Ok(_) => Ok(()),
    }
}

#[test]
fn regressions_found_by_fuzzing_stay_fixed() {
    let _serial = serial();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/regressions");
    for (name, bytes) in fixtures("regressions") {
        for pre in [imagenet(), bundled(), tiny()] {
            check_image(&pre, &bytes)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.join(&name).display()));
        }
    }
}

#[test]
fn fuzz_images_never_panic_or_outgrow_their_plan() {
    let _serial = serial();
    let (iterations, seed) = (fuzz_iterations(3000), fuzz_seed());
    let mut rng = StdRng::seed_from_u64(seed);
    let seeds = image_seeds();
    // A small pixel limit keeps every iteration quick; the plan is checked all the same.
    // Every other iteration at a 32-pixel input, where the JPEG seeds take the scaled decoder.
    let pre = Preprocessor::new(PreprocessConfig::imagenet(), 4_000_000);
    let scaled = Preprocessor { max_pixels: 4_000_000, ..tiny() };
    let (mut accepted, started) = (0, std::time::Instant::now());
    for i in 0..iterations {
        let (name, base) = &seeds[i % seeds.len()];
        let input = mutate(&mut rng, base);
        let pre = if (i / seeds.len()).is_multiple_of(2) { &pre } else { &scaled };
        if let Err(e) = check_image(pre, &input) {
            save_failure(&format!("image-{seed}-{i}"), &input);
            panic!("seed {seed}, iteration {i}, from {name}: {e}");
        }
        accepted += pre.plan(&input).is_ok() as usize;
    }
    eprintln!(
        "{iterations} mutated images ({accepted} with a readable header) in {:.1} s, seed {seed}",
        started.elapsed().as_secs_f64()
    );
}

fn multipart_body(parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, data) in parts {
        body.extend_from_slice(format!("--XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n").as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--XyZ--\r\n");
    body
}

#[test]
fn fuzz_request_bodies_never_panic_or_outgrow_their_reservation() {
    let _serial = serial();
    let (iterations, seed) = (fuzz_iterations(3000), fuzz_seed());
    let mut rng = StdRng::seed_from_u64(seed);
    let png = common::small_png(3);
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &png);
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("multipart/form-data; boundary=XyZ", multipart_body(&[("a.png", &png), ("b.png", &png)])),
        (
            "application/json",
            format!("{{\"images\": [\"{b64}\", \"data:image/png;base64,{b64}\"]}}").into_bytes(),
        ),
        (
            "application/json",
            format!("{{\"images\": [\"{}\"]}}", b64.replace('/', "\\/")).into_bytes(),
        ),
        ("image/png", png.clone()),
    ];
    let limits = BodyLimits {
        max_bytes: 1 << 20,
        read_timeout: Duration::from_secs(5),
        memory_wait: Duration::from_millis(10),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let pool = MemoryPool::new(64 << 20);
    for i in 0..iterations {
        let (content_type, base) = &seeds[i % seeds.len()];
        let body = mutate(&mut rng, base);
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("content-type", content_type.parse().unwrap());
        headers.insert("content-length", body.len().into());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let request_body = axum::body::Body::from(body.clone());
        let (result, used) = measure(|| {
            catch_unwind(AssertUnwindSafe(|| {
                runtime.block_on(read_images(&headers, request_body, &limits, 8, &pool, deadline))
            }))
        });
        let failure = match &result {
            Err(_) => Some("read_images panicked".to_string()),
            Ok(Ok(images)) if used > images.memory.bytes() + (64 << 10) => {
                Some(format!("used {used} bytes, reserved {}", images.memory.bytes()))
            }
            Ok(Err(_)) if used > 4 * body.len() as u64 + (64 << 10) => {
                Some(format!("used {used} bytes for a {}-byte body", body.len()))
            }
            _ => None,
        };
        if let Some(failure) = failure {
            save_failure(&format!("body-{seed}-{i}"), &body);
            panic!("seed {seed}, iteration {i} ({content_type}): {failure}");
        }
        drop(result);
        assert_eq!(pool.in_use(), 0, "iteration {i}: a reservation outlived its request");
    }
    eprintln!("{iterations} mutated request bodies, seed {seed}");
}
