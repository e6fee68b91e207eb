//! A loaded model with its preprocessing and labels: the API the CLI and the server use.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::Serialize;

use crate::labels::Labels;
use crate::model::{Checkpoint, Engine, FasterNet, HubConfig, ModelError, ModelOutput, Variant};
use crate::preprocess::{ImageError, PreprocessConfig, Preprocessor, DEFAULT_MAX_PIXELS};

/// Where the bundled model lives, relative to the working directory.
pub const BUNDLED_WEIGHTS: &str = "weights";

#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Prediction {
    pub label: String,
    pub class_index: usize,
    /// Softmax probability.
    pub score: f32,
}

/// How to load a classifier.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// A `.safetensors`/`.pth` file or a hub-style directory.
    pub weights: PathBuf,
    /// Must agree with the checkpoint's shapes when given.
    pub variant: Option<Variant>,
    /// Overrides config.json's crop_pct (or the ImageNet default of 0.9).
    pub crop_pct: Option<f64>,
    pub max_pixels: u64,
    /// Benchmarking: ignore `weights` and use random weights of this variant (1000 classes,
    /// ImageNet preprocessing).
    pub random_init: Option<Variant>,
    pub engine: Engine,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            weights: PathBuf::from(BUNDLED_WEIGHTS),
            variant: None,
            crop_pct: None,
            max_pixels: DEFAULT_MAX_PIXELS,
            random_init: None,
            engine: Engine::default(),
        }
    }
}

pub struct Classifier {
    model: FasterNet,
    preprocessor: Preprocessor,
    labels: Labels,
    name: String,
    source: PathBuf,
}

impl Classifier {
    pub fn load(options: &LoadOptions) -> Result<Self, ModelError> {
        let (model, hub, source) = match options.random_init {
            // Random weights behave like a tagless ImageNet checkpoint named `.random`.
            Some(variant) => {
                let config = crate::model::FasterNetConfig::preset(variant, 1000);
                let model = FasterNet::with_engine(
                    crate::model::FasterNetWeights::random(&config, 0)?,
                    options.engine,
                )?;
                let mut hub = crate::model::HubConfig::default();
                hub.pretrained_cfg.tag = Some("random".into());
                (model, hub, PathBuf::from("(random weights)"))
            }
            None => {
                let checkpoint = Checkpoint::load(&options.weights)?;
                let source = checkpoint.path.clone();
                let hub = checkpoint.hub_config.clone().unwrap_or_default();
                let num_classes_hint =
                    checkpoint.shape("classifier.weight").map(|s| s[0]).unwrap_or(1000);
                let config = options
                    .variant
                    .map(|v| crate::model::FasterNetConfig::preset(v, num_classes_hint));
                (FasterNet::from_checkpoint(checkpoint, config, options.engine)?, hub, source)
            }
        };
        let bad_config = |reason: String| ModelError::checkpoint(&source, reason);
        check_hub_config(&hub, model.config()).map_err(bad_config)?;
        let mut preprocess = PreprocessConfig::from_hub(&hub).map_err(bad_config)?;
        if let Some(crop_pct) = options.crop_pct {
            preprocess.crop_pct = crop_pct;
            preprocess.validate().map_err(bad_config)?;
        }
        let labels = Labels::new(model.config().num_classes, hub.label_names.as_deref())
            .map_err(bad_config)?;
        let name = match &hub.pretrained_cfg.tag {
            Some(tag) => format!("{}.{tag}", model.config().architecture()),
            None => model.config().architecture(),
        };
        Ok(Self::new(
            model,
            Preprocessor::new(preprocess, options.max_pixels),
            labels,
            name,
            source,
        ))
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

    /// Top-k predictions per image, highest probability first.
    pub fn classify(
        &self,
        images: &[Tensor],
        top_k: usize,
    ) -> Result<Vec<Vec<Prediction>>, ModelError> {
        let probs = self.forward(images)?.probabilities()?.to_vec2::<f32>()?;
        Ok(probs.iter().map(|p| self.top_k(p, top_k)).collect())
    }

    /// Pre-logits feature vectors, optionally scaled to unit L2 norm.
    pub fn embed(
        &self,
        images: &[Tensor],
        l2_normalize: bool,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut features = self.forward(images)?.features.to_vec2::<f32>()?;
        if l2_normalize {
            features.iter_mut().for_each(|f| normalize_l2(f));
        }
        Ok(features)
    }

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

/// config.json must describe the checkpoint it comes with: a wrong class count or
/// architecture there means mislabelled answers or a wrong preprocessing, served silently.
fn check_hub_config(hub: &HubConfig, model: &crate::model::FasterNetConfig) -> Result<(), String> {
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

/// Scales a vector to unit L2 norm (a zero vector stays zero).
pub fn normalize_l2(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}
