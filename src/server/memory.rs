//! The memory budget. The process is held under one figure (`--memory-budget`, by default 3/4
//! of the container's memory limit):
//!
//! ```text
//! budget = baseline     the process after loading and warming the model at --max-batch-size
//!                       (weights, engine buffers, runtime), measured before the port is bound
//!        + connections  --max-connections x CONNECTION_BYTES (hyper's buffers, the task),
//!                       twice with gRPC on (its connections are capped apart)
//!        + headers      HTTP worker threads x HEADER_READ_BYTES (image headers are read there)
//!        + slack        allocator caches and fragmentation, 1/16 of the budget
//!        + requests     the pool below: every allocation that grows with a request
//! ```
//!
//! A request reserves from the pool before it allocates: its body (before reading it, from
//! `Content-Length`), each image's decode and resize (from the header, before decoding), each
//! finished tensor until the forward pass that takes it, and each answer until the response is
//! written. What cannot fit waits up to `--memory-wait-ms`, then gets 503; what could never fit
//! gets 413.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reservations are counted in KiB so that one reservation of any real size fits the
/// semaphore's u32 permit count.
const UNIT: u64 = 1024;

/// What one open connection may hold: hyper's read buffer (its limit, [`MAX_HEADER_BYTES`])
/// and write buffer, the connection task and its timers.
pub const CONNECTION_BYTES: u64 = 2 * MAX_HEADER_BYTES as u64 + 32 * 1024;

/// Largest request head (request line and headers); hyper answers 431 above it. It is also
/// the most hyper buffers of a body before handing it over.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Budget without a container memory limit: 2 GiB, or 3/4 of the machine's memory if less.
pub const FIXED_DEFAULT_BUDGET: u64 = 2 << 30;

/// The pool that requests reserve from.
#[derive(Clone)]
pub struct MemoryPool {
    semaphore: Arc<Semaphore>,
    capacity: u64,
}

/// Bytes held by one request; given back when dropped.
#[derive(Debug, Default)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// More than the whole pool.
    NeverFits { needed: u64, capacity: u64 },
    /// Did not fit within the wait.
    Busy,
}

fn units(bytes: u64) -> u64 {
    bytes.div_ceil(UNIT)
}

impl MemoryPool {
    pub fn new(capacity: u64) -> Self {
        let permits = units(capacity).min(Semaphore::MAX_PERMITS as u64) as usize;
        Self { semaphore: Arc::new(Semaphore::new(permits)), capacity }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes reserved by requests right now.
    pub fn in_use(&self) -> u64 {
        (units(self.capacity) - self.semaphore.available_permits() as u64) * UNIT
    }

    /// Reserves `bytes`, waiting up to `wait` for other requests to give memory back.
    /// Waiters are served in order, so a large reservation is not starved by small ones.
    pub async fn reserve(&self, bytes: u64, wait: Duration) -> Result<Reservation, Refused> {
        let n = units(bytes);
        if n > units(self.capacity) || n > u32::MAX as u64 {
            return Err(Refused::NeverFits { needed: bytes, capacity: self.capacity });
        }
        if n == 0 {
            return Ok(Reservation { permit: None });
        }
        let acquire = self.semaphore.clone().acquire_many_owned(n as u32);
        match tokio::time::timeout(wait, acquire).await {
            Ok(Ok(permit)) => Ok(Reservation { permit: Some(permit) }),
            Ok(Err(_)) | Err(_) => Err(Refused::Busy),
        }
    }
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.permit.as_ref().map_or(0, |p| p.num_permits() as u64 * UNIT)
    }

    /// Splits `bytes` off into a reservation of its own (at most what this one holds).
    pub fn split_off(&mut self, bytes: u64) -> Reservation {
        let n = units(bytes) as usize;
        let held = self.permit.as_ref().map_or(0, |p| p.num_permits());
        let permit = match n {
            0 => None,
            n if n >= held => self.permit.take(),
            n => self.permit.as_mut().and_then(|p| p.split(n)),
        };
        Reservation { permit }
    }

    /// Gives back everything above `bytes`.
    pub fn shrink_to(&mut self, bytes: u64) {
        let kept = self.split_off(bytes);
        *self = kept;
    }
}

/// What the process is using, from /proc (Linux); `None` elsewhere.
#[derive(Debug, Clone, Copy)]
pub struct ProcessMemory {
    /// Resident now (VmRSS).
    pub resident: u64,
    /// Most resident since start or the last [`reset_peak`] (VmHWM).
    pub peak: u64,
}

impl ProcessMemory {
    pub fn read() -> Option<Self> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            Some(
                line[name.len()..].trim().trim_end_matches("kB").trim().parse::<u64>().ok()? * 1024,
            )
        };
        Some(Self { resident: field("VmRSS:")?, peak: field("VmHWM:")? })
    }
}

/// Resets VmHWM to the current resident size, so that a later reading measures one phase.
/// Best effort: without a writable /proc the peak keeps counting from process start, which
/// only makes the measured baseline larger.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The default budget and where it came from: 3/4 of the cgroup memory limit (v2 or v1)
/// when there is one; else [`FIXED_DEFAULT_BUDGET`], or 3/4 of the machine's memory if that
/// is smaller.
pub fn default_budget() -> (u64, String) {
    if let Some(limit) = cgroup_memory_limit() {
        return (limit / 4 * 3, format!("3/4 of the cgroup memory limit of {limit} bytes"));
    }
    match machine_memory() {
        Some(total) if total / 4 * 3 < FIXED_DEFAULT_BUDGET => {
            (total / 4 * 3, format!("3/4 of the machine's {total} bytes"))
        }
        _ => (FIXED_DEFAULT_BUDGET, "the fixed default (no cgroup memory limit)".into()),
    }
}

fn cgroup_memory_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut candidates = Vec::new();
    for line in cgroups.lines() {
        // v2: "0::/path"; v1: "N:memory:/path" (or a list of controllers with memory).
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) =
            (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        if controllers.is_empty() {
            candidates.push(format!("/sys/fs/cgroup{path}/memory.max"));
            candidates.push("/sys/fs/cgroup/memory.max".into());
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"));
            candidates.push("/sys/fs/cgroup/memory/memory.limit_in_bytes".into());
        }
    }
    candidates.iter().find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        // "max" (v2) or a huge number (v1's "unlimited") mean no limit.
        text.trim().parse::<u64>().ok().filter(|&limit| limit < 1 << 60)
    })
}

fn machine_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    Some(line["MemTotal:".len()..].trim().trim_end_matches("kB").trim().parse::<u64>().ok()? * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_wait_their_turn_and_what_never_fits_is_told_apart() {
        let pool = MemoryPool::new(10 * UNIT);
        let wait = Duration::from_millis(50);
        let mut a = pool.reserve(6 * UNIT, wait).await.unwrap();
        assert_eq!(pool.in_use(), 6 * UNIT);
        assert_eq!(pool.reserve(5 * UNIT, wait).await.unwrap_err(), Refused::Busy);
        assert_eq!(
            pool.reserve(11 * UNIT, wait).await.unwrap_err(),
            Refused::NeverFits { needed: 11 * UNIT, capacity: 10 * UNIT }
        );
        a.shrink_to(2 * UNIT);
        assert_eq!(pool.in_use(), 2 * UNIT);
        let b = a.split_off(UNIT);
        assert_eq!((a.bytes(), b.bytes()), (UNIT, UNIT));
        drop(a);
        assert_eq!(pool.in_use(), UNIT);
        // A waiter gets its memory as soon as it is given back.
        let pool2 = pool.clone();
        let waiter = tokio::spawn(async move {
            pool2.reserve(10 * UNIT, Duration::from_secs(5)).await.map(|r| r.bytes())
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(b);
        assert_eq!(waiter.await.unwrap(), Ok(10 * UNIT));
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn process_memory_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let m = ProcessMemory::read().unwrap();
            assert!(m.resident > 0 && m.peak >= m.resident, "{m:?}");
        }
        let (budget, source) = default_budget();
        assert!(budget > 0, "{source}");
    }
}
