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
    pub fn new(capacity: usize) -> Self {
        JobQueue {
            state: Mutex::new(State {
                jobs: VecDeque::with_capacity(capacity),
                capacity: capacity.max(1),
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
        let mut s = self.lock();
        if s.closed {
            return Err(PushError::Closed(job));
        }
        if s.jobs.len() >= s.capacity {
            return Err(PushError::Full(job));
        }
        s.jobs.push_back(job);
        let wake = s.sleeping > s.jobs.len() - 1;
        drop(s);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// The next job, waiting for one; `None` once the queue is closed and
    /// empty.
    pub fn pop(&self) -> Option<T> {
        let mut s = self.lock();
        loop {
            if let Some(job) = s.jobs.pop_front() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bounded_fifo_that_drains_after_close() {
        let q = JobQueue::new(2);
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
    fn sleeping_workers_are_woken_and_released_at_close() {
        let q = Arc::new(JobQueue::new(64));
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
