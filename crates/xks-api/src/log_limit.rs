//! How many access-log lines a client that has not authenticated may cause.
//!
//! Every request gets an access-log line, but a request that never passed
//! SigV4 (a scanner, a misconfigured client, an attack) must not be able to
//! fill the disk or drown the lines that matter. Such lines are limited per
//! source address and in total; what is held back is counted
//! (`xks_log_lines_suppressed_total`) and the next line from that source says
//! how many of its lines were left out (`suppressed`). Requests that
//! authenticated are always logged.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use xks_guard::throttle::{Bucket, RateLimit};

/// Per source: 10 lines a second, 20 at once.
const PER_SOURCE: RateLimit = RateLimit {
    per_second: 10.0,
    burst: 20.0,
};
/// All sources together: 100 lines a second, 200 at once.
const TOTAL: RateLimit = RateLimit {
    per_second: 100.0,
    burst: 200.0,
};
/// Sources remembered at once; beyond, the table starts over (the total
/// limit still holds).
const MAX_SOURCES: usize = 4096;

struct Source {
    bucket: Bucket,
    suppressed: u64,
}

struct Inner {
    total: Bucket,
    sources: HashMap<IpAddr, Source>,
}

/// The limiter for unauthenticated requests' access lines.
pub struct LogLimiter {
    inner: Mutex<Inner>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter {
            inner: Mutex::new(Inner {
                total: Bucket::full(TOTAL, Instant::now()),
                sources: HashMap::new(),
            }),
        }
    }
}

impl LogLimiter {
    /// `Some(n)` when this line may be written, `n` lines from the same
    /// source having been held back since its last one; `None` to hold it.
    pub fn admit(&self, source: IpAddr) -> Option<u64> {
        self.admit_at(source, Instant::now())
    }

    fn admit_at(&self, source: IpAddr, now: Instant) -> Option<u64> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.sources.len() >= MAX_SOURCES && !inner.sources.contains_key(&source) {
            inner.sources.clear();
        }
        let Inner { total, sources } = &mut *inner;
        let s = sources.entry(source).or_insert(Source {
            bucket: Bucket::full(PER_SOURCE, now),
            suppressed: 0,
        });
        if s.bucket.take(PER_SOURCE, now) && total.take(TOTAL, now) {
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_noisy_source_is_held_back_and_told_how_much() {
        let l = LogLimiter::default();
        let (noisy, quiet) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        let logged = (0..1000)
            .filter(|_| l.admit_at(noisy, t0).is_some())
            .count();
        assert_eq!(logged, 20);
        // Another source is not affected.
        assert_eq!(l.admit_at(quiet, t0), Some(0));
        // A second later, the next line says what was left out.
        assert_eq!(l.admit_at(noisy, t0 + Duration::from_secs(1)), Some(980));
    }

    #[test]
    fn many_sources_are_held_to_the_total() {
        let l = LogLimiter::default();
        let t0 = Instant::now();
        let logged = (0..10_000u32)
            .filter(|i| l.admit_at(IpAddr::from(i.to_be_bytes()), t0).is_some())
            .count();
        assert_eq!(logged, 200);
    }
}
