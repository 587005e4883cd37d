//! Per-key-store request-rate quotas.
//!
//! KMS allows 1,800 requests/s per key store by default; an operator may want
//! the proxy to enforce its own quota (to protect a shared HSM from one noisy
//! key store, say). A token bucket refills at `per_second` up to `burst`; a
//! request that finds it empty is answered 429 `ThrottlingException` at once,
//! which KMS treats as a signal to back off, rather than queueing.

use std::sync::Mutex;
use std::time::Instant;

/// A token bucket: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

/// The state of one token bucket: tokens left and when they were counted.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn full(limit: RateLimit, now: Instant) -> Self {
        Bucket {
            tokens: limit.burst,
            at: now,
        }
    }

    /// Refills for the time since the last call, then takes one token if
    /// there is one.
    pub fn take(&mut self, limit: RateLimit, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.per_second).min(limit.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A token bucket shared by a key store's requests.
#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    state: Mutex<Bucket>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: RateLimit) -> Self {
        TokenBucket {
            limit,
            state: Mutex::new(Bucket::full(limit, Instant::now())),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one token if there is one.
    pub fn try_acquire(&self) -> bool {
        self.try_acquire_at(Instant::now())
    }

    fn try_acquire_at(&self, now: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.take(self.limit, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_refills_at_the_rate_up_to_the_burst() {
        let b = TokenBucket::new(RateLimit {
            per_second: 10.0,
            burst: 3.0,
        });
        let t0 = Instant::now();
        assert!(b.try_acquire_at(t0));
        assert!(b.try_acquire_at(t0));
        assert!(b.try_acquire_at(t0));
        assert!(!b.try_acquire_at(t0));
        // 100 ms at 10/s: one more token.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.try_acquire_at(t1));
        assert!(!b.try_acquire_at(t1));
        // A long pause refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(b.try_acquire_at(t2));
        }
        assert!(!b.try_acquire_at(t2));
    }
}
