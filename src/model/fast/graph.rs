//! The network as a sequence of products: stem, stages of merges and blocks, head.

use fasternet_kernels::blocking::{
    gathers_patches, min_rows_for, HEAD_PART_COLUMNS, PREFETCH_ROWS_AHEAD,
};
use fasternet_kernels::winograd::{self, Winograd};
use fasternet_kernels::{
    grow, matmul, matmul_bf16, matmul_to_bf16, Activation, Epilogue, Segment, SegmentBf16,
};

use super::direct_conv::{partial_conv_direct, partial_conv_gathered};
use super::pack::{Block, ColumnParts, Dense};
use super::profile::Layer;
use super::schedule::{for_each_tile, tiles, Out, Workers, HIDDEN_BF16, SCRATCH};
use super::FastEngine;

impl FastEngine {
    /// The network on CHW images `input`, tiles run by `workers`.
    pub(super) fn forward_images(
        &self,
        input: &[&[f32]],
        (c, in_h, in_w): (usize, usize, usize),
        workers: Workers,
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
        // Running whole images of its own, this thread is one of the pool's threads at work.
        let concurrent = if workers.threads == 1 { rayon::current_num_threads() } else { 1 };
        let profile = &self.profile;
        profile.time(Layer::Stem, concurrent, || {
            self.strided_conv(
                grow(&mut a, rows * stem.w.n),
                batch * h,
                w,
                stem,
                workers,
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
            )
        });
        let (mut cur, mut next) = (&mut a, &mut b);
        for (index, stage) in self.stages.iter().enumerate() {
            if let Some(m) = &stage.merge {
                // 2x2 stride-2 patches of the NHWC map: one segment (two pixels) per patch row.
                let cin = m.w.k / 4;
                let src: &[f32] = cur;
                let (ih, iw) = (h, w);
                h /= 2;
                w /= 2;
                rows = batch * h * w;
                profile.time(Layer::Merge(index), concurrent, || {
                    self.strided_conv(
                        grow(next, rows * m.w.n),
                        batch * h,
                        w,
                        m,
                        workers,
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
                    )
                });
                std::mem::swap(&mut cur, &mut next);
            }
            profile.time(Layer::Blocks(index), concurrent, || {
                for blk in &stage.blocks {
                    self.block(
                        blk,
                        &cur[..rows * blk.dim],
                        grow(next, rows * blk.dim),
                        h,
                        w,
                        workers,
                    );
                    std::mem::swap(&mut cur, &mut next);
                }
            });
        }
        profile.time(Layer::Head, concurrent, || {
            self.head(&cur[..rows * self.head.k], batch, h * w, features, logits, workers)
        });
        self.buffers.lock().unwrap_or_else(|e| e.into_inner()).push([a, b]);
    }

    /// A strided, non-overlapping convolution (the stem, the merges): out (image_rows * w_out
    /// x n) = A @ w + bias, where `segments(row, list)` lists where the patches of output image
    /// row `row` are in the input (consecutive output pixels are a fixed stride apart there).
    ///
    /// Small weights: one product per output row, its patches read in place (a later row's
    /// asked for ahead: `PREFETCH_ROWS_AHEAD`). Weights larger than L2 are fetched from L3
    /// again by every product, which per row means once per few pixels (T2's last merge: 4.7
    /// MB for 7); such convolutions (and every one on the AVX2 kernels: `gathers_patches`)
    /// copy a tile's patches into one matrix (k floats per pixel, against k n multiply-adds)
    /// for one product per tile, and take tiles of at least as many floats as the weights, or
    /// an equal share of the rows where threads share them, as the blocks do.
    fn strided_conv(
        &self,
        out: &mut [f32],
        image_rows: usize,
        w_out: usize,
        d: &Dense,
        workers: Workers,
        segments: impl Fn(usize, &mut Vec<Segment>) + Sync,
    ) {
        let (k, n) = (d.w.k, d.w.n);
        let out_ptr = Out(out.as_mut_ptr());
        let gather = gathers_patches(self.kernels, k * n);
        let row_floats = w_out * (k + n);
        let min_rows = if gather { (k * n).div_ceil(row_floats) } else { 1 }
            .min(image_rows / workers.threads)
            .max(min_rows_for(w_out));
        for_each_tile(workers, tiles(image_rows, row_floats, min_rows, workers.threads), |g| {
            let mut list = Vec::new();
            if !gather {
                for row in g.clone() {
                    if row + PREFETCH_ROWS_AHEAD < g.end {
                        list.clear();
                        segments(row + PREFETCH_ROWS_AHEAD, &mut list);
                        list.iter().for_each(|s| s.prefetch(w_out));
                    }
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
    fn block(&self, b: &Block, x: &[f32], out: &mut [f32], h: usize, w: usize, workers: Workers) {
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
            workers.threads == 1
                || (images * h.div_ceil(winograd::ROWS)).is_multiple_of(workers.threads)
        });
        // Each tile reads all of the block's weights: in late stages (T2's last: 10.8 MB of
        // weights, 7-pixel rows) they outgrow L2 and are fetched again from L3 for every tile.
        // So a tile takes at least as many floats of rows as the block has weights, or, where
        // the threads share the rows, an equal share of them (T2 at batch 1: two tiles of
        // stage 3's 14 rows, not four).
        let partial = winograd.map_or(b.partial.k * b.partial.n, Winograd::weight_floats);
        let weights = partial + b.fc1.k * b.fc1.n + b.fc2.k * b.fc2.n;
        let min_rows =
            weights.div_ceil(row_floats).min(images * h / workers.threads).max(min_rows_for(w));
        // Tiles are made of groups of whole image rows: pairs for Winograd's 2x2 output blocks.
        let group = if winograd.is_some() { winograd::ROWS } else { 1 };
        let groups_per_image = h.div_ceil(group);
        let first_row = |g: usize| g / groups_per_image * h + g % groups_per_image * group;
        let tiles = tiles(
            images * groups_per_image,
            group * row_floats,
            min_rows.div_ceil(group),
            workers.threads,
        );
        for_each_tile(workers, tiles, |groups| {
            let g = first_row(groups.start)..first_row(groups.end);
            SCRATCH.with_borrow_mut(|[col, edge_out, mixed, hidden]| {
                let n = g.len() * w;
                let mixed = grow(mixed, n * cp);
                match winograd {
                    Some(winograd) => winograd.run(x, (h, w, dim), g.clone(), mixed),
                    None if b.gather_patches => {
                        partial_conv_gathered(b, x, (h, w), g.clone(), mixed)
                    }
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
                    let out = out_ptr.at(g.start * w * dim);
                    let residual = Epilogue::Residual(x_tile);
                    if b.fc2.takes_bf16_segments() {
                        // fc2 would round the hidden activations to bf16: fc1 writes them so.
                        HIDDEN_BF16.with_borrow_mut(|hidden| {
                            let hidden = grow(hidden, n * b.hidden);
                            let (ptr, stride, k) = (hidden.as_mut_ptr(), b.hidden, b.hidden);
                            matmul_to_bf16(n, &spatial_mixing, &b.fc1, ptr, stride, fc1_epilogue);
                            let hidden = [SegmentBf16 { ptr, stride, k }];
                            matmul_bf16(n, &hidden, &b.fc2, out, dim, residual);
                        });
                    } else {
                        let hidden = grow(hidden, n * b.hidden);
                        let (ptr, stride, k) = (hidden.as_mut_ptr(), b.hidden, b.hidden);
                        matmul(n, &spatial_mixing, &b.fc1, ptr, stride, fc1_epilogue);
                        matmul(n, &[Segment { ptr, stride, k }], &b.fc2, out, dim, residual);
                    }
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
        workers: Workers,
    ) {
        let c = x.len() / (batch * pixels);
        let mut pooled = vec![0f32; batch * c];
        for (b, p) in pooled.chunks_exact_mut(c).enumerate() {
            for row in x[b * pixels * c..(b + 1) * pixels * c].chunks_exact(c) {
                p.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            p.iter_mut().for_each(|s| *s /= pixels as f32);
        }
        dense_by_columns(&self.head, &pooled, features, Some(self.act), workers);
        dense_by_columns(&self.classifier, features, logits, None, workers);
    }
}

/// `out` = `a` @ `d` + bias, then `act`: each part of `d`'s columns one task of `workers`.
fn dense_by_columns(
    d: &ColumnParts,
    a: &[f32],
    out: &mut [f32],
    act: Option<Activation>,
    workers: Workers,
) {
    let rows = a.len() / d.k;
    assert_eq!(out.len(), rows * d.n, "output shape");
    let out = Out(out.as_mut_ptr());
    let parts = (0..d.parts.len()).map(|p| p..p + 1).collect();
    for_each_tile(workers, parts, |p| {
        let part = &d.parts[p.start];
        let a = [Segment { ptr: a.as_ptr(), stride: d.k, k: d.k }];
        // SAFETY: `a` holds `rows` rows of k; part p writes its columns, from
        // p * HEAD_PART_COLUMNS on, of `rows` rows of n, disjoint from every other part's.
        unsafe {
            let dst = out.at(p.start * HEAD_PART_COLUMNS);
            matmul(rows, &a, &part.w, dst, d.n, Epilogue::Bias(&part.bias, act));
        }
    });
}
