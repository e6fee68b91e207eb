//! The fp32 FLOP ceiling the fast engine works against: a large single-threaded GEMM through
//! the `gemm` crate, then the same on every thread (one GEMM per thread); and this CPU's
//! microkernel (`Kernels::detect`) on a product shaped like one of the engine's tiles of fc1
//! (96 rows, 320 x 320 weights: its operands in L2), the same ways; and where the CPU has bf16
//! kernels, those on the same product, from fp32 rows (fc1's operand) and from bf16 rows
//! (fc2's).
//!
//!     cargo run --release -p fasternet-kernels --example gemm_peak [-- THREADS]

use std::time::Instant;

fn gflops(threads: usize) -> f64 {
    const N: usize = 768;
    let (a, b) = (vec![1.0f32; N * N], vec![0.5f32; N * N]);
    // SAFETY: a, b and dst each hold N x N floats, row-major with stride N.
    let run = |dst: &mut [f32]| unsafe {
        gemm::gemm(
            N,
            N,
            N,
            dst.as_mut_ptr(),
            1,
            N as isize,
            false,
            a.as_ptr(),
            1,
            N as isize,
            b.as_ptr(),
            1,
            N as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    };
    let flops = 2 * N * N * N;
    rate(threads, flops, 20, N * N, run)
}

/// GFLOP/s of `run` (`flops` each) called `reps` times on each of `threads` threads, each with
/// its own output of `out` floats.
fn rate(
    threads: usize,
    flops: usize,
    reps: usize,
    out: usize,
    run: impl Fn(&mut [f32]) + Sync,
) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut dst = vec![0f32; out];
                for _ in 0..reps {
                    run(&mut dst);
                }
            });
        }
    });
    (flops * reps * threads) as f64 / start.elapsed().as_secs_f64() / 1e9
}

const M: usize = 96;
const K: usize = 320;

fn microkernel_gflops(threads: usize, kernels: fasternet_kernels::Kernels) -> f64 {
    use fasternet_kernels::{matmul, Epilogue, Segment, Weights};
    let w = Weights::new(K, K, vec![0.5; K * K], kernels);
    let a = vec![1.0f32; M * K];
    let run = |dst: &mut [f32]| {
        let segments = [Segment { ptr: a.as_ptr(), stride: K, k: K }];
        // SAFETY: a holds M x K floats and dst M x K, row stride K.
        unsafe { matmul(M, &segments, &w, dst.as_mut_ptr(), K, Epilogue::Store) }
    };
    rate(threads, 2 * M * K * K, 2000, M * K, run)
}

/// As `microkernel_gflops` with bf16 kernels on a left operand already in bf16 (`fc2`'s).
fn bf16_microkernel_gflops(threads: usize, kernels: fasternet_kernels::Kernels) -> f64 {
    use fasternet_kernels::{matmul_bf16, Dst, Epilogue, SegmentBf16, Weights};
    let w = Weights::new(K, K, vec![0.5; K * K], kernels);
    let a = vec![0x3f80u16; M * K];
    let run = |dst: &mut [f32]| {
        let segments = [SegmentBf16 { ptr: a.as_ptr(), stride: K, k: K }];
        // SAFETY: a holds M x K bf16 values and dst M x K floats, row stride K; the weights
        // are bf16 (`detect_bf16`).
        unsafe { matmul_bf16(M, &segments, &w, Dst::F32(dst.as_mut_ptr()), K, Epilogue::Store) }
    };
    rate(threads, 2 * M * K * K, 2000, M * K, run)
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|t| t.parse().ok()).unwrap_or(2);
    gflops(1); // warm-up
    println!("gemm crate, 1 thread: {:.0} GFLOP/s", gflops(1));
    println!("gemm crate, {threads} threads: {:.0} GFLOP/s", gflops(threads));
    let kernels = fasternet_kernels::Kernels::detect();
    let name = kernels.name();
    println!("{name} microkernel, 1 thread: {:.0} GFLOP/s", microkernel_gflops(1, kernels));
    println!(
        "{name} microkernel, {threads} threads: {:.0} GFLOP/s",
        microkernel_gflops(threads, kernels)
    );
    if let Some(kernels) = fasternet_kernels::Kernels::detect_bf16() {
        let name = kernels.name();
        for t in [1, threads] {
            println!(
                "{name} microkernel, {t} thread(s): {:.0} GFLOP/s from fp32 rows, {:.0} from bf16 rows",
                microkernel_gflops(t, kernels),
                bf16_microkernel_gflops(t, kernels)
            );
        }
    }
}
