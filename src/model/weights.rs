//! Inference-form weights: BatchNorm folded into every convolution, the block's first 1x1
//! convolution split so the partial 3x3 output never has to be concatenated back.
//!
//! Both forward implementations (the candle-ops reference and any faster CPU path) consume
//! these tensors, so they agree on arithmetic by construction.

use std::collections::{BTreeSet, HashMap};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::{FasterNetConfig, ModelError};

const BN_EPS: f64 = 1e-5;

/// A convolution whose bias came from the folded BatchNorm.
#[derive(Debug, Clone)]
pub struct FoldedConv {
    /// (out, in, kh, kw)
    pub weight: Tensor,
    /// (out,)
    pub bias: Tensor,
}

#[derive(Debug, Clone)]
pub struct BlockWeights {
    /// The partial 3x3 convolution on the first `cp` channels: (cp, cp, 3, 3), no bias.
    pub partial_conv: Tensor,
    /// First 1x1 convolution's columns for the `cp` convolved channels: (hidden, cp, 1, 1).
    pub fc1_mixed: Tensor,
    /// First 1x1 convolution's columns for the untouched channels: (hidden, dim - cp, 1, 1).
    pub fc1_untouched: Tensor,
    /// Folded BatchNorm of the hidden layer: (hidden,).
    pub fc1_bias: Tensor,
    /// Second 1x1 convolution: (dim, hidden, 1, 1), no bias.
    pub fc2: Tensor,
}

#[derive(Debug, Clone)]
pub struct StageWeights {
    /// 2x2 stride-2 patch merging, absent in the first stage.
    pub downsample: Option<FoldedConv>,
    pub blocks: Vec<BlockWeights>,
}

#[derive(Debug, Clone)]
pub struct FasterNetWeights {
    pub config: FasterNetConfig,
    /// 4x4 stride-4 patch embedding.
    pub stem: FoldedConv,
    pub stages: Vec<StageWeights>,
    /// 1x1 convolution after global pooling: (feature_dim, dim3, 1, 1), no bias.
    pub conv_head: Tensor,
    /// (num_classes, feature_dim)
    pub classifier_weight: Tensor,
    /// (num_classes,)
    pub classifier_bias: Tensor,
}

/// Every tensor a checkpoint of `config` holds, in timm naming, with its shape.
pub fn expected_shapes(config: &FasterNetConfig) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let bn = |out: &mut Vec<(String, Vec<usize>)>, prefix: String, c: usize| {
        for p in ["weight", "bias", "running_mean", "running_var"] {
            out.push((format!("{prefix}.{p}"), vec![c]));
        }
    };
    let e = config.embed_dim;
    out.push(("patch_embed.proj.weight".into(), vec![e, 3, 4, 4]));
    bn(&mut out, "patch_embed.norm".into(), e);
    for (i, &depth) in config.depths.iter().enumerate() {
        let dim = config.stage_dim(i);
        if i > 0 {
            out.push((format!("stages.{i}.downsample.reduction.weight"), vec![dim, dim / 2, 2, 2]));
            bn(&mut out, format!("stages.{i}.downsample.norm"), dim);
        }
        let (cp, hidden) = (config.partial_dim(dim), config.hidden_dim(dim));
        for j in 0..depth {
            let b = format!("stages.{i}.blocks.{j}");
            out.push((format!("{b}.spatial_mixing.partial_conv3.weight"), vec![cp, cp, 3, 3]));
            out.push((format!("{b}.mlp.0.weight"), vec![hidden, dim, 1, 1]));
            bn(&mut out, format!("{b}.mlp.1"), hidden);
            out.push((format!("{b}.mlp.3.weight"), vec![dim, hidden, 1, 1]));
        }
    }
    out.push(("conv_head.weight".into(), vec![config.feature_dim, config.stage_dim(3), 1, 1]));
    out.push(("classifier.weight".into(), vec![config.num_classes, config.feature_dim]));
    out.push(("classifier.bias".into(), vec![config.num_classes]));
    out
}

/// Compares a checkpoint's tensors with what `config` needs; lists every difference at once.
pub fn check_shapes(
    config: &FasterNetConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<(), ModelError> {
    let expected = expected_shapes(config);
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for (key, shape) in &expected {
        match tensors.get(key) {
            None => missing.push(key.clone()),
            Some(t) if t.dims() != shape.as_slice() => {
                mismatched.push((key.clone(), shape.clone(), t.dims().to_vec()))
            }
            Some(_) => {}
        }
    }
    let known: BTreeSet<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
    let mut unexpected: Vec<String> =
        tensors.keys().filter(|k| !known.contains(k.as_str())).cloned().collect();
    unexpected.sort();
    if missing.is_empty() && mismatched.is_empty() && unexpected.is_empty() {
        Ok(())
    } else {
        Err(ModelError::Mismatch {
            architecture: config.architecture(),
            missing,
            unexpected,
            mismatched,
        })
    }
}

impl FasterNetWeights {
    /// Folds a checked checkpoint (see [`check_shapes`]) into inference form.
    pub fn from_tensors(
        config: &FasterNetConfig,
        tensors: HashMap<String, Tensor>,
    ) -> Result<Self, ModelError> {
        check_shapes(config, &tensors)?;
        Self::build(config, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))
            .map_err(ModelError::Tensor)
    }

    /// Random weights and randomized BatchNorm statistics (benchmarks, tests); `seed` makes
    /// them reproducible.
    pub fn random(config: &FasterNetConfig, seed: u64) -> Result<Self, ModelError> {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        use rand_distr::{Distribution, Normal};
        let mut rng = StdRng::seed_from_u64(seed);
        let tensors = expected_shapes(config)
            .into_iter()
            .map(|(key, shape)| {
                let n: usize = shape.iter().product();
                let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
                let positive = key.ends_with("running_var")
                    || key.ends_with("norm.weight")
                    || key.ends_with("mlp.1.weight");
                let std = if shape.len() == 1 { 0.1 } else { (1.0 / fan_in as f32).sqrt() };
                let normal = Normal::new(0f32, std).expect("std is positive");
                let data: Vec<f32> = (0..n)
                    .map(|_| {
                        if positive {
                            rng.random_range(0.5f32..1.5)
                        } else {
                            normal.sample(&mut rng)
                        }
                    })
                    .collect();
                Ok((key, Tensor::from_vec(data, shape, &Device::Cpu)?))
            })
            .collect::<candle_core::Result<HashMap<_, _>>>()
            .map_err(ModelError::Tensor)?;
        Self::from_tensors(config, tensors)
    }

    fn build(config: &FasterNetConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let e = config.embed_dim;
        let stem =
            fold_bn(vb.get((e, 3, 4, 4), "patch_embed.proj.weight")?, vb.pp("patch_embed.norm"))?;
        let mut stages = Vec::with_capacity(4);
        for (i, &depth) in config.depths.iter().enumerate() {
            let vb = vb.pp(format!("stages.{i}"));
            let dim = config.stage_dim(i);
            let downsample = if i == 0 {
                None
            } else {
                let ds = vb.pp("downsample");
                Some(fold_bn(ds.get((dim, dim / 2, 2, 2), "reduction.weight")?, ds.pp("norm"))?)
            };
            let blocks = (0..depth)
                .map(|j| block(config, dim, vb.pp(format!("blocks.{j}"))))
                .collect::<candle_core::Result<Vec<_>>>()?;
            stages.push(StageWeights { downsample, blocks });
        }
        let (f, k) = (config.feature_dim, config.num_classes);
        Ok(Self {
            config: config.clone(),
            stem,
            stages,
            conv_head: vb.get((f, config.stage_dim(3), 1, 1), "conv_head.weight")?,
            classifier_weight: vb.get((k, f), "classifier.weight")?,
            classifier_bias: vb.get(k, "classifier.bias")?,
        })
    }
}

fn block(
    config: &FasterNetConfig,
    dim: usize,
    vb: VarBuilder,
) -> candle_core::Result<BlockWeights> {
    let (cp, hidden) = (config.partial_dim(dim), config.hidden_dim(dim));
    let partial_conv = vb.get((cp, cp, 3, 3), "spatial_mixing.partial_conv3.weight")?;
    let fc1 = fold_bn(vb.get((hidden, dim, 1, 1), "mlp.0.weight")?, vb.pp("mlp.1"))?;
    Ok(BlockWeights {
        partial_conv,
        fc1_mixed: fc1.weight.narrow(1, 0, cp)?.contiguous()?,
        fc1_untouched: fc1.weight.narrow(1, cp, dim - cp)?.contiguous()?,
        fc1_bias: fc1.bias,
        fc2: vb.get((dim, hidden, 1, 1), "mlp.3.weight")?,
    })
}

/// conv(x) followed by eval-mode BatchNorm == conv'(x) + b with
/// w' = w * gamma / sqrt(var + eps) and b = beta - mean * gamma / sqrt(var + eps).
/// Folded in f64 so the fold adds no rounding of its own.
fn fold_bn(weight: Tensor, vb: VarBuilder) -> candle_core::Result<FoldedConv> {
    let c = weight.dim(0)?;
    let get = |name: &str| vb.get(c, name).and_then(|t| t.to_dtype(DType::F64));
    let (gamma, beta, mean, var) =
        (get("weight")?, get("bias")?, get("running_mean")?, get("running_var")?);
    let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
    let bias = (beta - (mean * &scale)?)?;
    let weight = weight.to_dtype(DType::F64)?.broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?;
    Ok(FoldedConv {
        weight: weight.to_dtype(DType::F32)?.contiguous()?,
        bias: bias.to_dtype(DType::F32)?,
    })
}
