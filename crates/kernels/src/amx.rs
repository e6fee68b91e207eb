//! bf16 products on Intel's AMX tiles (Sapphire Rapids and later): one `tdpbf16ps` multiplies
//! a 16 x 32 bf16 tile of activations by a 32 x 16 tile of weights into 16 x 16 fp32
//! accumulators, 16 times the work of an AVX-512 FMA per cycle. The tile instructions are
//! written with `asm!` (Rust's AMX intrinsics and target features are unstable); everything
//! around them is AVX-512.
//!
//! A product converts its left operand once into a bf16 staging buffer whose rows are padded
//! to whole 32-value k steps with zeros (or, already in bf16 and of such a k, reads it in
//! place: `matmul_bf16`), then runs blocks of 32 x 32 outputs (four
//! accumulator tiles, two activation tiles, two weight tiles: all eight tile registers), each
//! block's accumulators stored to a small buffer and finished by the usual epilogue.

use std::arch::asm;
use std::arch::x86_64::*;

use crate::avx512;
use crate::gemm::{Dst, Epilogue, Segment, SegmentBf16, Weights};

/// Values of k per tile step (a tile row is 64 bytes of bf16) and rows or columns per tile.
const K_STEP: usize = 32;
const TILE: usize = 16;
/// u16 values in one packed weight tile: 16 pairs of k rows x 16 columns x 2.
const WEIGHT_TILE: usize = K_STEP * TILE;

/// Whether this CPU has AMX-BF16 and the kernel lets this process use the tile registers
/// (Linux hands them out on request, `arch_prctl(ARCH_REQ_XCOMP_PERM)`; asked once).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        // CPUID leaf 7 (where the CPU has it): EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let edx = if __get_cpuid_max(0).0 >= 7 { __cpuid_count(7, 0).edx } else { 0 };
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0 && request_tile_permission()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_permission() -> bool {
    const SYS_ARCH_PRCTL: isize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: the arch_prctl system call only changes this process's permitted xsave features.
    unsafe {
        asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => ret, in("rdi") ARCH_REQ_XCOMP_PERM, in("rsi") XFEATURE_XTILEDATA,
             lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_permission() -> bool {
    false
}

/// The (k x n) weights `at(i, j)` in tiles: per 16 columns, per 32 k, 16 rows of (pairs of k)
/// with each column's two values side by side, zero-padded to whole tiles.
pub fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> Vec<u16> {
    let steps = k.div_ceil(K_STEP);
    let mut data = Vec::with_capacity(n.div_ceil(TILE) * steps * WEIGHT_TILE);
    for j0 in (0..n).step_by(TILE) {
        for i0 in (0..steps * K_STEP).step_by(K_STEP) {
            for i in (i0..i0 + K_STEP).step_by(2) {
                for j in j0..j0 + TILE {
                    data.extend([crate::gemm::bf16(at(i, j)), crate::gemm::bf16(at(i + 1, j))]);
                }
            }
        }
    }
    data
}

/// Tile configuration (palette 1): all eight tiles 16 rows x 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// dst (m x w.n, row stride `dst_rs`) = epilogue([segments...] @ w), `data`: w's `pack`.
///
/// # Safety
/// `available()` must be true; otherwise as `gemm::matmul`.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
pub unsafe fn matmul(
    m: usize,
    a: &[Segment],
    w: &Weights,
    data: &[u16],
    dst: Dst,
    dst_rs: usize,
    epilogue: Epilogue,
) {
    // SAFETY: reached only through `TilesAmx` weights, packed when `Kernels::detect_bf16` found AMX
    // granted to this process; the pointers are as `gemm::matmul`'s contract requires.
    unsafe {
        let kp = w.k.next_multiple_of(K_STEP);
        // Rows past m (up to the next 16) are multiplied but never stored: any values do.
        avx512::with_bf16_rows(m, m.next_multiple_of(TILE), a, kp, |left| {
            run(m, &Left::staged(left, m, kp), w, data, dst, dst_rs, epilogue)
        });
    }
}

/// As `matmul`, on a left operand already in bf16: one segment of the whole k, a multiple of 32
/// (fc2 on fc1's bf16 output), is read in place, all but its last partial 16 rows, which are
/// copied into 16 rows of their own; other segments are copied into staging rows.
///
/// # Safety
/// `available()` must be true; otherwise as `gemm::matmul_bf16`.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
pub unsafe fn matmul_bf16(
    m: usize,
    a: &[SegmentBf16],
    w: &Weights,
    data: &[u16],
    dst: Dst,
    dst_rs: usize,
    epilogue: Epilogue,
) {
    thread_local! {
        /// The last, partial 16 rows of an operand read in place.
        static TAIL: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    // SAFETY: as `matmul`; the in-place segment covers m rows of kp values.
    unsafe {
        let kp = w.k.next_multiple_of(K_STEP);
        match a {
            [s] if !s.ptr.is_null() && s.k == kp => TAIL.with_borrow_mut(|tail| {
                tail.resize(tail.len().max(TILE * kp), 0);
                let in_place = m / TILE;
                for r in in_place * TILE..m {
                    let row = s.ptr.add(r * s.stride);
                    std::ptr::copy_nonoverlapping(row, tail.as_mut_ptr().add((r % TILE) * kp), kp);
                }
                let left = Left { rows: s.ptr, stride: s.stride, in_place, tail: tail.as_ptr() };
                run(m, &left, w, data, dst, dst_rs, epilogue)
            }),
            _ => avx512::with_bf16_rows(m, m.next_multiple_of(TILE), a, kp, |left| {
                run(m, &Left::staged(left, m, kp), w, data, dst, dst_rs, epilogue)
            }),
        }
    }
}

/// A left operand in bf16 rows, by tiles of 16: tiles `0..in_place` at `rows` (row stride
/// `stride` values), the one after them at `tail` (row stride kp).
struct Left {
    rows: *const u16,
    stride: usize,
    in_place: usize,
    tail: *const u16,
}

impl Left {
    /// m rows of kp values at `rows`, padded to whole tiles.
    fn staged(rows: *const u16, m: usize, kp: usize) -> Self {
        Self { rows, stride: kp, in_place: m.div_ceil(TILE), tail: rows }
    }

    /// Row tile `i`: its first row and its row stride in bytes (`tileloadd`'s).
    ///
    /// # Safety
    /// `i` is one of the operand's row tiles.
    unsafe fn tile(&self, i: usize, kp: usize) -> (*const u16, usize) {
        // SAFETY: the caller's tile index is inside the operand.
        unsafe {
            if i < self.in_place {
                (self.rows.add(i * TILE * self.stride), 2 * self.stride)
            } else {
                (self.tail, 2 * kp)
            }
        }
    }
}

/// The product on a left operand in bf16 rows: blocks of 32 x 32 outputs, each block's accumulators
/// stored to a small buffer and finished by the usual epilogue.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn run(
    m: usize,
    left: &Left,
    w: &Weights,
    data: &[u16],
    dst: Dst,
    dst_rs: usize,
    epilogue: Epilogue,
) {
    // SAFETY: `matmul` and `matmul_bf16` hand a left operand of every row tile of m rows, the
    // weights' tiles and a destination of m x w.n.
    unsafe {
        let (k, n) = (w.k, w.n);
        let kp = k.next_multiple_of(K_STEP);
        let row_blocks = m.div_ceil(TILE);
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
        let mut sums = [0f32; 4 * TILE * TILE];
        let col_blocks = n.div_ceil(TILE);
        for jb in (0..col_blocks).step_by(2) {
            let two_cols = jb + 1 < col_blocks;
            let panel = data.as_ptr().add(jb * (kp / K_STEP) * WEIGHT_TILE);
            for ib in (0..row_blocks).step_by(2) {
                let two_rows = ib + 1 < row_blocks;
                let x = [
                    left.tile(ib, kp),
                    if two_rows { left.tile(ib + 1, kp) } else { (std::ptr::null(), 0) },
                ];
                match (two_rows, two_cols) {
                    (true, true) => block::<true, true>(x, kp, panel, sums.as_mut_ptr()),
                    (true, false) => block::<true, false>(x, kp, panel, sums.as_mut_ptr()),
                    (false, true) => block::<false, true>(x, kp, panel, sums.as_mut_ptr()),
                    (false, false) => block::<false, false>(x, kp, panel, sums.as_mut_ptr()),
                }
                let (r0, j0) = (ib * TILE, jb * TILE);
                for r in r0..m.min(r0 + 2 * TILE) {
                    for j in (j0..n.min(j0 + 2 * TILE)).step_by(TILE) {
                        let valid = (n - j).min(TILE);
                        let mask: __mmask16 = if valid == TILE { 0xffff } else { (1 << valid) - 1 };
                        let sum = _mm512_loadu_ps(sums.as_ptr().add((r - r0) * 2 * TILE + j - j0));
                        avx512::finish(sum, mask, r, j, dst, dst_rs, epilogue);
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// One block of up to 32 x 32 outputs: two row tiles of `x` (bf16; each its first row and row
/// stride in bytes) times weight tiles `w` (the block's second 16 columns follow the first's
/// kp / 32 tiles) into `sums` (32 x 32 fp32, row-major). Tiles 0-3 accumulate, 4-5 hold
/// activations, 6-7 weights.
#[inline]
unsafe fn block<const TWO_ROWS: bool, const TWO_COLS: bool>(
    [(x, x_stride), (second_rows, second_stride)]: [(*const u16, usize); 2],
    kp: usize,
    w: *const u16,
    sums: *mut f32,
) {
    // SAFETY: `run` passes row tiles and weight tiles of kp columns that cover the block and a
    // 32 x 32 `sums`, with the tile registers configured.
    unsafe {
        let second_cols = w.add(kp / K_STEP * WEIGHT_TILE);
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for step in 0..kp / K_STEP {
            let (xo, wo) = (step * K_STEP, step * WEIGHT_TILE);
            asm!("tileloadd tmm4, [{p} + {s}*1]", "tileloadd tmm6, [{w} + {ws}*1]",
             p = in(reg) x.add(xo), s = in(reg) x_stride, w = in(reg) w.add(wo), ws = in(reg) 64usize, options(nostack, readonly));
            asm!("tdpbf16ps tmm0, tmm4, tmm6", options(nostack, nomem));
            if TWO_COLS {
                asm!("tileloadd tmm7, [{w} + {ws}*1]", w = in(reg) second_cols.add(wo), ws = in(reg) 64usize, options(nostack, readonly));
                asm!("tdpbf16ps tmm1, tmm4, tmm7", options(nostack, nomem));
            }
            if TWO_ROWS {
                asm!("tileloadd tmm5, [{p} + {s}*1]", p = in(reg) second_rows.add(xo), s = in(reg) second_stride, options(nostack, readonly));
                asm!("tdpbf16ps tmm2, tmm5, tmm6", options(nostack, nomem));
                if TWO_COLS {
                    asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem));
                }
            }
        }
        let s = 2 * TILE * 4;
        asm!("tilestored [{p} + {s}*1], tmm0", "tilestored [{q} + {s}*1], tmm1", "tilestored [{r} + {s}*1], tmm2", "tilestored [{t} + {s}*1], tmm3",
         p = in(reg) sums, q = in(reg) sums.add(TILE), r = in(reg) sums.add(TILE * 2 * TILE), t = in(reg) sums.add(TILE * 2 * TILE + TILE),
         s = in(reg) s, options(nostack));
    }
}
