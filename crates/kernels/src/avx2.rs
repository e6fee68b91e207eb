//! Our AVX2 + FMA microkernel, for CPUs without AVX-512: the design of `avx512.rs` on vectors
//! of 8 lanes and 16 ymm registers. Tiles of R rows x NV vectors of accumulators, 6 x 2 (12
//! accumulators, 2 weight vectors and a broadcast: 15 registers) or up to 12 x 1, on weight
//! panels of 16 columns packed by `Weights::new` (8 for a last remainder of at most 8), the
//! activations broadcast straight from their rows; fp32 only. The epilogue runs on the
//! accumulators.

use std::arch::x86_64::*;

use crate::blocking::MAX_TILE_ROWS_AVX2;
use crate::gemm::{Epilogue, Segment, Weights};
use crate::loops::{ERF_CLAMP, ERF_DEN, ERF_NUM};
use crate::Activation;

/// Lanes of a vector.
const LANES: usize = 8;

/// Widths, in vectors of 8 columns, of the panels that cover `n` columns: pairs, then a single
/// vector for a remainder of at most 8 columns, so that no panel multiplies more than 7
/// columns of padding.
pub(crate) fn panel_vectors(n: usize) -> impl Iterator<Item = usize> {
    let vectors = n.div_ceil(LANES);
    std::iter::repeat_n(2, vectors / 2).chain(std::iter::repeat_n(1, vectors % 2))
}

/// Calls `tile::<R, NV>` for the (rows, vectors) of a tile: R up to 12 (6 for 2 vectors).
macro_rules! dispatch {
    ($rows:expr, $vectors:expr, $tile:ident $args:tt) => {
        dispatch!(@ $rows, $vectors, $tile $args; 1 2 3 4 5 6; 7 8 9 10 11 12)
    };
    (@ $rows:expr, $vectors:expr, $tile:ident $args:tt; $($r:literal)*; $($r1:literal)*) => {
        match ($rows, $vectors) {
            $(($r, 1) => $tile::<$r, 1> $args, ($r, 2) => $tile::<$r, 2> $args,)*
            $(($r1, 1) => $tile::<$r1, 1> $args,)*
            _ => unreachable!(),
        }
    };
}

/// One register tile's place in the product.
struct Tile {
    /// Its first row, and the first column of its panel.
    r0: usize,
    j0: usize,
    /// Where its first output goes.
    dst: *mut f32,
    dst_rs: usize,
    /// Lanes of the panel's last vector that hold real columns, as a mask of all-ones lanes,
    /// and whether that is all of them.
    mask: __m256i,
    full: bool,
}

/// dst (m x n) = epilogue([segments...] @ w), on `w`'s panels `data`.
///
/// # Safety
/// The CPU has AVX2 and FMA, and `data` holds `w` packed by `panel_vectors`; otherwise as
/// `gemm::matmul`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn matmul(
    m: usize,
    a: &[Segment],
    w: &Weights,
    data: &[f32],
    dst: *mut f32,
    dst_rs: usize,
    epilogue: Epilogue,
) {
    // SAFETY: the caller upholds this function's contract (`# Safety` above); each tile reads
    // its rows of the segments and its panel, and writes its rows and columns of dst.
    unsafe {
        let mut j0 = 0;
        for vectors in panel_vectors(w.n) {
            let width = LANES * vectors;
            let last_lanes = (w.n - j0).min(width) - LANES * (vectors - 1);
            let mask = _mm256_cmpgt_epi32(
                _mm256_set1_epi32(last_lanes as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            );
            let panel = data.as_ptr().add(j0 * w.k);
            // As few row tiles as the register budget allows, of near-equal height (as
            // `avx512::for_each_tile` cuts them).
            let count = m.div_ceil(MAX_TILE_ROWS_AVX2[vectors - 1]);
            let mut r0 = 0;
            for t in 0..count {
                let rows = m / count + usize::from(t < m % count);
                let dst = dst.add(r0 * dst_rs + j0);
                let at = Tile { r0, j0, dst, dst_rs, mask, full: last_lanes == LANES };
                dispatch!(rows, vectors, tile(a, panel, &at, epilogue));
                r0 += rows;
            }
            j0 += width;
        }
    }
}

/// R rows x NV vectors of 8 columns, over every segment's k. Not inlined: one small function
/// per shape keeps each register allocation simple (all 12 accumulators in ymm).
#[inline(never)]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const R: usize, const NV: usize>(
    a: &[Segment],
    panel: *const f32,
    t: &Tile,
    epilogue: Epilogue,
) {
    // SAFETY: `matmul` hands this tile's rows and columns, inside the segments, the panel and
    // dst that it was given.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); NV]; R];
        let mut wp = panel;
        for s in a {
            if !s.ptr.is_null() {
                acc = accumulate::<R, NV>(acc, s.ptr.add(t.r0 * s.stride), s.stride, s.k, wp);
            }
            wp = wp.add(LANES * NV * s.k);
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, &sum) in acc.iter().enumerate() {
                let partial = v == NV - 1 && !t.full;
                let col = t.j0 + LANES * v;
                let out = match epilogue {
                    Epilogue::Store => sum,
                    Epilogue::Bias(bias, act) => {
                        let x = _mm256_add_ps(sum, load(bias.as_ptr().add(col), t.mask, partial));
                        match act {
                            None => x,
                            Some(Activation::Relu) => _mm256_max_ps(x, _mm256_setzero_ps()),
                            Some(Activation::Gelu) => gelu(x),
                        }
                    }
                    // Exact: the approximate form only pays where the next product rounds to
                    // bf16, which this fp32 kernel never does.
                    Epilogue::BiasGeluBf16(bias) => {
                        gelu(_mm256_add_ps(sum, load(bias.as_ptr().add(col), t.mask, partial)))
                    }
                    Epilogue::Residual(res) => {
                        let at = (t.r0 + r) * t.dst_rs + col;
                        _mm256_add_ps(sum, load(res.add(at), t.mask, partial))
                    }
                    Epilogue::ResidualBf16(_) => {
                        unreachable!("bf16 residuals for bf16 products only")
                    }
                };
                let p = t.dst.add(r * t.dst_rs + LANES * v);
                if partial {
                    _mm256_maskstore_ps(p, t.mask, out);
                } else {
                    _mm256_storeu_ps(p, out);
                }
            }
        }
    }
}

/// The 8 values at `p`, or only its `mask`ed lanes (the others zero) where `partial`: the
/// columns past a product's last one may be past the end of its bias or residual.
///
/// # Safety
/// The CPU has AVX2; `p` holds 8 values, or the masked ones where `partial`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load(p: *const f32, mask: __m256i, partial: bool) -> __m256 {
    // SAFETY: the caller upholds this function's contract (`# Safety` above).
    unsafe {
        if partial {
            _mm256_maskload_ps(p, mask)
        } else {
            _mm256_loadu_ps(p)
        }
    }
}

/// acc += (R rows of k values at `rowp`, row stride `stride`) @ (k x 8 NV panel at `wp`).
/// By value so that the accumulators live in registers for the whole loop.
///
/// # Safety
/// The CPU has AVX2 and FMA; the rows and the panel hold what is read.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate<const R: usize, const NV: usize>(
    mut acc: [[__m256; NV]; R],
    rowp: *const f32,
    stride: usize,
    k: usize,
    mut wp: *const f32,
) -> [[__m256; NV]; R] {
    // SAFETY: the caller upholds this function's contract (`# Safety` above).
    unsafe {
        // Rows 0-5 from `lo`, 6-11 from `hi`, at offsets that LLVM cannot see through, so
        // that it keeps a base register per row with one shared index (see
        // `avx512::accumulate`).
        let sb = 4 * stride;
        let (s1, s3, s5) = std::hint::black_box((sb, 3 * sb, 5 * sb));
        let offsets = [0, s1, 2 * s1, s3, 4 * s1, s5];
        let mut lo = rowp.cast::<u8>();
        let mut hi = lo.wrapping_add(6 * sb);
        for _ in 0..k {
            let mut wv = [_mm256_setzero_ps(); NV];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = _mm256_loadu_ps(wp.add(LANES * v));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let base = if r < 6 { lo } else { hi };
                let x = _mm256_broadcast_ss(&*base.add(offsets[r % 6]).cast::<f32>());
                for v in 0..NV {
                    acc[v] = _mm256_fmadd_ps(x, wv[v], acc[v]);
                }
            }
            lo = lo.add(4);
            hi = hi.wrapping_add(4);
            wp = wp.add(LANES * NV);
        }
        acc
    }
}

/// The same exact-erf GELU as `loops::gelu` (same coefficients), on 8 lanes; the division is
/// a reciprocal estimate (2^-12 relative) refined by one Newton step.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu(x: __m256) -> __m256 {
    let c = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-ERF_CLAMP)), _mm256_set1_ps(ERF_CLAMP));
    let c2 = _mm256_mul_ps(c, c);
    let mut p = _mm256_set1_ps(ERF_NUM[6]);
    for &k in ERF_NUM[..6].iter().rev() {
        p = _mm256_fmadd_ps(c2, p, _mm256_set1_ps(k));
    }
    let mut q = _mm256_set1_ps(ERF_DEN[4]);
    for &k in ERF_DEN[..4].iter().rev() {
        q = _mm256_fmadd_ps(c2, q, _mm256_set1_ps(k));
    }
    let r = _mm256_rcp_ps(q);
    let r = _mm256_mul_ps(r, _mm256_fnmadd_ps(q, r, _mm256_set1_ps(2.0)));
    let erf = _mm256_mul_ps(_mm256_mul_ps(c, p), r);
    let half_x = _mm256_mul_ps(_mm256_set1_ps(0.5), x);
    _mm256_fmadd_ps(half_x, erf, half_x)
}
