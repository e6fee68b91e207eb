//! The partial 3x3 convolution computed directly (where Winograd's does not pay).

use std::ops::Range;

use fasternet_kernels::{
    grow, im2col, matmul, matmul_bf16, to_bf16_rows, Epilogue, Segment, SegmentBf16,
};

use super::pack::Block;
use super::schedule::SCRATCH_BF16;

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
        // The rows in bf16, where the weights take bf16 segments.
        let staged: Option<Vec<u16>> = (b.partial.takes_bf16_segments() && w > 2 && cp % 2 == 0)
            .then(|| {
                let mut xb = SCRATCH_BF16.take();
                xb.resize(xb.len().max(bf16_rows * w * cp), 0);
                to_bf16_rows(
                    x.as_ptr().add(bf16_from * w * dim),
                    dim,
                    bf16_rows * w,
                    cp,
                    xb.as_mut_ptr(),
                );
                xb
            });
        for (t, row) in g.clone().enumerate() {
            let i = row % h;
            let outside = |di: usize| (i == 0 && di == 0) || (i == h - 1 && di == 2);
            let dst = mixed[(t * w + 1) * cp..].as_mut_ptr();
            if let Some(xb) = staged.as_ref().filter(|_| w > 2) {
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
            im2col(x, h, w, dim, cp, row, edges, 3, &mut col[t * edges.len() * 9 * cp..]);
        }
        if let Some(xb) = staged {
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
