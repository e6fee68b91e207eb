//! Our AVX-512 microkernel: R rows x NV vectors of 16 columns of accumulators (9 x 3 or
//! 12 x 2, 27 or 24 of the 32 zmm registers) on weight panels packed by `Weights::new`, the
//! activations broadcast straight from their rows; fp32 operands, bf16 pairs on
//! AVX512-BF16 (`vdpbf16ps`) with fp32 accumulators, or u8 x s8 quads on AVX512-VNNI
//! (`vpdpbusd`) with i32 accumulators. The epilogue runs on the accumulators.

use std::arch::x86_64::*;

use crate::blocking::MAX_TILE_ROWS;
use crate::gemm::{Dst, Epilogue, Segment, SegmentBf16, Weights};
use crate::int8::WeightsI8;
use crate::loops::{ERF_CLAMP, ERF_DEN, ERF_NUM};
use crate::Activation;

/// Widths, in vectors of 16 columns, of the panels that cover `n` columns: triples (48
/// columns, a 9 x 3 register tile) and pairs (12 x 2) for what is left, so that no panel runs
/// the lower-throughput single-vector tile except for n <= 16. The triple does 27 FMAs per 12
/// loads (9 broadcasts, 3 weight vectors) where the pair does 24 per 14 (measured in
/// docs/benchmark-log.md).
pub(crate) fn panel_vectors(n: usize) -> impl Iterator<Item = usize> {
    let (triples, pairs, singles) = match n.div_ceil(16) {
        0 => (0, 0, 0),
        1 => (0, 0, 1),
        v if v % 3 == 0 => (v / 3, 0, 0),
        v if v % 3 == 1 => (v / 3 - 1, 2, 0),
        v => (v / 3, 1, 0),
    };
    std::iter::repeat_n(3, triples)
        .chain(std::iter::repeat_n(2, pairs))
        .chain(std::iter::repeat_n(1, singles))
}

/// Calls `tile::<R, NV>` for the (rows, vectors) of a tile: R up to 12 (9 for 3 vectors).
macro_rules! dispatch {
    ($rows:expr, $vectors:expr, $tile:ident $args:tt) => {
        dispatch!(@ $rows, $vectors, $tile $args; 1 2 3 4 5 6 7 8 9 10 11 12; 1 2 3 4 5 6 7 8 9)
    };
    (@ $rows:expr, $vectors:expr, $tile:ident $args:tt; $($r:literal)*; $($r3:literal)*) => {
        match ($rows, $vectors) {
            $(($r, 1) => $tile::<$r, 1> $args, ($r, 2) => $tile::<$r, 2> $args,)*
            $(($r3, 3) => $tile::<$r3, 3> $args,)*
            _ => unreachable!(),
        }
    };
}

#[target_feature(enable = "avx512f")]
pub unsafe fn matmul(
    m: usize,
    a: &[Segment],
    w: &Weights,
    data: &[f32],
    dst: *mut f32,
    dst_rs: usize,
    epilogue: Epilogue,
) {
    // SAFETY: only reached through weights packed for these kernels, which `Kernels` chose
    // because this CPU has the features enabled here; the pointers are as `gemm::matmul`'s
    // contract requires.
    unsafe {
        for_each_tile(m, w.n, Dst::F32(dst), dst_rs, |rows, vectors, at| {
            let panel = data.as_ptr().add(at.j0 * w.k);
            dispatch!(rows, vectors, tile(a, panel, at, epilogue))
        });
    }
}

thread_local! {
    /// The bf16 copy of a product's left operand.
    static LEFT_BF16: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The element types of a product's left operand, and how `with_bf16_rows` stages a
/// segment of them as bf16: fp32 converted (`to_bf16`), bf16 copied (`copy_bf16`). A trait
/// rather than a function argument so that the staging is inlined into the row loop: the
/// partial convolution's taps are rows of 8-48 values, where a call per segment (and
/// `memcpy`'s per call) would cost more than the copy.
pub trait StageBf16: Sized {
    /// k values at `src` as bf16 at `dst`.
    ///
    /// # Safety
    /// The CPU has AVX512-BF16; `src` and `dst` hold k values.
    unsafe fn stage(src: *const Self, k: usize, dst: *mut u16);
}

impl StageBf16 for f32 {
    #[inline(always)]
    unsafe fn stage(src: *const f32, k: usize, dst: *mut u16) {
        // SAFETY: the caller upholds the trait method's contract.
        unsafe { to_bf16(src, k, dst) }
    }
}

impl StageBf16 for u16 {
    #[inline(always)]
    unsafe fn stage(src: *const u16, k: usize, dst: *mut u16) {
        // SAFETY: the caller upholds the trait method's contract.
        unsafe { copy_bf16(src, k, dst) }
    }
}

/// `run(rows)` on the `m` rows of segments `a` (fp32 or bf16, staged by `T::stage`) as bf16
/// rows of `kp` values (zero segments and the padding past their k as zeros) in this
/// thread's staging buffer, which holds at least `capacity` >= m such rows (the ones past m
/// hold any values).
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
pub unsafe fn with_bf16_rows<T: StageBf16>(
    m: usize,
    capacity: usize,
    a: &[Segment<T>],
    kp: usize,
    run: impl FnOnce(*const u16),
) {
    // SAFETY: only reached through weights packed for these kernels, which `Kernels` chose
    // because this CPU has the features enabled here; the pointers are as `gemm::matmul`'s
    // contract requires.
    unsafe {
        LEFT_BF16.with_borrow_mut(|left| {
            if left.len() < capacity * kp {
                left.resize(capacity * kp, 0);
            }
            let k: usize = a.iter().map(|s| s.k).sum();
            for r in 0..m {
                let mut row = left.as_mut_ptr().add(r * kp);
                for s in a {
                    if s.ptr.is_null() {
                        zero_bf16(row, s.k);
                    } else {
                        T::stage(s.ptr.add(r * s.stride), s.k, row);
                    }
                    row = row.add(s.k);
                }
                zero_bf16(row, kp - k);
            }
            run(left.as_ptr());
        });
    }
}

/// As `matmul`, on bf16 operands: the segments are converted into one bf16 row per input
/// row first (an odd k padded with a zero), then each tile multiplies pairs.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
pub unsafe fn matmul_bf16(
    m: usize,
    a: &[Segment],
    w: &Weights,
    data: &[u16],
    dst: Dst,
    dst_rs: usize,
    epilogue: Epilogue,
) {
    // SAFETY: only reached through weights packed for these kernels, which `Kernels` chose
    // because this CPU has the features enabled here; the pointers are as `gemm::matmul`'s
    // contract requires.
    unsafe {
        let kp = w.k.next_multiple_of(2);
        with_bf16_rows(m, m, a, kp, |left| {
            matmul_bf16_segments(
                m,
                &[SegmentBf16 { ptr: left, stride: kp, k: kp }],
                w,
                data,
                dst,
                dst_rs,
                epilogue,
            );
        });
    }
}

/// As `matmul`, on a left operand already in bf16.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
pub unsafe fn matmul_bf16_segments(
    m: usize,
    a: &[SegmentBf16],
    w: &Weights,
    data: &[u16],
    dst: Dst,
    dst_rs: usize,
    epilogue: Epilogue,
) {
    // SAFETY: only reached through weights packed for these kernels, which `Kernels` chose
    // because this CPU has the features enabled here; the pointers are as `gemm::matmul`'s
    // contract requires.
    unsafe {
        let kp = w.k.next_multiple_of(2);
        for_each_tile(m, w.n, dst, dst_rs, |rows, vectors, at| {
            let panel = data.as_ptr().add(at.j0 * kp);
            dispatch!(rows, vectors, tile_bf16(a, panel, at, epilogue))
        });
    }
}

/// As `matmul`, on u8 rows and int8 weights (`int8::matmul_u8`): each tile multiplies quads
/// of k.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn matmul_u8(
    m: usize,
    a: &[Segment<u8>],
    w: &WeightsI8,
    data: &[i8],
    dst: Dst,
    dst_rs: usize,
    epilogue: Epilogue,
) {
    // SAFETY: only reached through weights packed for these kernels, which `Kernels` chose
    // because this CPU has the features enabled here; the pointers are as
    // `int8::matmul_u8`'s contract requires, and `scale` and `offset` hold whole vectors.
    unsafe {
        let kp = w.padded_k();
        for_each_tile(m, w.n, dst, dst_rs, |rows, vectors, at| {
            let panel = data.as_ptr().add(at.j0 * kp);
            let dequantise = [w.scale.as_ptr().add(at.j0), w.offset.as_ptr().add(at.j0)];
            dispatch!(rows, vectors, tile_u8(a, panel, dequantise, at, epilogue))
        });
    }
}

/// k bf16 values at `src` quantised by `q` to u8 at `dst` (nearest, ties to even; clamped).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn quantize_bf16(src: *const u16, k: usize, q: crate::int8::QuantU8, dst: *mut u8) {
    // SAFETY: the caller's pointers hold k values.
    unsafe {
        let mut i = 0;
        while i < k {
            let mask: __mmask16 = if k - i >= 16 { 0xffff } else { (1u16 << (k - i)) - 1 };
            let bits = _mm256_maskz_loadu_epi16(mask, src.add(i).cast());
            let x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
            store_u8(dst.add(i), mask, x, q);
            i += 16;
        }
    }
}

/// The `mask`ed lanes of `v` quantised by `q` (as `QuantU8::quantize`) at `dst`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn store_u8(dst: *mut u8, mask: __mmask16, v: __m512, q: crate::int8::QuantU8) {
    // SAFETY: the caller's dst holds the masked lanes.
    unsafe {
        let inv = _mm512_set1_ps(1.0 / q.scale);
        let steps = _mm512_fmadd_ps(v, inv, _mm512_set1_ps(q.zero.into()));
        let v = _mm512_max_epi32(_mm512_cvtps_epi32(steps), _mm512_setzero_si512());
        _mm512_mask_cvtusepi32_storeu_epi8(dst.cast(), mask, v);
    }
}

/// k floats at `src` to bf16 at `dst`, rounding to nearest even.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
pub unsafe fn to_bf16(src: *const f32, k: usize, dst: *mut u16) {
    // SAFETY: only reached through weights packed for these kernels, which `Kernels` chose
    // because this CPU has the features enabled here; the pointers are as `gemm::matmul`'s
    // contract requires.
    unsafe {
        let mut i = 0;
        while i + 16 <= k {
            let v: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(src.add(i))));
            _mm256_storeu_si256(dst.add(i) as *mut __m256i, v);
            i += 16;
        }
        if i < k {
            let mask = (1u16 << (k - i)) - 1;
            let v: __m256i =
                std::mem::transmute(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src.add(i))));
            _mm256_mask_storeu_epi16(dst.add(i) as *mut i16, mask, v);
        }
    }
}

/// The mask of the first `n` (< 32) u16 lanes of a vector.
#[inline(always)]
fn first_lanes(n: usize) -> __mmask32 {
    (1u32 << n) - 1
}

/// k bf16 values from `src` to `dst`: `with_bf16_rows`'s staging of bf16 segments.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn copy_bf16(src: *const u16, k: usize, dst: *mut u16) {
    // SAFETY: the caller's segments cover k values of the row; the staging row holds them.
    unsafe {
        let mut i = 0;
        while i + 32 <= k {
            _mm512_storeu_si512(dst.add(i).cast(), _mm512_loadu_si512(src.add(i).cast()));
            i += 32;
        }
        if i < k {
            let mask = first_lanes(k - i);
            let v = _mm512_maskz_loadu_epi16(mask, src.add(i).cast());
            _mm512_mask_storeu_epi16(dst.add(i).cast(), mask, v);
        }
    }
}

/// k bf16 zeros at `dst`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn zero_bf16(dst: *mut u16, k: usize) {
    // SAFETY: the caller's staging row holds k values at `dst`.
    unsafe {
        let mut i = 0;
        while i + 32 <= k {
            _mm512_storeu_si512(dst.add(i).cast(), _mm512_setzero_si512());
            i += 32;
        }
        if i < k {
            _mm512_mask_storeu_epi16(dst.add(i).cast(), first_lanes(k - i), _mm512_setzero_si512());
        }
    }
}

/// The `mask`ed lanes of `v` rounded to bf16 (nearest even) at `dst`.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
pub unsafe fn store_bf16(dst: *mut u16, mask: __mmask16, v: __m512) {
    // SAFETY: the caller's dst holds the masked lanes.
    unsafe {
        let v: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_mask_storeu_epi16(dst as *mut i16, mask, v);
    }
}

/// The register tiles of an m x n product, panel by panel: `run(rows, vectors, tile)`.
/// As few row tiles per panel as the register budget allows, of near-equal height: 26
/// rows run as 9 + 9 + 8, not 12 + 12 + 2 (a 2-row tile has too few independent
/// accumulators to keep both FMA pipes busy).
unsafe fn for_each_tile(
    m: usize,
    n: usize,
    dst: Dst,
    dst_rs: usize,
    mut run: impl FnMut(usize, usize, &Tile),
) {
    // SAFETY: as `matmul`, whose contract the caller upholds.
    unsafe {
        let mut j0 = 0;
        for vectors in panel_vectors(n) {
            let width = 16 * vectors;
            let valid = (n - j0).min(width);
            // Lanes of the panel's last vector that hold real columns.
            let mask: __mmask16 = if valid % 16 == 0 { 0xffff } else { (1u16 << (valid % 16)) - 1 };
            let max_rows = MAX_TILE_ROWS[vectors - 1];
            let count = m.div_ceil(max_rows);
            let mut r0 = 0;
            for t in 0..count {
                let rows = m / count + usize::from(t < m % count);
                run(rows, vectors, &Tile { r0, j0, dst: dst.add(r0 * dst_rs + j0), dst_rs, mask });
                r0 += rows;
            }
            j0 += width;
        }
    }
}

/// The epilogue, on the accumulators of one tile, each vector written by `$write` at its
/// offset from the tile's first output. A macro, not a function: a call would pass the 24
/// accumulators through memory.
macro_rules! store {
    ($acc:expr, $t:expr, $epilogue:expr, $nv:expr, |$at:ident, $mask:ident, $out:ident| $write:expr) => {{
        let t: &Tile = $t;
        for (r, acc) in $acc.iter().enumerate() {
            for (v, &sum) in acc.iter().enumerate() {
                let $mask = if v == $nv - 1 { t.mask } else { 0xffff };
                let $out = finished!(sum, $mask, t.r0 + r, t.j0 + 16 * v, t.dst_rs, $epilogue);
                let $at = r * t.dst_rs + 16 * v;
                $write;
            }
        }
    }};
}

/// `store!` into the tile's fp32, bf16 or u8 destination.
macro_rules! store_to_dst {
    ($sums:expr, $t:expr, $epilogue:expr, $nv:expr) => {
        match $t.dst {
            Dst::F32(dst) => store!($sums, $t, $epilogue, $nv, |at, mask, out| {
                _mm512_mask_storeu_ps(dst.add(at), mask, out)
            }),
            Dst::Bf16(dst) => {
                store!($sums, $t, $epilogue, $nv, |at, mask, out| store_bf16(
                    dst.add(at),
                    mask,
                    out
                ))
            }
            Dst::U8(dst, q) => {
                store!($sums, $t, $epilogue, $nv, |at, mask, out| store_u8(
                    dst.add(at),
                    mask,
                    out,
                    q
                ))
            }
        }
    };
}

/// The epilogue on one vector of sums, at output row `row` (of stride `dst_rs`), column `col`.
macro_rules! finished {
    ($sum:expr, $mask:expr, $row:expr, $col:expr, $dst_rs:expr, $epilogue:expr) => {
        match $epilogue {
            Epilogue::Store => $sum,
            Epilogue::Bias(bias, act) => {
                let x = _mm512_add_ps($sum, _mm512_maskz_loadu_ps($mask, bias.as_ptr().add($col)));
                match act {
                    None => x,
                    Some(Activation::Relu) => _mm512_max_ps(x, _mm512_setzero_ps()),
                    Some(Activation::Gelu) => gelu(x),
                }
            }
            Epilogue::BiasGeluBf16(bias) => gelu_bf16(_mm512_add_ps(
                $sum,
                _mm512_maskz_loadu_ps($mask, bias.as_ptr().add($col)),
            )),
            Epilogue::Residual(res) => {
                _mm512_add_ps($sum, _mm512_maskz_loadu_ps($mask, res.add($row * $dst_rs + $col)))
            }
            Epilogue::ResidualBf16(res) => {
                let bits = _mm256_maskz_loadu_epi16($mask, res.add($row * $dst_rs + $col).cast());
                let res = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
                _mm512_add_ps($sum, res)
            }
        }
    };
}

/// `epilogue(sum)` into the `mask`ed lanes of `dst` at row `row`, column `col`.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
pub unsafe fn finish(
    sum: __m512,
    mask: __mmask16,
    row: usize,
    col: usize,
    dst: Dst,
    dst_rs: usize,
    epilogue: Epilogue,
) {
    // SAFETY: `for_each_tile` hands this tile's rows and columns, inside the segments, the
    // panel and dst that `matmul` was given.
    unsafe {
        let out = finished!(sum, mask, row, col, dst_rs, epilogue);
        match dst.add(row * dst_rs + col) {
            Dst::F32(p) => _mm512_mask_storeu_ps(p, mask, out),
            Dst::Bf16(p) => store_bf16(p, mask, out),
            Dst::U8(p, q) => store_u8(p, mask, out, q),
        }
    }
}

struct Tile {
    r0: usize,
    j0: usize,
    dst: Dst,
    dst_rs: usize,
    mask: __mmask16,
}

/// Asks for the cache lines the epilogue of an R x NV tile reads (the residual) and writes
/// (dst) before its products run: where a block's tile outgrows L2 (T2's stage 3 at batch 8:
/// 784 pixels), each of the tile's up to 27 vectors would otherwise wait at the end for a
/// line from L3 (measured in docs/benchmark-log.md).
#[inline(always)]
unsafe fn prefetch_epilogue<const R: usize, const NV: usize>(t: &Tile, epilogue: &Epilogue) {
    // SAFETY: prefetches do not fault; the addresses are the tile's own outputs and residual.
    unsafe {
        // As T0 for both: the write hint (`prefetchw`) would need `prfchw` enabled here.
        let (dst, bytes) = match t.dst {
            Dst::F32(p) => (p as *const i8, 4),
            Dst::Bf16(p) => (p as *const i8, 2),
            Dst::U8(p, _) => (p as *const i8, 1),
        };
        let residual = match *epilogue {
            Epilogue::Residual(res) => Some((res as *const i8, 4)),
            Epilogue::ResidualBf16(res) => Some((res as *const i8, 2)),
            _ => None,
        };
        for r in 0..R {
            for v in 0..NV {
                let at = r * t.dst_rs + 16 * v;
                _mm_prefetch::<_MM_HINT_T0>(dst.wrapping_add(at * bytes));
                if let Some((res, bytes)) = residual {
                    let at = (t.r0 * t.dst_rs + t.j0 + at) * bytes;
                    _mm_prefetch::<_MM_HINT_T0>(res.wrapping_add(at));
                }
            }
        }
    }
}

/// A copy of a tile's accumulators for `store!`, made element by element. `store!` indexes
/// its array in loops that LLVM does not unroll (their bodies hold every epilogue), so that
/// array lives in memory; were it the accumulators themselves, every segment of a tile would
/// spill and reload all of them around its k loop, and each tile would begin with a memset.
#[inline]
#[target_feature(enable = "avx512f")]
fn for_store<const R: usize, const NV: usize>(acc: &[[__m512; NV]; R]) -> [[__m512; NV]; R] {
    let mut sums = [[_mm512_setzero_ps(); NV]; R];
    for r in 0..R {
        for v in 0..NV {
            sums[r][v] = acc[r][v];
        }
    }
    sums
}

/// R rows x NV vectors of 16 columns, over every segment's k. Not inlined: one small
/// function per shape keeps each register allocation simple (all 24 accumulators in zmm).
#[inline(never)]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const NV: usize>(
    a: &[Segment],
    panel: *const f32,
    t: &Tile,
    epilogue: Epilogue,
) {
    // SAFETY: `for_each_tile` hands this tile's rows and columns, inside the segments, the
    // panel and dst that `matmul` was given.
    unsafe {
        prefetch_epilogue::<R, NV>(t, &epilogue);
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        let mut wp = panel;
        for s in a {
            if !s.ptr.is_null() {
                acc = accumulate::<R, NV>(acc, s.ptr.add(t.r0 * s.stride), s.stride, s.k, wp);
            }
            wp = wp.add(16 * NV * s.k);
        }
        let Dst::F32(dst) = t.dst else { unreachable!("fp32 weights write fp32") };
        let sums = for_store(&acc);
        store!(sums, t, epilogue, NV, |at, mask, out| {
            _mm512_mask_storeu_ps(dst.add(at), mask, out)
        });
    }
}

/// `tile` on bf16 segments and a bf16 panel: each step multiplies a pair of k. A separate
/// function rather than `tile` made generic over the element: the bf16 loop must be
/// compiled with AVX512-BF16 enabled to inline its `vdpbf16ps`, which the fp32 tile must
/// not require, and Rust cannot make `target_feature` depend on a type parameter.
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn tile_bf16<const R: usize, const NV: usize>(
    a: &[SegmentBf16],
    panel: *const u16,
    t: &Tile,
    epilogue: Epilogue,
) {
    // SAFETY: `for_each_tile` hands this tile's rows and columns, inside the segments, the
    // panel and dst that `matmul` was given.
    unsafe {
        prefetch_epilogue::<R, NV>(t, &epilogue);
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        let mut wp = panel;
        for s in a {
            if !s.ptr.is_null() {
                acc = accumulate_bf16::<R, NV>(
                    acc,
                    s.ptr.add(t.r0 * s.stride),
                    s.stride,
                    s.k / 2,
                    wp,
                );
            }
            wp = wp.add(16 * NV * s.k);
        }
        let sums = for_store(&acc);
        store_to_dst!(sums, t, epilogue, NV);
    }
}

/// `tile` on u8 segments and an s8 panel, each step a quad of k summed in i32, the sums
/// made real values (`scale` x sum + `offset`, per column) before the epilogue.
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_u8<const R: usize, const NV: usize>(
    a: &[Segment<u8>],
    panel: *const i8,
    [scale, offset]: [*const f32; 2],
    t: &Tile,
    epilogue: Epilogue,
) {
    // SAFETY: `for_each_tile` hands this tile's rows and columns, inside the segments, the
    // panel, the per-column vectors and dst that `matmul_u8` was given.
    unsafe {
        prefetch_epilogue::<R, NV>(t, &epilogue);
        let mut acc = [[_mm512_setzero_si512(); NV]; R];
        let mut wp = panel;
        for s in a {
            if !s.ptr.is_null() {
                acc =
                    accumulate_u8::<R, NV>(acc, s.ptr.add(t.r0 * s.stride), s.stride, s.k / 4, wp);
            }
            wp = wp.add(16 * NV * s.k);
        }
        let mut sums = [[_mm512_setzero_ps(); NV]; R];
        for v in 0..NV {
            let (scale, offset) =
                (_mm512_loadu_ps(scale.add(16 * v)), _mm512_loadu_ps(offset.add(16 * v)));
            for r in 0..R {
                sums[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][v]), scale, offset);
            }
        }
        store_to_dst!(sums, t, epilogue, NV);
    }
}

/// acc += (R rows of `quads` quads of u8 values at `rowp`, row stride `stride`) @ (`quads`
/// quads of rows x 16 NV s8 panel at `wp`, each quad's rows interleaved), in i32.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn accumulate_u8<const R: usize, const NV: usize>(
    mut acc: [[__m512i; NV]; R],
    mut rowp: *const u8,
    stride: usize,
    quads: usize,
    mut wp: *const i8,
) -> [[__m512i; NV]; R] {
    // SAFETY: `for_each_tile` hands this tile's rows and columns, inside the segments, the
    // panel and dst that `matmul_u8` was given.
    unsafe {
        for _ in 0..quads {
            let mut wv = [_mm512_setzero_si512(); NV];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = _mm512_loadu_si512(wp.add(64 * v).cast());
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                // One row's quad of u8 values in every 32-bit lane.
                let x = _mm512_set1_epi32(rowp.add(r * stride).cast::<i32>().read_unaligned());
                for v in 0..NV {
                    acc[v] = _mm512_dpbusd_epi32(acc[v], x, wv[v]);
                }
            }
            rowp = rowp.add(4);
            wp = wp.add(64 * NV);
        }
        acc
    }
}

/// acc += (R rows of `pairs` pairs of bf16 values at `rowp`, row stride `stride`) @
/// (`pairs` pairs of rows x 16 NV bf16 panel at `wp`, each pair's rows interleaved).
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn accumulate_bf16<const R: usize, const NV: usize>(
    mut acc: [[__m512; NV]; R],
    mut rowp: *const u16,
    stride: usize,
    pairs: usize,
    mut wp: *const u16,
) -> [[__m512; NV]; R] {
    // SAFETY: `for_each_tile` hands this tile's rows and columns, inside the segments, the
    // panel and dst that `matmul` was given.
    unsafe {
        for _ in 0..pairs {
            let mut wv = [_mm512_setzero_si512(); NV];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = _mm512_loadu_si512(wp.add(32 * v) as *const _);
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                // One row's pair of bf16 values in every 32-bit lane.
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                    (rowp.add(r * stride) as *const i32).read_unaligned(),
                ));
                for v in 0..NV {
                    acc[v] = _mm512_dpbf16_ps(
                        acc[v],
                        x,
                        std::mem::transmute::<__m512i, __m512bh>(wv[v]),
                    );
                }
            }
            rowp = rowp.add(2);
            wp = wp.add(32 * NV);
        }
        acc
    }
}

/// acc += (R rows of k values at `rowp`, row stride `stride`) @ (k x 16 NV panel at `wp`).
/// By value so that the accumulators live in registers for the whole loop.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn accumulate<const R: usize, const NV: usize>(
    mut acc: [[__m512; NV]; R],
    rowp: *const f32,
    stride: usize,
    k: usize,
    mut wp: *const f32,
) -> [[__m512; NV]; R] {
    // SAFETY: `for_each_tile` hands this tile's rows and columns, inside the segments, the
    // panel and dst that `matmul` was given.
    unsafe {
        // No address arithmetic per k: the rows' byte offsets (0, s, .., 5s from `lo` for rows
        // 0-5, the same from `hi` for 6-11) are opaque to LLVM (`black_box`), so it keeps a base
        // register per row with one shared index. Written as `rowp.add(r * stride)`, loop
        // strength reduction rebuilds the addresses every k as a chain of lea/add (8 integer
        // uops per 24 FMAs), which compete with the FMAs for ports on Intel cores.
        let sb = 4 * stride;
        let (s1, s3, s5) = std::hint::black_box((sb, 3 * sb, 5 * sb));
        let offsets = [0, s1, 2 * s1, s3, 4 * s1, s5];
        let mut lo = rowp.cast::<u8>();
        let mut hi = lo.wrapping_add(6 * sb);
        for _ in 0..k {
            let mut wv = [_mm512_setzero_ps(); NV];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = _mm512_loadu_ps(wp.add(16 * v));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let base = if r < 6 { lo } else { hi };
                let x = _mm512_set1_ps(base.add(offsets[r % 6]).cast::<f32>().read());
                for v in 0..NV {
                    acc[v] = _mm512_fmadd_ps(x, wv[v], acc[v]);
                }
            }
            lo = lo.add(4);
            hi = hi.wrapping_add(4);
            wp = wp.add(16 * NV);
        }
        acc
    }
}

/// The same exact-erf GELU as `loops::gelu` (same coefficients), on 16 lanes; the
/// division is a reciprocal estimate refined by one Newton step (full single precision).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn gelu(x: __m512) -> __m512 {
    let c = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-ERF_CLAMP)), _mm512_set1_ps(ERF_CLAMP));
    let c2 = _mm512_mul_ps(c, c);
    let mut p = _mm512_set1_ps(ERF_NUM[6]);
    for &k in ERF_NUM[..6].iter().rev() {
        p = _mm512_fmadd_ps(c2, p, _mm512_set1_ps(k));
    }
    let mut q = _mm512_set1_ps(ERF_DEN[4]);
    for &k in ERF_DEN[..4].iter().rev() {
        q = _mm512_fmadd_ps(c2, q, _mm512_set1_ps(k));
    }
    let r = _mm512_rcp14_ps(q);
    let r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.0)));
    let erf = _mm512_mul_ps(_mm512_mul_ps(c, p), r);
    let half_x = _mm512_mul_ps(_mm512_set1_ps(0.5), x);
    _mm512_fmadd_ps(half_x, erf, half_x)
}

/// GELU for `Epilogue::BiasGeluBf16`: erf(x / sqrt 2) as c P(c^2) / Q(c^2) with c = x
/// clamped to +-4.25, P and Q of degree 2 and 3 (a least-squares minimax fit, |error| <=
/// 6.5e-5, `tools/fit_gelu_bf16.py`), the division by an unrefined reciprocal estimate
/// (2^-14 relative): 13 vector operations against the exact form's 20.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_bf16(x: __m512) -> __m512 {
    let c = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-4.25)), _mm512_set1_ps(4.25));
    let c2 = _mm512_mul_ps(c, c);
    let p = _mm512_fmadd_ps(
        c2,
        _mm512_fmadd_ps(c2, _mm512_set1_ps(5.415_635e-3), _mm512_set1_ps(7.238_041_6e-2)),
        _mm512_set1_ps(7.976_824_6e-1),
    );
    let q = _mm512_fmadd_ps(
        c2,
        _mm512_fmadd_ps(c2, _mm512_set1_ps(4.318_789_3e-4), _mm512_set1_ps(2.537_439_2e-2)),
        _mm512_set1_ps(2.565_095_4e-1),
    );
    let q = _mm512_fmadd_ps(c2, q, _mm512_set1_ps(1.0));
    let erf = _mm512_mul_ps(_mm512_mul_ps(c, p), _mm512_rcp14_ps(q));
    let half_x = _mm512_mul_ps(_mm512_set1_ps(0.5), x);
    _mm512_fmadd_ps(half_x, erf, half_x)
}
