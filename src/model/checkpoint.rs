//! Reading checkpoint files into one tensor map in timm's naming.
//!
//! Accepted: `.safetensors` and torch.save zip `.pth`/`.pt`/`.bin` files in either the official
//! JierunChen/FasterNet naming or timm's, and timm hub-style directories (`model.safetensors` +
//! `config.json`). timm 1.0.31 cannot load official files itself, so the renaming lives here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::hub_config::HubConfig;
use super::ModelError;

/// Which naming scheme a checkpoint used before it was mapped to timm's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    Timm,
    Official,
}

/// A checkpoint's tensors, keyed by timm names, all f32 on the CPU.
pub struct Checkpoint {
    pub path: PathBuf,
    pub naming: Naming,
    pub tensors: HashMap<String, Tensor>,
    /// `config.json` beside the weights, when there is one.
    pub hub_config: Option<HubConfig>,
}

/// The bundled model (weights/ in the source tree), compiled into the binary so that it works
/// from any directory.
const BUNDLED_SAFETENSORS: &[u8] = include_bytes!("../../weights/model.safetensors");
const BUNDLED_CONFIG: &str = include_str!("../../weights/config.json");
/// What the bundled model's `path` says.
pub const BUNDLED: &str = "(bundled: weights/model.safetensors)";

impl Checkpoint {
    /// The bundled Fashion-MNIST FasterNet-T0, from the binary.
    pub fn bundled() -> Result<Self, ModelError> {
        let path = Path::new(BUNDLED);
        let hub = HubConfig::parse(BUNDLED_CONFIG, path)?;
        let raw = candle_core::safetensors::load_buffer(BUNDLED_SAFETENSORS, &Device::Cpu)
            .map_err(|e| ModelError::checkpoint(path, e))?;
        Self::from_tensors(path.to_path_buf(), raw.into_iter().collect(), Some(hub))
    }

    /// Loads a file or a hub-style directory.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let (weights, hub_config) = if path.is_dir() {
            let weights = ["model.safetensors", "pytorch_model.bin"]
                .iter()
                .map(|name| path.join(name))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    ModelError::checkpoint(
                        path,
                        "directory has no model.safetensors or pytorch_model.bin",
                    )
                })?;
            let config = path.join("config.json");
            let hub = config.is_file().then(|| HubConfig::load(&config)).transpose()?;
            (weights, hub)
        } else if path.is_file() {
            // A config.json next to a single weights file is used too (as in `weights/`).
            let config = path.with_file_name("config.json");
            let hub = config.is_file().then(|| HubConfig::load(&config)).transpose()?;
            (path.to_path_buf(), hub)
        } else {
            return Err(ModelError::checkpoint(path, "no such file or directory"));
        };
        let raw = read_tensors(&weights)?;
        Self::from_tensors(weights, raw, hub_config)
    }

    fn from_tensors(
        weights: PathBuf,
        raw: Vec<(String, Tensor)>,
        hub_config: Option<HubConfig>,
    ) -> Result<Self, ModelError> {
        let (naming, tensors) = to_timm_names(raw);
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
            .collect::<Result<HashMap<_, _>, candle_core::Error>>()
            .map_err(|e| ModelError::checkpoint(&weights, e))?;
        if tensors.is_empty() {
            return Err(ModelError::checkpoint(&weights, "holds no tensors"));
        }
        Ok(Self { path: weights, naming, tensors, hub_config })
    }

    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.tensors.get(key).map(|t| t.dims())
    }
}

fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>, ModelError> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let result = match ext.as_str() {
        "safetensors" => {
            candle_core::safetensors::load(path, &Device::Cpu).map(|m| m.into_iter().collect())
        }
        "pth" | "pt" | "bin" | "ckpt" => read_pth(path),
        _ => {
            return Err(ModelError::checkpoint(
                path,
                "unknown extension (expected .safetensors, .pth, .pt or .bin)",
            ))
        }
    };
    result.map_err(|e| ModelError::checkpoint(path, e))
}

/// torch.save zip archives: a plain state_dict, or one wrapped under `state_dict` or `model`
/// (training checkpoints that also hold the epoch, optimizer, ...).
fn read_pth(path: &Path) -> candle_core::Result<Vec<(String, Tensor)>> {
    let mut last_err = None;
    for key in [Some("state_dict"), Some("model"), None] {
        match candle_core::pickle::read_all_with_key(path, key) {
            Ok(tensors) if !tensors.is_empty() => return Ok(tensors),
            Ok(_) => {}
            Err(e) => last_err = Some(e),
        }
    }
    match last_err {
        Some(e) if !is_zip(path) => Err(candle_core::Error::Msg(format!(
            "not a torch.save zip archive (legacy or corrupt file?): {e}"
        ))),
        Some(e) => Err(e),
        None => Ok(Vec::new()),
    }
}

fn is_zip(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok()
        && magic == *b"PK\x03\x04"
}

/// Strips wrappers' prefixes, drops BatchNorm's step counters and renames official keys.
fn to_timm_names(raw: Vec<(String, Tensor)>) -> (Naming, HashMap<String, Tensor>) {
    let raw: Vec<(String, Tensor)> = raw
        .into_iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .map(|(k, t)| (k.strip_prefix("module.").map(str::to_string).unwrap_or(k), t))
        .collect();
    let official = raw.iter().any(|(k, _)| is_official_only(k));
    let naming = if official { Naming::Official } else { Naming::Timm };
    let tensors = raw
        .into_iter()
        .map(|(k, t)| (if official { official_to_timm(&k) } else { k }, t))
        .collect();
    (naming, tensors)
}

/// Keys that only the official naming has (timm has `downsample.`, `conv_head`, `classifier`).
fn is_official_only(key: &str) -> bool {
    key.starts_with("avgpool_pre_head.")
        || key.starts_with("head.")
        || ["stages.1.reduction.", "stages.3.reduction.", "stages.5.reduction."]
            .iter()
            .any(|p| key.starts_with(p))
}

/// Official -> timm: `stages.{1,3,5}.` become `stages.{1,2,3}.downsample.`, `stages.{2,4,6}.`
/// become `stages.{1,2,3}.`, `avgpool_pre_head.1.` becomes `conv_head.`, `head.` `classifier.`.
pub fn official_to_timm(key: &str) -> String {
    if let Some(rest) = key.strip_prefix("avgpool_pre_head.1.") {
        return format!("conv_head.{rest}");
    }
    if let Some(rest) = key.strip_prefix("head.") {
        return format!("classifier.{rest}");
    }
    if let Some(rest) = key.strip_prefix("stages.") {
        if let Some((index, tail)) = rest.split_once('.') {
            if let Ok(i) = index.parse::<usize>() {
                return match i {
                    0 => key.to_string(),
                    odd if odd % 2 == 1 => format!("stages.{}.downsample.{tail}", odd.div_ceil(2)),
                    even => format!("stages.{}.{tail}", even / 2),
                };
            }
        }
    }
    key.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_names_map_to_timm() {
        let cases = [
            ("patch_embed.proj.weight", "patch_embed.proj.weight"),
            ("stages.0.blocks.0.mlp.0.weight", "stages.0.blocks.0.mlp.0.weight"),
            ("stages.1.reduction.weight", "stages.1.downsample.reduction.weight"),
            (
                "stages.2.blocks.1.spatial_mixing.partial_conv3.weight",
                "stages.1.blocks.1.spatial_mixing.partial_conv3.weight",
            ),
            ("stages.5.norm.running_var", "stages.3.downsample.norm.running_var"),
            ("stages.6.blocks.0.mlp.3.weight", "stages.3.blocks.0.mlp.3.weight"),
            ("avgpool_pre_head.1.weight", "conv_head.weight"),
            ("head.bias", "classifier.bias"),
        ];
        for (official, timm) in cases {
            assert_eq!(official_to_timm(official), timm);
        }
    }
}
