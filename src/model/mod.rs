//! FasterNet ("Run, Don't Walk", CVPR 2023) in candle: configuration, checkpoint loading and
//! the forward pass. Knows nothing of images or HTTP.

pub mod checkpoint;
pub mod config;
mod fast;
pub use fast::LayerProfile;
pub mod hub_config;
mod reference;
pub mod weights;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

pub use checkpoint::{Checkpoint, Naming};
pub use config::{Activation, FasterNetConfig, Variant};
pub use hub_config::HubConfig;
pub use weights::FasterNetWeights;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("checkpoint does not fit {architecture}: {}", describe_mismatch(.missing, .unexpected, .mismatched))]
    Mismatch {
        architecture: String,
        missing: Vec<String>,
        unexpected: Vec<String>,
        /// (key, expected shape, checkpoint shape)
        mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    },
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn checkpoint(path: &Path, reason: impl ToString) -> Self {
        Self::Checkpoint { path: path.to_path_buf(), reason: reason.to_string() }
    }
}

fn describe_mismatch(
    missing: &[String],
    unexpected: &[String],
    mismatched: &[(String, Vec<usize>, Vec<usize>)],
) -> String {
    const SHOWN: usize = 6;
    fn list(out: &mut String, what: &str, items: Vec<String>) {
        if items.is_empty() {
            return;
        }
        if !out.is_empty() {
            out.push_str("; ");
        }
        let more = items.len().saturating_sub(SHOWN);
        let _ = write!(
            out,
            "{} {what}: {}",
            items.len(),
            items.into_iter().take(SHOWN).collect::<Vec<_>>().join(", ")
        );
        if more > 0 {
            let _ = write!(out, ", and {more} more");
        }
    }
    let mut out = String::new();
    list(
        &mut out,
        "with another shape",
        mismatched
            .iter()
            .map(|(k, want, got)| format!("{k} (expected {want:?}, checkpoint has {got:?})"))
            .collect(),
    );
    list(&mut out, "missing", missing.to_vec());
    list(&mut out, "unexpected", unexpected.to_vec());
    out
}

/// What a forward pass returns for a batch.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// (batch, num_classes)
    pub logits: Tensor,
    /// The pre-logits features after conv_head and the activation: (batch, feature_dim).
    pub features: Tensor,
}

impl ModelOutput {
    pub fn probabilities(&self) -> candle_core::Result<Tensor> {
        candle_nn::ops::softmax_last_dim(&self.logits)
    }
}

/// Whether the fast-bf16 engine runs on AMX tiles here: the CPU has AMX-BF16 and the OS lets
/// this process use the tile registers (Linux is asked once, on the first call).
pub fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return fast::amx_available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Which implementation runs the forward pass. Both consume the same folded weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// NHWC tiles, fused epilogues, buffer reuse (`fast` module).
    #[default]
    Fast,
    /// The fast engine with bf16 products (AVX512-BF16 CPUs only): faster, less exact.
    FastBf16,
    /// The bf16 engine with its blocks' 1x1 convolutions in int8 (AVX512-VNNI CPUs only),
    /// calibrated on images ([`FasterNet::with_int8`]): faster again, less exact again.
    FastInt8,
    /// Stock candle ops on NCHW tensors: the readable reference the fast path is tested against.
    Reference,
}

impl Engine {
    /// `auto`: bf16 products where they are faster than fp32 on this CPU (AMX tiles, or
    /// AVX512-BF16 on AMD; [`fasternet_kernels::Kernels::bf16_is_faster`]), fp32 elsewhere.
    pub fn auto() -> Self {
        if fasternet_kernels::Kernels::bf16_is_faster() {
            Self::FastBf16
        } else {
            Self::Fast
        }
    }
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fast" => Ok(Self::Fast),
            "fast-bf16" => Ok(Self::FastBf16),
            "fast-int8" => Ok(Self::FastInt8),
            "reference" => Ok(Self::Reference),
            "auto" => Ok(Self::auto()),
            other => Err(format!(
                "unknown engine `{other}` (expected fast, fast-bf16, fast-int8, auto or reference)"
            )),
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fast => "fast",
            Self::FastBf16 => "fast-bf16",
            Self::FastInt8 => "fast-int8",
            Self::Reference => "reference",
        })
    }
}

/// What every engine does: a forward pass over the folded weights.
trait Forward: Send + Sync {
    /// `images`: (3, H, W) f32 images of one shape, checked by [`FasterNet`].
    fn forward_each(
        &self,
        weights: &FasterNetWeights,
        images: &[Tensor],
    ) -> Result<ModelOutput, ModelError>;

    /// The CPU kernels behind it, for logs and benchmark headers.
    fn kernels(&self) -> &'static str;

    /// Its wall time per layer group, where it keeps one.
    fn profile(&self) -> Option<&LayerProfile> {
        None
    }
}

impl Forward for fast::FastEngine {
    /// The fast engine packed its own copy of the weights when it was built.
    fn forward_each(
        &self,
        _: &FasterNetWeights,
        images: &[Tensor],
    ) -> Result<ModelOutput, ModelError> {
        fast::FastEngine::forward_each(self, images)
    }

    fn kernels(&self) -> &'static str {
        fast::FastEngine::kernels(self)
    }

    fn profile(&self) -> Option<&LayerProfile> {
        Some(fast::FastEngine::profile(self))
    }
}

/// Stock candle ops on a stacked NCHW batch (`reference` module).
struct Reference;

impl Forward for Reference {
    fn forward_each(
        &self,
        weights: &FasterNetWeights,
        images: &[Tensor],
    ) -> Result<ModelOutput, ModelError> {
        Ok(reference::forward(weights, &Tensor::stack(images, 0)?)?)
    }

    fn kernels(&self) -> &'static str {
        "candle ops"
    }
}

/// A FasterNet ready for inference.
pub struct FasterNet {
    weights: FasterNetWeights,
    engine: Engine,
    forward: Box<dyn Forward>,
}

impl FasterNet {
    pub fn with_engine(weights: FasterNetWeights, engine: Engine) -> Result<Self, ModelError> {
        let forward: Box<dyn Forward> = match engine {
            Engine::Fast => Box::new(fast::FastEngine::new(&weights)?),
            Engine::FastBf16 => Box::new(fast::FastEngine::new_bf16(&weights)?),
            Engine::FastInt8 => {
                return Err(ModelError::Config(
                    "the fast-int8 engine is calibrated on images (FasterNet::with_int8)".into(),
                ))
            }
            Engine::Reference => Box::new(Reference),
        };
        Ok(Self { weights, engine, forward })
    }

    /// The fast-int8 engine ([`Engine::FastInt8`]), its quantisation calibrated on
    /// `calibration`: (3, H, W) images of one shape, normalised as for [`Self::forward`],
    /// read a few at a time.
    pub fn with_int8(
        weights: FasterNetWeights,
        calibration: impl IntoIterator<Item = Result<Tensor, ModelError>>,
    ) -> Result<Self, ModelError> {
        let forward = Box::new(fast::FastEngine::new_int8(&weights, calibration)?);
        Ok(Self { weights, engine: Engine::FastInt8, forward })
    }

    /// The CPU kernels behind the engine, for logs and benchmark headers.
    pub fn kernels(&self) -> &'static str {
        self.forward.kernels()
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The engine's wall time per layer group (the fast engines keep one; `bench --profile`).
    pub fn profile(&self) -> Option<&LayerProfile> {
        self.forward.profile()
    }

    /// Loads a checkpoint with the given engine; `config` overrides what the tensor shapes say,
    /// and must agree with them.
    pub fn from_checkpoint(
        checkpoint: Checkpoint,
        config: Option<FasterNetConfig>,
        engine: Engine,
    ) -> Result<Self, ModelError> {
        let config = match config {
            Some(c) => c,
            None => infer_config(&checkpoint.tensors, checkpoint.hub_config.as_ref())?,
        };
        config.validate().map_err(ModelError::Config)?;
        Self::with_engine(FasterNetWeights::from_tensors(&config, checkpoint.tensors)?, engine)
    }

    pub fn config(&self) -> &FasterNetConfig {
        &self.weights.config
    }

    /// The folded weights, for another engine to be built on.
    pub fn into_weights(self) -> FasterNetWeights {
        self.weights
    }

    pub fn weights(&self) -> &FasterNetWeights {
        &self.weights
    }

    fn check_input(&self, x: &Tensor) -> Result<(), ModelError> {
        let dims = x.dims();
        let min = FasterNetConfig::MIN_INPUT_SIDE;
        if dims.len() != 4 || dims[1] != 3 || dims[0] == 0 || dims[2] < min || dims[3] < min {
            return Err(ModelError::Input(format!(
                "expected a (batch >= 1, 3, H >= {min}, W >= {min}) tensor, got {dims:?}"
            )));
        }
        Ok(())
    }

    /// Most bytes a forward pass over `batch` images of `height` x `width` allocates beyond
    /// the weights: the activations and the engine's buffers. An upper bound measured on both
    /// engines (`tests/server_limits.rs`), for checking a batch size against a memory budget
    /// before running it.
    pub fn forward_bytes(&self, batch: usize, (height, width): (usize, usize)) -> u64 {
        // The first stage's activation map is the largest; the fast engine keeps two of them
        // (ping-pong buffers) and more for the threads' own images, candle's ops several, with
        // the MLP's hidden layer twice as wide. Measured use is 0.25-0.85 of this for t0..t2
        // at batch 1 to 64.
        let first_stage =
            (height / 4 * (width / 4) * self.config().embed_dim * std::mem::size_of::<f32>())
                as u64;
        let input = (3 * height * width * std::mem::size_of::<f32>()) as u64;
        let per_image = match self.engine {
            Engine::Reference => 10 * first_stage + 2 * input,
            Engine::Fast | Engine::FastBf16 | Engine::FastInt8 => 4 * first_stage + input,
        };
        // Thread-local tile scratch and packing buffers.
        batch as u64 * per_image + (32 << 20)
    }

    /// `x`: (batch, 3, H, W) f32 with H, W >= 32, normalised as the checkpoint expects.
    pub fn forward(&self, x: &Tensor) -> Result<ModelOutput, ModelError> {
        self.check_input(x)?;
        let images = (0..x.dim(0)?).map(|i| x.get(i)).collect::<Result<Vec<_>, _>>()?;
        self.forward_each(&images)
    }

    /// `forward` on a batch given as separate (3, H, W) images of one shape: the fast engine
    /// reads each where it lies instead of a stacked copy.
    pub fn forward_each(&self, images: &[Tensor]) -> Result<ModelOutput, ModelError> {
        let Some(first) = images.first() else {
            return Err(ModelError::Input("no images".into()));
        };
        if images.iter().any(|x| x.dims() != first.dims()) || first.rank() != 3 {
            return Err(ModelError::Input("expected (3, H, W) images of one shape".into()));
        }
        // The same checks as `forward`, on a one-image view.
        self.check_input(&first.unsqueeze(0)?)?;
        let images = images
            .iter()
            .map(|x| x.to_dtype(candle_core::DType::F32))
            .collect::<Result<Vec<_>, _>>()?;
        self.forward.forward_each(&self.weights, &images)
    }
}

/// Reads the architecture off the tensor shapes. The activation is not visible in shapes: it
/// comes from config.json's architecture or model_args, else from the preset with the same
/// shapes, else ReLU (timm's default).
pub fn infer_config(
    tensors: &HashMap<String, Tensor>,
    hub: Option<&HubConfig>,
) -> Result<FasterNetConfig, ModelError> {
    let dim = |key: &str, i: usize| -> Result<usize, ModelError> {
        tensors.get(key).and_then(|t| t.dims().get(i).copied()).ok_or_else(|| {
            ModelError::Config(format!("not a FasterNet checkpoint: no tensor `{key}`"))
        })
    };
    let embed_dim = dim("patch_embed.proj.weight", 0)?;
    let mut depths = [0usize; 4];
    for (i, d) in depths.iter_mut().enumerate() {
        while tensors.contains_key(&format!("stages.{i}.blocks.{}.mlp.0.weight", *d)) {
            *d += 1;
        }
    }
    let hidden = dim("stages.0.blocks.0.mlp.0.weight", 0)?;
    // dim / n_div is floored, so one stage can fit several n_div: take the one that fits all
    // stages, preferring the paper's 4.
    let partials = (0..4)
        .map(|i| dim(&format!("stages.{i}.blocks.0.spatial_mixing.partial_conv3.weight"), 0))
        .collect::<Result<Vec<_>, _>>()?;
    let n_div = std::iter::once(FasterNetConfig::N_DIV)
        .chain(1..=embed_dim)
        .find(|&n| partials.iter().enumerate().all(|(i, &p)| (embed_dim << i) / n == p))
        .ok_or_else(|| {
            ModelError::Config(format!("partial convolution widths {partials:?} fit no n_div"))
        })?;
    let mut config = FasterNetConfig {
        embed_dim,
        depths,
        mlp_ratio: hidden as f64 / embed_dim as f64,
        n_div,
        feature_dim: dim("conv_head.weight", 0)?,
        num_classes: dim("classifier.weight", 0)?,
        act: Activation::Relu,
    };
    let named_variant =
        hub.and_then(|h| h.architecture.as_deref()).and_then(|a| a.parse::<Variant>().ok());
    let named_act = hub
        .and_then(|h| h.model_args.act_layer.as_deref())
        .and_then(|a| a.parse::<Activation>().ok());
    let shape_twin = Variant::ALL.into_iter().find(|&v| {
        let p = FasterNetConfig::preset(v, config.num_classes);
        FasterNetConfig { act: p.act, ..config.clone() } == p
    });
    if let Some(act) =
        named_act.or(named_variant.or(shape_twin).map(|v| FasterNetConfig::preset(v, 1).act))
    {
        config.act = act;
    }
    Ok(config)
}
