//! The folded weights laid out for the kernels, once at load time.

use std::sync::Mutex;

use candle_core::Tensor;
use fasternet_kernels::blocking::HEAD_PART_COLUMNS;
use fasternet_kernels::winograd::{self, Winograd};
use fasternet_kernels::{Isa, Kernels, QuantU8, Weights, WeightsI8};

use super::{FastEngine, LayerProfile};
use crate::model::weights::{BlockWeights, FasterNetWeights, FoldedConv};
use crate::model::ModelError;

/// A dense layer: (k x n) weights and a bias.
pub(super) struct Dense {
    pub(super) w: Weights,
    pub(super) bias: Vec<f32>,
}

/// A dense layer cut into parts of `HEAD_PART_COLUMNS` output columns, so that threads can
/// share its product where there are fewer rows (images) than threads.
pub(super) struct ColumnParts {
    pub(super) k: usize,
    pub(super) n: usize,
    pub(super) parts: Vec<Dense>,
}

impl ColumnParts {
    /// `w`: (out, in, ...) as `transpose` takes it.
    fn new(w: &Tensor, bias: Vec<f32>, kernels: Kernels) -> Result<Self, ModelError> {
        let w = w.flatten_from(1)?;
        let (n, k) = w.dims2()?;
        let parts = (0..n)
            .step_by(HEAD_PART_COLUMNS)
            .map(|j0| {
                let j1 = (j0 + HEAD_PART_COLUMNS).min(n);
                let w = transpose(&w.narrow(0, j0, j1 - j0)?, kernels)?;
                Ok(Dense { w, bias: bias[j0..j1].to_vec() })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Self { k, n, parts })
    }
}

pub(super) struct Block {
    pub(super) dim: usize,
    pub(super) cp: usize,
    pub(super) hidden: usize,
    /// (9 cp) x cp, rows ordered (di, dj, channel)
    pub(super) partial: Weights,
    /// Whether the partial convolution runs on gathered patches (`partial_conv_gathered`): on
    /// AMX where a patch (9 cp values) is whole tile steps of 32, so the tiles read it in place.
    pub(super) gather_patches: bool,
    /// The same convolution by Winograd's F(2x2, 3x3) (fp32 on our AVX-512 kernels, cp >= 24),
    /// used instead of `partial` unless a split between threads would be uneven (`block`).
    pub(super) winograd: Option<Winograd>,
    /// dim x hidden
    pub(super) fc1: Weights,
    pub(super) fc1_bias: Vec<f32>,
    /// hidden x dim
    pub(super) fc2: Weights,
    /// fc1 and fc2 in int8 (`FastEngine::new_int8`), which then replace `fc1` and `fc2` (left
    /// empty).
    pub(super) int8: Option<Int8Block>,
    /// While the int8 engine calibrates: the ranges seen of fc1's and fc2's inputs.
    pub(super) seen: Option<Mutex<[Range; 2]>>,
}

/// The smallest and largest value seen of a tensor.
#[derive(Clone, Copy, Debug)]
pub(super) struct Range(pub(super) f32, pub(super) f32);

impl Range {
    pub(super) const EMPTY: Self = Self(f32::INFINITY, f32::NEG_INFINITY);

    pub(super) fn widened(self, values: impl Iterator<Item = f32>) -> Self {
        values.fold(self, |Self(lo, hi), v| Self(lo.min(v), hi.max(v)))
    }
}

/// A block's fc1 and fc2 on int8 operands, each input quantised per tensor to the range the
/// calibration saw of it, the weights per output channel.
pub(super) struct Int8Block {
    pub(super) fc1: WeightsI8,
    pub(super) fc2: WeightsI8,
    /// fc1's input: the partial convolution's output and the untouched channels.
    pub(super) input: QuantU8,
    /// fc2's input: the hidden activations.
    pub(super) hidden: QuantU8,
    /// The int8 kernels, which quantise the inputs too.
    pub(super) kernels: Kernels,
}

impl Int8Block {
    pub(super) fn new(
        b: &BlockWeights,
        [input, hidden]: [Range; 2],
        kernels: Kernels,
    ) -> Result<Self, ModelError> {
        let (input, hidden) =
            (QuantU8::covering(input.0, input.1), QuantU8::covering(hidden.0, hidden.1));
        let (k, n, fc1) = transposed(&Tensor::cat(&[&b.fc1_mixed, &b.fc1_untouched], 1)?)?;
        let fc1 = WeightsI8::new(k, n, &fc1, input, kernels);
        let (k, n, fc2) = transposed(&b.fc2)?;
        let fc2 = WeightsI8::new(k, n, &fc2, hidden, kernels);
        Ok(Self { fc1, fc2, input, hidden, kernels })
    }
}

pub(super) struct Stage {
    pub(super) merge: Option<Dense>,
    pub(super) blocks: Vec<Block>,
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>, ModelError> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// (out, in, kh, kw) -> ((di, dj, in) x out) for patches read from NHWC maps.
fn conv_nhwc_matrix(w: &Tensor, kernels: Kernels) -> Result<Weights, ModelError> {
    let (n, cin, kh, kw) = w.dims4()?;
    Ok(Weights::new(cin * kh * kw, n, to_vec(&w.permute((2, 3, 1, 0))?.contiguous()?)?, kernels))
}

/// (out, in, ...) -> (in x out).
fn transpose(w: &Tensor, kernels: Kernels) -> Result<Weights, ModelError> {
    let (k, n, row_major) = transposed(w)?;
    Ok(Weights::new(k, n, row_major, kernels))
}

/// (out, in, ...) -> (k = in, n = out, the (k x n) matrix row-major).
fn transposed(w: &Tensor) -> Result<(usize, usize, Vec<f32>), ModelError> {
    let w = w.flatten_from(1)?;
    let (n, k) = w.dims2()?;
    Ok((k, n, to_vec(&w.t()?.contiguous()?)?))
}

impl FastEngine {
    pub(super) fn with_kernels(w: &FasterNetWeights, kernels: Kernels) -> Result<Self, ModelError> {
        let dense =
            |conv: &FoldedConv, nhwc: bool, kernels: Kernels| -> Result<Dense, ModelError> {
                let w = if nhwc {
                    conv_nhwc_matrix(&conv.weight, kernels)?
                } else {
                    transpose(&conv.weight, kernels)?
                };
                Ok(Dense { w, bias: to_vec(&conv.bias)? })
            };
        let block = |b: &BlockWeights| -> Result<Block, ModelError> {
            let (hidden, cp, _, _) = b.fc1_mixed.dims4()?;
            let dim = b.fc2.dim(0)?;
            let winograd = if kernels.isa() == Isa::Avx512 && cp >= winograd::MIN_CHANNELS {
                Some(Winograd::new(&to_vec(&b.partial_conv)?, cp, kernels))
            } else {
                None
            };
            Ok(Block {
                dim,
                cp,
                hidden,
                partial: conv_nhwc_matrix(&b.partial_conv, kernels)?,
                gather_patches: kernels.isa() == Isa::Amx && (9 * cp).is_multiple_of(32),
                winograd,
                // fc1 as one product over [partial conv output, untouched channels].
                fc1: transpose(&Tensor::cat(&[&b.fc1_mixed, &b.fc1_untouched], 1)?, kernels)?,
                fc1_bias: to_vec(&b.fc1_bias)?,
                fc2: transpose(&b.fc2, kernels)?,
                int8: None,
                seen: None,
            })
        };
        let stages: Vec<Stage> = w
            .stages
            .iter()
            .map(|s| {
                Ok(Stage {
                    merge: s.downsample.as_ref().map(|d| dense(d, true, kernels)).transpose()?,
                    blocks: s.blocks.iter().map(block).collect::<Result<_, ModelError>>()?,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        let features = w.classifier_weight.dim(1)?;
        let stem = dense(&w.stem, false, kernels.fp32())?;
        let head = ColumnParts::new(&w.conv_head, vec![0.0; features], kernels)?;
        let classifier =
            ColumnParts::new(&w.classifier_weight, to_vec(&w.classifier_bias)?, kernels)?;
        let weight_bytes = stem.w.bytes()
            + stages
                .iter()
                .flat_map(|s| {
                    let blocks =
                        s.blocks.iter().map(|b| b.partial.bytes() + b.fc1.bytes() + b.fc2.bytes());
                    s.merge.iter().map(|m| m.w.bytes()).chain(blocks)
                })
                .sum::<usize>()
            + [&head, &classifier]
                .iter()
                .flat_map(|c| &c.parts)
                .map(|p| p.w.bytes())
                .sum::<usize>();
        let bf16_maps = kernels.is_bf16()
            && stages.iter().flat_map(|s| &s.blocks).all(|b| b.cp % 2 == 0 && b.dim % 2 == 0);
        Ok(Self {
            kernels,
            act: w.config.act.into(),
            stem,
            stages,
            head,
            classifier,
            weight_bytes,
            bf16_maps,
            buffers: Mutex::new(Vec::new()),
            team: Mutex::new(None),
            profile: LayerProfile::default(),
        })
    }
}
