//! The small loops around the products: the `gemm` crate call of the portable path, bias +
//! activation epilogues for it, and the patch gathering (im2col) of the partial convolution's
//! edge pixels. NHWC activations, rows = pixels. The x86-64 microkernels apply their
//! epilogues in registers (`avx2.rs`, `avx512.rs`), so the loops here run only on CPUs
//! without AVX2, and in the tests as the reference.

use crate::Activation;

/// dst (m x n, row stride dst_rs) = [dst +] lhs (m x k, row stride lhs_rs) @ rhs (k x n, row-major).
///
/// # Safety
/// The pointers must cover the described matrices; dst must not alias lhs or rhs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
) {
    // SAFETY: the caller upholds the contract above; the `gemm` crate reads lhs and rhs and writes
    // dst within the described matrices.
    unsafe {
        if m == 0 || n == 0 {
            return;
        }
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            1,
            lhs_rs as isize,
            rhs,
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// a * b + c, rounded once.
#[inline(always)]
fn fma(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

/// erf(x / sqrt 2) = c P(c^2) / Q(c^2) with c = x clamped to +-ERF_CLAMP (where erf is +-1 in
/// f32): the rational approximation of Eigen's and XLA's float erf (|error| <= 5e-7), with the
/// 1 / sqrt 2 folded into the coefficients (lowest degree first). Shared with the
/// microkernels' epilogues (`avx512::gelu`, `avx2::gelu`).
pub(crate) const ERF_CLAMP: f32 = 5.656_854;
pub(crate) const ERF_NUM: [f32; 7] = [
    -1.138_161_4e-2,
    -1.044_608_8e-3,
    -1.299_292_2e-4,
    -5.031_512_5e-6,
    -9.285_302e-8,
    6.122_399e-10,
    -3.011_990_2e-12,
];
pub(crate) const ERF_DEN: [f32; 5] =
    [-1.426_473_9e-2, -3.686_664_6e-3, -4.207_067_5e-4, -2.667_175_6e-5, -9.103_795e-7];

/// Exact-erf GELU to ~3e-7 relative. Branch-free (one division, no exp) so that it vectorises.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let c = x.clamp(-ERF_CLAMP, ERF_CLAMP);
    let c2 = c * c;
    let p = ERF_NUM[..6].iter().rev().fold(ERF_NUM[6], |p, &k| fma(c2, p, k));
    let q = ERF_DEN[..4].iter().rev().fold(ERF_DEN[4], |q, &k| fma(c2, q, k));
    let half_x = 0.5 * x;
    fma(half_x, c * p / q, half_x)
}

/// Adds `bias` to every row of `data` (rows of `bias.len()`), then applies `act`: the
/// portable kernels' epilogue.
pub fn bias_act(data: &mut [f32], bias: &[f32], act: Option<Activation>) {
    for row in data.chunks_exact_mut(bias.len()) {
        match act {
            Some(Activation::Gelu) => row.iter_mut().zip(bias).for_each(|(v, b)| *v = gelu(*v + b)),
            Some(Activation::Relu) => {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v = (*v + b).max(0.0))
            }
            None => row.iter_mut().zip(bias).for_each(|(v, b)| *v += b),
        }
    }
}

/// size x size patches of the first `cp` channels of an NHWC map with `c` channels (`h` x `w`
/// per image), their top-left corner one row above and one column left of the pixels `cols`
/// of global image row `g` (image * h + row), zeros outside the image; columns ordered (di, dj,
/// channel). Size 3: the 3x3, stride 1, zero padding 1 convolution's patches; size 4: the
/// input patches of Winograd's 2x2 output blocks.
#[allow(clippy::too_many_arguments)]
pub fn im2col<T: Copy + Default>(
    x: &[T],
    h: usize,
    w: usize,
    c: usize,
    cp: usize,
    g: usize,
    cols: &[usize],
    size: usize,
    out: &mut [T],
) {
    let (b, i) = (g / h, g % h);
    for (&j, out) in cols.iter().zip(out.chunks_exact_mut(size * size * cp)) {
        for (tap, dst) in out.chunks_exact_mut(cp).enumerate() {
            let (si, sj) = ((i + tap / size).wrapping_sub(1), (j + tap % size).wrapping_sub(1));
            if si >= h || sj >= w {
                dst.fill(T::default());
            } else {
                let src = ((b * h + si) * w + sj) * c;
                dst.copy_from_slice(&x[src..src + cp]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_matches_the_exact_erf_form() {
        // Reference values from the f64 definition 0.5 x (1 + erf(x / sqrt 2)), past the clamp.
        let mut worst = 0f64;
        for i in -1200..=1200 {
            let x = i as f64 / 100.0;
            let want = 0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2));
            let got = gelu(x as f32) as f64;
            worst = worst.max((got - want).abs() / want.abs().max(1.0));
        }
        assert!(worst < 1e-6, "worst error {worst:e}");
        let mut v = vec![-3.0f32, 0.0, 0.5, 1.0];
        bias_act(&mut v, &[0.0, 1.0], Some(Activation::Gelu));
        assert!(
            (v[1] - 0.841_344_7).abs() < 1e-6 && (v[3] - 1.954_5).abs() < 1e-3 && v[0].abs() < 0.01,
            "{v:?}"
        );
    }

    /// erf in f64 by its Taylor series, accurate to ~1e-8 up to |x| = 4.5 (its largest term,
    /// about e^(x^2), cancels); beyond that erf is +-1 within 2e-10.
    fn erf64(x: f64) -> f64 {
        if x.abs() > 4.5 {
            return x.signum();
        }
        let (mut sum, mut term, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 * sum.abs().max(1e-300) {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
            if n > 500.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
