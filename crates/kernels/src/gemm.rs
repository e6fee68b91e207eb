//! Activation rows times a weight matrix packed once at load time, with the epilogue (bias,
//! activation, residual) applied while the results are still in registers.
//!
//! On x86-64 this is our own microkernel, with AVX-512 (`avx512.rs`: 9 rows x 48 columns or
//! 12 x 32 of accumulators, 27 or 24 of the 32 zmm registers) or with AVX2 and FMA
//! (`avx2.rs`: 6 x 16, 12 of the 16 ymm registers): the weights pre-packed into column panels
//! of the tile's width so that every weight load is one full vector, and the activations
//! broadcast straight from their rows (no packing of the left operand, whose tiles the caller
//! keeps in L2). Any other CPU gets the `gemm` crate on the row-major weights and a separate
//! epilogue pass: the same results within rounding. Where the CPU has AVX512-BF16, the same
//! tiles can run on bf16 operands (`vdpbf16ps`: two products per lane and instruction, summed
//! in fp32): weights are converted once at load time, each product's left operand when it
//! runs. Where it also has AMX, bf16 products run on the tile unit instead (`amx.rs`).
//!
//! The left operand may be split into column segments read from different places: fc1 reads
//! the partial convolution's output for the first channels and the untouched input channels
//! for the rest, so the mixed tensor is never assembled.

use crate::cpu::{Isa, Kernels};
use crate::int8::QuantU8;
use crate::loops;
use crate::Activation;
#[cfg(target_arch = "x86_64")]
use crate::{avx2, avx512};

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

    /// Reads one value of every cache line of this segment's first `rows` rows, in address
    /// order, so that the product that follows finds them in cache. A strided convolution's
    /// product reads its patches a few values of each of several input rows at a time (the
    /// stem: 16 bytes of each of twelve image rows), an order the hardware prefetchers do not
    /// keep ahead of, so the product would wait for memory; read in address order first, the
    /// same bytes stream in (measured in docs/benchmark-log.md).
    ///
    /// # Safety
    /// The segment's first `rows` rows are readable, as for a product over them.
    pub unsafe fn load_into_cache(&self, rows: usize) {
        if self.ptr.is_null() || rows == 0 || self.k == 0 {
            return;
        }
        let len = (rows - 1) * self.stride + self.k;
        let per_line = (64 / size_of::<T>()).max(1);
        for i in (0..len).step_by(per_line).chain([len - 1]) {
            // SAFETY: i < len, inside the rows the caller vouches for (`# Safety` above); a
            // volatile read, so that the compiler keeps a load whose value is unused.
            unsafe { self.ptr.add(i).read_volatile() };
        }
    }
}

/// A `Segment` of a left operand already in bf16 (`to_bf16_rows`); `k` must be even.
pub type SegmentBf16 = Segment<u16>;

/// Where a bf16 or int8 product's results go (`matmul_bf16`, `matmul_u8`): fp32 rows, bf16
/// rows (rounded to nearest even) for an output whose readers are other bf16 products, or u8
/// rows quantised for an int8 product (AVX-512 kernels only).
#[derive(Clone, Copy)]
pub enum Dst {
    F32(*mut f32),
    Bf16(*mut u16),
    U8(*mut u8, QuantU8),
}

impl Dst {
    /// The same destination `offset` values on.
    ///
    /// # Safety
    /// As `pointer::add`.
    pub unsafe fn add(self, offset: usize) -> Self {
        // SAFETY: the caller upholds this function's contract (`# Safety` above).
        unsafe {
            match self {
                Dst::F32(p) => Dst::F32(p.add(offset)),
                Dst::Bf16(p) => Dst::Bf16(p.add(offset)),
                Dst::U8(p, q) => Dst::U8(p.add(offset), q),
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
    /// The same with a bf16 residual (bf16 products only).
    ResidualBf16(*const u16),
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
    /// For the portable kernels.
    RowMajor(Vec<f32>),
    /// Column panels as `avx512::panel_vectors` cuts them (zero-padded), k rows each.
    Panels(Vec<f32>),
    /// The same for the AVX2 kernels, as `avx2::panel_vectors` cuts them.
    PanelsAvx2(Vec<f32>),
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
        #[cfg(target_arch = "x86_64")]
        {
            let at = |i: usize, j: usize| if i < k && j < n { row_major[i * n + j] } else { 0.0 };
            // (first column, width) of each panel, for panels of `vectors` x `lanes` columns.
            fn panels(vectors: impl Iterator<Item = usize>, lanes: usize) -> Vec<(usize, usize)> {
                vectors
                    .scan(0, |j0, v| Some((std::mem::replace(j0, *j0 + lanes * v), lanes * v)))
                    .collect()
            }
            let fp32_panels = |panels: Vec<(usize, usize)>| {
                let mut data = Vec::with_capacity(k * panels.iter().map(|p| p.1).sum::<usize>());
                for (j0, width) in panels {
                    for i in 0..k {
                        data.extend((j0..j0 + width).map(|j| at(i, j)));
                    }
                }
                data
            };
            let data = match kernels.isa() {
                Isa::Portable => Layout::RowMajor(row_major),
                Isa::Avx2 => Layout::PanelsAvx2(fp32_panels(panels(avx2::panel_vectors(n), 8))),
                Isa::Avx512 => Layout::Panels(fp32_panels(panels(avx512::panel_vectors(n), 16))),
                Isa::Avx512Bf16 | Isa::Avx512Vnni => {
                    let mut data = Vec::with_capacity(k.next_multiple_of(2) * n.div_ceil(16) * 16);
                    for (j0, width) in panels(avx512::panel_vectors(n), 16) {
                        for i in (0..k).step_by(2) {
                            for j in j0..j0 + width {
                                data.extend([bf16(at(i, j)), bf16(at(i + 1, j))]);
                            }
                        }
                    }
                    Layout::PanelsBf16(data)
                }
                Isa::Amx => Layout::TilesAmx(crate::amx::pack(k, n, at)),
            };
            Self { k, n, data }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            debug_assert_eq!(kernels.isa(), Isa::Portable);
            Self { k, n, data: Layout::RowMajor(row_major) }
        }
    }

    /// The bytes a product reads of these weights (their layout's, padding included).
    pub fn bytes(&self) -> usize {
        match &self.data {
            Layout::RowMajor(v) | Layout::Panels(v) | Layout::PanelsAvx2(v) => 4 * v.len(),
            Layout::PanelsBf16(v) | Layout::TilesAmx(v) => 2 * v.len(),
        }
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

/// `matmul` with weights for which `takes_bf16_segments()` and a left operand already in
/// bf16, into `dst` (bf16 results rounded to nearest even).
///
/// # Safety
/// As `matmul`; moreover every segment's `k` is even.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub unsafe fn matmul_bf16(
    m: usize,
    a: &[SegmentBf16],
    w: &Weights,
    dst: Dst,
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
                avx512::matmul_bf16_segments(m, a, w, data, dst, dst_rs, epilogue)
            }
            #[cfg(target_arch = "x86_64")]
            Layout::TilesAmx(data) if m > 0 && w.n > 0 => {
                crate::amx::matmul_bf16(m, a, w, data, dst, dst_rs, epilogue)
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
            Layout::RowMajor(data) => portable(m, a, w, data, dst, dst_rs, epilogue),
            #[cfg(target_arch = "x86_64")]
            Layout::Panels(data) => avx512::matmul(m, a, w, data, dst, dst_rs, epilogue),
            #[cfg(target_arch = "x86_64")]
            Layout::PanelsAvx2(data) => avx2::matmul(m, a, w, data, dst, dst_rs, epilogue),
            #[cfg(target_arch = "x86_64")]
            Layout::PanelsBf16(data) => {
                avx512::matmul_bf16(m, a, w, data, Dst::F32(dst), dst_rs, epilogue)
            }
            #[cfg(target_arch = "x86_64")]
            Layout::TilesAmx(data) => {
                crate::amx::matmul(m, a, w, data, Dst::F32(dst), dst_rs, epilogue)
            }
            #[cfg(not(target_arch = "x86_64"))]
            Layout::Panels(_)
            | Layout::PanelsAvx2(_)
            | Layout::PanelsBf16(_)
            | Layout::TilesAmx(_) => {
                unreachable!("x86-64 kernels are only selected on x86-64")
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
            Epilogue::ResidualBf16(_) => unreachable!("bf16 residuals for bf16 products only"),
        };
        for r in 0..m {
            let row = std::slice::from_raw_parts_mut(dst.add(r * dst_rs), n);
            loops::bias_act(row, bias, act);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Products' (m, k, n) for the kernels' tests: every row count 1..=12 and panel shape
    /// (AVX-512: 16, 32, 48, masked; AVX2: 8, 16, masked), odd and even k.
    pub(crate) const SHAPES: [(usize, usize, usize); 8] = [
        (1, 3, 1),
        (12, 40, 80),
        (29, 17, 40),
        (7, 90, 10),
        (37, 64, 100),
        (9, 5, 48),
        (21, 8, 112),
        (70, 135, 80),
    ];

    /// Every epilogue with an fp32 residual, on `bias` and `residual`.
    pub(crate) fn epilogues<'a>(bias: &'a [f32], residual: &'a [f32]) -> [Epilogue<'a>; 5] {
        [
            Epilogue::Store,
            Epilogue::Bias(bias, Some(Activation::Gelu)),
            Epilogue::BiasGeluBf16(bias),
            Epilogue::Bias(bias, Some(Activation::Relu)),
            Epilogue::Residual(residual.as_ptr()),
        ]
    }

    /// What `epilogue` (of `epilogues`) makes of the product `p` at index `i` of the output.
    pub(crate) fn expected(epilogue: Epilogue, p: f64, i: usize, bias: &[f32], res: &[f32]) -> f64 {
        let x = p + f64::from(bias[i % bias.len()]);
        match epilogue {
            Epilogue::Store => p,
            Epilogue::Bias(_, Some(Activation::Gelu)) | Epilogue::BiasGeluBf16(_) => {
                0.5 * x * (1.0 + libm_erf(x / std::f64::consts::SQRT_2))
            }
            Epilogue::Bias(_, _) => x.max(0.0),
            Epilogue::Residual(_) => p + f64::from(res[i]),
            Epilogue::ResidualBf16(_) => unreachable!("not among `epilogues`"),
        }
    }

    /// A generator of uniform values in [-0.5, 0.5) (xorshift), the same sequence per seed.
    pub(crate) fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

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

    /// Every row count 1..=12 and panel shape (AVX-512: 16, 32, 48, masked; AVX2: 8, 16,
    /// masked), three segments (the middle one zeros), odd and even k, all epilogues, on this
    /// CPU's kernels (fp32 and, where it has them, bf16) and on the portable ones.
    #[test]
    fn matches_a_plain_product() {
        let mut next = uniform(0x2545_f491_4f6c_dd1d);
        for (m, k, n) in SHAPES.into_iter().chain([(2, 7, 24), (3, 33, 20), (8, 16, 8)]) {
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
            for kernels in Kernels::all_fp32().into_iter().chain(Kernels::all_bf16()) {
                let want = if kernels.is_bf16() { &rounded } else { &exact };
                let w = Weights::new(k, n, wm.clone(), kernels);
                for epilogue in epilogues(&bias, &residual) {
                    let mut got = vec![f32::NAN; m * n];
                    // SAFETY: the buffers hold the m x k operand and the m x n output the call
                    // describes.
                    unsafe { matmul(m, &segments, &w, got.as_mut_ptr(), n, epilogue) };
                    for (i, (&g, &p)) in got.iter().zip(want).enumerate() {
                        let c = i % n;
                        let expect = expected(epilogue, p.into(), i, &bias, &residual) as f32;
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
    /// bf16 engine's maps are) give bit for bit what converting per product gives; results
    /// written in bf16 (`matmul_to_bf16`, and `matmul_bf16` into `Dst::Bf16`) are the fp32
    /// results rounded; a bf16 residual adds what the same values in fp32 add: on every bf16
    /// kernel set this CPU runs, for operands split in segments (staged) and whole ones of a k
    /// that AMX reads in place, over row counts with and without a partial last 16 rows.
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
                let mut from_bf16 = vec![0u16; m * n];
                let residual_bf16: Vec<u16> =
                    (0..m * n).map(|i| bf16(((i * 31) % 89) as f32 / 11.0 - 4.0)).collect();
                let residual: Vec<f32> =
                    residual_bf16.iter().map(|&b| f32::from_bits(u32::from(b) << 16)).collect();
                let (mut want_sum, mut got_sum) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                // SAFETY: the buffers hold the m x k operand and the m x n outputs the calls
                // describe.
                unsafe {
                    to_bf16_rows(a.as_ptr(), stride, m, stride, ab.as_mut_ptr());
                    matmul_bf16(m, &bf16_segments, &w, Dst::F32(got.as_mut_ptr()), n, epilogue);
                    matmul(m, &f32_segments, &w, want.as_mut_ptr(), n, epilogue);
                    matmul_to_bf16(m, &f32_segments, &w, got_bf16.as_mut_ptr(), n, epilogue);
                    let dst = Dst::Bf16(from_bf16.as_mut_ptr());
                    matmul_bf16(m, &bf16_segments, &w, dst, n, epilogue);
                    let (dst, add) = (Dst::F32(want_sum.as_mut_ptr()), residual.as_ptr());
                    matmul_bf16(m, &bf16_segments, &w, dst, n, Epilogue::Residual(add));
                    let (dst, add) = (Dst::F32(got_sum.as_mut_ptr()), residual_bf16.as_ptr());
                    matmul_bf16(m, &bf16_segments, &w, dst, n, Epilogue::ResidualBf16(add));
                }
                let shape = format!("{kernels:?} m={m} k={widths:?} n={n}");
                assert_eq!(got, want, "{shape}");
                let rounded: Vec<u16> = want.iter().map(|&x| bf16(x)).collect();
                assert_eq!(got_bf16, rounded, "{shape}");
                assert_eq!(from_bf16, rounded, "{shape}: bf16 segments to bf16");
                assert_eq!(got_sum, want_sum, "{shape}: bf16 residual");
            }
        }
    }

    /// Reads stay inside the segment's rows, to the last element, on buffers of exactly that
    /// length (an overrun is what valgrind's run of these tests in CI reports).
    #[test]
    fn loading_into_cache_reads_only_the_segments_rows() {
        for (rows, stride, k) in [(1, 0, 1), (3, 4, 4), (56, 12, 48), (7, 40, 3), (5, 17, 17)] {
            let f32s = vec![1f32; (rows - 1) * stride + k];
            let bf16s = vec![1u16; (rows - 1) * stride + k];
            // SAFETY: each buffer holds exactly the segment's rows.
            unsafe {
                Segment { ptr: f32s.as_ptr(), stride, k }.load_into_cache(rows);
                SegmentBf16 { ptr: bf16s.as_ptr(), stride, k }.load_into_cache(rows);
                Segment::<f32>::zeros(k).load_into_cache(rows);
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
            for kernels in Kernels::all_fp32() {
                for (i, (d, p)) in out(kernels, epilogue).iter().zip(&portable).enumerate() {
                    let x = xs[i / n];
                    assert!(
                        (d - p).abs() <= tolerance * x.abs().max(1.0),
                        "{kernels:?} x = {x}: {d} vs {p}"
                    );
                }
            }
        }
    }

    /// erf as its defining integral, 2 / sqrt(pi) times that of exp(-t^2) from 0 to x, by
    /// Simpson's rule on steps of at most 0.01 (error below 1e-12 at any x).
    pub(crate) fn libm_erf(x: f64) -> f64 {
        let steps = ((x.abs() / 0.01).ceil() as usize).max(2).next_multiple_of(2);
        let h = x / steps as f64;
        let f = |i: usize| (-(i as f64 * h).powi(2)).exp();
        let inner: f64 = (1..steps).map(|i| if i % 2 == 1 { 4.0 } else { 2.0 } * f(i)).sum();
        (f(0) + inner + f(steps)) * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }
}
