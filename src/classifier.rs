//! A loaded model with its preprocessing and labels: the API the CLI and the server use.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::Serialize;

use crate::labels::Labels;
use crate::model::{
    Checkpoint, Engine, FasterNet, FasterNetConfig, HubConfig, ModelError, ModelOutput, Variant,
};
use crate::preprocess::{
    DecodeMode, ImageError, PreprocessConfig, Preprocessor, DEFAULT_MAX_PIXELS,
};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub class_index: usize,
    /// Softmax probability.
    pub score: f32,
}

/// What the caller of one image wants from its forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// The `top_k` most probable labels, and every class's logit if asked.
    Classify { top_k: usize, logits: bool },
    /// The pre-logits feature vector, scaled to unit L2 norm if asked.
    Embed { normalize: bool },
    /// Whole output tensors: every class's probability, the feature vector, or both.
    Tensors { probabilities: bool, features: bool },
}

/// One image's answer to its [`Task`].
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Predictions { predictions: Vec<Prediction>, logits: Option<Vec<f32>> },
    Embedding(Vec<f32>),
    Tensors { probabilities: Option<Vec<f32>>, features: Option<Vec<f32>> },
}

/// A [`Task::Tensors`] answer: the probabilities and the features, each when asked for.
pub type OutputTensors = (Option<Vec<f32>>, Option<Vec<f32>>);

/// How to load a classifier.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// A `.safetensors`/`.pth` file or a hub-style directory; `None`: the bundled model,
    /// compiled into the binary.
    pub weights: Option<PathBuf>,
    /// Must agree with the checkpoint's shapes when given.
    pub variant: Option<Variant>,
    /// Overrides config.json's crop_pct (or the ImageNet default of 0.9).
    pub crop_pct: Option<f64>,
    pub max_pixels: u64,
    pub decode: DecodeMode,
    /// Benchmarking: ignore `weights` and use random weights of this variant (1000 classes,
    /// ImageNet preprocessing).
    pub random_init: Option<Variant>,
    pub engine: Engine,
    /// The fast-int8 engine's calibration images: image files anywhere under this folder
    /// (`calibration_images` of them, evenly spaced in sorted order).
    pub calibration: Option<PathBuf>,
    pub calibration_images: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            weights: None,
            variant: None,
            crop_pct: None,
            max_pixels: DEFAULT_MAX_PIXELS,
            decode: DecodeMode::default(),
            random_init: None,
            engine: Engine::default(),
            calibration: None,
            calibration_images: DEFAULT_CALIBRATION_IMAGES,
        }
    }
}

/// `count` image files under `dir` (any depth), evenly spaced in sorted path order so that an
/// ImageFolder's classes all take part, each prepared as the model's input when it is read.
fn calibration_images<'a>(
    dir: &Path,
    count: usize,
    preprocessor: &'a Preprocessor,
) -> Result<impl Iterator<Item = Result<Tensor, ModelError>> + 'a, ModelError> {
    let unreadable = |path: &Path, e: &dyn std::fmt::Display| {
        ModelError::Config(format!("calibration image {}: {e}", path.display()))
    };
    let mut files = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).map_err(|e| unreadable(&folder, &e))? {
            let path = entry.map_err(|e| unreadable(&folder, &e))?.path();
            if path.is_dir() {
                folders.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    if files.is_empty() || count == 0 {
        return Err(ModelError::Config(format!(
            "no calibration images: {} holds no files (or 0 were asked for)",
            dir.display()
        )));
    }
    let step = (files.len() / count).max(1);
    Ok(files.into_iter().step_by(step).take(count).map(move |path| {
        let bytes = std::fs::read(&path).map_err(|e| unreadable(&path, &e))?;
        preprocessor.load(&bytes).map_err(|e| unreadable(&path, &e))
    }))
}

/// How many images the fast-int8 engine is calibrated on by default.
pub const DEFAULT_CALIBRATION_IMAGES: usize = 256;

pub struct Classifier {
    model: FasterNet,
    preprocessor: Preprocessor,
    labels: Labels,
    name: String,
    source: PathBuf,
}

impl Classifier {
    pub fn load(options: &LoadOptions) -> Result<Self, ModelError> {
        // The int8 engine is built once the preprocessing is known, from images it prepares;
        // until then the weights wait in the reference engine, which packs nothing.
        let int8 = options.engine == Engine::FastInt8;
        let engine = if int8 { Engine::Reference } else { options.engine };
        if int8 && options.calibration.is_none() {
            return Err(ModelError::Config(
                "the fast-int8 engine needs calibration images (--calibration DIR: images like \
                 those it will classify)"
                    .into(),
            ));
        }
        let (model, hub, source) = match options.random_init {
            // Random weights behave like a tagless ImageNet checkpoint named `.random`.
            Some(variant) => {
                let config = FasterNetConfig::preset(variant, 1000);
                let model = FasterNet::with_engine(
                    crate::model::FasterNetWeights::random(&config, 0)?,
                    engine,
                )?;
                let mut hub = crate::model::HubConfig::default();
                hub.pretrained_cfg.tag = Some("random".into());
                (model, hub, PathBuf::from("(random weights)"))
            }
            None => {
                let checkpoint = match &options.weights {
                    Some(path) => Checkpoint::load(path)?,
                    None => Checkpoint::bundled()?,
                };
                let source = checkpoint.path.clone();
                let hub = checkpoint.hub_config.clone().unwrap_or_default();
                let num_classes_hint =
                    checkpoint.shape("classifier.weight").map(|s| s[0]).unwrap_or(1000);
                let config = options.variant.map(|v| FasterNetConfig::preset(v, num_classes_hint));
                (FasterNet::from_checkpoint(checkpoint, config, engine)?, hub, source)
            }
        };
        let bad_config = |reason: String| ModelError::checkpoint(&source, reason);
        check_hub_config(&hub, model.config()).map_err(bad_config)?;
        let mut preprocess = preprocess_config(&hub).map_err(bad_config)?;
        if let Some(crop_pct) = options.crop_pct {
            preprocess.crop_pct = crop_pct;
        }
        check_preprocess_config(&preprocess).map_err(bad_config)?;
        let labels = Labels::new(model.config().num_classes, hub.label_names.as_deref())
            .map_err(bad_config)?;
        let name = match &hub.pretrained_cfg.tag {
            Some(tag) => format!("{}.{tag}", model.config().architecture()),
            None => model.config().architecture(),
        };
        let preprocessor =
            Preprocessor::new(preprocess, options.max_pixels).with_decode(options.decode);
        let model = match &options.calibration {
            Some(dir) if int8 => {
                let images = calibration_images(dir, options.calibration_images, &preprocessor)?;
                FasterNet::with_int8(model.into_weights(), images)?
            }
            _ => model,
        };
        Ok(Self::new(model, preprocessor, labels, name, source))
    }

    /// Serves the model under another name (what API answers name and the v2 routes match).
    pub fn with_name(mut self, name: String) -> Self {
        self.name = name;
        self
    }

    pub fn new(
        model: FasterNet,
        preprocessor: Preprocessor,
        labels: Labels,
        name: String,
        source: PathBuf,
    ) -> Self {
        Self { model, preprocessor, labels, name, source }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The weights file the model came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn model(&self) -> &FasterNet {
        &self.model
    }

    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    pub fn preprocessor(&self) -> &Preprocessor {
        &self.preprocessor
    }

    /// Encoded image bytes to a (3, H, W) input tensor.
    pub fn prepare(&self, bytes: &[u8]) -> Result<Tensor, ImageError> {
        self.preprocessor.load(bytes)
    }

    /// One forward pass over prepared images (each (3, H, W)).
    pub fn forward(&self, images: &[Tensor]) -> Result<ModelOutput, ModelError> {
        if images.is_empty() {
            return Err(ModelError::Input("no images".into()));
        }
        self.model.forward_each(images)
    }

    /// One forward pass over prepared images, each answered for its own task. Only the
    /// outputs some task needs are computed and copied out of the batch.
    pub fn run(&self, images: &[Tensor], tasks: &[Task]) -> Result<Vec<Outcome>, ModelError> {
        if images.len() != tasks.len() {
            return Err(ModelError::Input(format!(
                "{} images but {} tasks",
                images.len(),
                tasks.len()
            )));
        }
        let output = self.forward(images)?;
        let needs_probabilities = |t: &Task| match *t {
            Task::Classify { .. } => true,
            Task::Embed { .. } => false,
            Task::Tensors { probabilities, .. } => probabilities,
        };
        let needs_features = |t: &Task| match *t {
            Task::Classify { .. } => false,
            Task::Embed { .. } => true,
            Task::Tensors { features, .. } => features,
        };
        let mut probabilities = match tasks.iter().any(needs_probabilities) {
            true => output.probabilities()?.to_vec2::<f32>()?,
            false => Vec::new(),
        };
        let mut features = match tasks.iter().any(needs_features) {
            true => output.features.to_vec2::<f32>()?,
            false => Vec::new(),
        };
        let mut logits =
            match tasks.iter().any(|t| matches!(t, Task::Classify { logits: true, .. })) {
                true => output.logits.to_vec2::<f32>()?,
                false => Vec::new(),
            };
        let outcomes = tasks.iter().enumerate().map(|(i, task)| match *task {
            Task::Classify { top_k, logits: l } => Outcome::Predictions {
                predictions: self.top_k(&probabilities[i], top_k),
                logits: l.then(|| std::mem::take(&mut logits[i])),
            },
            Task::Embed { normalize } => {
                let mut f = std::mem::take(&mut features[i]);
                if normalize {
                    normalize_l2(&mut f);
                }
                Outcome::Embedding(f)
            }
            Task::Tensors { probabilities: p, features: f } => Outcome::Tensors {
                probabilities: p.then(|| std::mem::take(&mut probabilities[i])),
                features: f.then(|| std::mem::take(&mut features[i])),
            },
        });
        Ok(outcomes.collect())
    }

    /// Top-k predictions per image, highest probability first.
    pub fn classify(
        &self,
        images: &[Tensor],
        top_k: usize,
    ) -> Result<Vec<Vec<Prediction>>, ModelError> {
        let tasks = vec![Task::Classify { top_k, logits: false }; images.len()];
        Ok(self.run(images, &tasks)?.into_iter().filter_map(Outcome::predictions).collect())
    }

    /// Pre-logits feature vectors, optionally scaled to unit L2 norm.
    pub fn embed(&self, images: &[Tensor], normalize: bool) -> Result<Vec<Vec<f32>>, ModelError> {
        let tasks = vec![Task::Embed { normalize }; images.len()];
        Ok(self.run(images, &tasks)?.into_iter().filter_map(Outcome::embedding).collect())
    }

    /// The `k` most probable labels of one image's probabilities, highest first (ties: the
    /// lower class index first).
    pub fn top_k(&self, probabilities: &[f32], k: usize) -> Vec<Prediction> {
        let mut order: Vec<usize> = (0..probabilities.len()).collect();
        order.sort_by(|&a, &b| probabilities[b].total_cmp(&probabilities[a]).then(a.cmp(&b)));
        order
            .into_iter()
            .take(k)
            .map(|i| Prediction {
                label: self.labels.get(i).to_string(),
                class_index: i,
                score: probabilities[i],
            })
            .collect()
    }
}

impl Outcome {
    pub fn predictions(self) -> Option<Vec<Prediction>> {
        self.classified().map(|(predictions, _)| predictions)
    }

    /// The predictions of a [`Task::Classify`] answer, with the logits when asked for.
    pub fn classified(self) -> Option<(Vec<Prediction>, Option<Vec<f32>>)> {
        match self {
            Self::Predictions { predictions, logits } => Some((predictions, logits)),
            _ => None,
        }
    }

    pub fn embedding(self) -> Option<Vec<f32>> {
        match self {
            Self::Embedding(e) => Some(e),
            _ => None,
        }
    }

    /// The probabilities and features of a [`Task::Tensors`] answer.
    pub fn tensors(self) -> Option<OutputTensors> {
        match self {
            Self::Tensors { probabilities, features } => Some((probabilities, features)),
            _ => None,
        }
    }
}

/// config.json must describe the checkpoint it comes with: a wrong class count or
/// architecture there means mislabelled answers or a wrong preprocessing, served silently.
fn check_hub_config(hub: &HubConfig, model: &FasterNetConfig) -> Result<(), String> {
    if let Some(named) = hub.architecture.as_deref() {
        match (named.parse::<Variant>(), model.variant()) {
            (Ok(said), Some(found)) if said != found => {
                return Err(format!("config.json names architecture `{named}` but the checkpoint's tensors are fasternet_{found}"))
            }
            (Ok(said), None) => return Err(format!("config.json names architecture `{named}` but the checkpoint's tensors match no preset (fasternet_{said} expected)")),
            _ => {}
        }
    }
    for (field, value) in [
        ("num_classes", hub.num_classes),
        ("pretrained_cfg.num_classes", hub.pretrained_cfg.num_classes),
    ] {
        if let Some(n) = value.filter(|&n| n != model.num_classes) {
            return Err(format!(
                "config.json says {field} = {n} but the checkpoint's classifier has {} classes",
                model.num_classes
            ));
        }
    }
    Ok(())
}

/// The ImageNet defaults overridden by whatever config.json's pretrained_cfg sets.
fn preprocess_config(hub: &HubConfig) -> Result<PreprocessConfig, String> {
    let cfg = &hub.pretrained_cfg;
    let mut out = PreprocessConfig::imagenet();
    if let Some(size) = &cfg.input_size {
        match size.as_slice() {
            [3, h, w] | [h, w] => out.input_size = (*h, *w),
            other => return Err(format!("pretrained_cfg.input_size {other:?} is not [3, H, W]")),
        }
    }
    let three = |v: &Option<Vec<f32>>, name: &str| -> Result<Option<[f32; 3]>, String> {
        v.as_ref()
            .map(|v| {
                <[f32; 3]>::try_from(v.as_slice())
                    .map_err(|_| format!("pretrained_cfg.{name} needs 3 values"))
            })
            .transpose()
    };
    out.mean = three(&cfg.mean, "mean")?.unwrap_or(out.mean);
    out.std = three(&cfg.std, "std")?.unwrap_or(out.std);
    out.crop_pct = cfg.crop_pct.unwrap_or(out.crop_pct);
    if let Some(i) = &cfg.interpolation {
        out.interpolation = i.parse()?;
    }
    Ok(out)
}

/// What preprocessing itself requires, and an input size the network takes.
fn check_preprocess_config(config: &PreprocessConfig) -> Result<(), String> {
    config.validate()?;
    let (min, max) = (FasterNetConfig::MIN_INPUT_SIDE, FasterNetConfig::MAX_INPUT_SIDE);
    let (h, w) = config.input_size;
    if h < min || w < min || h > max || w > max {
        return Err(format!("input size {h}x{w} is outside {min}x{min} to {max}x{max}"));
    }
    Ok(())
}

/// Scales a vector to unit L2 norm (a zero vector stays zero).
fn normalize_l2(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn each_image_in_a_batch_gets_the_answer_to_its_own_task() {
        let classifier = Classifier::load(&LoadOptions::default()).unwrap();
        let (h, w) = classifier.preprocessor().config.input_size;
        let images: Vec<Tensor> =
            (0..6).map(|_| Tensor::randn(0f32, 1.0, (3, h, w), &Device::Cpu).unwrap()).collect();
        let tasks = [
            Task::Classify { top_k: 3, logits: false },
            Task::Embed { normalize: true },
            Task::Classify { top_k: 1, logits: true },
            Task::Embed { normalize: false },
            Task::Tensors { probabilities: true, features: true },
            Task::Tensors { probabilities: true, features: false },
        ];
        let mixed = classifier.run(&images, &tasks).unwrap();
        // The oracle: the batch's own rows.
        let output = classifier.forward(&images).unwrap();
        let probabilities = output.probabilities().unwrap().to_vec2::<f32>().unwrap();
        let features = output.features.to_vec2::<f32>().unwrap();
        let best = |row: &[f32], k: usize| -> Vec<(usize, f32)> {
            let mut order: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
            order.sort_by(|a, b| b.1.total_cmp(&a.1));
            order.truncate(k);
            order
        };
        let answered = |outcome: &Outcome| -> Vec<(usize, f32)> {
            let predictions = outcome.clone().predictions().expect("predictions");
            predictions.iter().map(|p| (p.class_index, p.score)).collect()
        };
        assert_eq!(answered(&mixed[0]), best(&probabilities[0], 3));
        assert_eq!(answered(&mixed[2]), best(&probabilities[2], 1));
        let logits = output.logits.to_vec2::<f32>().unwrap();
        assert_eq!(mixed[0].clone().classified().unwrap().1, None);
        assert_eq!(mixed[2].clone().classified().unwrap().1, Some(logits[2].clone()));
        let unit = mixed[1].clone().embedding().expect("an embedding");
        let norm = features[1].iter().map(|x| x * x).sum::<f32>().sqrt();
        let expected: Vec<f32> = features[1].iter().map(|x| x / norm).collect();
        assert!(unit.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-6));
        assert_eq!(mixed[3], Outcome::Embedding(features[3].clone()));
        let both = Outcome::Tensors {
            probabilities: Some(probabilities[4].clone()),
            features: Some(features[4].clone()),
        };
        assert_eq!(mixed[4], both);
        let one =
            Outcome::Tensors { probabilities: Some(probabilities[5].clone()), features: None };
        assert_eq!(mixed[5], one);
        let label = classifier.labels().get(best(&probabilities[2], 1)[0].0).to_string();
        assert_eq!(mixed[2].clone().predictions().unwrap()[0].label, label);
        assert!(classifier.run(&images, &tasks[..2]).is_err(), "a task per image");
    }
}
