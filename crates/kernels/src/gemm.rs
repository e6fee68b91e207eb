//! Activation rows times a weight matrix packed once at load time, with the epilogue (bias,
//! activation, residual) applied while the results are still in registers.
//!
//! On x86-64 with AVX-512 this is our own microkernel: 9 rows x 48 columns (or 12 x 32) of
//! accumulators (27 or 24 of the 32 zmm registers), the weights pre-packed into column panels
//! of that width so that every weight load is one full vector, and the activations broadcast
//! straight from their rows (no packing of the left operand, whose tiles the caller keeps in
//! L2). Any other CPU gets the `gemm` crate on the row-major weights and a separate epilogue
//! pass: the same results within rounding. Where the CPU has AVX512-BF16, the same tiles can
//! run on bf16 operands (`vdpbf16ps`: two products per lane and instruction, summed in fp32):
//! weights are converted once at load time, each product's left operand when it runs. Where
//! it also has AMX, bf16 products run on the tile unit instead (`amx.rs`).
//!
//! The left operand may be split into column segments read from different places: fc1 reads
//! the partial convolution's output for the first channels and the untouched input channels
//! for the rest, so the mixed tensor is never assembled.

use crate::cpu::{Isa, Kernels};
use crate::loops;
use crate::Activation;

/// Columns of `A`: `k` consecutive values from row `r` at `ptr + r * stride`; a null `ptr`
/// stands for zeros (the matching rows of the weights are skipped). `T` is the operand's
/// element: `f32`, or bf16 bits (`SegmentBf16`).
#[derive(Clone, Copy)]
pub struct Segment<T = f32> {
    pub ptr: *const T,
    pub stride: usize,
    pub k: usize,
}

impl<T> Segment<T> {
    pub fn zeros(k: usize) -> Self {
        Self { ptr: std::ptr::null(), stride: 0, k }
    }
}

/// A `Segment` of a left operand already in bf16 (`to_bf16_rows`); `k` must be even.
pub type SegmentBf16 = Segment<u16>;

/// Where a product's results go: fp32 rows, or bf16 rows (`matmul_to_bf16`).
#[derive(Clone, Copy)]
pub(crate) enum Dst {
    F32(*mut f32),
    Bf16(*mut u16),
}

impl Dst {
    /// The same destination `offset` values on.
    ///
    /// # Safety
    /// As `pointer::add`.
    unsafe fn add(self, offset: usize) -> Self {
        // SAFETY: the caller upholds this function's contract (`# Safety` above).
        unsafe {
            match self {
                Dst::F32(p) => Dst::F32(p.add(offset)),
                Dst::Bf16(p) => Dst::Bf16(p.add(offset)),
            }
        }
    }
}

#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// dst = A W
    Store,
    /// dst = act(A W + bias)
    Bias(&'a [f32], Option<Activation>),
    /// dst = GELU(A W + bias) to 1e-4 |x| instead of 3e-7 relative, in 13 vector operations
    /// instead of 20: for the bf16 engine, whose next product rounds dst to bf16 (2^-9
    /// relative) anyway.
    BiasGeluBf16(&'a [f32]),
    /// dst = A W + residual; `residual` rows have the stride of `dst`'s.
    Residual(*const f32),
}

/// A (k x n) weight matrix in the layout its `Kernels` want.
pub struct Weights {
    pub k: usize,
    pub n: usize,
    data: Layout,
}

// The panel layouts are only read by the x86-64 kernels.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Layout {
    /// With the kernels whose epilogue pass runs on it.
    RowMajor(Vec<f32>, Kernels),
    /// Column panels as `panel_vectors` cuts them (zero-padded), k rows each.
    Panels(Vec<f32>),
    /// The same panels in bf16 with rows in pairs: per pair (2i, 2i + 1), each column's two
    /// values side by side, the operand layout of `vdpbf16ps`; an odd k gets a zero row.
    PanelsBf16(Vec<u16>),
    /// bf16 tiles for AMX, as `amx::pack` lays them out.
    TilesAmx(Vec<u16>),
}

impl Weights {
    /// `row_major`: (k x n).
    pub fn new(k: usize, n: usize, row_major: Vec<f32>, kernels: Kernels) -> Self {
        assert_eq!(row_major.len(), k * n, "weight matrix shape");
        if !kernels.has_avx512() {
            return Self { k, n, data: Layout::RowMajor(row_major, kernels) };
        }
        let at = |i: usize, j: usize| if i < k && j < n { row_major[i * n + j] } else { 0.0 };
        #[cfg(target_arch = "x86_64")]
        if kernels.isa() == Isa::Amx {
            return Self { k, n, data: Layout::TilesAmx(crate::amx::pack(k, n, at)) };
        }
        let panels = || {
            panel_vectors(n).scan(0, |j0, v| Some((std::mem::replace(j0, *j0 + 16 * v), 16 * v)))
        };
        let data = if kernels.isa() == Isa::Avx512Bf16 {
            let mut data = Vec::with_capacity(k.next_multiple_of(2) * n.div_ceil(16) * 16);
            for (j0, width) in panels() {
                for i in (0..k).step_by(2) {
                    for j in j0..j0 + width {
                        data.extend([bf16(at(i, j)), bf16(at(i + 1, j))]);
                    }
                }
            }
            Layout::PanelsBf16(data)
        } else {
            let mut data = Vec::with_capacity(k * n.div_ceil(16) * 16);
            for (j0, width) in panels() {
                for i in 0..k {
                    data.extend((j0..j0 + width).map(|j| at(i, j)));
                }
            }
            Layout::Panels(data)
        };
        Self { k, n, data }
    }

    /// Whether these weights multiply in bf16, and so take left operands already in bf16
    /// (`matmul_bf16`) and can write bf16 results (`matmul_to_bf16`).
    pub fn takes_bf16_segments(&self) -> bool {
        matches!(self.data, Layout::PanelsBf16(_) | Layout::TilesAmx(_))
    }
}

/// `rows` rows of `k` floats (row stride `stride`) to bf16 rows of `k` values at `dst`, the
/// left operand of `matmul_bf16`: for an operand that several products read, converted once.
///
/// # Safety
/// Only where some `Weights::takes_bf16_segments()` (the CPU has AVX512-BF16); the pointers
/// must cover the rows.
pub unsafe fn to_bf16_rows(src: *const f32, stride: usize, rows: usize, k: usize, dst: *mut u16) {
    // SAFETY: the caller upholds this function's contract (`# Safety` above).
    unsafe {
        #[cfg(target_arch = "x86_64")]
        for r in 0..rows {
            avx512::to_bf16(src.add(r * stride), k, dst.add(r * k));
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "bf16 kernels are only selected on x86-64 ({src:?}, {stride}, {rows}, {k}, {dst:?})"
        )
    }
}

/// `matmul` with weights for which `takes_bf16_segments()` and a left operand already in bf16.
///
/// # Safety
/// As `matmul`; moreover every segment's `k` is even.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub unsafe fn matmul_bf16(
    m: usize,
    a: &[SegmentBf16],
    w: &Weights,
    dst: *mut f32,
    dst_rs: usize,
    epilogue: Epilogue,
) {
    // SAFETY: the caller upholds this function's contract (`# Safety` above).
    unsafe {
        debug_assert!(
            a.iter().all(|s| s.k % 2 == 0) && a.iter().map(|s| s.k).sum::<usize>() == w.k
        );
        match &w.data {
            #[cfg(target_arch = "x86_64")]
            Layout::PanelsBf16(data) if m > 0 && w.n > 0 => {
                avx512::matmul_bf16_segments(m, a, w, data, Dst::F32(dst), dst_rs, epilogue)
            }
            #[cfg(target_arch = "x86_64")]
            Layout::TilesAmx(data) if m > 0 && w.n > 0 => {
                crate::amx::matmul_bf16(m, a, w, data, Dst::F32(dst), dst_rs, epilogue)
            }
            _ => assert!(m == 0 || w.n == 0, "matmul_bf16 needs bf16 weights"),
        }
    }
}

/// As `matmul`, with the results rounded to bf16 (to nearest even) into `dst` (m x w.n u16,
/// row stride `dst_rs`): for an output whose only reader is another bf16 product
/// (`matmul_bf16`), which would round it so anyway; it gets the same operand in half the
/// bytes and without a conversion pass.
///
/// # Safety
/// As `matmul`; moreover `w.takes_bf16_segments()`.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub unsafe fn matmul_to_bf16(
    m: usize,
    a: &[Segment],
    w: &Weights,
    dst: *mut u16,
    dst_rs: usize,
    epilogue: Epilogue,
) {
    // SAFETY: the caller upholds this function's contract (`# Safety` above).
    unsafe {
        debug_assert_eq!(a.iter().map(|s| s.k).sum::<usize>(), w.k);
        match &w.data {
            #[cfg(target_arch = "x86_64")]
            Layout::PanelsBf16(data) if m > 0 && w.n > 0 => {
                avx512::matmul_bf16(m, a, w, data, Dst::Bf16(dst), dst_rs, epilogue)
            }
            #[cfg(target_arch = "x86_64")]
            Layout::TilesAmx(data) if m > 0 && w.n > 0 => {
                crate::amx::matmul(m, a, w, data, Dst::Bf16(dst), dst_rs, epilogue)
            }
            _ => assert!(m == 0 || w.n == 0, "matmul_to_bf16 needs bf16 weights"),
        }
    }
}

/// f32 to bf16, rounding to nearest even (as `vcvtneps2bf16` does for finite values).
pub(crate) fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Widths, in vectors of 16 columns, of the panels that cover `n` columns: triples (48
/// columns, a 9 x 3 register tile) and pairs (12 x 2) for what is left, so that no panel runs
/// the lower-throughput single-vector tile except for n <= 16. The triple does 27 FMAs per 12
/// loads (9 broadcasts, 3 weight vectors) where the pair does 24 per 14 (measured in
/// docs/benchmark-log.md).
fn panel_vectors(n: usize) -> impl Iterator<Item = usize> {
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

/// dst (m x n, row stride `dst_rs`) = epilogue([segments...] @ w).
///
/// # Safety
/// Every segment must cover `m` rows; the segments' `k` must add up to `w.k`; dst must cover
/// m rows of `w.n` values at stride `dst_rs` and alias neither the segments nor the residual.
pub unsafe fn matmul(
    m: usize,
    a: &[Segment],
    w: &Weights,
    dst: *mut f32,
    dst_rs: usize,
    epilogue: Epilogue,
) {
    // SAFETY: the caller upholds this function's contract (`# Safety` above).
    unsafe {
        debug_assert_eq!(a.iter().map(|s| s.k).sum::<usize>(), w.k);
        if m == 0 || w.n == 0 {
            return;
        }
        match &w.data {
            Layout::RowMajor(data, kernels) => {
                portable(m, a, w, data, *kernels, dst, dst_rs, epilogue)
            }
            #[cfg(target_arch = "x86_64")]
            Layout::Panels(data) => avx512::matmul(m, a, w, data, dst, dst_rs, epilogue),
            #[cfg(target_arch = "x86_64")]
            Layout::PanelsBf16(data) => {
                avx512::matmul_bf16(m, a, w, data, Dst::F32(dst), dst_rs, epilogue)
            }
            #[cfg(target_arch = "x86_64")]
            Layout::TilesAmx(data) => {
                crate::amx::matmul(m, a, w, data, Dst::F32(dst), dst_rs, epilogue)
            }
            #[cfg(not(target_arch = "x86_64"))]
            Layout::Panels(_) | Layout::PanelsBf16(_) | Layout::TilesAmx(_) => {
                unreachable!("AVX-512 kernels are only selected on x86-64")
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn portable(
    m: usize,
    a: &[Segment],
    w: &Weights,
    data: &[f32],
    kernels: Kernels,
    dst: *mut f32,
    dst_rs: usize,
    epilogue: Epilogue,
) {
    // SAFETY: as `matmul`, whose contract the caller upholds.
    unsafe {
        let n = w.n;
        let mut accumulate = false;
        if let Epilogue::Residual(res) = epilogue {
            for r in 0..m {
                std::ptr::copy_nonoverlapping(res.add(r * dst_rs), dst.add(r * dst_rs), n);
            }
            accumulate = true;
        }
        let mut k0 = 0;
        for s in a {
            if !s.ptr.is_null() {
                loops::matmul(
                    m,
                    n,
                    s.k,
                    dst,
                    dst_rs,
                    accumulate,
                    s.ptr,
                    s.stride,
                    data[k0 * n..].as_ptr(),
                );
                accumulate = true;
            }
            k0 += s.k;
        }
        if !accumulate {
            for r in 0..m {
                std::slice::from_raw_parts_mut(dst.add(r * dst_rs), n).fill(0.0);
            }
        }
        let (bias, act) = match epilogue {
            Epilogue::Bias(bias, act) => (bias, act),
            Epilogue::BiasGeluBf16(bias) => (bias, Some(Activation::Gelu)),
            Epilogue::Store | Epilogue::Residual(_) => return,
        };
        for r in 0..m {
            let row = std::slice::from_raw_parts_mut(dst.add(r * dst_rs), n);
            loops::bias_act(kernels, row, bias, act);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::{panel_vectors, Activation, Dst, Epilogue, Segment, SegmentBf16, Weights};
    use crate::blocking::MAX_TILE_ROWS;
    use crate::loops::{ERF_CLAMP, ERF_DEN, ERF_NUM};

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
                let v: __m256i =
                    std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(src.add(i))));
                _mm256_storeu_si256(dst.add(i) as *mut __m256i, v);
                i += 16;
            }
            if i < k {
                let mask = (1u16 << (k - i)) - 1;
                let v: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(
                    mask,
                    src.add(i),
                )));
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
                _mm512_mask_storeu_epi16(
                    dst.add(i).cast(),
                    first_lanes(k - i),
                    _mm512_setzero_si512(),
                );
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
                let mask: __mmask16 =
                    if valid % 16 == 0 { 0xffff } else { (1u16 << (valid % 16)) - 1 };
                let max_rows = MAX_TILE_ROWS[vectors - 1];
                let count = m.div_ceil(max_rows);
                let mut r0 = 0;
                for t in 0..count {
                    let rows = m / count + usize::from(t < m % count);
                    run(
                        rows,
                        vectors,
                        &Tile { r0, j0, dst: dst.add(r0 * dst_rs + j0), dst_rs, mask },
                    );
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

    /// The epilogue on one vector of sums, at output row `row` (of stride `dst_rs`), column `col`.
    macro_rules! finished {
        ($sum:expr, $mask:expr, $row:expr, $col:expr, $dst_rs:expr, $epilogue:expr) => {
            match $epilogue {
                Epilogue::Store => $sum,
                Epilogue::Bias(bias, act) => {
                    let x =
                        _mm512_add_ps($sum, _mm512_maskz_loadu_ps($mask, bias.as_ptr().add($col)));
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
                Epilogue::Residual(res) => _mm512_add_ps(
                    $sum,
                    _mm512_maskz_loadu_ps($mask, res.add($row * $dst_rs + $col)),
                ),
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
            let mut acc = [[_mm512_setzero_ps(); NV]; R];
            let mut wp = panel;
            for s in a {
                if !s.ptr.is_null() {
                    acc = accumulate::<R, NV>(acc, s.ptr.add(t.r0 * s.stride), s.stride, s.k, wp);
                }
                wp = wp.add(16 * NV * s.k);
            }
            let Dst::F32(dst) = t.dst else { unreachable!("fp32 weights write fp32") };
            store!(acc, t, epilogue, NV, |at, mask, out| _mm512_mask_storeu_ps(
                dst.add(at),
                mask,
                out
            ));
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
            match t.dst {
                Dst::F32(dst) => store!(acc, t, epilogue, NV, |at, mask, out| {
                    _mm512_mask_storeu_ps(dst.add(at), mask, out)
                }),
                Dst::Bf16(dst) => store!(acc, t, epilogue, NV, |at, mask, out| {
                    store_bf16(dst.add(at), mask, out)
                }),
            }
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
        let c =
            _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-ERF_CLAMP)), _mm512_set1_ps(ERF_CLAMP));
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(m: usize, k: usize, n: usize, a: &[f32], w: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                out[r * n + c] =
                    (0..k).map(|i| a[r * k + i] as f64 * w[i * n + c] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    /// Every row count 1..=12 and panel shape (16, 32, 48, masked), three segments (the middle
    /// one zeros), odd and even k, all epilogues, on this CPU's kernels (fp32 and, where it
    /// has them, bf16) and on the portable ones.
    #[test]
    fn matches_a_plain_product() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for (m, k, n) in [
            (1, 3, 1),
            (12, 40, 80),
            (29, 17, 40),
            (7, 90, 10),
            (37, 64, 100),
            (9, 5, 48),
            (21, 8, 112),
            (70, 135, 80),
        ] {
            let mut a: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let wm: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let bias: Vec<f32> = (0..n).map(|_| next()).collect();
            let residual: Vec<f32> = (0..m * n).map(|_| next()).collect();
            let (s1, s2) = (k / 3, k / 3 + k / 4);
            let segments = [
                Segment { ptr: a.as_ptr(), stride: k, k: s1 },
                Segment::zeros(s2 - s1),
                Segment { ptr: a[s2..].as_ptr(), stride: k, k: k - s2 },
            ];
            // What the zero segment stands for.
            a.chunks_exact_mut(k).for_each(|row| row[s1..s2].fill(0.0));
            let exact = reference(m, k, n, &a, &wm);
            // bf16 kernels: exactly the product of the operands rounded to bf16.
            let round = |v: &[f32]| {
                v.iter().map(|&x| f32::from_bits((bf16(x) as u32) << 16)).collect::<Vec<_>>()
            };
            let rounded = reference(m, k, n, &round(&a), &round(&wm));
            for kernels in
                [Kernels::detect(), Kernels::portable()].into_iter().chain(Kernels::all_bf16())
            {
                let want = if kernels.is_bf16() { &rounded } else { &exact };
                let w = Weights::new(k, n, wm.clone(), kernels);
                let epilogues = [
                    Epilogue::Store,
                    Epilogue::Bias(&bias, Some(Activation::Gelu)),
                    Epilogue::BiasGeluBf16(&bias),
                    Epilogue::Bias(&bias, Some(Activation::Relu)),
                    Epilogue::Residual(residual.as_ptr()),
                ];
                for epilogue in epilogues {
                    let mut got = vec![f32::NAN; m * n];
                    // SAFETY: the buffers hold the m x k operand and the m x n output the call
                    // describes.
                    unsafe { matmul(m, &segments, &w, got.as_mut_ptr(), n, epilogue) };
                    for (i, (&g, &p)) in got.iter().zip(want).enumerate() {
                        let c = i % n;
                        let expect = match epilogue {
                            Epilogue::Store => p,
                            Epilogue::Bias(_, Some(Activation::Gelu))
                            | Epilogue::BiasGeluBf16(_) => {
                                let x = (p + bias[c]) as f64;
                                (0.5 * x * (1.0 + libm_erf(x / std::f64::consts::SQRT_2))) as f32
                            }
                            Epilogue::Bias(_, _) => (p + bias[c]).max(0.0),
                            Epilogue::Residual(_) => p + residual[i],
                        };
                        let approximate =
                            matches!(epilogue, Epilogue::BiasGeluBf16(_)) && kernels.has_avx512();
                        let tolerance =
                            if approximate { 1e-4 * (p + bias[c]).abs().max(1.0) } else { 2e-5 };
                        assert!(
                            (g - expect).abs() < tolerance,
                            "{kernels:?} m={m} k={k} n={n} row {} col {c}: {g} vs {expect}",
                            i / n
                        );
                    }
                }
            }
        }
    }

    /// Left operands converted once (`to_bf16_rows` + `matmul_bf16` on bf16 segments, as the
    /// partial convolution and fc2 use them) give bit for bit what converting per product
    /// gives, and results written in bf16 (`matmul_to_bf16`, as fc1 writes them) are the fp32
    /// results rounded: on every bf16 kernel set this CPU runs, for operands split in segments
    /// (staged) and whole ones of a k that AMX reads in place, over row counts with and without
    /// a partial last 16 rows.
    #[test]
    fn bf16_segments_and_results_match_the_per_product_conversion() {
        let all = Kernels::all_bf16();
        if all.is_empty() {
            return eprintln!("skipped: this CPU has no AVX512-BF16");
        }
        for kernels in all {
            // Each case's staging rows start out holding the case before's values, so that a
            // value left unstaged shows.
            for (m, widths, n) in [
                (29, &[64][..], 40),
                (29, &[10, 10, 20], 40),
                (33, &[40, 24], 40),
                (48, &[96], 24),
                (40, &[32, 32], 72),
                (7, &[128], 33),
            ] {
                let k: usize = widths.iter().sum();
                let stride = k + 6;
                let a: Vec<f32> =
                    (0..m * stride).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
                let wm: Vec<f32> =
                    (0..k * n).map(|i| ((i * 104_729) % 997) as f32 / 498.0 - 1.0).collect();
                let bias: Vec<f32> = (0..n).map(|j| j as f32 / 7.0 - 2.0).collect();
                let w = Weights::new(k, n, wm, kernels);
                let mut ab = vec![0u16; m * stride];
                let (mut f32_segments, mut bf16_segments, mut k0) = (Vec::new(), Vec::new(), 0);
                for (i, &width) in widths.iter().enumerate() {
                    if i == 1 && widths.len() == 3 {
                        f32_segments.push(Segment::zeros(width));
                        bf16_segments.push(SegmentBf16::zeros(width));
                    } else {
                        f32_segments.push(Segment { ptr: a[k0..].as_ptr(), stride, k: width });
                        bf16_segments.push(SegmentBf16 {
                            ptr: ab[k0..].as_ptr(),
                            stride,
                            k: width,
                        });
                    }
                    k0 += width;
                }
                let epilogue = Epilogue::Bias(&bias, Some(Activation::Gelu));
                let (mut want, mut got) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                let mut got_bf16 = vec![0u16; m * n];
                // SAFETY: the buffers hold the m x k operand and the m x n outputs the calls
                // describe.
                unsafe {
                    to_bf16_rows(a.as_ptr(), stride, m, stride, ab.as_mut_ptr());
                    matmul_bf16(m, &bf16_segments, &w, got.as_mut_ptr(), n, epilogue);
                    matmul(m, &f32_segments, &w, want.as_mut_ptr(), n, epilogue);
                    matmul_to_bf16(m, &f32_segments, &w, got_bf16.as_mut_ptr(), n, epilogue);
                }
                let shape = format!("{kernels:?} m={m} k={widths:?} n={n}");
                assert_eq!(got, want, "{shape}");
                let rounded: Vec<u16> = want.iter().map(|&x| bf16(x)).collect();
                assert_eq!(got_bf16, rounded, "{shape}");
            }
        }
    }

    /// The GELU epilogues of this CPU's kernels against the portable one (itself checked
    /// against the f64 definition in `loops::tests`) from -12 to 12, past the erf clamps:
    /// the exact one to 1e-6 relative, the bf16 engine's to 1e-4 |x|.
    #[test]
    fn gelu_epilogue_agrees_with_the_portable_one_over_a_wide_range() {
        let xs: Vec<f32> = (-1200..=1200).map(|i| i as f32 / 100.0).collect();
        let (m, n) = (xs.len(), 16);
        let bias = vec![0f32; n];
        let out = |kernels, epilogue| {
            let w = Weights::new(1, n, vec![1.0; n], kernels);
            let mut got = vec![f32::NAN; m * n];
            let a = [Segment { ptr: xs.as_ptr(), stride: 1, k: 1 }];
            // SAFETY: the buffers hold the m x k operand and the m x n output the call describes.
            unsafe { matmul(m, &a, &w, got.as_mut_ptr(), n, epilogue) };
            got
        };
        let exact = Epilogue::Bias(&bias, Some(Activation::Gelu));
        let portable = out(Kernels::portable(), exact);
        for (epilogue, tolerance) in [(exact, 1e-6), (Epilogue::BiasGeluBf16(&bias), 1e-4)] {
            for (i, (d, p)) in out(Kernels::detect(), epilogue).iter().zip(&portable).enumerate() {
                let x = xs[i / n];
                assert!((d - p).abs() <= tolerance * x.abs().max(1.0), "x = {x}: {d} vs {p}");
            }
        }
    }

    /// erf by its Taylor series (|x| is small here).
    fn libm_erf(x: f64) -> f64 {
        let (mut sum, mut term) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
