//! The bundled model on the 10,000 Fashion-MNIST test images (Debian's dataset-fashion-mnist),
//! exported to PNG like tools/export_fashion_mnist.py does, through `fasternet-serve eval`.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// tools/eval_timm.py (timm's own transform and model) on the same images.
const PYTHON_TOP1: f64 = 93.48;

fn read_idx(path: &Path) -> (Vec<usize>, Vec<u8>) {
    let mut data = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut data)
        .unwrap();
    let ndim = data[3] as usize;
    let dims = (0..ndim)
        .map(|i| u32::from_be_bytes(data[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    (dims, data[4 + 4 * ndim..].to_vec())
}

#[test]
fn bundled_model_reaches_its_accuracy_through_the_cli() {
    let dir = PathBuf::from(
        std::env::var("FASTERNET_FMNIST_DIR").unwrap_or("/usr/share/datasets/fashion-mnist".into()),
    );
    let images_path = dir.join("t10k-images-idx3-ubyte.gz");
    if !images_path.exists() {
        assert!(std::env::var_os("CI").is_none(), "CI must install dataset-fashion-mnist");
        eprintln!(
            "skipped: {} not found (apt-get install dataset-fashion-mnist)",
            images_path.display()
        );
        return;
    }
    let out = export_png(&dir, "t10k", 10_000);
    let top1 = top1_through_eval(out.path(), "fast", &[]);
    assert!(top1 >= 92.5, "top-1 {top1}% below 92.5%");
    assert!((top1 - PYTHON_TOP1).abs() <= 0.2, "top-1 {top1}% vs timm's {PYTHON_TOP1}%");
    // bf16 products cost some precision; on this test set they may cost at most 0.3 points.
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bf16") {
        let bf16 = top1_through_eval(out.path(), "fast-bf16", &[]);
        assert!((bf16 - top1).abs() <= 0.3, "fast-bf16 top-1 {bf16}% vs fp32 {top1}%");
    } else {
        eprintln!("fast-bf16 not checked: this CPU has no AVX512-BF16");
    }
    // So may int8 products, calibrated on 256 of the first 2,560 training images (never on
    // the test images).
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512vnni")
        && std::arch::is_x86_feature_detected!("avx512bf16")
    {
        let train = export_png(&dir, "train", 2_560);
        let calibration = ["--calibration".as_ref(), train.path().as_os_str()];
        let int8 = top1_through_eval(out.path(), "fast-int8", &calibration);
        assert!((int8 - top1).abs() <= 0.3, "fast-int8 top-1 {int8}% vs fp32 {top1}%");
    } else {
        eprintln!("fast-int8 not checked: this CPU has no AVX512-VNNI or AVX512-BF16");
    }
}

/// The first `count` images of a Fashion-MNIST split (`t10k`, `train`) as PNG files in an
/// ImageFolder (one folder per class, named by its index).
fn export_png(dir: &Path, split: &str, count: usize) -> tempfile::TempDir {
    let (dims, pixels) = read_idx(&dir.join(format!("{split}-images-idx3-ubyte.gz")));
    let (_, labels) = read_idx(&dir.join(format!("{split}-labels-idx1-ubyte.gz")));
    assert_eq!(dims[1..], [28, 28]);
    let out = tempfile::tempdir().unwrap();
    for class in 0..10 {
        std::fs::create_dir(out.path().join(format!("{class}"))).unwrap();
    }
    for (i, (img, &label)) in pixels.chunks(28 * 28).zip(&labels).take(count).enumerate() {
        let grey = image::GrayImage::from_raw(28, 28, img.to_vec()).unwrap();
        grey.save(out.path().join(format!("{label}/{i:05}.png"))).unwrap();
    }
    out
}

/// `fasternet-serve eval --engine ENGINE ARGS` on an ImageFolder of the 10,000 test images:
/// top-1 %.
fn top1_through_eval(data: &Path, engine: &str, args: &[&OsStr]) -> f64 {
    let output = Command::new(env!("CARGO_BIN_EXE_fasternet-serve"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["eval", "--engine", engine])
        .args(args)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{engine}:\n{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success());
    assert!(stdout.contains("(10000 images, 10 classes, 0 unreadable)"));
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("top-1: "))
        .and_then(|v| v.trim_end_matches('%').parse().ok())
        .expect("a top-1 line")
}
