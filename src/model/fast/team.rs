//! Helper threads that share a pass's tiles with the thread that runs the pass.
//!
//! Below one image per thread every layer is a parallel region of its own: about 20 per T0
//! pass, each a few hundred microseconds. Run on rayon's pool from outside it, the calling
//! thread sleeps on a latch for every region and is woken for the next; run on a pool thread,
//! the pool's threads spin after the pass too and keep the service's other threads from the
//! cores. A team instead takes the caller as one of its workers and keeps its helpers
//! spinning only while a pass runs: they park as soon as it ends, and are woken once per pass.

use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::*};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

/// Spins between looks for a region before a helper yields its core once.
const SPINS_BEFORE_YIELD: u32 = 1 << 12;

/// One parallel region: tasks `0..count`, taken one at a time by whoever is free.
struct Region<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    count: usize,
    next: AtomicUsize,
    panicked: AtomicBool,
}

impl Region<'_> {
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Relaxed);
            if i >= self.count {
                return;
            }
            (self.task)(i);
        }
    }
}

#[derive(Default)]
struct Shared {
    /// The region being run, null between regions. Type-erased to `'static`: a helper reads it
    /// only while `entered` counts it, and the caller waits for `entered` to drop to zero
    /// after clearing it, before the region leaves its stack frame.
    region: AtomicPtr<Region<'static>>,
    /// Helpers inside `region`.
    entered: AtomicUsize,
    /// A pass is running: helpers spin rather than park.
    in_pass: AtomicBool,
    stop: AtomicBool,
}

/// `helpers` threads that join the calling thread in `for_each` while `pass` runs.
pub(super) struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

impl Team {
    pub(super) fn new(helpers: usize) -> Self {
        let shared = Arc::new(Shared::default());
        let helpers = (0..helpers)
            .map(|i| {
                let shared = Arc::clone(&shared);
                thread::Builder::new()
                    .name(format!("fast-engine-{}", i + 1))
                    .spawn(move || help(&shared))
                    .expect("spawning a compute thread")
            })
            .collect();
        Self { shared, helpers }
    }

    /// With the helpers: the threads of a team, the calling one included.
    pub(super) fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `f` with the helpers awake, and lets them park after it.
    pub(super) fn pass<R>(&mut self, f: impl FnOnce(&Self) -> R) -> R {
        self.shared.in_pass.store(true, SeqCst);
        self.helpers.iter().for_each(|h| h.thread().unpark());
        struct EndPass<'a>(&'a AtomicBool);
        impl Drop for EndPass<'_> {
            fn drop(&mut self) {
                self.0.store(false, SeqCst);
            }
        }
        let _end = EndPass(&self.shared.in_pass);
        f(self)
    }

    /// Runs `task(i)` for every `i` in `0..count` on this thread and whichever helpers are
    /// free, and returns when all have finished; a panic in a helper's task is raised here.
    pub(super) fn for_each(&self, count: usize, task: &(dyn Fn(usize) + Sync)) {
        let region = Region { task, count, next: AtomicUsize::new(0), panicked: false.into() };
        let shared = &*self.shared;
        shared.region.store(ptr::from_ref(&region).cast_mut().cast(), SeqCst);
        // Clears the region and waits for the helpers inside it, also when this thread's own
        // task panics: they must not outlive `region`.
        struct Leave<'a>(&'a Shared);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.region.store(ptr::null_mut(), SeqCst);
                while self.0.entered.load(Acquire) != 0 {
                    std::hint::spin_loop();
                }
            }
        }
        let leave = Leave(shared);
        region.work();
        drop(leave);
        assert!(!region.panicked.load(Relaxed), "a compute thread panicked");
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        for helper in self.helpers.drain(..) {
            helper.thread().unpark();
            let _ = helper.join();
        }
    }
}

/// A helper's life: run a share of each region of a pass, spin between them, park between
/// passes.
fn help(shared: &Shared) {
    let mut spins = 0u32;
    while !shared.stop.load(Relaxed) {
        let region = shared.region.load(SeqCst);
        if !region.is_null() {
            shared.entered.fetch_add(1, SeqCst);
            // Entered before the caller cleared `region`, so it waits for this helper.
            if shared.region.load(SeqCst) == region {
                // SAFETY: `region` is still published, so `for_each` has not returned and
                // will not before `entered` drops back (the protocol at `Shared::region`).
                let region = unsafe { &*region };
                if panic::catch_unwind(AssertUnwindSafe(|| region.work())).is_err() {
                    region.panicked.store(true, Relaxed);
                    // The remaining tasks are left to the caller, which then raises it.
                }
            }
            shared.entered.fetch_sub(1, Release);
        }
        if shared.in_pass.load(Relaxed) {
            spins += 1;
            if spins.is_multiple_of(SPINS_BEFORE_YIELD) {
                thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        } else {
            // Woken by the next pass, or by `drop`. An unpark that comes before this park
            // makes it return at once, so no pass is missed.
            thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    #[test]
    fn every_task_runs_once_in_every_region_of_every_pass() {
        let mut team = Team::new(2);
        let threads_seen = std::sync::Mutex::new(std::collections::HashSet::new());
        for pass in 0..50 {
            let runs: Vec<AtomicU32> = (0..37).map(|_| AtomicU32::new(0)).collect();
            team.pass(|team| {
                for count in [1, 2, 5, 37, 0, 3] {
                    team.for_each(count, &|i| {
                        // A slow task: `for_each` must wait for the helper that took it.
                        if i == 0 {
                            thread::sleep(std::time::Duration::from_micros(200));
                        }
                        runs[i].fetch_add(1, Relaxed);
                        threads_seen.lock().unwrap().insert(thread::current().id());
                    });
                }
            });
            let want = |i: usize| [1, 2, 5, 37, 0, 3].iter().filter(|&&c| i < c).count() as u32;
            for (i, r) in runs.iter().enumerate() {
                assert_eq!(r.load(Relaxed), want(i), "pass {pass}, task {i}");
            }
        }
        assert_eq!(threads_seen.lock().unwrap().len(), 3, "a helper never took a task");
    }

    /// Spinning between passes would take a core from the service's other threads (decoding,
    /// HTTP, the inference thread itself) while it waits for requests.
    #[cfg(target_os = "linux")]
    #[test]
    fn helpers_take_no_cpu_between_passes() {
        use std::os::unix::thread::JoinHandleExt;
        use std::time::Duration;
        let cpu_time = |helper: &JoinHandle<()>| {
            let mut clock = 0;
            let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: the thread is alive (the team joins it only when dropped); both calls
            // write only to the locals passed.
            unsafe {
                assert_eq!(libc::pthread_getcpuclockid(helper.as_pthread_t(), &mut clock), 0);
                assert_eq!(libc::clock_gettime(clock, &mut t), 0);
            }
            Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
        };
        let mut team = Team::new(1);
        team.pass(|team| team.for_each(8, &|_| thread::sleep(Duration::from_millis(1))));
        thread::sleep(Duration::from_millis(20));
        let before = cpu_time(&team.helpers[0]);
        thread::sleep(Duration::from_millis(300));
        let spent = cpu_time(&team.helpers[0]) - before;
        assert!(spent < Duration::from_millis(30), "the helper ran {spent:?} in 300 ms idle");
    }

    #[test]
    fn a_panicking_task_is_raised_by_the_caller_and_the_team_still_works() {
        let mut team = Team::new(1);
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            team.pass(|team| team.for_each(64, &|i| assert!(i != 40, "task 40")))
        }));
        assert!(result.is_err());
        let ran = AtomicUsize::new(0);
        team.pass(|team| {
            team.for_each(10, &|_| {
                ran.fetch_add(1, Relaxed);
            })
        });
        assert_eq!(ran.load(Relaxed), 10);
    }
}
