//! What one core multiplies per second at each precision the CPU offers, with nothing else in
//! the way: 16 independent accumulators, one 512-bit instruction each per step, no loads.
//! `vfmadd231ps` (fp32, 16 multiply-adds), `vdpbf16ps` (AVX512-BF16, 32) and `vpdpbusd`
//! (AVX512-VNNI, u8 x s8, 64): the ceilings of an fp32, a bf16 and an int8 engine, to set
//! beside `gemm_peak`'s kernels.
//!
//!     cargo run --release -p fasternet-kernels --example instruction_peak

#[cfg(target_arch = "x86_64")]
fn main() {
    use std::arch::asm;
    use std::time::Instant;

    /// Runs `$insn` on zmm0-15 (zmm30 and zmm31 as operands) `STEPS` times 16 and prints the
    /// instructions and multiply-adds per second.
    macro_rules! peak {
        ($name:literal, $insn:literal, $macs:expr) => {{
            const STEPS: u64 = 100_000_000;
            let start = Instant::now();
            // SAFETY: the caller checked the instruction's feature; the block writes only the
            // registers it declares clobbered and the loop counter.
            unsafe {
                asm!(
                    "vpxord zmm30, zmm30, zmm30",
                    "vpxord zmm31, zmm31, zmm31",
                    "2:",
                    concat!($insn, " zmm0, zmm30, zmm31"),
                    concat!($insn, " zmm1, zmm30, zmm31"),
                    concat!($insn, " zmm2, zmm30, zmm31"),
                    concat!($insn, " zmm3, zmm30, zmm31"),
                    concat!($insn, " zmm4, zmm30, zmm31"),
                    concat!($insn, " zmm5, zmm30, zmm31"),
                    concat!($insn, " zmm6, zmm30, zmm31"),
                    concat!($insn, " zmm7, zmm30, zmm31"),
                    concat!($insn, " zmm8, zmm30, zmm31"),
                    concat!($insn, " zmm9, zmm30, zmm31"),
                    concat!($insn, " zmm10, zmm30, zmm31"),
                    concat!($insn, " zmm11, zmm30, zmm31"),
                    concat!($insn, " zmm12, zmm30, zmm31"),
                    concat!($insn, " zmm13, zmm30, zmm31"),
                    concat!($insn, " zmm14, zmm30, zmm31"),
                    concat!($insn, " zmm15, zmm30, zmm31"),
                    "dec {n}",
                    "jnz 2b",
                    n = inout(reg) STEPS => _,
                    out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                    out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                    out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                    out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
                    out("zmm30") _, out("zmm31") _,
                    options(nostack, nomem),
                );
            }
            let per_s = (16 * STEPS) as f64 / start.elapsed().as_secs_f64();
            println!(
                "{:<12} {:5.2} G instructions/s, {:4.0} G multiply-adds/s (1 core)",
                $name,
                per_s / 1e9,
                per_s * $macs as f64 / 1e9
            );
        }};
    }

    if !is_x86_feature_detected!("avx512f") {
        println!("no AVX-512 on this CPU: nothing to measure");
        return;
    }
    for _ in 0..2 {
        peak!("fp32", "vfmadd231ps", 16);
        if is_x86_feature_detected!("avx512bf16") {
            peak!("bf16", "vdpbf16ps", 32);
        }
        if is_x86_feature_detected!("avx512vnni") {
            peak!("u8 x s8", "vpdpbusd", 64);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("x86-64 only");
}
