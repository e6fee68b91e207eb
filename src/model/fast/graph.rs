//! The network as a sequence of products: stem, stages of merges and blocks, head.

use std::cell::RefCell;
use std::ops::Range;

use fasternet_kernels::blocking::{gathers_patches, min_rows_for, HEAD_PART_COLUMNS};
use fasternet_kernels::winograd::{self, Winograd};
use fasternet_kernels::{
    grow, matmul, matmul_bf16, matmul_to_bf16, matmul_u8, quantize_bf16_rows, to_bf16_rows,
    Activation, Dst, Epilogue, Segment, SegmentBf16, Weights,
};

use super::direct_conv::{
    partial_conv_direct, partial_conv_gathered, rows_bf16, ConvInput, RowsBf16,
};
use super::pack::{Block, ColumnParts, Dense, Int8Block};
use super::profile::Layer;
use super::schedule::{
    for_each_tile, tiles, Buffers, Out, SharedDst, Workers, HIDDEN_BF16, PATCHES_BF16, SCRATCH,
    SCRATCH_BF16,
};
use super::FastEngine;

/// A map that the head reads.
enum Map<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

/// A block's input map and the map it writes: fp32, or bf16 in the bf16 engine (`bf16_maps`).
enum BlockMaps<'a> {
    F32 { x: &'a [f32], out: &'a mut [f32] },
    Bf16 { x: &'a [u16], out: &'a mut [u16] },
}

/// The element of a map that a strided convolution reads: fp32 (an image, or the fp32
/// engine's maps) or bf16 (the bf16 engine's).
trait MapElement: Copy + Default + Sync {
    /// dst (m x w.n, row stride `dst_rs`) = epilogue([segments...] @ w).
    ///
    /// # Safety
    /// As `matmul`.
    unsafe fn product(
        m: usize,
        a: &[Segment<Self>],
        w: &Weights,
        dst: Dst,
        dst_rs: usize,
        epilogue: Epilogue,
    );

    /// `f` on this thread's scratch for a tile's gathered patches.
    fn with_patches<R>(f: impl FnOnce(&mut Vec<Self>) -> R) -> R;
}

thread_local! {
    /// The stem's fp32 results for one product, before they are rounded into a bf16 map.
    static STEM_ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The int8 engine's u8 operand of one product: a tile's rows quantised.
    static QUANTIZED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl MapElement for f32 {
    fn with_patches<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
        SCRATCH.with_borrow_mut(|[patches, ..]| f(patches))
    }

    unsafe fn product(
        m: usize,
        a: &[Segment],
        w: &Weights,
        dst: Dst,
        dst_rs: usize,
        epilogue: Epilogue,
    ) {
        // SAFETY: the caller upholds `matmul`'s contract.
        unsafe {
            match dst {
                Dst::F32(dst) => matmul(m, a, w, dst, dst_rs, epilogue),
                // The stem (fp32 weights) into a bf16 map: its rows rounded while in L1.
                Dst::Bf16(dst) => STEM_ROWS.with_borrow_mut(|rows| {
                    let rows = grow(rows, m * w.n);
                    matmul(m, a, w, rows.as_mut_ptr(), w.n, epilogue);
                    for (r, row) in rows.chunks_exact(w.n).enumerate() {
                        to_bf16_rows(row.as_ptr(), w.n, 1, w.n, dst.add(r * dst_rs));
                    }
                }),
                Dst::U8(..) => unreachable!("maps are fp32 or bf16"),
            }
        }
    }
}

impl MapElement for u16 {
    fn with_patches<R>(f: impl FnOnce(&mut Vec<u16>) -> R) -> R {
        PATCHES_BF16.with_borrow_mut(f)
    }

    unsafe fn product(
        m: usize,
        a: &[SegmentBf16],
        w: &Weights,
        dst: Dst,
        dst_rs: usize,
        epilogue: Epilogue,
    ) {
        // SAFETY: the caller upholds `matmul_bf16`'s contract.
        unsafe { matmul_bf16(m, a, w, dst, dst_rs, epilogue) }
    }
}

/// The 2x2 stride-2 patches of output image row `row` of a merge, in its NHWC input map
/// (`ih` x `iw` pixels of `cin` channels per image; `h` output rows per image): one segment
/// (two pixels) per patch row.
fn merge_segments<T>(
    src: &[T],
    (ih, iw, cin, h): (usize, usize, usize, usize),
) -> impl Fn(usize, &mut Vec<Segment<T>>) + Sync + '_
where
    T: Sync,
{
    move |row, list| {
        let (b, i) = (row / h, row % h);
        for di in 0..2 {
            list.push(Segment {
                ptr: src[((b * ih + 2 * i + di) * iw) * cin..].as_ptr(),
                stride: 2 * cin,
                k: 2 * cin,
            });
        }
    }
}

/// The current map (`cur` of the pair, `x_len` values) to read, and the other, grown to
/// `out_len` values, to write.
fn read_write<T: Copy + Default>(
    pair: &mut [Vec<T>; 2],
    cur: usize,
    x_len: usize,
    out_len: usize,
) -> (&[T], &mut [T]) {
    let [a, b] = pair;
    let (x, out) = if cur == 0 { (a, b) } else { (b, a) };
    (&x[..x_len], grow(out, out_len))
}

impl FastEngine {
    /// The network on CHW images `input`, tiles run by `workers`. The maps between layers are
    /// fp32, or bf16 in the bf16 engine (`bf16_maps`): each product then reads its operand as
    /// the one before wrote it, in half the bytes and without converting it (as OpenVINO's bf16
    /// does); residual adds are made in fp32, then rounded.
    pub(super) fn forward_images(
        &self,
        input: &[&[f32]],
        (c, in_h, in_w): (usize, usize, usize),
        workers: Workers,
        features: &mut [f32],
        logits: &mut [f32],
    ) {
        let batch = input.len();
        let mut buffers =
            self.buffers.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        let Buffers { maps, maps_bf16 } = &mut buffers;
        let bf16 = self.bf16_maps;
        // Stem: 4x4 stride-4 patches straight from each image's CHW data, one segment per
        // (channel, row).
        let (mut h, mut w) = (in_h / 4, in_w / 4);
        let mut rows = batch * h * w;
        let stem = &self.stem;
        // Running whole images of its own, this thread is one of the pool's threads at work.
        let concurrent = if workers.threads == 1 { rayon::current_num_threads() } else { 1 };
        let profile = &self.profile;
        let out = SharedDst(if bf16 {
            Dst::Bf16(grow(&mut maps_bf16[0], rows * stem.w.n).as_mut_ptr())
        } else {
            Dst::F32(grow(&mut maps[0], rows * stem.w.n).as_mut_ptr())
        });
        profile.time(Layer::Stem, concurrent, || {
            self.strided_conv(out, batch * h, w, stem, workers, |row, list| {
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
            })
        });
        // Which map of the pair holds the current one.
        let mut cur = 0;
        for (index, stage) in self.stages.iter().enumerate() {
            if let Some(m) = &stage.merge {
                let cin = m.w.k / 4;
                let (x_len, input) = (rows * cin, (h, w, cin, h / 2));
                h /= 2;
                w /= 2;
                rows = batch * h * w;
                let out_len = rows * m.w.n;
                let (image_rows, d) = (batch * h, m);
                profile.time(Layer::Merge(index), concurrent, || {
                    if bf16 {
                        let (x, out) = read_write(maps_bf16, cur, x_len, out_len);
                        let out = SharedDst(Dst::Bf16(out.as_mut_ptr()));
                        let segments = merge_segments(x, input);
                        self.strided_conv(out, image_rows, w, d, workers, segments)
                    } else {
                        let (x, out) = read_write(maps, cur, x_len, out_len);
                        let out = SharedDst(Dst::F32(out.as_mut_ptr()));
                        let segments = merge_segments(x, input);
                        self.strided_conv(out, image_rows, w, d, workers, segments)
                    }
                });
                cur = 1 - cur;
            }
            profile.time(Layer::Blocks(index), concurrent, || {
                for blk in &stage.blocks {
                    let len = rows * blk.dim;
                    let block_maps = if bf16 {
                        let (x, out) = read_write(maps_bf16, cur, len, len);
                        BlockMaps::Bf16 { x, out }
                    } else {
                        let (x, out) = read_write(maps, cur, len, len);
                        BlockMaps::F32 { x, out }
                    };
                    self.block(blk, block_maps, h, w, workers);
                    cur = 1 - cur;
                }
            });
        }
        profile.time(Layer::Head, concurrent, || {
            let len = rows * self.head.k;
            let x =
                if bf16 { Map::Bf16(&maps_bf16[cur][..len]) } else { Map::F32(&maps[cur][..len]) };
            self.head(x, batch, h * w, features, logits, workers)
        });
        self.buffers.lock().unwrap_or_else(|e| e.into_inner()).push(buffers);
    }

    /// A strided, non-overlapping convolution (the stem, the merges): out (image_rows * w_out
    /// x n) = A @ w + bias, where `segments(row, list)` lists where the patches of output image
    /// row `row` are in the input (consecutive output pixels are a fixed stride apart there).
    ///
    /// Small weights: one product per output row, its patches read in place (the tile's read
    /// into cache first, in address order: `Segment::load_into_cache`). Weights larger than L2
    /// are fetched from L3 again by every product, which per row means once per few pixels
    /// (T2's last merge: 4.7 MB for 7); such convolutions (and every one on the AVX2 kernels:
    /// `gathers_patches`) copy a tile's patches into one matrix (k values per pixel, against
    /// k n multiply-adds) for one product per tile, and take tiles of at least as many floats
    /// as the weights, or an equal share of the rows where threads share them, as the blocks
    /// do.
    fn strided_conv<T: MapElement>(
        &self,
        out: SharedDst,
        image_rows: usize,
        w_out: usize,
        d: &Dense,
        workers: Workers,
        segments: impl Fn(usize, &mut Vec<Segment<T>>) + Sync,
    ) {
        let (k, n) = (d.w.k, d.w.n);
        let gather = gathers_patches(self.kernels, k * n);
        let row_floats = w_out * (k + n);
        let min_rows = if gather { (k * n).div_ceil(row_floats) } else { 1 }
            .min(image_rows / workers.threads)
            .max(min_rows_for(w_out));
        for_each_tile(workers, tiles(image_rows, row_floats, min_rows, workers.threads), |g| {
            let (out, bias) = (out, Epilogue::Bias(&d.bias, None));
            let mut list = Vec::new();
            if !gather {
                for row in g.clone() {
                    list.clear();
                    segments(row, &mut list);
                    // SAFETY: the caller's segments cover the row's w_out patches.
                    list.iter().for_each(|s| unsafe { s.load_into_cache(w_out) });
                }
                for row in g.clone() {
                    list.clear();
                    segments(row, &mut list);
                    // SAFETY: tiles are disjoint row ranges of `out`; the caller's segments
                    // cover the row's w_out patches.
                    unsafe { T::product(w_out, &list, &d.w, out.at(row * w_out * n), n, bias) };
                }
                return;
            }
            T::with_patches(|patches| {
                let patches = grow(patches, g.len() * w_out * k);
                for (row, patches) in g.clone().zip(patches.chunks_exact_mut(w_out * k)) {
                    list.clear();
                    segments(row, &mut list);
                    let mut k0 = 0;
                    for s in &list {
                        for (p, dst) in patches.chunks_exact_mut(k).enumerate() {
                            let dst = &mut dst[k0..k0 + s.k];
                            if s.ptr.is_null() {
                                dst.fill(T::default());
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
                    T::product(g.len() * w_out, &a, &d.w, out.at(g.start * w_out * n), n, bias)
                };
            });
        });
    }

    /// out = x + fc2(act(fc1([pconv(x[:, :cp]), x[:, cp:]]))) over tiles of whole image rows:
    /// the partial convolution (`partial_conv_direct`, on gathered patches, or Winograd's)
    /// writes a scratch tile of cp channels; fc1 reads that and the untouched input channels as
    /// two segments of one product (nothing is concatenated); bias + activation are fc1's
    /// epilogue and the residual add is fc2's.
    fn block(&self, b: &Block, maps: BlockMaps, h: usize, w: usize, workers: Workers) {
        let pixels = match &maps {
            BlockMaps::F32 { x, .. } => x.len(),
            BlockMaps::Bf16 { x, .. } => x.len(),
        } / b.dim;
        let (dim, cp) = (b.dim, b.cp);
        let images = pixels / (h * w);
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
        let (maps_f32, maps_bf16) = match maps {
            BlockMaps::F32 { x, out } => (Some((x, Out(out.as_mut_ptr()))), None),
            BlockMaps::Bf16 { x, out } => (None, Some((x, SharedDst(Dst::Bf16(out.as_mut_ptr()))))),
        };
        for_each_tile(workers, tiles, |groups| {
            let g = first_row(groups.start)..first_row(groups.end);
            let fc1_epilogue = if bf16_gelu {
                Epilogue::BiasGeluBf16(&b.fc1_bias)
            } else {
                Epilogue::Bias(&b.fc1_bias, Some(act))
            };
            let (n, at) = (g.len() * w, g.start * w * dim);
            SCRATCH.with_borrow_mut(|[col, edge_out, mixed, hidden]| {
                // SAFETY: tiles are disjoint row ranges of `out`; x and out never alias; the
                // scratch tiles cover the tile's rows.
                unsafe {
                    if let Some((x, out)) = maps_bf16 {
                        let scratch = [col, edge_out];
                        return block_tile_bf16(b, x, out.at(at), (h, w), g, scratch, fc1_epilogue);
                    }
                    let Some((x, out)) = maps_f32 else { unreachable!("a block's maps") };
                    let out = out.at(at);
                    let residual = Epilogue::Residual(x[at..].as_ptr());
                    let mixed = grow(mixed, n * cp);
                    match winograd {
                        Some(winograd) => winograd.run(x, (h, w, dim), g.clone(), mixed),
                        None if b.gather_patches => {
                            let (xb, from) = rows_bf16(x, (w, dim, cp), &g);
                            let rows = RowsBf16 { data: &xb, from, stride: cp };
                            let mixed = Dst::F32(mixed.as_mut_ptr());
                            partial_conv_gathered(b, rows, (h, w), g.clone(), mixed);
                            SCRATCH_BF16.set(xb);
                        }
                        None => {
                            // The rows in bf16 once, where the weights take bf16 segments.
                            let staged = (b.partial.takes_bf16_segments() && w > 2 && cp % 2 == 0)
                                .then(|| rows_bf16(x, (w, dim, cp), &g));
                            let input = match &staged {
                                Some((xb, from)) => ConvInput::Staged(
                                    x,
                                    RowsBf16 { data: xb, from: *from, stride: cp },
                                ),
                                None => ConvInput::F32(x),
                            };
                            let scratch = [col, edge_out];
                            let mixed = Dst::F32(mixed.as_mut_ptr());
                            partial_conv_direct(b, input, (h, w), g.clone(), scratch, mixed);
                            if let Some((xb, _)) = staged {
                                SCRATCH_BF16.set(xb);
                            }
                        }
                    }
                    let spatial_mixing = [
                        Segment { ptr: mixed.as_ptr(), stride: cp, k: cp },
                        Segment { ptr: x[at + cp..].as_ptr(), stride: dim, k: dim - cp },
                    ];
                    if b.fc2.takes_bf16_segments() {
                        // fc2 would round the hidden activations to bf16: fc1 writes them so.
                        HIDDEN_BF16.with_borrow_mut(|hidden| {
                            let hidden = grow(hidden, n * b.hidden);
                            let (ptr, stride, k) = (hidden.as_mut_ptr(), b.hidden, b.hidden);
                            matmul_to_bf16(n, &spatial_mixing, &b.fc1, ptr, stride, fc1_epilogue);
                            let hidden = [SegmentBf16 { ptr, stride, k }];
                            matmul_bf16(n, &hidden, &b.fc2, Dst::F32(out), dim, residual);
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
        x: Map,
        batch: usize,
        pixels: usize,
        features: &mut [f32],
        logits: &mut [f32],
        workers: Workers,
    ) {
        let c = self.head.k;
        let mut pooled = vec![0f32; batch * c];
        for (b, p) in pooled.chunks_exact_mut(c).enumerate() {
            let image = b * pixels * c..(b + 1) * pixels * c;
            match x {
                Map::F32(x) => x[image].chunks_exact(c).for_each(|row| {
                    p.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                }),
                Map::Bf16(x) => x[image].chunks_exact(c).for_each(|row| {
                    p.iter_mut()
                        .zip(row)
                        .for_each(|(s, &v)| *s += f32::from_bits(u32::from(v) << 16));
                }),
            }
            p.iter_mut().for_each(|s| *s /= pixels as f32);
        }
        dense_by_columns(&self.head, &pooled, features, Some(self.act), workers);
        dense_by_columns(&self.classifier, features, logits, None, workers);
    }
}

/// One tile (global image rows `g`) of a block on bf16 maps: the partial convolution into a
/// bf16 scratch tile, fc1 on it and x's untouched channels into the bf16 hidden tile, fc2 plus
/// x into `out`; fc1 and fc2 in int8 where the block has int8 weights, and while the int8
/// engine calibrates, the ranges of their inputs recorded.
///
/// # Safety
/// `out` holds the tile's rows of `b.dim` values, aliasing neither x nor the scratch.
unsafe fn block_tile_bf16(
    b: &Block,
    x: &[u16],
    out: Dst,
    (h, w): (usize, usize),
    g: Range<usize>,
    scratch: [&mut Vec<f32>; 2],
    fc1_epilogue: Epilogue,
) {
    let (dim, cp) = (b.dim, b.cp);
    let (n, at) = (g.len() * w, g.start * w * dim);
    SCRATCH_BF16.with_borrow_mut(|mixed| {
        let mixed = grow(mixed, n * cp);
        let mixed_dst = Dst::Bf16(mixed.as_mut_ptr());
        if b.gather_patches {
            let rows = RowsBf16 { data: x, from: 0, stride: dim };
            partial_conv_gathered(b, rows, (h, w), g, mixed_dst)
        } else {
            partial_conv_direct(b, ConvInput::Bf16(x), (h, w), g, scratch, mixed_dst)
        }
        let spatial_mixing = [
            SegmentBf16 { ptr: mixed.as_ptr(), stride: cp, k: cp },
            SegmentBf16 { ptr: x[at + cp..].as_ptr(), stride: dim, k: dim - cp },
        ];
        let residual = Epilogue::ResidualBf16(x[at..].as_ptr());
        if let Some(int8) = &b.int8 {
            // SAFETY: the segments cover the tile's n rows; the caller's `out` too.
            return unsafe {
                block_products_int8(int8, n, &spatial_mixing, out, [fc1_epilogue, residual])
            };
        }
        HIDDEN_BF16.with_borrow_mut(|hidden| {
            let hidden = grow(hidden, n * b.hidden);
            let (ptr, stride, k) = (hidden.as_mut_ptr(), b.hidden, b.hidden);
            let hidden_segment = [SegmentBf16 { ptr, stride, k }];
            // SAFETY: the scratch tiles hold the tile's n rows; the caller's `out` too.
            unsafe {
                matmul_bf16(n, &spatial_mixing, &b.fc1, Dst::Bf16(ptr), stride, fc1_epilogue);
                matmul_bf16(n, &hidden_segment, &b.fc2, out, dim, residual);
            }
            if let Some(seen) = &b.seen {
                let values = |s: SegmentBf16| {
                    (0..n).flat_map(move |r| {
                        // SAFETY: the segments cover the tile's n rows.
                        let row =
                            unsafe { std::slice::from_raw_parts(s.ptr.add(r * s.stride), s.k) };
                        row.iter().map(|&v| f32::from_bits(u32::from(v) << 16))
                    })
                };
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                seen[0] = seen[0].widened(spatial_mixing.into_iter().flat_map(values));
                seen[1] = seen[1].widened(hidden_segment.into_iter().flat_map(values));
            }
        });
    });
}

/// fc1 and fc2 of a tile of `n` rows in int8: `spatial_mixing` quantised into one u8 operand,
/// fc1 into the u8 hidden tile (quantised in its epilogue), fc2 into `out`; `epilogues`:
/// fc1's, fc2's.
///
/// # Safety
/// As `block_tile_bf16`'s products: the segments cover n rows, `out` too.
unsafe fn block_products_int8(
    b: &Int8Block,
    n: usize,
    spatial_mixing: &[SegmentBf16],
    out: Dst,
    [fc1_epilogue, residual]: [Epilogue; 2],
) {
    QUANTIZED.with_borrow_mut(|quantized| {
        let (kp1, kp2) = (b.fc1.padded_k(), b.fc2.padded_k());
        let (input, hidden) = grow(quantized, n * (kp1 + kp2)).split_at_mut(n * kp1);
        let (input, hidden) = (input.as_mut_ptr(), hidden.as_mut_ptr());
        // SAFETY: `input` holds n rows of kp1 values, `hidden` n rows of kp2; the int8 engine
        // exists only where the CPU has int8 kernels.
        unsafe {
            let mut k0 = 0;
            for s in spatial_mixing {
                let (ptr, stride, k) = (s.ptr, s.stride, s.k);
                quantize_bf16_rows(b.kernels, ptr, stride, n, k, b.input, input.add(k0), kp1);
                k0 += s.k;
            }
            let a = [Segment { ptr: input.cast_const(), stride: kp1, k: kp1 }];
            matmul_u8(n, &a, &b.fc1, Dst::U8(hidden, b.hidden), kp2, fc1_epilogue);
            let a = [Segment { ptr: hidden.cast_const(), stride: kp2, k: kp2 }];
            matmul_u8(n, &a, &b.fc2, out, b.fc2.n, residual);
        }
    })
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
