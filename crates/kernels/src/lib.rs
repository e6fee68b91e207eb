//! The CPU kernels behind fasternet-serve's fast engine: products of activation rows with
//! weights packed once at load time, with the epilogue (bias, activation, residual) fused.
//!
//! - [`Kernels`] (`cpu.rs`) is the one detection of the CPU's features: a token that only
//!   `detect()` and `detect_bf16()` make, and that every dispatch below takes.
//! - [`Weights`], [`matmul`], [`matmul_bf16`] and [`matmul_to_bf16`] (`gemm.rs`): the packed
//!   layouts and the dispatch to our microkernels, or to the `gemm` crate on any CPU.
//! - `avx512.rs`: the AVX-512 microkernel, on fp32 or AVX512-BF16 operands.
//! - `avx2.rs`: the same design on AVX2 and FMA, fp32 only.
//! - `amx.rs`: the same products on AMX tiles.
//! - [`WeightsI8`], [`matmul_u8`], [`QuantU8`], [`quantize_bf16_rows`] (`int8.rs`): products
//!   on u8 activations and s8 weights (AVX512-VNNI), and their operands' quantisation.
//! - [`Winograd`] (`winograd.rs`): the 3x3 convolution by F(2x2, 3x3).
//! - `loops.rs`: the portable path's epilogue, the erf approximation, patch gathering.
//! - [`blocking`]: the sizes work is cut by, together.
//!
//! Every `unsafe fn` states its contract under `# Safety` and every `unsafe` block why it
//! holds (the crate's lints deny both omissions). The tests compare each kernel set this CPU
//! runs with the portable one; `.ci/run` also runs them under valgrind, where the CPU appears
//! without AVX-512, so that the AVX2 and portable paths are checked for memory errors (Miri
//! needs a nightly toolchain and cannot run the SIMD intrinsics).

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod blocking;
mod cpu;
mod gemm;
mod int8;
mod loops;
pub mod winograd;

#[cfg(target_arch = "x86_64")]
pub use amx::available as amx_available;
pub use cpu::{Isa, Kernels};
pub use gemm::{
    matmul, matmul_bf16, matmul_to_bf16, to_bf16_rows, Dst, Epilogue, Segment, SegmentBf16, Weights,
};
pub use int8::{matmul_u8, quantize_bf16_rows, QuantU8, WeightsI8};
pub use loops::im2col;
pub use winograd::Winograd;

/// The activation an epilogue applies. GELU is the exact erf form, as `torch.nn.GELU()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Gelu,
    Relu,
}

/// `v` grown to at least `len` elements (never shrunk: scratch kept between calls), as a
/// slice of exactly `len`.
pub fn grow<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::default());
    }
    &mut v[..len]
}
