//! Command line: `serve` (the default), `classify`, `eval`, `bench`. Every flag also reads a
//! `FASTERNET_*` environment variable.

mod bench;
mod classify;
mod eval;
mod healthcheck;
mod serve;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use fasternet_serve::classifier::{LoadOptions, DEFAULT_CALIBRATION_IMAGES};
use fasternet_serve::model::{Engine, Variant};
use fasternet_serve::preprocess::{DecodeMode, DEFAULT_MAX_PIXELS};

#[derive(Parser)]
#[command(
    name = "fasternet-serve",
    version,
    about = "FasterNet image classification: an HTTP service and its tools"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once at start-up: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Serve the HTTP API (the default when no command is given).
    Serve(serve::ServeArgs),
    /// Classify image files and print the top-k labels.
    Classify(classify::ClassifyArgs),
    /// Top-1/top-5 accuracy on an ImageFolder directory (one sub-folder per class).
    Eval(eval::EvalArgs),
    /// Model-only throughput on random weights (no checkpoint needed).
    Bench(bench::BenchArgs),
    /// Exit 0 when the server's readiness URL answers 200 (for container health checks).
    Healthcheck(healthcheck::HealthcheckArgs),
}

/// Which model to load: shared by every command that needs a checkpoint.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Checkpoint: a .safetensors or .pth file, or a hub-style directory
    /// (model.safetensors + config.json). Default: the bundled model, built into the binary.
    #[arg(long, env = "FASTERNET_WEIGHTS")]
    pub weights: Option<PathBuf>,
    /// Variant (t0, t1, t2, s, m, l); inferred from the checkpoint when omitted.
    #[arg(long, env = "FASTERNET_VARIANT")]
    pub variant: Option<Variant>,
    /// Resize to input_size / crop_pct before the center crop; overrides config.json
    /// (default without one: 0.9, the official ImageNet evaluation).
    #[arg(long, env = "FASTERNET_CROP_PCT")]
    pub crop_pct: Option<f64>,
    /// Reject images whose header declares more pixels than this.
    #[arg(long, env = "FASTERNET_MAX_PIXELS", default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// fast: a JPEG is decoded at the smallest of 1/2, 1/4 or 1/8 scale (in the DCT domain)
    /// that keeps it at least twice the resize target (1.5 times at 1/8); exact: at full size
    /// (timm's pipeline pixel for pixel).
    #[arg(long, env = "FASTERNET_DECODE", default_value = "fast")]
    pub decode: DecodeMode,
    /// Compute threads (default: the CPUs this process may use, cgroup quota included).
    #[arg(long, env = "FASTERNET_THREADS")]
    pub threads: Option<usize>,
    /// For benchmarks: random weights of this variant (1000 classes) instead of a checkpoint.
    #[arg(long, env = "FASTERNET_RANDOM_INIT", value_name = "VARIANT")]
    pub random_init: Option<Variant>,
    /// Forward-pass implementation: fast (NHWC CPU kernels), fast-bf16 (the same with bf16 products; AVX512-BF16 CPUs, on AMX tiles where present), fast-int8 (fast-bf16 with the blocks' 1x1 convolutions in int8; AVX512-VNNI CPUs; needs --calibration), auto (fast-bf16 where it is faster than fast: AMX, or AVX512-BF16 on AMD; fast elsewhere) or reference (stock candle ops).
    #[arg(long, env = "FASTERNET_ENGINE", default_value = "fast")]
    pub engine: Engine,
    /// With --engine fast-int8: a folder of images like those the model will classify (any
    /// layout, e.g. an ImageFolder), to set the int8 quantisation's ranges from.
    #[arg(long, env = "FASTERNET_CALIBRATION")]
    pub calibration: Option<PathBuf>,
    /// How many of the --calibration folder's images to use (evenly spaced in sorted order).
    #[arg(long, env = "FASTERNET_CALIBRATION_IMAGES", default_value_t = DEFAULT_CALIBRATION_IMAGES)]
    pub calibration_images: usize,
}

impl ModelArgs {
    /// The model to load, for error messages.
    pub fn source(&self) -> String {
        match &self.weights {
            Some(path) => path.display().to_string(),
            None => "the bundled model".into(),
        }
    }

    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            weights: self.weights.clone(),
            variant: self.variant,
            crop_pct: self.crop_pct,
            max_pixels: self.max_pixels,
            decode: self.decode,
            random_init: self.random_init,
            engine: self.engine,
            calibration: self.calibration.clone(),
            calibration_images: self.calibration_images,
        }
    }
}

/// Parses the command line and runs the command; returns the process exit code. Without a
/// command (only flags, or nothing) the server runs.
pub fn main_with_args(mut args: Vec<OsString>) -> anyhow::Result<i32> {
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    if args.len() == 1
        || (first.starts_with('-') && !["-h", "--help", "-V", "--version"].contains(&first))
    {
        args.insert(1, "serve".into());
    }
    let cli = Cli::parse_from(args);
    let json_logs = matches!(&cli.command, Command::Serve(s) if s.log_format == "json");
    // Traces are the server's; dropped last, after the command, to flush them.
    let _telemetry =
        fasternet_serve::telemetry::init(json_logs, matches!(cli.command, Command::Serve(_)))?;
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Classify(args) => classify::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Healthcheck(args) => healthcheck::run(args),
    }
}

/// A progress bar on stderr for a long command, drawn only when stderr is a terminal (indicatif
/// hides it otherwise), so piped and logged output stays as it was. Print through
/// `bar.suspend` while it runs.
pub fn progress(len: usize, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    let template =
        format!("{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{elapsed}} (eta {{eta}})");
    bar.set_style(
        indicatif::ProgressStyle::with_template(&template)
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    if !bar.is_hidden() {
        // Redrawn while one long step runs, so the clock moves.
        bar.enable_steady_tick(std::time::Duration::from_millis(500));
    }
    bar
}

/// Sizes the compute pools once, before anything uses them. candle's matmuls read
/// RAYON_NUM_THREADS on every call, so the variable and rayon's global pool must agree.
pub fn init_threads(threads: Option<usize>) -> usize {
    let n = threads
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    n
}
