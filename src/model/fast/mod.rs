//! The fast CPU path: the same folded weights as the reference, computed on NHWC activations
//! (rows = pixels) as products with pre-packed weights (`fasternet_kernels`), every operand read in place.
//!
//! - Stem and patch merging: the patches of an output row are fixed-stride segments of the
//!   input (12 for the 4x4 stem on NCHW, 2 for a 2x2 merge on NHWC): one product per row, or,
//!   for weights larger than L2, the tile's patches copied into one product.
//! - Each block runs over tiles of whole image rows that stay in L2: the partial 3x3
//!   convolution (by Winograd's F(2x2, 3x3) in fp32 where cp >= 24; otherwise
//!   a row's inner pixels as nine shifted segments of the input, only the two edge pixels,
//!   whose windows reach into the padding, gathered) into a cp-wide scratch tile; fc1 reads
//!   that and the untouched channels as two segments, with bias + activation as its
//!   epilogue; fc2 adds the residual in its epilogue, straight into the output map.
//! - With at least as many images as threads, each thread of rayon's pool runs whole images
//!   on its own, in groups whose maps stay in L3 (`blocking::images_per_group`); otherwise
//!   the calling thread and a team of helpers (`team.rs`) share each layer's tiles. Either
//!   way there is one level of parallelism and each product is single-threaded.
//! - Activation buffers are kept between forward passes.
//! - The bf16 engine (`new_bf16`) runs the body's products on bf16 operands: AMX tiles where
//!   the CPU has them, otherwise AVX512-BF16 in the same register tiles as fp32. Its maps
//!   between layers are bf16 too (as OpenVINO's are), written by each product's epilogue and
//!   read in place by the next; sums, bias, activation and residual add are fp32 in
//!   registers, rounded once on the store. Where a block's channel counts are odd (a bf16
//!   segment is whole pairs) the maps stay fp32 and each product converts its operand.
//! - The int8 engine (`new_int8`) is the bf16 engine with each block's fc1 and fc2 on u8 x s8
//!   operands (AVX512-VNNI): a tile's bf16 rows quantised per tensor, to ranges a bf16 pass
//!   over calibration images found, into one u8 operand; the epilogue makes the i32 sums
//!   real values again before bias, activation and residual.
//!
//! Where things are: `pack.rs` lays the folded weights out for the kernels, `schedule.rs`
//! splits the work into tiles and threads, `team.rs` runs shared tiles on the calling thread
//! and its helpers, `graph.rs` is the network as a sequence of those products,
//! `direct_conv.rs` the partial convolution without Winograd, `profile.rs` the time per layer
//! group that `bench --profile` prints. The kernels themselves, the CPU detection
//! they dispatch on and the blocking constants are the `fasternet-kernels` crate
//! (`crates/kernels`).

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

mod direct_conv;
mod graph;
mod pack;
mod profile;
mod schedule;
mod team;

use std::sync::Mutex;

use candle_core::Tensor;
#[cfg(target_arch = "x86_64")]
pub use fasternet_kernels::amx_available;
use fasternet_kernels::{Activation, Kernels, Weights};

use super::weights::FasterNetWeights;
use super::{ModelError, ModelOutput};
use pack::{ColumnParts, Dense, Int8Block, Range, Stage};
pub use profile::LayerProfile;
use schedule::Buffers;
use team::Team;

impl From<super::Activation> for Activation {
    fn from(act: super::Activation) -> Self {
        match act {
            super::Activation::Gelu => Self::Gelu,
            super::Activation::Relu => Self::Relu,
        }
    }
}

pub struct FastEngine {
    /// The kernels of every product but the stem's.
    kernels: Kernels,
    act: Activation,
    stem: Dense,
    stages: Vec<Stage>,
    /// dim3 x feature_dim, no bias (zeros)
    head: ColumnParts,
    classifier: ColumnParts,
    /// Whether the maps between layers are bf16 (`graph.rs`): bf16 weights and even channel
    /// counts (a bf16 segment is whole pairs).
    bf16_maps: bool,
    /// Activation buffers, one set per concurrent pass, kept between calls.
    buffers: Mutex<Vec<Buffers>>,
    /// What a pass reads of the weights (stem, merges, blocks, head, classifier), in bytes:
    /// whether a thread's images run in groups (`images_per_group`).
    weight_bytes: usize,
    /// The helper threads that share the tiles of a batch smaller than the thread count,
    /// started by the first such pass.
    team: Mutex<Option<Team>>,
    profile: LayerProfile,
}

impl FastEngine {
    pub fn new(w: &FasterNetWeights) -> Result<Self, ModelError> {
        Self::with_kernels(w, Kernels::detect())
    }

    /// The products on bf16 operands (fp32 accumulation, bf16 maps between layers), on AMX
    /// tiles where the CPU has them. The stem (2% of the work, and its 4-wide input segments
    /// cost more to convert than they save) multiplies in fp32 and rounds its output. The head
    /// and the classifier are under 1% of the work but not of the time: at small batches they
    /// stream their weights (7.7 MB in fp32 for ImageNet) once per pass and thread, which bf16
    /// halves.
    pub fn new_bf16(w: &FasterNetWeights) -> Result<Self, ModelError> {
        let kernels = Kernels::detect_bf16()
            .ok_or_else(|| ModelError::Config("the fast-bf16 engine needs a CPU with AVX512-BF16; this one has none (use the fast engine)".into()))?;
        Self::with_kernels(w, kernels)
    }

    /// The bf16 engine with every block's fc1 and fc2 (85-90% of the work) on int8 operands
    /// (AVX512-VNNI): their inputs quantised per tensor to u8 over the range each takes on the
    /// `calibration` images in a bf16 pass (smallest to largest value; read 8 at a time), the
    /// weights per output channel to s8. The stem, merges, partial convolutions and head stay
    /// bf16.
    pub fn new_int8(
        w: &FasterNetWeights,
        calibration: impl IntoIterator<Item = Result<Tensor, ModelError>>,
    ) -> Result<Self, ModelError> {
        let kernels = Kernels::detect_int8().ok_or_else(|| {
            ModelError::Config("the fast-int8 engine needs a CPU with AVX512-VNNI and AVX512-BF16; this one lacks them (use fast or fast-bf16)".into())
        })?;
        let mut engine = Self::with_kernels(w, kernels)?;
        if !engine.bf16_maps {
            return Err(ModelError::Config(
                "the fast-int8 engine needs even channel counts (bf16 maps)".into(),
            ));
        }
        for b in engine.stages.iter_mut().flat_map(|s| &mut s.blocks) {
            b.seen = Some(Mutex::new([Range::EMPTY; 2]));
        }
        let (mut calibration, mut seen) = (calibration.into_iter(), 0);
        loop {
            let images = calibration.by_ref().take(8).collect::<Result<Vec<_>, _>>()?;
            if images.is_empty() {
                break;
            }
            engine.forward_each(&images)?;
            seen += images.len();
        }
        if seen == 0 {
            return Err(ModelError::Config("the fast-int8 engine needs calibration images".into()));
        }
        let weights = w.stages.iter().flat_map(|s| &s.blocks);
        for (b, bw) in engine.stages.iter_mut().flat_map(|s| &mut s.blocks).zip(weights) {
            let seen = b.seen.take().expect("set above");
            let seen = seen.into_inner().unwrap_or_else(|e| e.into_inner());
            b.int8 = Some(Int8Block::new(bw, seen, kernels)?);
            // The int8 products replace the bf16 ones, whose panels (T2: 30 MB) go.
            b.fc1 = Weights::new(0, 0, Vec::new(), kernels);
            b.fc2 = Weights::new(0, 0, Vec::new(), kernels);
        }
        Ok(engine)
    }

    /// Which kernels run the products (all but the stem's), e.g. "AMX bf16 tiles".
    pub fn kernels(&self) -> &'static str {
        self.kernels.name()
    }

    /// Wall time per layer group, once started.
    pub fn profile(&self) -> &LayerProfile {
        &self.profile
    }

    /// `images`: each (3, H, W) f32 of one shape, already checked by the caller. Read where they
    /// lie: stacking a batch of 16 at 224 would copy 9.6 MB on the calling thread while the
    /// compute threads wait.
    pub fn forward_each(&self, images: &[Tensor]) -> Result<ModelOutput, ModelError> {
        let (c, h, w) =
            images.first().ok_or_else(|| ModelError::Input("no images".into()))?.dims3()?;
        let images = images.iter().map(|x| x.contiguous()).collect::<Result<Vec<_>, _>>()?;
        let storages: Vec<_> = images.iter().map(|x| x.storage_and_layout()).collect();
        let slices = storages
            .iter()
            .map(|(storage, layout)| Ok(&cpu_f32(storage)?[layout.start_offset()..][..c * h * w]))
            .collect::<Result<Vec<_>, ModelError>>()?;
        self.forward_slices(&slices, (c, h, w))
    }
}

/// The f32 data of a CPU tensor's storage.
fn cpu_f32(storage: &candle_core::Storage) -> Result<&[f32], ModelError> {
    match storage {
        candle_core::Storage::Cpu(cpu) => Ok(cpu.as_slice::<f32>()?),
        _ => Err(ModelError::Input("the fast engine runs on CPU tensors".into())),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::{FasterNetConfig, Variant};

    /// `got` against `want` on T0 and T2 with two threads, so that every split runs: tiles
    /// shared by both threads (batch 1), whole images per thread plus a shared remainder
    /// (batch 3), and only whole images (batch 4 and 2); 32x45 also gives 1-pixel-wide maps in
    /// the last stage, 144x256 a thread's stage-3 tile of 144 pixels, more than one product of
    /// gathered patches (`GATHERED_PATCH_PIXELS`). Logits may differ by `tolerance` times their
    /// scale.
    fn engines_agree_for_every_split(got: Kernels, want: Kernels, tolerance: f32) {
        let engine = |kernels| move |w: &_| FastEngine::with_kernels(w, kernels).unwrap();
        engines_agree_for_every_split_as(engine(got), engine(want), tolerance)
    }

    /// As `engines_agree_for_every_split`, for engines that `got` and `want` make.
    fn engines_agree_for_every_split_as(
        got: impl Fn(&FasterNetWeights) -> FastEngine,
        want: impl Fn(&FasterNetWeights) -> FastEngine,
        tolerance: f32,
    ) {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for variant in [Variant::T0, Variant::T2] {
            let weights =
                FasterNetWeights::random(&FasterNetConfig::preset(variant, 10), 7).unwrap();
            let (engine, reference) = (got(&weights), want(&weights));
            for (b, h, w) in [(1, 64, 64), (3, 37, 70), (4, 32, 45), (2, 144, 256)] {
                let x = Tensor::randn(0f32, 1.0, (b, 3, h, w), &Device::Cpu).unwrap();
                let images: Vec<Tensor> = (0..b).map(|i| x.get(i).unwrap()).collect();
                let (out, expected) = pool.install(|| {
                    (
                        engine.forward_each(&images).unwrap(),
                        reference.forward_each(&images).unwrap(),
                    )
                });
                let logits =
                    |o: ModelOutput| o.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let (out, expected) = (logits(out), logits(expected));
                let scale = expected.iter().fold(1f32, |m, v| m.max(v.abs()));
                let diff = out.iter().zip(&expected).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    diff <= tolerance * scale,
                    "{} {variant} {b}x{h}x{w}: {diff} (scale {scale})",
                    engine.kernels()
                );
            }
        }
    }

    /// A thread's images run in groups (`images_per_group`) against the reference engine:
    /// T0 at 224 in groups of 4, so that two threads' 5 images each run as 4 + 1; T1 and T2
    /// (fp32 weights of 30 and 60 MB) in one group.
    #[test]
    fn images_run_in_groups_match_the_reference() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let weights =
            FasterNetWeights::random(&FasterNetConfig::preset(Variant::T0, 1000), 3).unwrap();
        let engine = FastEngine::with_kernels(&weights, Kernels::detect()).unwrap();
        assert_eq!(engine.images_per_group(224, 224), 4, "{} weight bytes", engine.weight_bytes);
        for variant in [Variant::T1, Variant::T2] {
            let weights =
                FasterNetWeights::random(&FasterNetConfig::preset(variant, 1000), 3).unwrap();
            let engine = FastEngine::with_kernels(&weights, Kernels::detect()).unwrap();
            assert_eq!(
                engine.images_per_group(224, 224),
                usize::MAX,
                "{variant}: {} weight bytes",
                engine.weight_bytes
            );
        }
        let reference =
            crate::model::FasterNet::with_engine(weights, crate::model::Engine::Reference).unwrap();
        let x = Tensor::randn(0f32, 1.0, (10, 3, 224, 224), &Device::Cpu).unwrap();
        let images: Vec<Tensor> = (0..10).map(|i| x.get(i).unwrap()).collect();
        let got = pool.install(|| engine.forward_each(&images).unwrap());
        let want = reference.forward(&x).unwrap();
        for (got, want) in [(got.logits, want.logits), (got.features, want.features)] {
            let (got, want) = (got.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
            let scale = want.iter().flatten().fold(1f32, |m, v| m.max(v.abs()));
            for (i, (got, want)) in got.iter().zip(&want).enumerate() {
                let diff = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff <= 1e-4 * scale, "image {i}: {diff} (scale {scale})");
            }
        }
    }

    /// Every fp32 kernel set this CPU runs (the AVX-512 and AVX2 microkernels where present)
    /// against the portable ones.
    #[test]
    fn portable_and_detected_kernels_agree_for_every_split() {
        for kernels in Kernels::all_fp32() {
            engines_agree_for_every_split(kernels, Kernels::portable(), 1e-4);
        }
    }

    /// Every bf16 kernel set this CPU runs against fp32, within bf16's error (3% of the
    /// logits' scale, as in tests/model_parity.rs). On an AMX CPU this also covers the AVX-512
    /// bf16 kernels, which the engine then does not pick.
    #[test]
    fn bf16_kernels_stay_close_to_fp32_for_every_split() {
        for kernels in Kernels::all_bf16() {
            engines_agree_for_every_split(kernels, Kernels::detect(), 3e-2);
        }
    }

    /// The int8 engine (calibrated on eight other random images) against fp32, within int8's
    /// error: 15% of the logits' scale (measured: 1-7%, against bf16's 0.5-1.4%).
    #[test]
    fn int8_engine_stays_close_to_fp32_for_every_split() {
        if Kernels::detect_int8().is_none() {
            return eprintln!("skipped: this CPU has no AVX512-VNNI");
        }
        let int8 = |w: &_| {
            let images = (0..8).map(|_| Ok(Tensor::randn(0f32, 1.0, (3, 64, 64), &Device::Cpu)?));
            FastEngine::new_int8(w, images).unwrap()
        };
        let fp32 = |w: &_| FastEngine::with_kernels(w, Kernels::detect()).unwrap();
        engines_agree_for_every_split_as(int8, fp32, 0.15);
    }

    /// The same for the bf16 engine on fp32 maps (its products converting their operands), as
    /// it runs where a block's channel counts are odd.
    #[test]
    fn bf16_kernels_on_fp32_maps_stay_close_to_fp32_for_every_split() {
        for kernels in Kernels::all_bf16() {
            let on_fp32_maps = move |w: &_| {
                let engine = FastEngine::with_kernels(w, kernels).unwrap();
                assert!(engine.bf16_maps, "{}: even channel counts", engine.kernels());
                FastEngine { bf16_maps: false, ..engine }
            };
            let fp32 = |w: &_| FastEngine::with_kernels(w, Kernels::detect()).unwrap();
            engines_agree_for_every_split_as(on_fp32_maps, fp32, 3e-2);
        }
    }
}
