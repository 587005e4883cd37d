//! CPU lanes: a request's hand-off to the HSM thread and back stays on one
//! CPU.
//!
//! A PKCS#11 call blocks, so it never runs on the async runtime: every
//! request is handed from a runtime worker to a pool thread and back. At
//! KMS's rate (1,800 requests/s, a request every half millisecond) every
//! hand-off finds the other thread asleep, and when the scheduler wakes it
//! on the *other* CPU, the wake-up costs an inter-processor interrupt and an
//! idle CPU's exit from its sleep state (on a VM, exits to the hypervisor on
//! both sides). Measured on a 2-core VM at 1,800 requests/s
//! (docs/performance.md, round three): the same proxy pinned to one CPU spent
//! 158 µs of CPU per request against 189 µs spread over two, with the same
//! number of context switches. A wake-up on the waker's own CPU is a plain
//! switch.
//!
//! So each allowed CPU gets a **lane**: the runtime worker pinned there and
//! the pool threads pinned there, with a job queue of their own. A request
//! goes to the lane of the CPU its worker runs on, while that lane has an
//! idle thread; otherwise to another lane with an idle thread, and only then
//! waits in the shortest queue. So at low load every hand-off stays on one
//! CPU, and at saturation every session still works.
//!
//! Pinning is decided once, at startup ([`Placement::detect`]): only the
//! CPUs this process may run on (its affinity mask: a container's cpuset,
//! `taskset`, systemd's `CPUAffinity=`) are used, and with a single CPU, or
//! `server.pin_threads = false`, nothing is pinned and there is one lane.
//!
//! This module is the second `unsafe` island of the crate: the three
//! scheduler calls (`sched_getaffinity`, `sched_setaffinity`,
//! `sched_getcpu`) have no safe wrapper in the standard library.

#![allow(unsafe_code)]

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

thread_local! {
    /// Whether [`Placement::place_worker`] has seen this thread already.
    static PLACED: Cell<bool> = const { Cell::new(false) };
}

/// Where the proxy's threads run: one lane per CPU it may use, or a single
/// unpinned lane. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Placement {
    /// The CPU of each lane; empty when nothing is pinned.
    cpus: Arc<Vec<usize>>,
    /// Runtime workers placed so far (see [`Placement::place_worker`]).
    workers: Arc<AtomicUsize>,
    /// How many workers the async runtime starts (the first ones pinned).
    runtime_workers: usize,
    /// The lane of the first runtime worker: the one the process started
    /// on, so that several proxies on one host do not all put their worker
    /// on the first CPU.
    first_lane: usize,
}

impl Default for Placement {
    /// One lane, nothing pinned.
    fn default() -> Self {
        Placement::unpinned()
    }
}

impl Placement {
    /// One lane, nothing pinned.
    pub fn unpinned() -> Placement {
        Placement {
            cpus: Arc::new(Vec::new()),
            workers: Arc::new(AtomicUsize::new(0)),
            runtime_workers: 1,
            first_lane: 0,
        }
    }

    /// A lane for each CPU in the calling thread's affinity mask when `pin`
    /// is set and there are two or more; else [`Placement::unpinned`].
    /// `runtime_workers` (0: one per lane) is how many workers the async
    /// runtime will start. Call it on the main thread, before the runtime.
    ///
    /// Nothing is pinned either when a CPU quota (a container's CPU limit,
    /// which `available_parallelism` reads from the cgroup) allows fewer
    /// CPUs than the mask names: the process then shares those CPUs with
    /// others and gets a slice of each, and a thread pinned to one of them
    /// could not move away from a busy neighbour.
    pub fn detect(pin: bool, runtime_workers: usize) -> Placement {
        let quota = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut cpus = if pin { allowed_cpus() } else { Vec::new() };
        if cpus.len() >= 2 && quota < cpus.len() {
            tracing::info!(
                cpus = cpus.len(),
                quota,
                "a CPU quota below the CPUs this process may use: threads are not pinned"
            );
            cpus.clear();
        }
        if cpus.len() < 2 {
            cpus.clear();
        }
        let mut p = Placement {
            runtime_workers: match runtime_workers {
                0 if !cpus.is_empty() => cpus.len(),
                0 => quota,
                n => n,
            },
            cpus: Arc::new(cpus),
            ..Placement::unpinned()
        };
        p.first_lane = p.lane_here();
        p
    }

    /// How many workers the async runtime starts: the configured number, or
    /// one per lane (one per CPU when nothing is pinned).
    pub fn runtime_workers(&self) -> usize {
        self.runtime_workers
    }

    /// How many lanes (at least one).
    pub fn lanes(&self) -> usize {
        self.cpus.len().max(1)
    }

    /// The CPU of each lane; empty when nothing is pinned.
    pub fn cpus(&self) -> &[usize] {
        &self.cpus
    }

    /// Whether threads are pinned at all.
    pub fn pinned(&self) -> bool {
        !self.cpus.is_empty()
    }

    /// For a session pool with `n` lanes of its own (fewer than
    /// [`Self::lanes`] when it has fewer threads): its lane `l` sits on the
    /// CPU of lane `first_lane + l`, so that a small pool shares the CPU of
    /// the first runtime worker. This maps `lane` (a [`Self::lane_here`]) to
    /// the pool's lane.
    pub(crate) fn pool_lane(&self, lane: usize, n: usize) -> usize {
        let lanes = self.lanes();
        (lane + lanes - self.first_lane) % lanes % n.max(1)
    }

    /// Whether `lane` (a [`Self::lane_here`]) is the CPU of pool lane `l`,
    /// threads being pinned at all: a job handed to that pool lane's free
    /// thread then runs on that very CPU.
    pub(crate) fn is_cpu_of_pool_lane(&self, lane: usize, l: usize) -> bool {
        self.pinned() && lane == (self.first_lane + l) % self.lanes()
    }

    /// Pins the calling thread, one of a session pool's, to its pool lane
    /// `l` (see [`Self::pool_lane_here`]).
    pub(crate) fn pin_pool_thread(&self, l: usize) {
        self.pin_current(self.first_lane + l);
    }

    /// The lane of the CPU the calling thread runs on now (0 when unpinned).
    pub fn lane_here(&self) -> usize {
        if self.cpus.len() < 2 {
            return 0;
        }
        // SAFETY: sched_getcpu takes no arguments and only reads the
        // calling thread's state; it returns -1 on error.
        let cpu = unsafe { libc::sched_getcpu() };
        usize::try_from(cpu)
            .ok()
            .and_then(|cpu| self.cpus.iter().position(|&c| c == cpu))
            .unwrap_or(0)
    }

    /// Pins the calling thread to `lane`'s CPU (nothing when unpinned). A
    /// refusal (a cpuset changed under us) leaves the thread where it was:
    /// placement is an optimisation, never a condition.
    pub fn pin_current(&self, lane: usize) {
        if let Some(&cpu) = self.cpus.get(lane % self.lanes()) {
            if !set_affinity(&[cpu]) {
                tracing::debug!(cpu, "could not pin a thread to its CPU");
            }
        }
    }

    /// Lets the calling thread run on every lane's CPU again.
    pub(crate) fn unpin_current(&self) {
        if self.pinned() && !set_affinity(&self.cpus) {
            tracing::debug!("could not unpin a thread");
        }
    }

    /// For the async runtime's `on_thread_start`, which every runtime thread
    /// runs (workers and the blocking pool alike): all the lanes' CPUs, since
    /// a new thread inherits the mask of the thread that started it, which
    /// may be a pinned worker. Workers are pinned at their first park (see
    /// [`Self::place_worker`]).
    pub fn place_runtime_thread(&self) {
        self.unpin_current();
    }

    /// For the async runtime's `on_thread_park`, which only its workers run:
    /// at a worker's first park, pins it to the next lane's CPU in turn, from
    /// the lane the process started on. (`on_thread_start` cannot tell a
    /// worker from a blocking thread, and the first blocking thread may start
    /// before the last worker does.)
    pub fn place_worker(&self) {
        if !self.pinned() || PLACED.with(|p| p.replace(true)) {
            return;
        }
        let n = self.workers.fetch_add(1, Ordering::Relaxed);
        if n < self.runtime_workers {
            self.pin_current(self.first_lane + n);
        }
    }
}

/// The CPUs in the calling thread's affinity mask, in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain bits, valid when zeroed; sched_getaffinity
    // writes at most size_of::<cpu_set_t>() bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Restricts the calling thread to `cpus`; false if the kernel refused.
fn set_affinity(cpus: &[usize]) -> bool {
    if cpus.iter().any(|&cpu| cpu >= libc::CPU_SETSIZE as usize) {
        return false;
    }
    // SAFETY: as in allowed_cpus; every CPU_SET is in bounds (checked
    // above), and sched_setaffinity only reads the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpinned_is_one_lane_everywhere() {
        let p = Placement::detect(false, 0);
        assert_eq!(p.lanes(), 1);
        assert!(!p.pinned());
        assert_eq!(p.lane_here(), 0);
    }

    #[test]
    fn a_pinned_thread_runs_on_its_lanes_cpu() {
        let p = Placement::detect(true, 0);
        if !p.pinned() {
            // A single-CPU machine: nothing to pin, one lane.
            assert_eq!(p.lanes(), 1);
            return;
        }
        for lane in 0..p.lanes() {
            let q = p.clone();
            let (here, cpu) = std::thread::spawn(move || {
                q.pin_current(lane);
                // SAFETY: as in lane_here.
                (q.lane_here(), unsafe { libc::sched_getcpu() })
            })
            .join()
            .unwrap();
            assert_eq!(here, lane);
            assert_eq!(cpu as usize, p.cpus[lane]);
        }
    }

    #[test]
    fn a_pool_thread_finds_its_own_lane_from_its_cpu() {
        let p = Placement::detect(true, 1);
        if !p.pinned() {
            return;
        }
        for n in 1..=p.lanes() {
            for l in 0..n {
                let q = p.clone();
                let here = std::thread::spawn(move || {
                    q.pin_pool_thread(l);
                    q.pool_lane(q.lane_here(), n)
                })
                .join()
                .unwrap();
                assert_eq!(here, l, "pool of {n} lanes");
            }
        }
    }

    #[test]
    fn runtime_workers_get_a_lane_each_and_blocking_threads_every_lane() {
        let p = Placement::detect(true, 0);
        if !p.pinned() {
            return;
        }
        assert_eq!(p.runtime_workers(), p.lanes());
        // A real runtime: its workers park, its blocking threads do not.
        let rt = {
            let (start, park) = (p.clone(), p.clone());
            tokio::runtime::Builder::new_multi_thread()
                .enable_time()
                .worker_threads(p.lanes())
                .on_thread_start(move || start.place_runtime_thread())
                .on_thread_park(move || park.place_worker())
                .build()
                .unwrap()
        };
        let mut worker_masks: Vec<Vec<usize>> = rt.block_on(async {
            let mut masks = Vec::new();
            // Until every worker has parked once (been placed); idle
            // workers park at once.
            for _ in 0..2000 {
                if p.workers.load(Ordering::Relaxed) >= p.lanes() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            assert_eq!(p.workers.load(Ordering::Relaxed), p.lanes());
            for _ in 0..50 {
                masks.push(tokio::spawn(async { allowed_cpus() }).await.unwrap());
            }
            masks
        });
        worker_masks.sort();
        worker_masks.dedup();
        for mask in &worker_masks {
            assert_eq!(mask.len(), 1, "a worker is pinned to one CPU: {mask:?}");
        }
        let blocking =
            rt.block_on(async { tokio::task::spawn_blocking(allowed_cpus).await.unwrap() });
        assert_eq!(
            blocking, *p.cpus,
            "a blocking thread may use every lane's CPU"
        );
    }
}
