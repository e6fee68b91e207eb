//! The partial 3x3 convolution computed directly (where Winograd's does not pay).

use std::ops::Range;

use fasternet_kernels::blocking::GATHERED_PATCH_PIXELS;
use fasternet_kernels::{
    grow, im2col, matmul, matmul_bf16, to_bf16_rows, Epilogue, Segment, SegmentBf16,
};

use super::pack::Block;
use super::schedule::{PATCHES_BF16, SCRATCH_BF16};

/// The cp channels of global image rows `g` and of their neighbours above and below (within
/// the batch) in bf16, in this thread's scratch, which the caller hands back with
/// `SCRATCH_BF16.set`; and the first row it holds.
///
/// # Safety
/// Only where the block's weights take bf16 segments (the CPU has AVX512-BF16).
unsafe fn rows_bf16(
    x: &[f32],
    (w, dim, cp): (usize, usize, usize),
    g: &Range<usize>,
) -> (Vec<u16>, usize) {
    let image_rows = x.len() / (dim * w);
    let from = g.start.saturating_sub(1);
    let rows = (g.end + 1).min(image_rows) - from;
    let mut xb = SCRATCH_BF16.take();
    xb.resize(xb.len().max(rows * w * cp), 0);
    // SAFETY: x holds the rows' pixels of dim channels; xb holds rows x w x cp values; the
    // caller's CPU has AVX512-BF16.
    unsafe { to_bf16_rows(x.as_ptr().add(from * w * dim), dim, rows * w, cp, xb.as_mut_ptr()) };
    (xb, from)
}

/// The partial convolution of global image rows `g` into `mixed` (rows x w pixels of cp
/// channels) on AMX, where `Block::gather_patches`: the rows in bf16 once (`rows_bf16`), then
/// per `GATHERED_PATCH_PIXELS` pixels each pixel's 3x3 patch gathered from them (zeros outside
/// the image) into one bf16 row of 9 cp values, and one product that the tiles read in place.
/// Per image row instead (`partial_conv_direct`), a product has 5-12 pixels in the last two
/// stages, so every weight tile is loaded for a single, part-empty row tile.
pub(super) fn partial_conv_gathered(
    b: &Block,
    x: &[f32],
    (h, w): (usize, usize),
    g: Range<usize>,
    mixed: &mut [f32],
) {
    let cp = b.cp;
    let patch = 9 * cp;
    // SAFETY: `gather_patches` is only set for AMX weights.
    let (xb, from) = unsafe { rows_bf16(x, (w, b.dim, cp), &g) };
    let pixels = g.len() * w;
    PATCHES_BF16.with_borrow_mut(|patches| {
        let patches = grow(patches, GATHERED_PATCH_PIXELS.min(pixels) * patch);
        for p0 in (0..pixels).step_by(GATHERED_PATCH_PIXELS) {
            let n = GATHERED_PATCH_PIXELS.min(pixels - p0);
            for (p, out) in (p0..p0 + n).zip(patches.chunks_exact_mut(patch)) {
                let (row, j) = (g.start + p / w, p % w);
                let i = row % h;
                for (tap, dst) in out.chunks_exact_mut(cp).enumerate() {
                    let (si, sj) = ((i + tap / 3).wrapping_sub(1), (j + tap % 3).wrapping_sub(1));
                    if si >= h || sj >= w {
                        dst.fill(0);
                    } else {
                        let src = ((row + tap / 3 - 1 - from) * w + sj) * cp;
                        dst.copy_from_slice(&xb[src..src + cp]);
                    }
                }
            }
            let a = [SegmentBf16 { ptr: patches.as_ptr(), stride: patch, k: patch }];
            // SAFETY: `patches` holds n rows of 9 cp values; `mixed` the tile's pixels.
            unsafe {
                matmul_bf16(n, &a, &b.partial, mixed[p0 * cp..].as_mut_ptr(), cp, Epilogue::Store)
            };
        }
    });
    SCRATCH_BF16.set(xb);
}

/// The partial convolution of global image rows `g` into `mixed` (rows x w pixels of cp
/// channels), directly: a row's inner pixels read the input as nine shifted segments (taps
/// above the first or below the last row are skipped); only the two edge pixels of each row,
/// whose windows reach into the zero padding, are gathered (im2col) into `col`, all of the
/// tile's in one product into `edge_out`. With bf16 weights, the cp channels of the tile's rows
/// and their neighbours are converted once, for the nine taps to read as shifted segments
/// (instead of each tap converting its own copy).
pub(super) fn partial_conv_direct(
    b: &Block,
    x: &[f32],
    (h, w): (usize, usize),
    g: Range<usize>,
    [col, edge_out]: [&mut Vec<f32>; 2],
    mixed: &mut [f32],
) {
    let (dim, cp) = (b.dim, b.cp);
    let edges: &[usize] = if w == 1 { &[0] } else { &[0, w - 1] };
    let edge_rows = g.len() * edges.len();
    let col = grow(col, edge_rows * 9 * cp);
    let edge_out = grow(edge_out, edge_rows * cp);
    // SAFETY: x and mixed never alias; the scratch tiles cover the tile's rows; a tap's segment
    // is skipped where its rows would leave the image.
    unsafe {
        // The rows in bf16, where the weights take bf16 segments.
        let staged = (b.partial.takes_bf16_segments() && w > 2 && cp % 2 == 0)
            .then(|| rows_bf16(x, (w, dim, cp), &g));
        for (t, row) in g.clone().enumerate() {
            let i = row % h;
            let outside = |di: usize| (i == 0 && di == 0) || (i == h - 1 && di == 2);
            let dst = mixed[(t * w + 1) * cp..].as_mut_ptr();
            if let Some((xb, from)) = staged.as_ref().filter(|_| w > 2) {
                let taps: [SegmentBf16; 9] = std::array::from_fn(|tap| {
                    let (di, dj) = (tap / 3, tap % 3);
                    if outside(di) {
                        SegmentBf16::zeros(cp)
                    } else {
                        SegmentBf16 {
                            ptr: xb.as_ptr().add(((row + di - 1 - from) * w + dj) * cp),
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
            im2col(x, h, w, dim, cp, row, edges, 3, &mut col[t * edges.len() * 9 * cp..]);
        }
        if let Some((xb, _)) = staged {
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
