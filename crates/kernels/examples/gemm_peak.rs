//! The fp32 FLOP ceiling the fast engine works against: a large single-threaded GEMM through
//! the same `gemm` crate and kernels, then the same on every thread (one GEMM per thread).
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
    let reps = 20;
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut dst = vec![0f32; N * N];
                for _ in 0..reps {
                    run(&mut dst);
                }
            });
        }
    });
    (2 * N * N * N * reps * threads) as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|t| t.parse().ok()).unwrap_or(2);
    gflops(1); // warm-up
    println!("1 thread: {:.0} GFLOP/s", gflops(1));
    println!("{threads} threads: {:.0} GFLOP/s", gflops(threads));
}
