//! The bounded job queue between the async side and a pool's worker threads.
//!
//! A mutex-guarded deque and a condition variable, rather than a channel
//! crate: a waiting worker sleeps in the kernel at once. Channel receivers
//! (crossbeam's, which `std::sync::mpsc` shares) first spin and call
//! `sched_yield` a few times before they sleep, which at a few thousand
//! requests per second cost more CPU than the HSM operation itself (measured
//! in docs/performance.md); and a sender wakes a worker only when one is
//! actually asleep.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Why a job was not queued.
#[derive(Debug)]
pub enum PushError<T> {
    /// As many jobs wait as the queue holds: the key manager is saturated.
    Full(T),
    /// The pool is shutting down.
    Closed(T),
}

struct State<T> {
    jobs: VecDeque<T>,
    capacity: usize,
    /// Worker threads that take from this queue.
    consumers: usize,
    /// Jobs taken by `pop` whose worker has not called `done` yet.
    running: usize,
    /// Workers inside `pop`, asleep or about to be.
    sleeping: usize,
    closed: bool,
}

/// Many producers (request tasks), many consumers (worker threads).
pub struct JobQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

impl<T> JobQueue<T> {
    /// A queue of `capacity` jobs for `consumers` worker threads.
    pub fn new(capacity: usize, consumers: usize) -> Self {
        JobQueue {
            state: Mutex::new(State {
                jobs: VecDeque::with_capacity(capacity),
                capacity: capacity.max(1),
                consumers,
                running: 0,
                sleeping: 0,
                closed: false,
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A worker that panicked inside a job does not hold this lock (jobs
        // run outside it), so poisoning carries no broken invariant.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job` without waiting; wakes one sleeping worker, if any.
    pub fn push(&self, job: T) -> Result<(), PushError<T>> {
        let s = self.lock();
        if s.closed {
            return Err(PushError::Closed(job));
        }
        if s.jobs.len() >= s.capacity {
            return Err(PushError::Full(job));
        }
        self.append(s, job);
        Ok(())
    }

    /// Appends `job` under the lock `s`, then wakes a sleeping worker if one
    /// is not already woken for an earlier job.
    fn append(&self, mut s: MutexGuard<'_, State<T>>, job: T) {
        s.jobs.push_back(job);
        let wake = s.sleeping > s.jobs.len() - 1;
        drop(s);
        if wake {
            self.ready.notify_one();
        }
    }

    /// Queues `job` only if a worker is free to take it at once (asleep in
    /// `pop`, or done with its last job and on its way back), waking it if
    /// it sleeps; gives the job back otherwise. For the lanes of a pool (see
    /// `super::lanes`): a job goes where it will not wait.
    pub fn push_to_idle(&self, job: T) -> Result<(), T> {
        let s = self.lock();
        if s.closed || s.consumers.saturating_sub(s.running) <= s.jobs.len() {
            return Err(job);
        }
        self.append(s, job);
        Ok(())
    }

    /// The next job, waiting for one; `None` once the queue is closed and
    /// empty.
    pub fn pop(&self) -> Option<T> {
        let mut s = self.lock();
        loop {
            if let Some(job) = s.jobs.pop_front() {
                s.running += 1;
                return Some(job);
            }
            if s.closed {
                return None;
            }
            s.sleeping += 1;
            s = self.ready.wait(s).unwrap_or_else(|e| e.into_inner());
            s.sleeping -= 1;
        }
    }

    /// A job if one waits, without waiting (counted as running, as `pop`'s).
    fn try_pop(&self) -> Option<T> {
        let mut s = self.lock();
        let job = s.jobs.pop_front()?;
        s.running += 1;
        Some(job)
    }

    /// A job if one waits, without waiting, for a worker of another queue
    /// (which counts it as its own: see [`pop_lanes`]).
    fn steal(&self) -> Option<T> {
        self.lock().jobs.pop_front()
    }

    /// A worker finished the job `pop` (or [`pop_lanes`]) gave it.
    pub fn done(&self) {
        let mut s = self.lock();
        s.running = s.running.saturating_sub(1);
    }

    /// Jobs waiting for a worker.
    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    /// No new jobs; workers finish what is queued, then `pop` says `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

/// The next job for a worker of lane `own` among a pool's `lanes` (see
/// `super::lanes`): one waiting in its own lane; else one waiting in
/// another lane; else it waits on its own lane. A job waits in a lane only
/// when no thread anywhere was free to take it, and then the first thread
/// to finish a job takes it, whichever its lane: a thread stuck in a hung
/// call never strands the jobs queued behind it. The job counts as running
/// in the worker's own lane (its `done` goes there). `None` once its own
/// lane is closed and empty.
pub fn pop_lanes<T>(lanes: &[std::sync::Arc<JobQueue<T>>], own: usize) -> Option<T> {
    if let Some(job) = lanes[own].try_pop() {
        return Some(job);
    }
    let n = lanes.len();
    if let Some(job) = (1..n).find_map(|k| lanes[(own + k) % n].steal()) {
        lanes[own].lock().running += 1;
        return Some(job);
    }
    lanes[own].pop()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bounded_fifo_that_drains_after_close() {
        let q = JobQueue::new(2, 1);
        q.push(1).unwrap();
        q.push(2).unwrap();
        assert!(matches!(q.push(3), Err(PushError::Full(3))));
        assert_eq!(q.len(), 2);
        q.close();
        assert!(matches!(q.push(4), Err(PushError::Closed(4))));
        assert_eq!(q.pop(), Some(1));
        assert_eq!(q.pop(), Some(2));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn push_to_idle_takes_a_job_only_while_a_worker_is_free() {
        let q = Arc::new(JobQueue::new(8, 1));
        // One worker, free: the first job is taken, a second would wait.
        assert_eq!(q.push_to_idle(1), Ok(()));
        assert_eq!(q.push_to_idle(2), Err(2));
        let (took, took_rx) = std::sync::mpsc::channel();
        let (finish, finish_rx) = std::sync::mpsc::channel::<()>();
        let worker = {
            let q = q.clone();
            std::thread::spawn(move || {
                while let Some(j) = q.pop() {
                    took.send(j).unwrap();
                    finish_rx.recv().unwrap();
                    q.done();
                }
            })
        };
        assert_eq!(took_rx.recv().unwrap(), 1);
        // Inside its job, the worker is not free.
        assert_eq!(q.push_to_idle(2), Err(2));
        finish.send(()).unwrap();
        // Done (asleep in pop, or on its way there): free again.
        let mut job = 2;
        while let Err(j) = q.push_to_idle(job) {
            job = j;
            std::thread::yield_now();
        }
        assert_eq!(took_rx.recv().unwrap(), 2);
        finish.send(()).unwrap();
        q.close();
        worker.join().unwrap();
        assert_eq!(q.push_to_idle(3), Err(3));
    }

    #[test]
    fn a_job_queued_behind_a_stuck_thread_is_taken_by_another_lane() {
        let lanes = vec![Arc::new(JobQueue::new(4, 1)), Arc::new(JobQueue::new(4, 1))];
        // Lane 0's only thread takes a job and hangs in it.
        lanes[0].push(1).unwrap();
        assert_eq!(pop_lanes(&lanes, 0), Some(1));
        // Lane 1's thread is busy too; a job arrives and, no thread being
        // free, waits in lane 0.
        lanes[1].push(2).unwrap();
        assert_eq!(pop_lanes(&lanes, 1), Some(2));
        lanes[0].push(3).unwrap();
        assert_eq!(
            lanes[0].push_to_idle(4),
            Err(4),
            "lane 0's thread is not free"
        );
        // Lane 1's thread finishes and takes the job from lane 0; it counts
        // as lane 1's, whose thread is busy again.
        lanes[1].done();
        assert_eq!(pop_lanes(&lanes, 1), Some(3));
        assert_eq!(lanes[0].len(), 0);
        assert_eq!(lanes[1].push_to_idle(5), Err(5), "lane 1's thread is busy");
    }

    #[test]
    fn sleeping_workers_are_woken_and_released_at_close() {
        let q = Arc::new(JobQueue::new(64, 3));
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let q = q.clone();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    while let Some(j) = q.pop() {
                        got.push(j);
                    }
                    got
                })
            })
            .collect();
        for i in 0..1000 {
            // Full only if the workers fall 64 behind; retry until taken.
            let mut job = i;
            while let Err(PushError::Full(j)) = q.push(job) {
                job = j;
                std::thread::yield_now();
            }
        }
        q.close();
        let mut all: Vec<i32> = workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
    }
}
