//! The partial 3x3 convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016): every 2x2 block of output pixels
//! comes from its 4x4 input patch as 16 independent cp x cp products, one per point of the
//! transformed patch, instead of 9 taps per pixel: 16 / 4 = 4 multiplies per output where the
//! direct convolution takes 9. The convolution is 12% of a block's multiply-adds (9 cp^2 of
//! 73 cp^2 per pixel: fc1 and fc2 are 32 cp^2 each, dim = 4 cp), so this removes about 7% of
//! the model's work; the transforms are additions only (G's halves are applied to the
//! weights, in f64, at load time).
//! Maps of odd height or width get a last, half-used block row or column (T2's 7x7 stage).

use std::cell::RefCell;
use std::ops::Range;

use crate::blocking::WINOGRAD_ROUND_FLOATS;
use crate::cpu::Kernels;
use crate::gemm::{matmul, Epilogue, Segment, Weights};
use crate::{grow, loops};

/// Output rows per block of the transform: row tiles of the block start on even image rows.
pub const ROWS: usize = 2;

/// The fewest convolved channels for which this beats the direct convolution: with fewer, the
/// 16 products (k = cp) are too short and the transforms cost more than they save (the
/// per-layer measurements are in docs/benchmark-log.md).
pub const MIN_CHANNELS: usize = 24;

/// The partial convolution's weights transformed: U(xi) = (G g G^T)(xi) for the 16 points xi
/// of the 4x4 transformed patch, each a (cp_in x cp_out) matrix.
pub struct Winograd {
    cp: usize,
    /// Whose transforms run.
    kernels: Kernels,
    u: Vec<Weights>,
}

thread_local! {
    /// Per-thread scratch: transformed input patches, their products, and one patch.
    static SCRATCH: RefCell<[Vec<f32>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

impl Winograd {
    /// `w`: the (cp_out, cp_in, 3, 3) convolution, row-major.
    pub fn new(w: &[f32], cp: usize, kernels: Kernels) -> Self {
        assert_eq!(w.len(), cp * cp * 9, "partial convolution shape");
        const G: [[f64; 3]; 4] =
            [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
        let mut u = vec![vec![0f32; cp * cp]; 16];
        for o in 0..cp {
            for i in 0..cp {
                let g = &w[(o * cp + i) * 9..][..9];
                for (xi, u) in u.iter_mut().enumerate() {
                    let (a, b) = (xi / 4, xi % 4);
                    let s: f64 = (0..9).map(|t| G[a][t / 3] * G[b][t % 3] * g[t] as f64).sum();
                    u[i * cp + o] = s as f32;
                }
            }
        }
        Self { cp, kernels, u: u.into_iter().map(|m| Weights::new(cp, cp, m, kernels)).collect() }
    }

    /// Floats of weights the products read (16 cp^2: 16/9 of the direct convolution's).
    pub fn weight_floats(&self) -> usize {
        16 * self.cp * self.cp
    }

    /// The partial convolution of the global image rows `rows` of the NHWC map `x` (images of
    /// `h` x `w` pixels, `dim` channels, the first cp convolved) into `out` (rows x w pixels
    /// of cp channels). `rows` starts on an even row of an image and ends on one or at the end
    /// of an image.
    pub fn run(
        &self,
        x: &[f32],
        (h, w, dim): (usize, usize, usize),
        rows: Range<usize>,
        out: &mut [f32],
    ) {
        let cp = self.cp;
        debug_assert!((rows.start % h).is_multiple_of(ROWS) && out.len() >= rows.len() * w * cp);
        // Patch t covers output rows r, r + 1 and columns j, j + 1, in the order of `out`. Row
        // pairs are numbered across images; `first` is the pair `rows` starts with.
        let (pairs_per_image, cols) = (h.div_ceil(2), w.div_ceil(2));
        let pair_index = |r: usize| r / h * pairs_per_image + (r % h).div_ceil(2);
        let first = pair_index(rows.start);
        let count = (pair_index(rows.end) - first) * cols;
        let patch_at = |t: usize| {
            let pair = first + t / cols;
            (pair / pairs_per_image * h + pair % pairs_per_image * 2, t % cols * 2)
        };
        // As many patches per round of products as keep its transformed patches near 128 KB.
        let chunk = (WINOGRAD_ROUND_FLOATS / (16 * cp)).clamp(12, 96) / 12 * 12;
        SCRATCH.with_borrow_mut(|[v, m, patch]| {
            let v = grow(v, chunk * 16 * cp);
            let m = grow(m, chunk * 16 * cp);
            let patch = grow(patch, 16 * cp);
            for start in (0..count).step_by(chunk) {
                let group = start..(start + chunk).min(count);
                for (t, (r, j)) in group.clone().map(patch_at).enumerate() {
                    loops::im2col(x, h, w, dim, cp, r, &[j], 4, patch);
                    input_transform(self.kernels, patch, &mut v[t * 16 * cp..(t + 1) * 16 * cp]);
                }
                for (xi, u) in self.u.iter().enumerate() {
                    let a = [Segment { ptr: v[xi * cp..].as_ptr(), stride: 16 * cp, k: cp }];
                    // SAFETY: `v` and `m` hold `group.len()` patches of 16 cp floats each.
                    unsafe {
                        matmul(
                            group.len(),
                            &a,
                            u,
                            m[xi * cp..].as_mut_ptr(),
                            16 * cp,
                            Epilogue::Store,
                        )
                    };
                }
                for (t, (r, j)) in group.clone().map(patch_at).enumerate() {
                    output_transform(self.kernels, &m[t * 16 * cp..(t + 1) * 16 * cp], patch);
                    let i = r % h;
                    for di in 0..(h - i).min(2) {
                        let pixels = (w - j).min(2);
                        let at = ((r + di - rows.start) * w + j) * cp;
                        out[at..at + pixels * cp]
                            .copy_from_slice(&patch[di * 2 * cp..][..pixels * cp]);
                    }
                }
            }
        });
    }
}

/// V = B^T d B for each channel: `d` and `v` are 16 points (row-major 4x4) of cp channels.
/// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
#[inline(always)]
fn input_transform_generic(d: &[f32], v: &mut [f32]) {
    let cp = d.len() / 16;
    assert!(d.len() == 16 * cp && v.len() == 16 * cp);
    for c in 0..cp {
        // SAFETY: c < cp and every index is below 16 cp (asserted above).
        let x = |p: usize| unsafe { *d.get_unchecked(p * cp + c) };
        let d: [[f32; 4]; 4] = std::array::from_fn(|a| std::array::from_fn(|b| x(4 * a + b)));
        // B^T d, then B on the right of each row.
        let rows = [sub(d[0], d[2]), add(d[1], d[2]), sub(d[2], d[1]), sub(d[1], d[3])];
        for (a, [t0, t1, t2, t3]) in rows.into_iter().enumerate() {
            for (b, value) in [t0 - t2, t1 + t2, t2 - t1, t1 - t3].into_iter().enumerate() {
                // SAFETY: c < cp and every index is below 16 cp (asserted above).
                unsafe { *v.get_unchecked_mut((4 * a + b) * cp + c) = value };
            }
        }
    }
}

/// Y = A^T M A for each channel: `m` is 16 points of cp channels, `y` the 2x2 output pixels
/// (row-major) of cp channels. A^T = [1 1 1 0; 0 1 -1 -1].
#[inline(always)]
fn output_transform_generic(m: &[f32], y: &mut [f32]) {
    let cp = m.len() / 16;
    assert!(m.len() == 16 * cp && y.len() >= 4 * cp);
    for c in 0..cp {
        // SAFETY: c < cp and every index is below 16 cp (asserted above).
        let x = |p: usize| unsafe { *m.get_unchecked(p * cp + c) };
        let m: [[f32; 4]; 4] = std::array::from_fn(|a| std::array::from_fn(|b| x(4 * a + b)));
        // A^T m, then A on the right of each row.
        let rows = [add(add(m[0], m[1]), m[2]), sub(sub(m[1], m[2]), m[3])];
        for (a, [t0, t1, t2, t3]) in rows.into_iter().enumerate() {
            // SAFETY: c < cp and every index is below 16 cp (asserted above).
            unsafe {
                *y.get_unchecked_mut((2 * a) * cp + c) = t0 + t1 + t2;
                *y.get_unchecked_mut((2 * a + 1) * cp + c) = t1 - t2 - t3;
            }
        }
    }
}

#[inline(always)]
fn add(p: [f32; 4], q: [f32; 4]) -> [f32; 4] {
    std::array::from_fn(|i| p[i] + q[i])
}

#[inline(always)]
fn sub(p: [f32; 4], q: [f32; 4]) -> [f32; 4] {
    std::array::from_fn(|i| p[i] - q[i])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn input_transform_avx512(d: &[f32], v: &mut [f32]) {
    input_transform_generic(d, v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_transform_avx512(m: &[f32], y: &mut [f32]) {
    output_transform_generic(m, y)
}

fn input_transform(kernels: Kernels, d: &[f32], v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if kernels.has_avx512() {
        // SAFETY: the token says the CPU has AVX-512.
        return unsafe { input_transform_avx512(d, v) };
    }
    input_transform_generic(d, v)
}

fn output_transform(kernels: Kernels, m: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if kernels.has_avx512() {
        // SAFETY: the token says the CPU has AVX-512.
        return unsafe { output_transform_avx512(m, y) };
    }
    output_transform_generic(m, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the definition (f64, zero padding) on maps of odd and even sizes down to one
    /// pixel, two images, for whole maps and for row ranges that start inside an image (20x19:
    /// more patches than one round of products takes), on this CPU's kernels and the portable
    /// ones.
    #[test]
    fn matches_a_direct_convolution() {
        let (cp, dim, images) = (24, 40, 2);
        let value =
            |i: usize, salt: usize| ((i * 7919 + salt * 104_729) % 1999) as f32 / 1000.0 - 1.0;
        let g: Vec<f32> = (0..cp * cp * 9).map(|i| value(i, 1)).collect();
        for kernels in Kernels::all_fp32() {
            let winograd = Winograd::new(&g, cp, kernels);
            for (h, w) in [(1, 1), (1, 5), (5, 1), (6, 7), (7, 7), (4, 4), (9, 2), (20, 19)] {
                let x: Vec<f32> = (0..images * h * w * dim).map(|i| value(i, h * 10 + w)).collect();
                let want = |r: usize, j: usize, o: usize| {
                    let (image, i) = (r / h, r % h);
                    let mut sum = 0f64;
                    for (tap, di, dj) in (0..9).map(|t| (t, t / 3, t % 3)) {
                        let (si, sj) = ((i + di).wrapping_sub(1), (j + dj).wrapping_sub(1));
                        if si < h && sj < w {
                            let px = &x[((image * h + si) * w + sj) * dim..];
                            sum += (0..cp)
                                .map(|c| g[(o * cp + c) * 9 + tap] as f64 * px[c] as f64)
                                .sum::<f64>();
                        }
                    }
                    sum
                };
                let second_image = h + (h / 2) / 2 * 2;
                for rows in [0..images * h, second_image..images * h, 0..h] {
                    let mut out = vec![f32::NAN; rows.len() * w * cp];
                    winograd.run(&x, (h, w, dim), rows.clone(), &mut out);
                    for (p, px) in out.chunks_exact(cp).enumerate() {
                        let (r, j) = (rows.start + p / w, p % w);
                        for (o, &got) in px.iter().enumerate() {
                            let want = want(r, j, o);
                            assert!((got as f64 - want).abs() < 1e-4 * want.abs().max(1.0), "{kernels:?} {h}x{w} rows {rows:?}: pixel ({r}, {j}) channel {o}: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }
}
