use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use clap::Args;

use fasternet_serve::model::{Engine, FasterNet, FasterNetConfig, FasterNetWeights, Variant};

use super::init_threads;

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
    /// Forward-pass implementation: fast, fast-bf16 or reference.
    #[arg(long, env = "FASTERNET_ENGINE", default_value = "fast")]
    engine: Engine,
}

pub fn run(args: BenchArgs) -> anyhow::Result<i32> {
    let threads = init_threads(args.threads);
    let (h, w) = parse_size(&args.size)?;
    let config = FasterNetConfig::preset(args.variant, args.num_classes);
    let model = FasterNet::with_engine(FasterNetWeights::random(&config, 0)?, args.engine)?;
    eprintln!(
        "{} random weights, {} engine ({}), {threads} threads, {:.2} GMACs/image",
        config.architecture(),
        args.engine,
        model.kernels(),
        config.macs(h, w) as f64 / 1e9
    );
    for &batch in &args.batch {
        if batch == 0 {
            bail!("batch sizes must be positive");
        }
        let x = Tensor::randn(0f32, 1.0, (batch, 3, h, w), &Device::Cpu)?;
        // Warm-up: at least two passes and half a second.
        let warm = Instant::now();
        let mut passes = 0;
        while passes < 2 || warm.elapsed() < Duration::from_millis(500) {
            model.forward(&x)?;
            passes += 1;
        }
        let start = Instant::now();
        let mut passes = 0u32;
        while passes < 1 || start.elapsed().as_secs_f64() < args.seconds {
            model.forward(&x)?;
            passes += 1;
        }
        let per_batch = start.elapsed().as_secs_f64() / passes as f64;
        println!(
            "{} {h}x{w} batch {batch}: {:.1} img/s ({:.1} ms/batch)",
            args.variant,
            batch as f64 / per_batch,
            per_batch * 1e3
        );
    }
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
