//! How the work is split: tiles of image rows sized for L2, whole images per thread where
//! the batch allows, buffers kept between passes. The constants here are the blocking policy.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::TryLockError;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use fasternet_kernels::blocking::{images_per_group, TILE_FLOATS};
use fasternet_kernels::Dst;

use super::team::Team;
use super::FastEngine;
use crate::model::{ModelError, ModelOutput};

/// Splits `rows` into tiles: small enough for a tile's working set (`width` floats per row)
/// to stay in L2, at least `min_rows` rows so each product has work, and a multiple of the
/// thread count so that no thread idles while another finishes an extra tile. Sizes differ
/// by at most one row and the larger ones are spread out (14 rows in 4 tiles: 3, 4, 3, 4), so
/// that rayon's halving of the list gives every thread the same number of rows.
pub(super) fn tiles(
    rows: usize,
    width: usize,
    min_rows: usize,
    threads: usize,
) -> Vec<Range<usize>> {
    let max_rows = (TILE_FLOATS / width.max(1)).max(min_rows);
    let count = rows.div_ceil(max_rows).div_ceil(threads) * threads;
    // At most as many tiles as have min_rows each: still a multiple of the threads where the
    // rows allow (28 rows of at least 8 on two threads: two tiles of 14, not three of 9-10,
    // which would leave one thread idle while the other runs its second).
    let most = rows / min_rows.max(1);
    let count = if most >= threads { count.min(most - most % threads) } else { most }.max(1);
    (0..count).map(|i| i * rows / count..(i + 1) * rows / count).collect()
}

/// Who runs a pass's tiles: this thread alone (`threads` 1), or `threads` threads sharing
/// them: a team, or rayon's pool when the team is busy with another pass.
#[derive(Clone, Copy)]
pub(super) struct Workers<'a> {
    pub(super) threads: usize,
    pub(super) team: Option<&'a Team>,
}

impl Workers<'_> {
    pub(super) const ONE: Self = Self { threads: 1, team: None };
}

/// Runs `f` on every tile, on the threads of `workers`.
pub(super) fn for_each_tile(
    workers: Workers,
    tiles: Vec<Range<usize>>,
    f: impl Fn(Range<usize>) + Sync + Send,
) {
    match workers.team {
        Some(team) => team.for_each(tiles.len(), &|i| f(tiles[i].clone())),
        None if workers.threads > 1 => tiles.into_par_iter().for_each(f),
        None => tiles.into_iter().for_each(f),
    }
}

thread_local! {
    /// Per-thread tile scratch: gathered patches (edge pixels, or a merge's) and the edge
    /// pixels' outputs, the partial convolution's output and the hidden activations.
    pub(super) static SCRATCH: RefCell<[Vec<f32>; 4]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new()]) };
    /// bf16 engines: the partial convolution's input channels of a tile and its
    /// neighbour rows.
    pub(super) static SCRATCH_BF16: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// bf16 engines on AMX: the partial convolution's gathered patches.
    pub(super) static PATCHES_BF16: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// bf16 engines: a tile's hidden activations as fc1 writes them and fc2 reads them.
    pub(super) static HIDDEN_BF16: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// A pass's activation maps (ping-pong), fp32 or bf16 (the bf16 engine's), kept between
/// passes.
#[derive(Default)]
pub(super) struct Buffers {
    pub(super) maps: [Vec<f32>; 2],
    pub(super) maps_bf16: [Vec<u16>; 2],
}

/// Raw output pointer shared by tiles that write disjoint rows.
#[derive(Clone, Copy)]
pub(super) struct Out(pub(super) *mut f32);
// SAFETY: an `Out` is only written through by tiles of disjoint rows (`graph.rs`), and the
// buffer outlives the `for_each_tile` call that shares it.
unsafe impl Send for Out {}
// SAFETY: as for `Send`: no two threads write the same element, and none reads it.
unsafe impl Sync for Out {}

impl Out {
    /// The output `offset` floats in (a method, so closures capture the whole `Out`).
    ///
    /// # Safety
    /// `offset` is inside the buffer the pointer came from.
    pub(super) unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: the caller keeps `offset` inside the output buffer (`# Safety` above).
        unsafe { self.0.add(offset) }
    }
}

/// The same for a product's destination of either element (`Dst`).
#[derive(Clone, Copy)]
pub(super) struct SharedDst(pub(super) Dst);
// SAFETY: as for `Out`.
unsafe impl Send for SharedDst {}
// SAFETY: as for `Out`.
unsafe impl Sync for SharedDst {}

impl SharedDst {
    /// The destination `offset` values in.
    ///
    /// # Safety
    /// As `Out::at`.
    pub(super) unsafe fn at(self, offset: usize) -> Dst {
        // SAFETY: the caller keeps `offset` inside the output buffer (`# Safety` above).
        unsafe { self.0.add(offset) }
    }
}

impl FastEngine {
    /// How many of its own images a thread runs through the network at a time
    /// (`blocking::images_per_group`) for inputs of `in_h` x `in_w`.
    pub(super) fn images_per_group(&self, in_h: usize, in_w: usize) -> usize {
        let map_pair_bytes = 2 * (in_h / 4) * (in_w / 4) * self.stem.w.n * size_of::<f32>();
        images_per_group(map_pair_bytes, self.weight_bytes)
    }

    /// With at least as many images as threads, each thread runs whole images on its own (no
    /// synchronisation between layers), in groups (`images_per_group`); the images left
    /// over, or a batch smaller than the thread count, are split into tiles that all threads
    /// share.
    pub(super) fn forward_slices(
        &self,
        images: &[&[f32]],
        (c, in_h, in_w): (usize, usize, usize),
    ) -> Result<ModelOutput, ModelError> {
        let batch = images.len();
        let (f, k) = (self.head.n, self.classifier.n);
        let mut features = vec![0f32; batch * f];
        let mut logits = vec![0f32; batch * k];
        let threads = rayon::current_num_threads().max(1);
        let per_thread = if threads > 1 { batch / threads } else { 0 };
        let own = per_thread * threads;
        let (features_own, features_shared) = features.split_at_mut(own * f);
        let (logits_own, logits_shared) = logits.split_at_mut(own * k);
        if per_thread > 0 {
            let group = self.images_per_group(in_h, in_w).min(per_thread);
            images[..own]
                .par_chunks(per_thread)
                .zip(features_own.par_chunks_mut(per_thread * f))
                .zip(logits_own.par_chunks_mut(per_thread * k))
                .for_each(|((x, features), logits)| {
                    let groups = x
                        .chunks(group)
                        .zip(features.chunks_mut(group * f))
                        .zip(logits.chunks_mut(group * k));
                    for ((x, features), logits) in groups {
                        self.forward_images(x, (c, in_h, in_w), Workers::ONE, features, logits)
                    }
                });
        }
        if own < batch {
            let mut shared = |workers: Workers<'_>| {
                self.forward_images(
                    &images[own..],
                    (c, in_h, in_w),
                    workers,
                    features_shared,
                    logits_shared,
                )
            };
            let team = match self.team.try_lock() {
                Ok(team) => Some(team),
                Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            };
            match team {
                Some(mut team) if threads > 1 => {
                    let kept = team.take().filter(|t| t.threads() == threads);
                    let team = team.insert(kept.unwrap_or_else(|| Team::new(threads - 1)));
                    team.pass(|team| shared(Workers { threads, team: Some(team) }));
                }
                _ => shared(Workers { threads, team: None }),
            }
        }
        Ok(ModelOutput {
            logits: Tensor::from_vec(logits, (batch, k), &Device::Cpu)?,
            features: Tensor::from_vec(features, (batch, f), &Device::Cpu)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_rows_in_near_equal_sizes_split_evenly_between_threads() {
        for (rows, width, min_rows, threads) in [
            (14, 15_232, 2, 2),
            (7, 15_232, 3, 2),
            (56, 15_232, 1, 1),
            (28, 1000, 2, 2),
            (5, 10, 16, 2),
            (3, 100_000, 1, 4),
            (28, 22_848, 8, 2),
            (28, 15_232, 5, 2),
            (27, 1000, 4, 3),
        ] {
            let t = tiles(rows, width, min_rows, threads);
            let sizes: Vec<usize> = t.iter().map(|r| r.len()).collect();
            assert_eq!(t.first().unwrap().start, 0);
            assert!(
                t.windows(2).all(|p| p[0].end == p[1].start) && t.last().unwrap().end == rows,
                "{t:?}"
            );
            assert!(
                sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
                "{rows} rows: {sizes:?}"
            );
            assert!(
                sizes.iter().all(|&s| s >= min_rows.min(rows)),
                "{rows} rows, min {min_rows}: {sizes:?}"
            );
            if rows / min_rows >= threads {
                assert!(t.len().is_multiple_of(threads), "{rows} rows, {threads} threads: {t:?}");
            }
            if t.len().is_multiple_of(2) && threads == 2 {
                let half: usize = sizes[..t.len() / 2].iter().sum();
                assert!(half.abs_diff(rows - half) <= 1, "{rows} rows: {sizes:?}");
            }
        }
        assert_eq!(tiles(14, 15_232, 2, 2), [0..3, 3..7, 7..10, 10..14]);
    }
}
