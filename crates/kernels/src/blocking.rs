//! The blocking policy: every size the fast engine cuts its work by, together. The tile and
//! gather sizes are the engine's (`tiles`, `strided_conv`); the register tiles are the
//! microkernel's.

use crate::cpu::{Isa, Kernels};

/// Most rows of a register tile of the AVX-512 microkernel, by its width in vectors (1, 2, 3):
/// R x NV accumulators, the NV weight vectors and a broadcast must fit the 32 zmm registers
/// (12 x 2 + 2 + 1 = 27, 9 x 3 + 3 + 1 = 31). AMX's tiles are fixed by the hardware (16 x 32).
pub const MAX_TILE_ROWS: [usize; 3] = [12, 12, 9];

/// The same for the AVX2 microkernel, by its width in vectors of 8 (1, 2), within 16 ymm
/// registers: 6 x 2 + 2 + 1 = 15, 12 x 1 + 1 + 1 = 14.
pub const MAX_TILE_ROWS_AVX2: [usize; 2] = [12, 6];

/// A tile's working set (its input rows, scratch and output rows) in floats: 384 KiB, which
/// stays in a 1-2 MiB L2 beside the weights streaming through.
pub const TILE_FLOATS: usize = 96 * 1024;

/// A strided convolution (stem, merges) whose weights exceed this many floats (1 MiB) would
/// fetch them from L3 again for every output row's product; it gathers a tile's patches into
/// one product instead (`gathers_patches`).
pub const GATHER_ABOVE_FLOATS: usize = 256 * 1024;

/// Fewest output pixels per product: with fewer, the register tiles run mostly empty.
pub const MIN_PRODUCT_PIXELS: usize = 16;

/// Winograd patches transformed per round of its 16 products: their transformed inputs (16 cp
/// floats each) fill about this many floats, within 12..=96 patches and a multiple of 12 (the
/// microkernel's row tile).
pub const WINOGRAD_ROUND_FLOATS: usize = 32 * 1024;

/// Pixels per product of the partial convolution on gathered bf16 patches (AMX): eight row
/// tiles, so that each weight tile loaded serves four pairs of them; 128 patches of 9 cp bf16
/// values stay within L2 (432 KiB at cp = 192).
pub const GATHERED_PATCH_PIXELS: usize = 128;

/// Output columns per part of the head and the classifier, which threads share when the batch
/// is smaller than the thread count: at batch 1 they are one row of products streaming 7.7 MB
/// of fp32 weights (ImageNet), which one thread alone would read while the others wait. 128
/// columns cut ImageNet's 1280 features and 1000 classes into 10 and 8 parts that two threads
/// share evenly, and are whole register tiles (8 vectors) and AMX tiles (16 columns).
pub const HEAD_PART_COLUMNS: usize = 128;

/// A thread with several whole images of its own runs them through the network in groups of
/// as many as keep the largest pair of maps a layer reads and writes (the first stage's: 1 MB
/// per image for T0 at 224) within this many bytes. Layer by layer over a thread's half of a
/// batch of 32, T0's maps are 16 MB per thread: with the other thread's, more than a 32 MiB L3
/// holds, so every layer reads and writes them in memory; in groups of four they stay in L3
/// (measured in docs/benchmark-log.md).
pub const GROUP_MAP_BYTES: usize = 4 << 20;

/// Groups only for weights of at most this many bytes: each group reads all of them again,
/// which costs less than the maps' trips to memory only while the weights stay in L3 beside
/// two threads' groups of maps (32 MiB - 2 x `GROUP_MAP_BYTES`). T0 (15.7 MB in fp32) and T1
/// in bf16 (15.2 MB) are grouped; T1 in fp32 (30.4 MB) and T2 are not.
pub const GROUP_WEIGHT_BYTES: usize = 24 << 20;

/// Images per group (`GROUP_MAP_BYTES`) for a network whose largest pair of maps is
/// `map_pair_bytes` per image and whose weights are `weight_bytes`: at least 1, and
/// `usize::MAX` (one group) for weights above `GROUP_WEIGHT_BYTES`.
pub fn images_per_group(map_pair_bytes: usize, weight_bytes: usize) -> usize {
    if weight_bytes > GROUP_WEIGHT_BYTES {
        usize::MAX
    } else {
        (GROUP_MAP_BYTES / map_pair_bytes.max(1)).max(1)
    }
}

/// Whether a strided convolution with `weight_floats` of weights gathers a tile's patches
/// into one product, rather than multiplying each output row's patches where they lie: above
/// `GATHER_ABOVE_FLOATS`, and always with the AVX2 kernels, where the per-row products' short
/// segments (the stem's 12 values, a merge's two taps of 2 c) and part-filled row tiles cost
/// more than the copy (measured in docs/benchmark-log.md).
pub fn gathers_patches(kernels: Kernels, weight_floats: usize) -> bool {
    kernels.isa() == Isa::Avx2 || weight_floats > GATHER_ABOVE_FLOATS
}

/// Fewest image rows of `width` pixels that give a product `MIN_PRODUCT_PIXELS`.
pub fn min_rows_for(width: usize) -> usize {
    MIN_PRODUCT_PIXELS.div_ceil(width)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_keep_a_threads_maps_within_the_budget_for_small_weights_only() {
        let t0_at_224 = 2 * 56 * 56 * 40 * 4;
        assert_eq!(images_per_group(t0_at_224, 15 << 20), 4);
        assert_eq!(images_per_group(GROUP_MAP_BYTES / 3, GROUP_WEIGHT_BYTES), 3);
        assert_eq!(images_per_group(GROUP_MAP_BYTES + 1, 0), 1);
        assert_eq!(images_per_group(t0_at_224, GROUP_WEIGHT_BYTES + 1), usize::MAX);
    }
}
