//! What bf16 can gain on this CPU: the inner loop of the fast engine's 12 x 32 register tile
//! (12 broadcast rows x 2 vectors, 24 accumulators) with fp32 FMAs (`vfmadd231ps`, 16 MACs)
//! and with bf16 pair dot products (`vdpbf16ps`, 32 MACs), operands in L1, one thread; where
//! the CPU has AMX, also the tile unit alone (`tdpbf16ps` on tiles already loaded, 8192 MACs).
//!
//!     cargo run --release -p fasternet-kernels --example bf16_tile_peak

#[cfg(target_arch = "x86_64")]
mod tile {
    use std::arch::x86_64::*;
    use std::hint::black_box;

    const K: usize = 64;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fp32(iters: usize, a: &[f32; 12 * K], w: &[__m512; 2 * K]) -> f32 {
        let mut acc = [[_mm512_setzero_ps(); 2]; 12];
        for it in 0..iters {
            let k = it % K;
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(a[r * K + k]);
                acc[0] = _mm512_fmadd_ps(x, w[2 * k], acc[0]);
                acc[1] = _mm512_fmadd_ps(x, w[2 * k + 1], acc[1]);
            }
        }
        acc.iter().map(|a| _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]))).sum()
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn bf16(iters: usize, a: &[i32; 12 * K], w: &[__m512i; 2 * K]) -> f32 {
        // SAFETY: `main` checked AVX512-BF16; the loops read only within `a` and `w`.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; 12];
            for it in 0..iters {
                let k = it % K;
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(a[r * K + k]));
                    acc[0] = _mm512_dpbf16_ps(
                        acc[0],
                        x,
                        std::mem::transmute::<__m512i, __m512bh>(w[2 * k]),
                    );
                    acc[1] = _mm512_dpbf16_ps(
                        acc[1],
                        x,
                        std::mem::transmute::<__m512i, __m512bh>(w[2 * k + 1]),
                    );
                }
            }
            acc.iter().map(|a| _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]))).sum()
        }
    }

    /// `iters` x four `tdpbf16ps` into tiles 0-3 from tiles 4-7 (16 rows x 64 bytes each).
    pub unsafe fn amx(iters: usize) {
        // SAFETY: `main` runs this only where `amx_available()`; the configuration below sets up
        // every tile the loop uses.
        unsafe {
            #[repr(C, align(64))]
            struct Config([u8; 16], [u16; 16], [u8; 16]);
            let mut config = Config([0; 16], [0; 16], [0; 16]);
            config.0[0] = 1; // palette 1
            config.1[..8].fill(64);
            config.2[..8].fill(16);
            std::arch::asm!("ldtilecfg [{}]", in(reg) &config);
            // Zeros: the values do not matter, only the rate.
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "tilezero tmm4",
                "tilezero tmm5",
                "tilezero tmm6",
                "tilezero tmm7"
            );
            for _ in 0..iters {
                std::arch::asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    options(nostack, nomem)
                );
            }
            std::arch::asm!("tilerelease");
        }
    }

    pub fn run() {
        if !is_x86_feature_detected!("avx512bf16") {
            println!("this CPU has no AVX512-BF16");
            return;
        }
        const ITERS: usize = 50_000_000;
        let time = |f: &dyn Fn() -> f32, macs_per_iter: f64| {
            let start = std::time::Instant::now();
            black_box(f());
            ITERS as f64 * macs_per_iter * 2.0 / start.elapsed().as_secs_f64() / 1e9
        };
        // SAFETY: AVX512-BF16 was detected above, and `amx` runs only where `amx_available()`.
        unsafe {
            // 0.5 and 1/512 in bf16 pairs; the values do not matter, only the instruction rate.
            let (a32, w32) = ([0.5f32; 12 * K], [_mm512_set1_ps(1.0 / 512.0); 2 * K]);
            let (a16, w16) = ([0x3f00_3f00i32; 12 * K], [_mm512_set1_epi32(0x3b00_3b00); 2 * K]);
            for _ in 0..2 {
                let f =
                    time(&|| fp32(black_box(ITERS), black_box(&a32), black_box(&w32)), 24.0 * 16.0);
                let b =
                    time(&|| bf16(black_box(ITERS), black_box(&a16), black_box(&w16)), 24.0 * 32.0);
                println!(
                    "fp32 FMA tile: {f:.0} GFLOP/s, bf16 tile: {b:.0} GFLOP/s ({:.2}x)",
                    b / f
                );
                if fasternet_kernels::amx_available() {
                    let a = time(
                        &|| {
                            amx(black_box(ITERS / 64));
                            0.0
                        },
                        4.0 * 16.0 * 16.0 * 32.0 / 64.0,
                    );
                    println!("AMX tdpbf16ps: {a:.0} GFLOP/s ({:.1}x the fp32 tile)", a / f);
                }
            }
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    tile::run();
    #[cfg(not(target_arch = "x86_64"))]
    println!("x86-64 only");
}
