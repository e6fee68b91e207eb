use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use fasternet_serve::{Classifier, Prediction};

use super::{init_threads, ModelArgs};

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// How many labels to print per image.
    #[arg(long, env = "FASTERNET_TOP_K", default_value_t = 5)]
    top_k: usize,
    /// One JSON object per image per line.
    #[arg(long, env = "FASTERNET_JSON")]
    json: bool,
    /// Images per forward pass.
    #[arg(long, env = "FASTERNET_BATCH_SIZE", default_value_t = 16)]
    batch_size: usize,
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
}

#[derive(Serialize)]
struct JsonLine<'a> {
    file: String,
    predictions: &'a [Prediction],
}

pub fn run(args: ClassifyArgs) -> anyhow::Result<i32> {
    init_threads(args.model.threads);
    let classifier = Classifier::load(&args.model.load_options())
        .with_context(|| format!("cannot load model from {}", args.model.source()))?;
    anyhow::ensure!(args.top_k >= 1, "--top-k must be at least 1");
    let top_k = args.top_k.min(classifier.labels().len());
    let mut failed = 0;
    let mut ready = Vec::new();
    for path in &args.images {
        let prepared = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| classifier.prepare(&bytes).map_err(|e| e.to_string()));
        match prepared {
            Ok(tensor) => ready.push((path, tensor)),
            Err(reason) => {
                eprintln!("error: {}: {reason}", path.display());
                failed += 1;
            }
        }
    }
    for chunk in ready.chunks(args.batch_size.max(1)) {
        let tensors: Vec<_> = chunk.iter().map(|(_, t)| t.clone()).collect();
        let results = classifier.classify(&tensors, top_k)?;
        for ((path, _), predictions) in chunk.iter().zip(&results) {
            print_result(&path.display().to_string(), predictions, args.json)?;
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

fn print_result(file: &str, predictions: &[Prediction], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(&JsonLine { file: file.to_string(), predictions })?);
    } else {
        println!("{file}");
        for p in predictions {
            println!("  {:.4}  {} ({})", p.score, p.label, p.class_index);
        }
    }
    Ok(())
}
