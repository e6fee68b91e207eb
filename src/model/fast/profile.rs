//! Wall time per layer group of the fast engine's forward passes (`bench --profile`), to set
//! beside the per-layer profiles OpenVINO and ONNX Runtime keep themselves
//! (`tools/ov_profile.py --by stage`, `tools/ort_profile.py`). Off unless started: one relaxed
//! load per layer group and pass.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Stages FasterNet has; a profile keeps a merge and a blocks slot for each.
const STAGES: usize = 4;

/// Where a layer group's time is kept: the stem, each stage's merge and blocks, the head.
#[derive(Clone, Copy)]
pub(super) enum Layer {
    Stem,
    Merge(usize),
    Blocks(usize),
    Head,
}

impl Layer {
    fn slot(self) -> usize {
        match self {
            Self::Stem => 0,
            Self::Merge(stage) => 1 + 2 * stage,
            Self::Blocks(stage) => 2 + 2 * stage,
            Self::Head => 1 + 2 * STAGES,
        }
    }

    fn name(slot: usize) -> String {
        match slot {
            0 => "stem".into(),
            s if s == 1 + 2 * STAGES => "head (pool, 1x1 conv, classifier)".into(),
            s if s % 2 == 1 => format!("stage {} merge", s.div_ceil(2)),
            s => format!("stage {} blocks", s / 2),
        }
    }
}

/// Nanoseconds of wall time per layer group, summed over passes since `start`.
#[derive(Default)]
pub struct LayerProfile {
    on: AtomicBool,
    nanos: [AtomicU64; 2 + 2 * STAGES],
}

impl LayerProfile {
    /// Clears the sums and starts timing (after a warm-up, say).
    pub fn start(&self) {
        self.nanos.iter().for_each(|n| n.store(0, Relaxed));
        self.on.store(true, Relaxed);
    }

    /// (layer group, milliseconds per pass) over `passes` passes since `start`, in network
    /// order, without the groups that never ran (stage 1 has no merge).
    pub fn per_pass(&self, passes: u32) -> Vec<(String, f64)> {
        (self.nanos.iter().enumerate())
            .map(|(slot, n)| (slot, n.load(Relaxed)))
            .filter(|&(_, n)| n > 0)
            .map(|(slot, n)| (Layer::name(slot), n as f64 / 1e6 / passes.max(1) as f64))
            .collect()
    }

    /// Runs `f`, adding its wall time divided by `concurrent` to `layer`: `concurrent` threads
    /// run the same layers at once on images of their own, so each adds its share of the pass.
    pub(super) fn time<R>(&self, layer: Layer, concurrent: usize, f: impl FnOnce() -> R) -> R {
        if !self.on.load(Relaxed) {
            return f();
        }
        let start = Instant::now();
        let out = f();
        let nanos = start.elapsed().as_nanos() as u64 / concurrent.max(1) as u64;
        self.nanos[layer.slot()].fetch_add(nanos, Relaxed);
        out
    }
}
