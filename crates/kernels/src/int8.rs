//! Products on int8 operands: activations quantised per tensor to u8 (`QuantU8`), weights
//! per output column to s8 (`WeightsI8`), summed in i32 (on AVX512-VNNI, `vpdpbusd`: four u8
//! x s8 products per 32-bit lane and instruction, twice `vdpbf16ps`'s count), the sums turned
//! back into real values at the start of the epilogue: the products of the fast-int8 engine.
//!
//! With the input a = sa (qa - za) and column j's weights w = sw_j qw, a product's column j is
//! sa sw_j (sum qa qw - za sum qw): per column one scale (sa sw_j) and one offset
//! (-za sa sw_j sum qw), both fixed when the weights are packed for their input's quantisation.

use crate::cpu::{Isa, Kernels};
use crate::gemm::{bf16, Dst, Epilogue, Segment};
use crate::{loops, Activation};

/// Per-tensor affine quantisation of activations to u8: real = scale (q - zero).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantU8 {
    pub scale: f32,
    pub zero: u8,
}

impl QuantU8 {
    /// The quantisation whose 256 steps span [min, max], widened to hold 0, so that zero (the
    /// convolutions' padding) is exact.
    pub fn covering(min: f32, max: f32) -> Self {
        let (min, max) = (min.min(0.0), max.max(0.0));
        let scale = if max > min { (max - min) / 255.0 } else { 1.0 };
        Self { scale, zero: (-min / scale).round_ties_even().clamp(0.0, 255.0) as u8 }
    }

    /// The nearest step to `x` (ties to even), clamped to the range: x / scale + zero, with
    /// the division as a multiplication by 1 / scale fused with the addition, as the vector
    /// code computes it.
    pub fn quantize(self, x: f32) -> u8 {
        x.mul_add(1.0 / self.scale, f32::from(self.zero)).round_ties_even().clamp(0.0, 255.0) as u8
    }
}

/// A (k x n) weight matrix quantised to s8 per column (symmetric: the column's largest
/// magnitude is 127 steps), for inputs of one `QuantU8`, in the layout its `Kernels` want.
pub struct WeightsI8 {
    pub k: usize,
    pub n: usize,
    /// Per column, padded with zeros to whole vectors of 16: sa sw_j.
    pub(crate) scale: Vec<f32>,
    /// Per column, padded likewise: -za sa sw_j sum_i qw_ij.
    pub(crate) offset: Vec<f32>,
    data: Layout,
}

// The panel layout is only read by the x86-64 kernels.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Layout {
    /// For the portable loops.
    RowMajor(Vec<i8>),
    /// Column panels as `avx512::panel_vectors` cuts them (zero-padded), rows in quads: per
    /// quad (4i .. 4i + 3), each column's four values side by side, the operand layout of
    /// `vpdpbusd`; k padded with zero rows to a multiple of 4.
    PanelsVnni(Vec<i8>),
}

impl WeightsI8 {
    /// `row_major`: (k x n) real weights; `input`: how the left operands are quantised.
    pub fn new(k: usize, n: usize, row_major: &[f32], input: QuantU8, kernels: Kernels) -> Self {
        assert_eq!(row_major.len(), k * n, "weight matrix shape");
        let padded = n.next_multiple_of(16);
        let (mut scale, mut offset) = (vec![0f32; padded], vec![0f32; padded]);
        let mut q = vec![0i8; k * n];
        for j in 0..n {
            let largest = (0..k).map(|i| row_major[i * n + j].abs()).fold(0f32, f32::max);
            let step = if largest > 0.0 { largest / 127.0 } else { 1.0 };
            let mut sum = 0i32;
            for i in 0..k {
                let v = (row_major[i * n + j] / step).round_ties_even().clamp(-127.0, 127.0);
                q[i * n + j] = v as i8;
                sum += v as i32;
            }
            scale[j] = input.scale * step;
            offset[j] = -(f32::from(input.zero) * sum as f32) * scale[j];
        }
        let data = match kernels.isa() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                let kp = k.next_multiple_of(4);
                let at = |i: usize, j: usize| if i < k && j < n { q[i * n + j] } else { 0 };
                let mut data = Vec::with_capacity(kp * padded);
                let mut j0 = 0;
                for vectors in crate::avx512::panel_vectors(n) {
                    for i in (0..kp).step_by(4) {
                        for j in j0..j0 + 16 * vectors {
                            data.extend((i..i + 4).map(|i| at(i, j)));
                        }
                    }
                    j0 += 16 * vectors;
                }
                Layout::PanelsVnni(data)
            }
            Isa::Portable => Layout::RowMajor(q),
            isa => panic!("int8 weights need int8 kernels (Kernels::detect_int8), not {isa:?}"),
        };
        Self { k, n, scale, offset, data }
    }

    /// The k of the left operand a product takes: `k` rounded up to a multiple of 4.
    pub fn padded_k(&self) -> usize {
        self.k.next_multiple_of(4)
    }
}

/// dst (m x n, row stride `dst_rs`) = epilogue(real value of [segments...] @ w): the segments
/// hold u8 rows quantised as `w` was made for, their k (each a multiple of 4) adding up to
/// `w.padded_k()`; values past `w.k` are multiplied by zero weights.
///
/// # Safety
/// Every segment must cover `m` rows; dst must cover m rows of `w.n` values at stride `dst_rs`
/// and alias neither the segments nor the residual, whose rows have dst's stride; a bf16
/// residual (`Epilogue::ResidualBf16`) only on the int8 kernels.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub unsafe fn matmul_u8(
    m: usize,
    a: &[Segment<u8>],
    w: &WeightsI8,
    dst: Dst,
    dst_rs: usize,
    epilogue: Epilogue,
) {
    // SAFETY: the caller upholds this function's contract (`# Safety` above).
    unsafe {
        debug_assert!(a.iter().all(|s| s.k % 4 == 0));
        debug_assert_eq!(a.iter().map(|s| s.k).sum::<usize>(), w.padded_k());
        if m == 0 || w.n == 0 {
            return;
        }
        match &w.data {
            Layout::RowMajor(q) => portable(m, a, w, q, dst, dst_rs, epilogue),
            #[cfg(target_arch = "x86_64")]
            Layout::PanelsVnni(data) => {
                crate::avx512::matmul_u8(m, a, w, data, dst, dst_rs, epilogue)
            }
            #[cfg(not(target_arch = "x86_64"))]
            Layout::PanelsVnni(_) => unreachable!("x86-64 kernels are only selected on x86-64"),
        }
    }
}

/// `rows` rows of `k` bf16 values (row stride `stride`) quantised by `q` (`QuantU8::quantize`)
/// into u8 rows at `dst` (row stride `dst_stride`): a product's left operand.
///
/// # Safety
/// The pointers cover the rows.
#[allow(clippy::too_many_arguments)]
pub unsafe fn quantize_bf16_rows(
    kernels: Kernels,
    src: *const u16,
    stride: usize,
    rows: usize,
    k: usize,
    q: QuantU8,
    dst: *mut u8,
    dst_stride: usize,
) {
    // SAFETY: the caller upholds this function's contract; the vector code runs only with the
    // int8 kernels, which `Kernels` holds only where the CPU has them.
    unsafe {
        for r in 0..rows {
            let (src, dst) = (src.add(r * stride), dst.add(r * dst_stride));
            match kernels.isa() {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Vnni => crate::avx512::quantize_bf16(src, k, q, dst),
                _ => {
                    for i in 0..k {
                        *dst.add(i) = q.quantize(f32::from_bits(u32::from(*src.add(i)) << 16));
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn portable(
    m: usize,
    a: &[Segment<u8>],
    w: &WeightsI8,
    q: &[i8],
    dst: Dst,
    dst_rs: usize,
    epilogue: Epilogue,
) {
    // SAFETY: as `matmul_u8`, whose contract the caller upholds.
    unsafe {
        let n = w.n;
        let mut sums = vec![0i32; n];
        let mut row = vec![0f32; n];
        for r in 0..m {
            sums.fill(0);
            let mut k0 = 0;
            for s in a {
                for i in k0..(k0 + s.k).min(w.k) {
                    let x = i32::from(*s.ptr.add(r * s.stride + i - k0));
                    let weights = &q[i * n..(i + 1) * n];
                    sums.iter_mut().zip(weights).for_each(|(sum, &v)| *sum += x * i32::from(v));
                }
                k0 += s.k;
            }
            for (j, v) in row.iter_mut().enumerate() {
                *v = (sums[j] as f32).mul_add(w.scale[j], w.offset[j]);
            }
            match epilogue {
                Epilogue::Store => {}
                Epilogue::Bias(bias, act) => loops::bias_act(&mut row, bias, act),
                Epilogue::BiasGeluBf16(bias) => {
                    loops::bias_act(&mut row, bias, Some(Activation::Gelu))
                }
                Epilogue::Residual(res) => {
                    row.iter_mut().enumerate().for_each(|(j, v)| *v += *res.add(r * dst_rs + j))
                }
                Epilogue::ResidualBf16(_) => unreachable!("bf16 residuals on int8 kernels only"),
            }
            match dst.add(r * dst_rs) {
                Dst::F32(p) => std::ptr::copy_nonoverlapping(row.as_ptr(), p, n),
                Dst::Bf16(p) => row.iter().enumerate().for_each(|(j, &v)| *p.add(j) = bf16(v)),
                Dst::U8(p, q) => {
                    row.iter().enumerate().for_each(|(j, &v)| *p.add(j) = q.quantize(v))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::tests::{epilogues, expected, uniform, SHAPES};

    /// bf16 rows of every length up to 40 (whole vectors of 16 and masked tails), values past
    /// both ends of the range and halfway between steps, on every int8 kernel set: what
    /// `QuantU8::quantize` gives each value, and nothing written past a row.
    #[test]
    fn quantised_rows_match_the_scalar_quantisation() {
        let q = QuantU8::covering(-1.5, 3.0);
        let mut values: Vec<f32> = (0..200).map(|i| i as f32 * 0.03 - 2.5).collect();
        values.extend((0..50).map(|i| q.scale * (i as f32 + 0.5 - f32::from(q.zero))));
        let bf16s: Vec<u16> = values.iter().map(|&v| bf16(v)).collect();
        for kernels in Kernels::all_int8() {
            for k in 1..=40 {
                let (rows, stride, dst_stride) = (bf16s.len() / 48, 48, k + 3);
                let mut got = vec![0xeeu8; rows * dst_stride];
                // SAFETY: `bf16s` holds `rows` rows of stride 48 >= k, `got` of dst_stride.
                unsafe {
                    let (src, dst) = (bf16s.as_ptr(), got.as_mut_ptr());
                    quantize_bf16_rows(kernels, src, stride, rows, k, q, dst, dst_stride);
                }
                for r in 0..rows {
                    let want = (0..k).map(|i| {
                        q.quantize(f32::from_bits(u32::from(bf16s[r * stride + i]) << 16))
                    });
                    let row = &got[r * dst_stride..][..dst_stride];
                    assert!(row[..k].iter().copied().eq(want), "{kernels:?} k={k} row {r}");
                    assert_eq!(row[k..], [0xee; 3], "{kernels:?} k={k} row {r}: past the row");
                }
            }
        }
    }

    #[test]
    fn quantisation_spans_the_range_and_keeps_zero_exact() {
        for (min, max) in [(-1.0, 3.0), (0.5, 2.0), (-4.0, -1.0), (-0.17, 6.0), (0.0, 0.0)] {
            let q = QuantU8::covering(min, max);
            let real = |v: u8| q.scale * (f32::from(v) - f32::from(q.zero));
            assert_eq!(real(q.quantize(0.0)), 0.0, "{min}..{max}");
            if max > min {
                assert!(real(0) <= min.min(0.0) + q.scale / 2.0, "{min}..{max}: {q:?}");
                assert!(real(255) >= max.max(0.0) - q.scale / 2.0, "{min}..{max}: {q:?}");
            }
            let x = (min + max) / 2.0;
            assert!((real(q.quantize(x)) - x).abs() <= q.scale / 2.0 + 1e-6, "{min}..{max}");
        }
        let q = QuantU8::covering(-1.0, 1.0);
        assert_eq!((q.quantize(-5.0), q.quantize(5.0)), (0, 255));
    }

    /// Every row count 1..=12 and panel shape (16, 32, 48 columns, masked ones), k that are and
    /// are not multiples of 4, one and two segments, every epilogue, fp32, bf16 and u8 results,
    /// on each int8 kernel set this CPU runs: the real product of the quantised operands, to
    /// fp32's rounding (GELU: the epilogue's own tolerance); bf16 and u8 results are the fp32
    /// ones rounded and quantised.
    #[test]
    fn matches_the_product_of_the_quantised_operands() {
        let mut next = uniform(0x9e37_79b9_7f4a_7c15);
        let (input, output) = (QuantU8::covering(-0.6, 2.0), QuantU8::covering(-1.0, 2.5));
        for (m, k, n) in SHAPES.into_iter().chain([(3, 256, 20)]) {
            let kp = k.next_multiple_of(4);
            // The padding past k holds any values: they meet zero weights.
            let a: Vec<u8> = (0..m * kp)
                .map(|i| if i % kp < k { ((next() + 0.5) * 255.9) as u8 } else { 0xa5 })
                .collect();
            let wm: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let bias: Vec<f32> = (0..n).map(|_| next()).collect();
            let residual: Vec<f32> = (0..m * n).map(|_| next()).collect();
            // The reference: each column quantised to its largest magnitude over 127 steps.
            let mut exact = vec![0f64; m * n];
            for j in 0..n {
                let step = (0..k).map(|i| wm[i * n + j].abs()).fold(0f32, f32::max) / 127.0;
                for r in 0..m {
                    exact[r * n + j] = (0..k)
                        .map(|i| {
                            let x = f64::from(input.scale)
                                * (f64::from(a[r * kp + i]) - f64::from(input.zero));
                            x * f64::from((wm[i * n + j] / step).round_ties_even() * step)
                        })
                        .sum();
                }
            }
            let split = (kp / 2).next_multiple_of(4).min(kp);
            let segments = [
                Segment { ptr: a.as_ptr(), stride: kp, k: split },
                Segment { ptr: a[split..].as_ptr(), stride: kp, k: kp - split },
            ];
            let whole = [Segment { ptr: a.as_ptr(), stride: kp, k: kp }];
            for kernels in Kernels::all_int8() {
                let w = WeightsI8::new(k, n, &wm, input, kernels);
                let epilogues = epilogues(&bias, &residual);
                for (a, epilogue) in
                    epilogues.into_iter().flat_map(|e| [(&segments[..], e), (&whole[..], e)])
                {
                    let mut got = vec![f32::NAN; m * n];
                    let mut got_bf16 = vec![0u16; m * n];
                    let mut got_u8 = vec![0u8; m * n];
                    // SAFETY: the buffers hold the m x kp operand and the m x n outputs the
                    // calls describe.
                    unsafe {
                        matmul_u8(m, a, &w, Dst::F32(got.as_mut_ptr()), n, epilogue);
                        matmul_u8(m, a, &w, Dst::Bf16(got_bf16.as_mut_ptr()), n, epilogue);
                        matmul_u8(m, a, &w, Dst::U8(got_u8.as_mut_ptr(), output), n, epilogue);
                    }
                    for (i, (&g, &p)) in got.iter().zip(&exact).enumerate() {
                        let c = i % n;
                        let expect = expected(epilogue, p, i, &bias, &residual);
                        let approximate = matches!(epilogue, Epilogue::BiasGeluBf16(_))
                            && kernels.isa() != Isa::Portable;
                        let scale = (p.abs() + f64::from(bias[c].abs())).max(1.0);
                        let tolerance = if approximate { 1e-4 } else { 1e-5 } * scale;
                        let shape = format!("{kernels:?} m={m} k={k} n={n} row {} col {c}", i / n);
                        assert!(
                            (f64::from(g) - expect).abs() < tolerance,
                            "{shape}: {g} vs {expect}"
                        );
                        assert_eq!(
                            got_bf16[i],
                            bf16(g),
                            "{shape}: the bf16 result rounds the fp32 one"
                        );
                        assert_eq!(
                            got_u8[i],
                            output.quantize(g),
                            "{shape}: the u8 result quantises the fp32 one"
                        );
                    }
                }
            }
        }
    }
}
