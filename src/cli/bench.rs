use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use clap::Args;

use fasternet_serve::model::{Engine, FasterNet, FasterNetConfig, FasterNetWeights, Variant};
use fasternet_serve::preprocess::{
    DecodeMode, Plan, PreprocessConfig, Preprocessor, DEFAULT_MAX_PIXELS,
};
use fasternet_serve::server::memory::{self, ProcessMemory};

use super::{init_threads, progress};

/// Images the fast-int8 engine is calibrated on here.
const CALIBRATION_IMAGES: usize = 16;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, env = "FASTERNET_VARIANT", default_value = "t0")]
    variant: Variant,
    /// Input size: `224` or `HxW` (e.g. `160x256`).
    #[arg(long, env = "FASTERNET_BENCH_SIZE", default_value = "224")]
    size: String,
    /// Batch sizes, comma separated.
    #[arg(long, env = "FASTERNET_BENCH_BATCH", value_delimiter = ',', default_value = "8")]
    batch: Vec<usize>,
    /// Compute threads (default: the CPUs this process may use).
    #[arg(long, env = "FASTERNET_THREADS")]
    threads: Option<usize>,
    /// Seconds to measure each batch size (after warm-up).
    #[arg(long, env = "FASTERNET_BENCH_SECONDS", default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, env = "FASTERNET_NUM_CLASSES", default_value_t = 1000)]
    num_classes: usize,
    /// Forward-pass implementation: fast, fast-bf16, fast-int8 (calibrated on random images,
    /// as the weights are random) or reference.
    #[arg(long, env = "FASTERNET_ENGINE", default_value = "fast")]
    engine: Engine,
    /// Time preprocessing instead (decode, resize, crop, normalise to the `--size` input with
    /// ImageNet's crop 0.9) of these image files, one thread, `--seconds` each.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    images: Vec<PathBuf>,
    /// With `--images`: how JPEGs are decoded (fast or exact).
    #[arg(long, env = "FASTERNET_DECODE", default_value = "fast")]
    decode: DecodeMode,
    /// Also print the wall time per layer group (stem, each stage's merge and blocks, head)
    /// of each batch size (fast engines), to compare with tools/ov_profile.py --by stage.
    #[arg(long)]
    profile: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<i32> {
    let threads = init_threads(args.threads);
    let (h, w) = parse_size(&args.size)?;
    if !args.images.is_empty() {
        return preprocessing(&args, (h, w));
    }
    let config = FasterNetConfig::preset(args.variant, args.num_classes);
    let weights = FasterNetWeights::random(&config, 0)?;
    let model = match args.engine {
        // Random weights, so random images: only the speed is measured.
        Engine::FastInt8 => {
            let image = |_| Ok(Tensor::randn(0f32, 1.0, (3, h, w), &Device::Cpu)?);
            FasterNet::with_int8(weights, (0..CALIBRATION_IMAGES).map(image))?
        }
        engine => FasterNet::with_engine(weights, engine)?,
    };
    eprintln!(
        "{} random weights, {} engine ({}), {threads} threads, {:.2} GMACs/image",
        config.architecture(),
        args.engine,
        model.kernels(),
        config.macs(h, w) as f64 / 1e9
    );
    let profile = match (args.profile, model.profile()) {
        (false, _) => None,
        (true, Some(profile)) => Some(profile),
        (true, None) => {
            bail!("--profile needs a fast engine (the {} engine keeps no profile)", args.engine)
        }
    };
    let bar = progress(args.batch.len(), "batch sizes");
    for &batch in &args.batch {
        if batch == 0 {
            bail!("batch sizes must be positive");
        }
        bar.set_message(format!("batch {batch}"));
        let x = Tensor::randn(0f32, 1.0, (batch, 3, h, w), &Device::Cpu)?;
        // Warm-up: at least two passes and half a second.
        let warm = Instant::now();
        let mut passes = 0;
        while passes < 2 || warm.elapsed() < Duration::from_millis(500) {
            model.forward(&x)?;
            passes += 1;
        }
        profile.inspect(|p| p.start());
        let start = Instant::now();
        let mut passes = 0u32;
        while passes < 1 || start.elapsed().as_secs_f64() < args.seconds {
            model.forward(&x)?;
            passes += 1;
        }
        let per_batch = start.elapsed().as_secs_f64() / passes as f64;
        bar.suspend(|| {
            println!(
                "{} {h}x{w} batch {batch}: {:.1} img/s ({:.1} ms/batch)",
                args.variant,
                batch as f64 / per_batch,
                per_batch * 1e3
            );
            for (layer, ms) in profile.map(|p| p.per_pass(passes)).unwrap_or_default() {
                println!(
                    "  {layer:36} {ms:7.3} ms/batch ({:4.1}%)",
                    100.0 * ms / (per_batch * 1e3)
                );
            }
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(0)
}

const MIB: f64 = (1 << 20) as f64;

/// Milliseconds per image from encoded bytes to the normalised tensor, one file at a time.
fn preprocessing(args: &BenchArgs, input_size: (usize, usize)) -> anyhow::Result<i32> {
    let config = PreprocessConfig { input_size, ..PreprocessConfig::imagenet() };
    let pre = Preprocessor::new(config, DEFAULT_MAX_PIXELS).with_decode(args.decode);
    let bar = progress(args.images.len(), "images");
    for path in &args.images {
        bar.set_message(path.display().to_string());
        let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
        let once = || -> anyhow::Result<Plan> {
            let plan = pre.plan(&bytes)?;
            pre.prepare(&bytes, &plan)?;
            Ok(plan)
        };
        // Measured on the second run: the first also faults in code and allocator arenas.
        once()?;
        memory::reset_peak();
        let before = ProcessMemory::read();
        let plan = once()?;
        let peak = match (before, ProcessMemory::read()) {
            (Some(before), Some(after)) => {
                format!("{:.1} MiB", after.peak.saturating_sub(before.resident) as f64 / MIB)
            }
            _ => "unknown".into(),
        };
        let (start, mut runs) = (Instant::now(), 0u32);
        while runs < 3 || start.elapsed().as_secs_f64() < args.seconds {
            once()?;
            runs += 1;
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / runs as f64;
        let decode = format!("{:?}", args.decode).to_lowercase();
        let planned = plan.peak_bytes as f64 / MIB;
        bar.suspend(|| {
            println!(
                "{}: {ms:.2} ms/image ({decode} decode, 1/{} scale, {runs} runs; peak memory \
                 {peak}, planned {planned:.1} MiB)",
                path.display(),
                plan.divisor,
            )
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(0)
}

fn parse_size(s: &str) -> anyhow::Result<(usize, usize)> {
    let parse = |v: &str| v.trim().parse::<usize>().with_context(|| format!("bad size `{s}`"));
    let (h, w) = match s.split_once(['x', 'X']) {
        Some((h, w)) => (parse(h)?, parse(w)?),
        None => (parse(s)?, parse(s)?),
    };
    let min = FasterNetConfig::MIN_INPUT_SIDE;
    if h < min || w < min {
        bail!("input size {h}x{w} is below {min}x{min}");
    }
    Ok((h, w))
}
