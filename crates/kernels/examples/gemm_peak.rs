//! The fp32 FLOP ceiling the fast engine works against: a large single-threaded GEMM through
//! the `gemm` crate, then the same on every thread (one GEMM per thread); and this CPU's
//! microkernel (`Kernels::detect`) on a product shaped like one of the engine's tiles of fc1
//! (96 rows, 320 x 320 weights: its operands in L2), the same ways; and where the CPU has bf16
//! kernels, those on the same product, from fp32 rows (fc1's operand) and from bf16 rows
//! (fc2's); where it has int8 kernels, those from u8 rows (GOP/s: two per multiply-add). Last, on one thread, what fc1's GELU epilogue costs against a plain store on the
//! shapes of T0's and T1's tiles of fc1 (the fewer input channels, the larger its share).
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

/// As `microkernel_gflops` with int8 kernels on u8 rows, into bf16 (an int8 engine's maps).
fn int8_microkernel_gops(threads: usize, kernels: fasternet_kernels::Kernels) -> f64 {
    use fasternet_kernels::{matmul_u8, Dst, Epilogue, QuantU8, Segment, WeightsI8};
    let w = WeightsI8::new(K, K, &vec![0.5; K * K], QuantU8::covering(-1.0, 1.0), kernels);
    let a = vec![0x81u8; M * K];
    let run = |dst: &mut [f32]| {
        let segments = [Segment { ptr: a.as_ptr(), stride: K, k: K }];
        let dst = Dst::Bf16(dst.as_mut_ptr().cast());
        // SAFETY: a holds M x K u8 values and dst M x K bf16 values (half of its floats), row
        // stride K, a multiple of 4; the weights are int8 (`detect_int8`).
        unsafe { matmul_u8(M, &segments, &w, dst, K, Epilogue::Store) }
    };
    rate(threads, 2 * M * K * K, 2000, M * K, run)
}

/// One thread's GFLOP/s for fc1's products of one tile (m pixels, k -> n channels) of T0's
/// stages 1-3 and T1's stage 1, with a plain store and with the engine's GELU epilogue: fp32
/// kernels on fp32 rows, bf16 kernels on bf16 rows into bf16 (`Epilogue::BiasGeluBf16`).
/// GFLOP/s of `run(dst, false)` and `run(dst, true)` on one thread.
fn run_both(
    out: usize,
    flops: usize,
    reps: usize,
    run: &(dyn Fn(&mut [f32], bool) + Sync),
) -> [f64; 2] {
    [false, true].map(|gelu| rate(1, flops, reps, out, |dst| run(dst, gelu)))
}

fn gelu_epilogue_cost(kernels: fasternet_kernels::Kernels) {
    use fasternet_kernels::{
        matmul, matmul_bf16, Activation, Dst, Epilogue, Segment, SegmentBf16, Weights,
    };
    let bf16 = kernels.is_bf16();
    for (m, k, n) in [(448, 40, 80), (392, 80, 160), (196, 160, 320), (448, 64, 128)] {
        let w = Weights::new(k, n, (0..k * n).map(|i| (i % 7) as f32 * 0.01).collect(), kernels);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 5) as f32 * 0.1 - 0.2).collect();
        let a_bf16: Vec<u16> = a.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        let bias = vec![0.1f32; n];
        let reps = 400_000_000 / (2 * m * k * n);
        // The best of five alternating runs each: this machine's neighbours come and go.
        let (mut store, mut gelu) = (0f64, 0f64);
        for _ in 0..5 {
            let [s, g] = run_both(m * n, 2 * m * k * n, reps, &|dst, gelu| {
                // SAFETY: a (fp32 and bf16) holds m x k values, dst m x n floats (as bf16,
                // half of them), row stride n; bf16 products only with bf16 weights.
                unsafe {
                    if bf16 {
                        let a = [SegmentBf16 { ptr: a_bf16.as_ptr(), stride: k, k }];
                        let e = if gelu { Epilogue::BiasGeluBf16(&bias) } else { Epilogue::Store };
                        matmul_bf16(m, &a, &w, Dst::Bf16(dst.as_mut_ptr().cast()), n, e)
                    } else {
                        let a = [Segment { ptr: a.as_ptr(), stride: k, k }];
                        let act = Some(Activation::Gelu);
                        let e = if gelu { Epilogue::Bias(&bias, act) } else { Epilogue::Store };
                        matmul(m, &a, &w, dst.as_mut_ptr(), n, e)
                    }
                }
            });
            (store, gelu) = (store.max(s), gelu.max(g));
        }
        println!(
            "{} fc1 of {m} pixels, {k} -> {n} channels, 1 thread: {store:.0} GFLOP/s stored, \
             {gelu:.0} with GELU ({:.0}% more time)",
            kernels.name(),
            100.0 * (store / gelu - 1.0)
        );
    }
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
    if let Some(kernels) = fasternet_kernels::Kernels::detect_int8() {
        for t in [1, threads] {
            println!(
                "{} microkernel, {t} thread(s): {:.0} GOP/s from u8 rows",
                kernels.name(),
                int8_microkernel_gops(t, kernels)
            );
        }
    }
    gelu_epilogue_cost(kernels);
    if let Some(kernels) = fasternet_kernels::Kernels::detect_bf16() {
        gelu_epilogue_cost(kernels);
    }
}
