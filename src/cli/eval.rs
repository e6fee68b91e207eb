use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use rayon::prelude::*;

use fasternet_serve::Classifier;

use super::{init_threads, progress, ModelArgs};

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// ImageFolder layout: one sub-folder per class; sorted folder names give class indices.
    #[arg(long, env = "FASTERNET_DATA")]
    data: PathBuf,
    /// Images per forward pass.
    #[arg(long, env = "FASTERNET_BATCH_SIZE", default_value_t = 64)]
    batch_size: usize,
}

struct Sample {
    path: PathBuf,
    class: usize,
}

#[derive(Default, Clone)]
struct Tally {
    images: usize,
    top1: usize,
    top5: usize,
}

pub fn run(args: EvalArgs) -> anyhow::Result<i32> {
    init_threads(args.model.threads);
    let classifier = Classifier::load(&args.model.load_options())
        .with_context(|| format!("cannot load model from {}", args.model.source()))?;
    let (folders, samples) = list_image_folder(&args.data)?;
    let num_classes = classifier.labels().len();
    if folders.len() > num_classes {
        bail!(
            "{} has {} class folders but the model has {num_classes} classes",
            args.data.display(),
            folders.len()
        );
    }
    let start = Instant::now();
    let mut per_class = vec![Tally::default(); folders.len()];
    let mut failed = 0usize;
    let bar = progress(samples.len(), "images");
    bar.set_message("eval");
    for chunk in samples.chunks(args.batch_size.max(1)) {
        bar.inc(chunk.len() as u64);
        let prepared: Vec<_> = chunk
            .par_iter()
            .map(|s| {
                std::fs::read(&s.path)
                    .map_err(|e| e.to_string())
                    .and_then(|b| classifier.prepare(&b).map_err(|e| e.to_string()))
            })
            .collect();
        let mut tensors = Vec::with_capacity(chunk.len());
        let mut classes = Vec::with_capacity(chunk.len());
        for (sample, result) in chunk.iter().zip(prepared) {
            match result {
                Ok(t) => {
                    tensors.push(t);
                    classes.push(sample.class);
                }
                Err(reason) => {
                    bar.suspend(|| eprintln!("error: {}: {reason}", sample.path.display()));
                    failed += 1;
                }
            }
        }
        if tensors.is_empty() {
            continue;
        }
        let top5 = classifier.classify(&tensors, 5)?;
        for (class, preds) in classes.into_iter().zip(top5) {
            let t = &mut per_class[class];
            t.images += 1;
            t.top1 += (preds[0].class_index == class) as usize;
            t.top5 += preds.iter().any(|p| p.class_index == class) as usize;
        }
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let total = per_class.iter().fold(Tally::default(), |a, t| Tally {
        images: a.images + t.images,
        top1: a.top1 + t.top1,
        top5: a.top5 + t.top5,
    });
    if total.images == 0 {
        bail!("no image in {} could be read", args.data.display());
    }
    let pct = |n: usize, d: usize| 100.0 * n as f64 / d.max(1) as f64;
    println!("model: {} ({})", classifier.name(), classifier.source().display());
    println!(
        "data: {} ({} images, {} classes, {failed} unreadable)",
        args.data.display(),
        total.images,
        folders.len()
    );
    println!("top-1: {:.2}%", pct(total.top1, total.images));
    println!("top-5: {:.2}%", pct(total.top5, total.images));
    println!("time: {seconds:.1} s ({:.0} img/s)", total.images as f64 / seconds);
    println!();
    println!("{:>5}  {:<24} {:<24} {:>7} {:>7}", "class", "label", "folder", "images", "top-1");
    for (i, (folder, t)) in folders.iter().zip(&per_class).enumerate() {
        println!(
            "{i:>5}  {:<24} {:<24} {:>7} {:>6.2}%",
            classifier.labels().get(i),
            folder,
            t.images,
            pct(t.top1, t.images)
        );
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

/// torchvision ImageFolder semantics: sorted sub-folders are classes 0, 1, ...; files sorted.
fn list_image_folder(root: &Path) -> anyhow::Result<(Vec<String>, Vec<Sample>)> {
    let read_sorted = |dir: &Path| -> anyhow::Result<Vec<PathBuf>> {
        let mut entries = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()?;
        entries.sort();
        Ok(entries)
    };
    let folders: Vec<PathBuf> = read_sorted(root)?.into_iter().filter(|p| p.is_dir()).collect();
    if folders.is_empty() {
        bail!("{} has no class sub-folders (expected ImageFolder layout)", root.display());
    }
    let mut samples = Vec::new();
    for (class, folder) in folders.iter().enumerate() {
        for path in read_sorted(folder)?.into_iter().filter(|p| p.is_file()) {
            samples.push(Sample { path, class });
        }
    }
    let names = folders
        .iter()
        .map(|f| f.file_name().unwrap_or_default().to_string_lossy().into_owned())
        .collect();
    Ok((names, samples))
}
