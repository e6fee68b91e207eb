//! The partial 3x3 convolution computed directly (where Winograd's does not pay).

use std::ops::Range;

use fasternet_kernels::blocking::GATHERED_PATCH_PIXELS;
use fasternet_kernels::{
    grow, im2col, matmul, matmul_bf16, to_bf16_rows, Dst, Epilogue, Segment, SegmentBf16,
};

use super::pack::Block;
use super::schedule::{PATCHES_BF16, SCRATCH_BF16};

/// Rows of a map's pixels in bf16, which the partial convolution's bf16 products read its
/// input channels from: pixel p of global image row r at `data[((r - from) * w + p) * stride..]`.
#[derive(Clone, Copy)]
pub(super) struct RowsBf16<'a> {
    pub(super) data: &'a [u16],
    pub(super) from: usize,
    pub(super) stride: usize,
}

/// The cp channels of global image rows `g` and of their neighbours above and below (within
/// the batch) in bf16, in this thread's scratch, which the caller hands back with
/// `SCRATCH_BF16.set`; and the first row it holds: for a bf16 engine whose maps stay fp32.
///
/// # Safety
/// Only where the block's weights take bf16 segments (the CPU has AVX512-BF16).
pub(super) unsafe fn rows_bf16(
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
/// channels, fp32 or bf16) on AMX, where `Block::gather_patches`: per
/// `GATHERED_PATCH_PIXELS` pixels each pixel's 3x3 patch gathered from the rows in bf16 `xb`
/// (zeros outside the image) into one bf16 row of 9 cp values, and one product that the tiles
/// read in place. Per image row instead (`partial_conv_direct`), a product has 5-12 pixels in
/// the last two stages, so every weight tile is loaded for a single, part-empty row tile.
pub(super) fn partial_conv_gathered(
    b: &Block,
    xb: RowsBf16,
    (h, w): (usize, usize),
    g: Range<usize>,
    mixed: Dst,
) {
    let cp = b.cp;
    let patch = 9 * cp;
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
                        let src = ((row + tap / 3 - 1 - xb.from) * w + sj) * xb.stride;
                        dst.copy_from_slice(&xb.data[src..src + cp]);
                    }
                }
            }
            let a = [SegmentBf16 { ptr: patches.as_ptr(), stride: patch, k: patch }];
            // SAFETY: `patches` holds n rows of 9 cp values; `mixed` the tile's pixels.
            unsafe { matmul_bf16(n, &a, &b.partial, mixed.add(p0 * cp), cp, Epilogue::Store) };
        }
    });
}

/// The partial convolution's input: an fp32 map, the same with its rows around the tile
/// converted to bf16 (`rows_bf16`), or a map in bf16.
#[derive(Clone, Copy)]
pub(super) enum ConvInput<'a> {
    F32(&'a [f32]),
    Staged(&'a [f32], RowsBf16<'a>),
    Bf16(&'a [u16]),
}

/// The partial convolution of global image rows `g` into `mixed` (rows x w pixels of cp
/// channels; bf16 only from a bf16 map), directly: a row's inner pixels read the input as nine
/// shifted segments (taps above the first or below the last row are skipped); only the two
/// edge pixels of each row, whose windows reach into the zero padding, are gathered (im2col)
/// into `col`, and multiplied in one product for all of the tile's (fp32 maps, then copied into
/// place) or one per edge column, straight into place (bf16 maps).
pub(super) fn partial_conv_direct(
    b: &Block,
    input: ConvInput,
    (h, w): (usize, usize),
    g: Range<usize>,
    [col, edge_out]: [&mut Vec<f32>; 2],
    mixed: Dst,
) {
    let (dim, cp) = (b.dim, b.cp);
    let edges: &[usize] = if w == 1 { &[0] } else { &[0, w - 1] };
    let (edge_rows, patch) = (g.len() * edges.len(), 9 * cp);
    let rows = match input {
        ConvInput::F32(_) => None,
        ConvInput::Staged(_, rows) => Some(rows),
        ConvInput::Bf16(data) => Some(RowsBf16 { data, from: 0, stride: dim }),
    };
    PATCHES_BF16.with_borrow_mut(|col_bf16| {
        let (col, col_bf16) = match input {
            ConvInput::Bf16(_) => (&mut [][..], grow(col_bf16, edge_rows * patch)),
            _ => (grow(col, edge_rows * patch), &mut [][..]),
        };
        // SAFETY: x and mixed never alias; the scratch tiles cover the tile's rows; a tap's
        // segment is skipped where its rows would leave the image.
        unsafe {
            for (t, row) in g.clone().enumerate() {
                let i = row % h;
                let outside = |di: usize| (i == 0 && di == 0) || (i == h - 1 && di == 2);
                let dst = mixed.add((t * w + 1) * cp);
                match (rows, input) {
                    _ if w <= 2 => {}
                    (Some(xb), _) => {
                        let taps: [SegmentBf16; 9] = std::array::from_fn(|tap| {
                            let (di, dj) = (tap / 3, tap % 3);
                            if outside(di) {
                                SegmentBf16::zeros(cp)
                            } else {
                                let at = ((row + di - 1 - xb.from) * w + dj) * xb.stride;
                                SegmentBf16 {
                                    ptr: xb.data[at..].as_ptr(),
                                    stride: xb.stride,
                                    k: cp,
                                }
                            }
                        });
                        matmul_bf16(w - 2, &taps, &b.partial, dst, cp, Epilogue::Store);
                    }
                    (None, ConvInput::F32(x)) => {
                        let Dst::F32(dst) = dst else { unreachable!("fp32 output from fp32 maps") };
                        let taps: [Segment; 9] = std::array::from_fn(|tap| {
                            let (di, dj) = (tap / 3, tap % 3);
                            if outside(di) {
                                Segment::zeros(cp)
                            } else {
                                let at = ((row + di - 1) * w + dj) * dim;
                                Segment { ptr: x[at..].as_ptr(), stride: dim, k: cp }
                            }
                        });
                        matmul(w - 2, &taps, &b.partial, dst, cp, Epilogue::Store);
                    }
                    (None, _) => unreachable!("bf16 maps are read as bf16 rows"),
                }
                let at = t * edges.len() * patch;
                match input {
                    ConvInput::F32(x) | ConvInput::Staged(x, _) => {
                        im2col(x, h, w, dim, cp, row, edges, 3, &mut col[at..])
                    }
                    ConvInput::Bf16(x) => {
                        im2col(x, h, w, dim, cp, row, edges, 3, &mut col_bf16[at..])
                    }
                }
            }
            if let ConvInput::Bf16(_) = input {
                for (e, &j) in edges.iter().enumerate() {
                    let (ptr, stride) = (col_bf16[e * patch..].as_ptr(), edges.len() * patch);
                    let a = [SegmentBf16 { ptr, stride, k: patch }];
                    let dst = mixed.add(j * cp);
                    matmul_bf16(g.len(), &a, &b.partial, dst, w * cp, Epilogue::Store);
                }
                return;
            }
            let Dst::F32(mixed) = mixed else { unreachable!("fp32 output from fp32 maps") };
            let edge_out = grow(edge_out, edge_rows * cp);
            let patches = [Segment { ptr: col.as_ptr(), stride: patch, k: patch }];
            matmul(edge_rows, &patches, &b.partial, edge_out.as_mut_ptr(), cp, Epilogue::Store);
            for (t, out) in edge_out.chunks_exact(edges.len() * cp).enumerate() {
                for (&j, px) in edges.iter().zip(out.chunks_exact(cp)) {
                    px.as_ptr().copy_to_nonoverlapping(mixed.add((t * w + j) * cp), cp);
                }
            }
        }
    });
}
