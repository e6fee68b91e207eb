//! timm hub `config.json`: architecture, label names and the pretrained_cfg preprocessing.

use std::path::Path;

use serde::Deserialize;

use super::ModelError;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct HubConfig {
    pub architecture: Option<String>,
    pub num_classes: Option<usize>,
    pub label_names: Option<Vec<String>>,
    #[serde(default)]
    pub pretrained_cfg: PretrainedCfg,
    #[serde(default)]
    pub model_args: ModelArgs,
}

/// The subset of timm's pretrained_cfg that eval preprocessing needs.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PretrainedCfg {
    /// timm's pretrained tag, e.g. `in1k`; part of the served model's name.
    pub tag: Option<String>,
    pub input_size: Option<Vec<usize>>,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    pub crop_pct: Option<f64>,
    pub interpolation: Option<String>,
    pub num_classes: Option<usize>,
}

/// Constructor arguments of a custom (non-preset) model, as timm writes them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ModelArgs {
    pub act_layer: Option<String>,
}

impl HubConfig {
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::checkpoint(path, e))?;
        Self::parse(&text, path)
    }

    /// `path` names where the text came from, in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ModelError> {
        serde_json::from_str(text)
            .map_err(|e| ModelError::checkpoint(path, format!("invalid config.json: {e}")))
    }
}
