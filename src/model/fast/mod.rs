//! The fast CPU path: the same folded weights as the reference, computed on NHWC activations
//! (rows = pixels) as products with pre-packed weights (`gemm`), every operand read in place.
//!
//! - Stem and patch merging: the patches of an output row are fixed-stride segments of the
//!   input (12 for the 4x4 stem on NCHW, 2 for a 2x2 merge on NHWC): one product per row, or,
//!   for weights larger than L2, the tile's patches copied into one product.
//! - Each block runs over tiles of whole image rows that stay in L2: the partial 3x3
//!   convolution (by Winograd's F(2x2, 3x3) in fp32 where cp >= 24, `winograd.rs`; otherwise
//!   a row's inner pixels as nine shifted segments of the input, only the two edge pixels,
//!   whose windows reach into the padding, gathered) into a cp-wide scratch tile; fc1 reads
//!   that and the untouched channels as two segments, with bias + activation as its
//!   epilogue; fc2 adds the residual in its epilogue, straight into the output map.
//! - With at least as many images as threads, each thread runs whole images on its own;
//!   otherwise tiles run on rayon's pool. Either way there is one level of parallelism and
//!   each product is single-threaded.
//! - Activation buffers are kept between forward passes.
//! - The bf16 engine (`new_bf16`) runs the body's products on bf16 operands: AMX tiles where
//!   the CPU has them (`amx.rs`), otherwise AVX512-BF16 in the same register tiles as fp32.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
pub use amx::available as amx_available;
mod gemm;
mod kernels;
mod winograd;

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::weights::{BlockWeights, FasterNetWeights, FoldedConv};
use super::{Activation, ModelError, ModelOutput};
use gemm::{matmul, matmul_bf16, to_bf16_rows, Epilogue, Kernels, Segment, SegmentBf16, Weights};
use winograd::Winograd;

/// A dense layer: (k x n) weights and a bias.
struct Dense {
    w: Weights,
    bias: Vec<f32>,
}

struct Block {
    dim: usize,
    cp: usize,
    hidden: usize,
    /// (9 cp) x cp, rows ordered (di, dj, channel)
    partial: Weights,
    /// The same convolution by Winograd's F(2x2, 3x3) (fp32 on our AVX-512 kernels, cp >= 24),
    /// used instead of `partial` unless a split between threads would be uneven (`block`).
    winograd: Option<Winograd>,
    /// dim x hidden
    fc1: Weights,
    fc1_bias: Vec<f32>,
    /// hidden x dim
    fc2: Weights,
}

struct Stage {
    merge: Option<Dense>,
    blocks: Vec<Block>,
}

pub struct FastEngine {
    /// The kernels of the network body's products.
    kernels: Kernels,
    act: Activation,
    stem: Dense,
    stages: Vec<Stage>,
    /// dim3 x feature_dim, no bias (zeros)
    head: Dense,
    classifier: Dense,
    /// Ping-pong activation buffers, one pair per concurrent pass, kept between calls.
    buffers: Mutex<Vec<[Vec<f32>; 2]>>,
}

/// Splits `rows` into tiles: small enough for a tile's working set (`width` floats per row)
/// to stay in L2, at least `min_rows` rows so each product has work, and a multiple of the
/// thread count so that no thread idles while another finishes an extra tile. Sizes differ
/// by at most one row and the larger ones are spread out (14 rows in 4 tiles: 3, 4, 3, 4), so
/// that rayon's halving of the list gives every thread the same number of rows.
fn tiles(rows: usize, width: usize, min_rows: usize, threads: usize) -> Vec<Range<usize>> {
    const TILE_FLOATS: usize = 96 * 1024;
    let max_rows = (TILE_FLOATS / width.max(1)).max(min_rows);
    let count = rows.div_ceil(max_rows).div_ceil(threads) * threads;
    let count = count.min(rows / min_rows.max(1)).max(1);
    (0..count).map(|i| i * rows / count..(i + 1) * rows / count).collect()
}

/// Runs `f` on every tile: on rayon's pool when the tiles are for several threads.
fn for_each_tile(threads: usize, tiles: Vec<Range<usize>>, f: impl Fn(Range<usize>) + Sync + Send) {
    if threads > 1 {
        tiles.into_par_iter().for_each(f)
    } else {
        tiles.into_iter().for_each(f)
    }
}

thread_local! {
    /// Per-thread tile scratch: gathered patches (edge pixels, or a merge's) and the edge
    /// pixels' outputs, the partial convolution's output and the hidden activations.
    static SCRATCH: RefCell<[Vec<f32>; 4]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new()]) };
    /// AVX512-BF16 engine: the partial convolution's input channels of a tile and its
    /// neighbour rows.
    static SCRATCH_BF16: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// Raw output pointer shared by tiles that write disjoint rows.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The output `offset` floats in (a method, so closures capture the whole `Out`).
    unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

fn grow(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// The f32 data of a CPU tensor's storage.
fn cpu_f32(storage: &candle_core::Storage) -> Result<&[f32], ModelError> {
    match storage {
        candle_core::Storage::Cpu(cpu) => Ok(cpu.as_slice::<f32>()?),
        _ => Err(ModelError::Input("the fast engine runs on CPU tensors".into())),
    }
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
    let w = w.flatten_from(1)?;
    let (n, k) = w.dims2()?;
    Ok(Weights::new(k, n, to_vec(&w.t()?.contiguous()?)?, kernels))
}

impl FastEngine {
    pub fn new(w: &FasterNetWeights) -> Result<Self, ModelError> {
        Self::with_kernels(w, Kernels::detect())
    }

    /// The network body's products on bf16 operands (fp32 accumulation, fp32 activations
    /// between layers), on AMX tiles where the CPU has them. The stem (2% of the work, and its
    /// 4-wide input segments cost more to convert than they save), the head and the
    /// classifier (under 1%) stay fp32.
    pub fn new_bf16(w: &FasterNetWeights) -> Result<Self, ModelError> {
        let kernels = Kernels::detect_bf16()
            .ok_or_else(|| ModelError::Config("the fast-bf16 engine needs a CPU with AVX512-BF16; this one has none (use the fast engine)".into()))?;
        Self::with_kernels(w, kernels)
    }

    fn with_kernels(w: &FasterNetWeights, kernels: Kernels) -> Result<Self, ModelError> {
        let fp32 = if kernels.is_bf16() { Kernels::Avx512 } else { kernels };
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
            let winograd = if kernels == Kernels::Avx512 && cp >= winograd::MIN_CHANNELS {
                Some(Winograd::new(&to_vec(&b.partial_conv)?, cp, kernels))
            } else {
                None
            };
            Ok(Block {
                dim,
                cp,
                hidden,
                partial: conv_nhwc_matrix(&b.partial_conv, kernels)?,
                winograd,
                // fc1 as one product over [partial conv output, untouched channels].
                fc1: transpose(&Tensor::cat(&[&b.fc1_mixed, &b.fc1_untouched], 1)?, kernels)?,
                fc1_bias: to_vec(&b.fc1_bias)?,
                fc2: transpose(&b.fc2, kernels)?,
            })
        };
        let stages = w
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
        Ok(Self {
            kernels,
            act: w.config.act,
            stem: dense(&w.stem, false, fp32)?,
            stages,
            head: Dense { w: transpose(&w.conv_head, fp32)?, bias: vec![0.0; features] },
            classifier: Dense {
                w: transpose(&w.classifier_weight, fp32)?,
                bias: to_vec(&w.classifier_bias)?,
            },
            buffers: Mutex::new(Vec::new()),
        })
    }

    /// Which kernels run the network body's products, e.g. "AMX bf16 tiles".
    pub fn kernels(&self) -> &'static str {
        self.kernels.name()
    }

    /// `images`: each (3, H, W) f32 of one shape, already checked by the caller. Read where they
    /// lie: stacking a batch of 16 at 224 first copied 9.6 MB on the calling thread while the
    /// compute threads waited.
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

    /// With at least as many images as threads, each thread runs whole images on its own (no
    /// synchronisation between layers); the images left over, or a batch smaller than the
    /// thread count, are split into tiles that all threads share.
    fn forward_slices(
        &self,
        images: &[&[f32]],
        (c, in_h, in_w): (usize, usize, usize),
    ) -> Result<ModelOutput, ModelError> {
        let batch = images.len();
        let (f, k) = (self.head.w.n, self.classifier.w.n);
        let mut features = vec![0f32; batch * f];
        let mut logits = vec![0f32; batch * k];
        let threads = rayon::current_num_threads().max(1);
        let per_thread = if threads > 1 { batch / threads } else { 0 };
        let own = per_thread * threads;
        let (features_own, features_shared) = features.split_at_mut(own * f);
        let (logits_own, logits_shared) = logits.split_at_mut(own * k);
        if per_thread > 0 {
            images[..own]
                .par_chunks(per_thread)
                .zip(features_own.par_chunks_mut(per_thread * f))
                .zip(logits_own.par_chunks_mut(per_thread * k))
                .for_each(|((x, features), logits)| {
                    self.forward_images(x, (c, in_h, in_w), 1, features, logits)
                });
        }
        if own < batch {
            self.forward_images(
                &images[own..],
                (c, in_h, in_w),
                threads,
                features_shared,
                logits_shared,
            );
        }
        Ok(ModelOutput {
            logits: Tensor::from_vec(logits, (batch, k), &Device::Cpu)?,
            features: Tensor::from_vec(features, (batch, f), &Device::Cpu)?,
        })
    }

    /// The network on CHW images `input`, tiles spread over `threads` threads (1: this one).
    fn forward_images(
        &self,
        input: &[&[f32]],
        (c, in_h, in_w): (usize, usize, usize),
        threads: usize,
        features: &mut [f32],
        logits: &mut [f32],
    ) {
        let batch = input.len();
        let [mut a, mut b] =
            self.buffers.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        // Stem: 4x4 stride-4 patches straight from each image's CHW data, one segment per
        // (channel, row).
        let (mut h, mut w) = (in_h / 4, in_w / 4);
        let mut rows = batch * h * w;
        let stem = &self.stem;
        self.strided_conv(
            grow(&mut a, rows * stem.w.n),
            batch * h,
            w,
            stem,
            threads,
            |row, list| {
                let (b, i) = (row / h, row % h);
                for ch in 0..c {
                    for di in 0..4 {
                        list.push(Segment {
                            ptr: input[b][(ch * in_h + 4 * i + di) * in_w..].as_ptr(),
                            stride: 4,
                            k: 4,
                        });
                    }
                }
            },
        );
        let (mut cur, mut next) = (&mut a, &mut b);
        for stage in &self.stages {
            if let Some(m) = &stage.merge {
                // 2x2 stride-2 patches of the NHWC map: one segment (two pixels) per patch row.
                let cin = m.w.k / 4;
                let src: &[f32] = cur;
                let (ih, iw) = (h, w);
                h /= 2;
                w /= 2;
                rows = batch * h * w;
                self.strided_conv(
                    grow(next, rows * m.w.n),
                    batch * h,
                    w,
                    m,
                    threads,
                    |row, list| {
                        let (b, i) = (row / h, row % h);
                        for di in 0..2 {
                            list.push(Segment {
                                ptr: src[((b * ih + 2 * i + di) * iw) * cin..].as_ptr(),
                                stride: 2 * cin,
                                k: 2 * cin,
                            });
                        }
                    },
                );
                std::mem::swap(&mut cur, &mut next);
            }
            for blk in &stage.blocks {
                self.block(blk, &cur[..rows * blk.dim], grow(next, rows * blk.dim), h, w, threads);
                std::mem::swap(&mut cur, &mut next);
            }
        }
        self.head(&cur[..rows * self.head.w.k], batch, h * w, features, logits);
        self.buffers.lock().unwrap_or_else(|e| e.into_inner()).push([a, b]);
    }

    /// A strided, non-overlapping convolution (the stem, the merges): out (image_rows * w_out
    /// x n) = A @ w + bias, where `segments(row, list)` lists where the patches of output image
    /// row `row` are in the input (consecutive output pixels are a fixed stride apart there).
    ///
    /// Small weights: one product per output row, its patches read in place. Weights larger
    /// than L2 are fetched from L3 again by every product, which per row means once per few
    /// pixels (T2's last merge: 4.7 MB for 7); such convolutions copy a tile's patches into
    /// one matrix (k floats per pixel, against k n multiply-adds) for one product per tile, and
    /// a thread running its own images takes tiles of at least as many floats as the weights,
    /// as the blocks do.
    fn strided_conv(
        &self,
        out: &mut [f32],
        image_rows: usize,
        w_out: usize,
        d: &Dense,
        threads: usize,
        segments: impl Fn(usize, &mut Vec<Segment>) + Sync,
    ) {
        const GATHER_ABOVE_FLOATS: usize = 256 * 1024;
        let (k, n) = (d.w.k, d.w.n);
        let out_ptr = Out(out.as_mut_ptr());
        let gather = k * n > GATHER_ABOVE_FLOATS;
        let row_floats = w_out * (k + n);
        let min_rows = if gather && threads == 1 { (k * n).div_ceil(row_floats) } else { 1 }
            .max(16usize.div_ceil(w_out));
        for_each_tile(threads, tiles(image_rows, row_floats, min_rows, threads), |g| {
            let mut list = Vec::new();
            if !gather {
                for row in g {
                    list.clear();
                    segments(row, &mut list);
                    // SAFETY: tiles are disjoint row ranges of `out`; the caller's segments
                    // cover the row's w_out patches.
                    unsafe {
                        matmul(
                            w_out,
                            &list,
                            &d.w,
                            out_ptr.at(row * w_out * n),
                            n,
                            Epilogue::Bias(&d.bias, None),
                        )
                    };
                }
                return;
            }
            SCRATCH.with_borrow_mut(|[patches, ..]| {
                let patches = grow(patches, g.len() * w_out * k);
                for (row, patches) in g.clone().zip(patches.chunks_exact_mut(w_out * k)) {
                    list.clear();
                    segments(row, &mut list);
                    let mut k0 = 0;
                    for s in &list {
                        for (p, dst) in patches.chunks_exact_mut(k).enumerate() {
                            let dst = &mut dst[k0..k0 + s.k];
                            if s.ptr.is_null() {
                                dst.fill(0.0);
                            } else {
                                // SAFETY: the caller's segments cover the row's w_out patches.
                                dst.copy_from_slice(unsafe {
                                    std::slice::from_raw_parts(s.ptr.add(p * s.stride), s.k)
                                });
                            }
                        }
                        k0 += s.k;
                    }
                }
                let a = [Segment { ptr: patches.as_ptr(), stride: k, k }];
                // SAFETY: tiles are disjoint row ranges of `out`; `patches` holds the tile's.
                unsafe {
                    matmul(
                        g.len() * w_out,
                        &a,
                        &d.w,
                        out_ptr.at(g.start * w_out * n),
                        n,
                        Epilogue::Bias(&d.bias, None),
                    )
                };
            });
        });
    }

    /// out = x + fc2(act(fc1([pconv(x[:, :cp]), x[:, cp:]]))) over tiles of whole image rows:
    /// the partial convolution (`partial_conv_direct` or Winograd's) writes a scratch tile of
    /// cp channels; fc1 reads that and the untouched input channels as two segments of one
    /// product (nothing is concatenated); bias + activation are fc1's epilogue and the
    /// residual add is fc2's.
    fn block(&self, b: &Block, x: &[f32], out: &mut [f32], h: usize, w: usize, threads: usize) {
        let (dim, cp) = (b.dim, b.cp);
        let images = x.len() / (dim * h * w);
        let out_ptr = Out(out.as_mut_ptr());
        // fc2 rounds the bf16 engine's hidden activations to bf16: a GELU good to 1e-4 does.
        let bf16_gelu = self.act == Activation::Gelu && self.kernels.is_bf16();
        let act = self.act;
        let row_floats = w * (b.hidden + 2 * dim + cp);
        // Winograd's tiles are made of row pairs; where tiles shared by several threads would
        // then hold unequal work (batch 1 of T0: 14 rows are 7 pairs, split 3 + 4), the direct
        // convolution's single rows split evenly.
        let winograd = b.winograd.as_ref().filter(|_| {
            threads == 1 || (images * h.div_ceil(winograd::ROWS)).is_multiple_of(threads)
        });
        // A thread running its own images takes, per tile, at least as many floats of rows as
        // the block has weights: in late stages (T2's last: 10.8 MB of weights, 7-pixel rows)
        // the weights outgrow L2 and are fetched again from L3 for every tile. Tiles shared
        // by several threads stay small, for balance.
        let partial = winograd.map_or(b.partial.k * b.partial.n, Winograd::weight_floats);
        let weights = partial + b.fc1.k * b.fc1.n + b.fc2.k * b.fc2.n;
        let min_rows =
            if threads == 1 { weights.div_ceil(row_floats) } else { 1 }.max(16usize.div_ceil(w));
        // Tiles are made of groups of whole image rows: pairs for Winograd's 2x2 output blocks.
        let group = if winograd.is_some() { winograd::ROWS } else { 1 };
        let groups_per_image = h.div_ceil(group);
        let first_row = |g: usize| g / groups_per_image * h + g % groups_per_image * group;
        let tiles =
            tiles(images * groups_per_image, group * row_floats, min_rows.div_ceil(group), threads);
        for_each_tile(threads, tiles, |groups| {
            let g = first_row(groups.start)..first_row(groups.end);
            SCRATCH.with_borrow_mut(|[col, edge_out, mixed, hidden]| {
                let n = g.len() * w;
                let mixed = grow(mixed, n * cp);
                let hidden = grow(hidden, n * b.hidden);
                match winograd {
                    Some(winograd) => winograd.run(x, (h, w, dim), g.clone(), mixed),
                    None => partial_conv_direct(b, x, (h, w), g.clone(), [col, edge_out], mixed),
                }
                let x_tile = x[g.start * w * dim..].as_ptr();
                // SAFETY: tiles are disjoint row ranges of `out`; x and out never alias; the
                // scratch tiles cover the tile's rows.
                unsafe {
                    let spatial_mixing = [
                        Segment { ptr: mixed.as_ptr(), stride: cp, k: cp },
                        Segment { ptr: x_tile.add(cp), stride: dim, k: dim - cp },
                    ];
                    let fc1_epilogue = if bf16_gelu {
                        Epilogue::BiasGeluBf16(&b.fc1_bias)
                    } else {
                        Epilogue::Bias(&b.fc1_bias, Some(act))
                    };
                    matmul(n, &spatial_mixing, &b.fc1, hidden.as_mut_ptr(), b.hidden, fc1_epilogue);
                    let hidden = [Segment { ptr: hidden.as_ptr(), stride: b.hidden, k: b.hidden }];
                    matmul(
                        n,
                        &hidden,
                        &b.fc2,
                        out_ptr.at(g.start * w * dim),
                        dim,
                        Epilogue::Residual(x_tile),
                    );
                }
            })
        });
    }

    /// Global average pool, conv_head + activation, classifier.
    fn head(
        &self,
        x: &[f32],
        batch: usize,
        pixels: usize,
        features: &mut [f32],
        logits: &mut [f32],
    ) {
        let c = x.len() / (batch * pixels);
        let mut pooled = vec![0f32; batch * c];
        for (b, p) in pooled.chunks_exact_mut(c).enumerate() {
            for row in x[b * pixels * c..(b + 1) * pixels * c].chunks_exact(c) {
                p.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            p.iter_mut().for_each(|s| *s /= pixels as f32);
        }
        let (f, k) = (self.head.w.n, self.classifier.w.n);
        // SAFETY: the buffers hold `batch` rows of the stated widths.
        unsafe {
            matmul(
                batch,
                &[Segment { ptr: pooled.as_ptr(), stride: c, k: c }],
                &self.head.w,
                features.as_mut_ptr(),
                f,
                Epilogue::Bias(&self.head.bias, Some(self.act)),
            );
            let a = [Segment { ptr: features.as_ptr(), stride: f, k: f }];
            matmul(
                batch,
                &a,
                &self.classifier.w,
                logits.as_mut_ptr(),
                k,
                Epilogue::Bias(&self.classifier.bias, None),
            );
        }
    }
}

/// The partial convolution of global image rows `g` into `mixed` (rows x w pixels of cp
/// channels), directly: a row's inner pixels read the input as nine shifted segments (taps
/// above the first or below the last row are skipped); only the two edge pixels of each row,
/// whose windows reach into the zero padding, are gathered (im2col) into `col`, all of the
/// tile's in one product into `edge_out`. With AVX512-BF16 weights, the cp channels of the tile's
/// rows and their neighbours are converted once, for the nine taps to read as shifted segments
/// (AMX weights convert the nine taps into their own staging rows).
fn partial_conv_direct(
    b: &Block,
    x: &[f32],
    (h, w): (usize, usize),
    g: Range<usize>,
    [col, edge_out]: [&mut Vec<f32>; 2],
    mixed: &mut [f32],
) {
    let (dim, cp) = (b.dim, b.cp);
    let image_rows = x.len() / (dim * w);
    let edges: &[usize] = if w == 1 { &[0] } else { &[0, w - 1] };
    let edge_rows = g.len() * edges.len();
    let col = grow(col, edge_rows * 9 * cp);
    let edge_out = grow(edge_out, edge_rows * cp);
    // SAFETY: x and mixed never alias; the scratch tiles cover the tile's rows; a tap's segment
    // is skipped where its rows would leave the image.
    unsafe {
        let bf16_from = g.start.saturating_sub(1);
        let bf16_rows = (g.end + 1).min(image_rows) - bf16_from;
        let mut xb = Vec::new();
        if b.partial.takes_bf16_segments() && w > 2 && cp % 2 == 0 {
            xb = SCRATCH_BF16.take();
            xb.resize(xb.len().max(bf16_rows * w * cp), 0);
            to_bf16_rows(
                x.as_ptr().add(bf16_from * w * dim),
                dim,
                bf16_rows * w,
                cp,
                xb.as_mut_ptr(),
            );
        }
        for (t, row) in g.clone().enumerate() {
            let i = row % h;
            let outside = |di: usize| (i == 0 && di == 0) || (i == h - 1 && di == 2);
            let dst = mixed[(t * w + 1) * cp..].as_mut_ptr();
            if w > 2 && !xb.is_empty() {
                let taps: [SegmentBf16; 9] = std::array::from_fn(|tap| {
                    let (di, dj) = (tap / 3, tap % 3);
                    if outside(di) {
                        SegmentBf16::zeros(cp)
                    } else {
                        SegmentBf16 {
                            ptr: xb.as_ptr().add(((row + di - 1 - bf16_from) * w + dj) * cp),
                            stride: cp,
                            k: cp,
                        }
                    }
                });
                matmul_bf16(w - 2, &taps, &b.partial, dst, cp, Epilogue::Store);
            } else if w > 2 {
                let taps: [Segment; 9] = std::array::from_fn(|tap| {
                    let (di, dj) = (tap / 3, tap % 3);
                    if outside(di) {
                        Segment::zeros(cp)
                    } else {
                        Segment {
                            ptr: x.as_ptr().add(((row + di - 1) * w + dj) * dim),
                            stride: dim,
                            k: cp,
                        }
                    }
                });
                matmul(w - 2, &taps, &b.partial, dst, cp, Epilogue::Store);
            }
            kernels::im2col(x, h, w, dim, cp, row, edges, 3, &mut col[t * edges.len() * 9 * cp..]);
        }
        if !xb.is_empty() {
            SCRATCH_BF16.set(xb);
        }
        // The edge pixels of all the tile's rows in one product, then into place.
        let patches = [Segment { ptr: col.as_ptr(), stride: 9 * cp, k: 9 * cp }];
        matmul(edge_rows, &patches, &b.partial, edge_out.as_mut_ptr(), cp, Epilogue::Store);
    }
    for (t, out) in edge_out.chunks_exact(edges.len() * cp).enumerate() {
        for (&j, px) in edges.iter().zip(out.chunks_exact(cp)) {
            mixed[(t * w + j) * cp..(t * w + j + 1) * cp].copy_from_slice(px);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FasterNetConfig, Variant};

    #[test]
    fn tiles_cover_the_rows_in_near_equal_sizes_split_evenly_between_threads() {
        for (rows, width, min_rows, threads) in [
            (14, 15_232, 2, 2),
            (7, 15_232, 3, 2),
            (56, 15_232, 1, 1),
            (28, 1000, 2, 2),
            (5, 10, 16, 2),
            (3, 100_000, 1, 4),
        ] {
            let t = tiles(rows, width, min_rows, threads);
            let sizes: Vec<usize> = t.iter().map(|r| r.len()).collect();
            assert_eq!(t.first().unwrap().start, 0);
            assert!(
                t.windows(2).all(|p| p[0].end == p[1].start) && t.last().unwrap().end == rows,
                "{t:?}"
            );
            assert!(
                sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
                "{rows} rows: {sizes:?}"
            );
            assert!(
                sizes.iter().all(|&s| s >= min_rows.min(rows)),
                "{rows} rows, min {min_rows}: {sizes:?}"
            );
            if t.len().is_multiple_of(2) && threads == 2 {
                let half: usize = sizes[..t.len() / 2].iter().sum();
                assert!(half.abs_diff(rows - half) <= 1, "{rows} rows: {sizes:?}");
            }
        }
        assert_eq!(tiles(14, 15_232, 2, 2), [0..3, 3..7, 7..10, 10..14]);
    }

    /// `got` against `want` on T0 and T2 with two threads, so that every split runs: tiles
    /// shared by both threads (batch 1), whole images per thread plus a shared remainder
    /// (batch 3), and only whole images (batch 4); 32x45 also gives 1-pixel-wide maps in the
    /// last stage. Logits may differ by `tolerance` times their scale.
    fn engines_agree_for_every_split(got: Kernels, want: Kernels, tolerance: f32) {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for variant in [Variant::T0, Variant::T2] {
            let weights =
                FasterNetWeights::random(&FasterNetConfig::preset(variant, 10), 7).unwrap();
            let (engine, reference) = (
                FastEngine::with_kernels(&weights, got).unwrap(),
                FastEngine::with_kernels(&weights, want).unwrap(),
            );
            for (b, h, w) in [(1, 64, 64), (3, 37, 70), (4, 32, 45)] {
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
                    "{got:?} {variant} {b}x{h}x{w}: {diff} (scale {scale})"
                );
            }
        }
    }

    /// This CPU's fp32 kernels (the AVX-512 microkernel where present) against the portable ones.
    #[test]
    fn portable_and_detected_kernels_agree_for_every_split() {
        engines_agree_for_every_split(Kernels::detect(), Kernels::Portable, 1e-4);
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
}
