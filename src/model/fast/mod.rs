//! The fast CPU path: the same folded weights as the reference, computed on NHWC activations.
//!
//! - Stem and patch merging: non-overlapping patches gathered into rows, one GEMM each.
//! - Each block runs over tiles of pixels that stay in L2: the partial 3x3 convolution
//!   (im2col of the first dim/4 channels + GEMM) writes its channels in place into a copy of
//!   the input tile (nothing is concatenated), fc1 is one GEMM over that tile, bias +
//!   activation run in cache, and fc2 accumulates onto the input tile (the residual).
//! - Tiles run in parallel on rayon's pool; each GEMM inside a tile is single-threaded, so
//!   there is one level of parallelism and no spinning barrier between ops.
//! - Activation buffers are kept between forward passes.

mod kernels;

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::weights::{BlockWeights, FasterNetWeights, FoldedConv};
use super::{Activation, ModelError, ModelOutput};
use kernels::matmul;

/// A dense layer as GEMM operands: `w` is (k x n) row-major.
struct Dense {
    k: usize,
    n: usize,
    w: Vec<f32>,
    bias: Vec<f32>,
}

struct Block {
    dim: usize,
    cp: usize,
    hidden: usize,
    /// (9 cp) x cp, rows ordered (di, dj, channel)
    partial: Vec<f32>,
    /// dim x hidden
    fc1: Vec<f32>,
    fc1_bias: Vec<f32>,
    /// hidden x dim
    fc2: Vec<f32>,
}

struct Stage {
    merge: Option<Dense>,
    blocks: Vec<Block>,
}

pub struct FastEngine {
    act: Activation,
    stem: Dense,
    stages: Vec<Stage>,
    /// dim3 x feature_dim
    head: Vec<f32>,
    classifier: Dense,
    /// Ping-pong activation buffers, kept between calls.
    buffers: Mutex<[Vec<f32>; 2]>,
}

/// Splits `rows` into tiles: small enough for a tile's working set (`width` floats per row)
/// to stay in L2, at least 16 rows so each GEMM call has work, and a multiple of the thread
/// count so that no thread idles while another finishes an extra tile.
fn tiles(rows: usize, width: usize) -> Vec<Range<usize>> {
    const TILE_FLOATS: usize = 96 * 1024;
    let threads = rayon::current_num_threads().max(1);
    let max_rows = (TILE_FLOATS / width.max(1)).max(16);
    let count = rows.div_ceil(max_rows).div_ceil(threads) * threads;
    let count = count.min(rows.div_ceil(16)).max(1);
    let t = rows.div_ceil(count);
    (0..rows.div_ceil(t)).map(|i| i * t..((i + 1) * t).min(rows)).collect()
}

thread_local! {
    /// Per-thread tile scratch: gathered patches and the hidden activations.
    static SCRATCH: RefCell<[Vec<f32>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
}

/// Raw output pointer shared by tiles that write disjoint rows.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

fn grow(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>, ModelError> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// (out, in, kh, kw) -> ((di, dj, in) x out) for patches gathered from NHWC maps.
fn conv_nhwc_matrix(w: &Tensor) -> Result<Vec<f32>, ModelError> {
    Ok(to_vec(&w.permute((2, 3, 1, 0))?.contiguous()?)?)
}

/// (out, in, ...) -> (in x out).
fn transpose(w: &Tensor) -> Result<Vec<f32>, ModelError> {
    let w = w.flatten_from(1)?;
    to_vec(&w.t()?.contiguous()?)
}

impl FastEngine {
    pub fn new(w: &FasterNetWeights) -> Result<Self, ModelError> {
        let dense = |conv: &FoldedConv, nhwc: bool| -> Result<Dense, ModelError> {
            let (n, cin, kh, kw) = conv.weight.dims4()?;
            let matrix = if nhwc { conv_nhwc_matrix(&conv.weight)? } else { transpose(&conv.weight)? };
            Ok(Dense { k: cin * kh * kw, n, w: matrix, bias: to_vec(&conv.bias)? })
        };
        let block = |b: &BlockWeights| -> Result<Block, ModelError> {
            let (hidden, cp, _, _) = b.fc1_mixed.dims4()?;
            let dim = b.fc2.dim(0)?;
            Ok(Block {
                dim,
                cp,
                hidden,
                partial: conv_nhwc_matrix(&b.partial_conv)?,
                // fc1 as one GEMM over the tile whose first cp channels the partial
                // convolution overwrote in place.
                fc1: transpose(&Tensor::cat(&[&b.fc1_mixed, &b.fc1_untouched], 1)?)?,
                fc1_bias: to_vec(&b.fc1_bias)?,
                fc2: transpose(&b.fc2)?,
            })
        };
        let stages = w
            .stages
            .iter()
            .map(|s| {
                Ok(Stage {
                    merge: s.downsample.as_ref().map(|d| dense(d, true)).transpose()?,
                    blocks: s.blocks.iter().map(block).collect::<Result<_, ModelError>>()?,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        let (classes, features) = w.classifier_weight.dims2()?;
        Ok(Self {
            act: w.config.act,
            stem: dense(&w.stem, false)?,
            stages,
            head: transpose(&w.conv_head)?,
            classifier: Dense { k: features, n: classes, w: transpose(&w.classifier_weight)?, bias: to_vec(&w.classifier_bias)? },
            buffers: Mutex::new([Vec::new(), Vec::new()]),
        })
    }

    /// `x`: (batch, 3, H, W) f32, already checked by the caller.
    pub fn forward(&self, x: &Tensor) -> Result<ModelOutput, ModelError> {
        let (batch, c, in_h, in_w) = x.dims4()?;
        let input = to_vec(x)?;
        let mut guard = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        let [a, b] = &mut *guard;
        // Stem: 4x4 stride-4 patches straight from the NCHW input.
        let (mut h, mut w) = (in_h / 4, in_w / 4);
        let mut rows = batch * h * w;
        let stem = &self.stem;
        self.dense_rows(grow(a, rows * stem.n), rows, stem, |r, col| kernels::im2col_patches_nchw(&input, c, in_h, in_w, 4, r, col));
        let (mut cur, mut next) = (a, b);
        for stage in &self.stages {
            if let Some(m) = &stage.merge {
                let cin = m.k / 4;
                let src: &[f32] = cur;
                let (ih, iw) = (h, w);
                h /= 2;
                w /= 2;
                rows = batch * h * w;
                self.dense_rows(grow(next, rows * m.n), rows, m, |r, col| kernels::im2col_patches_nhwc(src, ih, iw, cin, 2, r, col));
                std::mem::swap(&mut cur, &mut next);
            }
            for blk in &stage.blocks {
                self.block(blk, &cur[..rows * blk.dim], grow(next, rows * blk.dim), h, w);
                std::mem::swap(&mut cur, &mut next);
            }
        }
        self.head(&cur[..rows * self.head.len() / self.classifier.k], batch, h * w)
    }

    /// out (rows x n) = gather(rows) @ w + bias, tiles in parallel.
    fn dense_rows(&self, out: &mut [f32], rows: usize, d: &Dense, gather: impl Fn(Range<usize>, &mut [f32]) + Sync) {
        let out_ptr = Out(out.as_mut_ptr());
        tiles(rows, d.k + d.n).into_par_iter().for_each(|r| {
            SCRATCH.with_borrow_mut(|[col, _]| {
                let col = grow(col, r.len() * d.k);
                gather(r.clone(), col);
                let out_ptr = out_ptr;
                // SAFETY: tiles are disjoint row ranges of `out`.
                let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.0.add(r.start * d.n), r.len() * d.n) };
                unsafe { matmul(r.len(), d.n, d.k, dst.as_mut_ptr(), d.n, false, col.as_ptr(), d.k, d.w.as_ptr()) };
                kernels::bias_act(dst, &d.bias, None);
            })
        });
    }

    /// out = x + fc2(act(fc1([pconv(x[:, :cp]), x[:, cp:]]))) over tiles of pixels. The output
    /// tile starts as a copy of the input tile; the partial convolution writes its cp channels
    /// into it (the spatial-mixing output), fc1 reads it whole, then the cp channels are restored
    /// so that fc2 accumulates onto the original input (the residual).
    fn block(&self, b: &Block, x: &[f32], out: &mut [f32], h: usize, w: usize) {
        let rows = x.len() / b.dim;
        let out_ptr = Out(out.as_mut_ptr());
        let act = self.act;
        tiles(rows, b.hidden + 2 * b.dim + 9 * b.cp).into_par_iter().for_each(|r| {
            SCRATCH.with_borrow_mut(|[col, hidden]| {
                let n = r.len();
                let col = grow(col, n * 9 * b.cp);
                let hidden = grow(hidden, n * b.hidden);
                kernels::im2col_3x3(x, h, w, b.dim, b.cp, r.clone(), col);
                let x_tile = &x[r.start * b.dim..r.end * b.dim];
                let out_ptr = out_ptr;
                // SAFETY: tiles are disjoint row ranges of `out`; x and out never alias.
                let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.0.add(r.start * b.dim), n * b.dim) };
                dst.copy_from_slice(x_tile);
                unsafe {
                    matmul(n, b.cp, 9 * b.cp, dst.as_mut_ptr(), b.dim, false, col.as_ptr(), 9 * b.cp, b.partial.as_ptr());
                    matmul(n, b.hidden, b.dim, hidden.as_mut_ptr(), b.hidden, false, dst.as_ptr(), b.dim, b.fc1.as_ptr());
                }
                kernels::bias_act(hidden, &b.fc1_bias, Some(act));
                for (o, i) in dst.chunks_exact_mut(b.dim).zip(x_tile.chunks_exact(b.dim)) {
                    o[..b.cp].copy_from_slice(&i[..b.cp]);
                }
                unsafe { matmul(n, b.dim, b.hidden, dst.as_mut_ptr(), b.dim, true, hidden.as_ptr(), b.hidden, b.fc2.as_ptr()) };
            })
        });
    }

    /// Global average pool, conv_head + activation, classifier.
    fn head(&self, x: &[f32], batch: usize, pixels: usize) -> Result<ModelOutput, ModelError> {
        let c = x.len() / (batch * pixels);
        let f = self.classifier.k;
        let mut pooled = vec![0f32; batch * c];
        for (b, p) in pooled.chunks_exact_mut(c).enumerate() {
            for row in x[b * pixels * c..(b + 1) * pixels * c].chunks_exact(c) {
                p.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            p.iter_mut().for_each(|s| *s /= pixels as f32);
        }
        let mut features = vec![0f32; batch * f];
        unsafe { matmul(batch, f, c, features.as_mut_ptr(), f, false, pooled.as_ptr(), c, self.head.as_ptr()) };
        kernels::bias_act(&mut features, &vec![0.0; f], Some(self.act));
        let k = self.classifier.n;
        let mut logits = vec![0f32; batch * k];
        unsafe { matmul(batch, k, f, logits.as_mut_ptr(), k, false, features.as_ptr(), f, self.classifier.w.as_ptr()) };
        kernels::bias_act(&mut logits, &self.classifier.bias, None);
        Ok(ModelOutput {
            logits: Tensor::from_vec(logits, (batch, k), &Device::Cpu)?,
            features: Tensor::from_vec(features, (batch, f), &Device::Cpu)?,
        })
    }
}
