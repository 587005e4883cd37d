//! Per-key-store request-rate quotas.
//!
//! KMS allows 1,800 requests/s per key store by default; an operator may want
//! the proxy to enforce its own quota (to protect a shared HSM from one noisy
//! key store, say). A token bucket refills at `per_second` up to `burst`; a
//! request that finds it empty is answered 429 `ThrottlingException` at once,
//! which KMS treats as a signal to back off, rather than queueing.

use std::sync::Mutex;
use std::time::Instant;

use crate::config::RateLimit;

/// A token bucket.
#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    /// (tokens, last refill).
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: RateLimit) -> Self {
        TokenBucket {
            limit,
            state: Mutex::new((limit.burst, Instant::now())),
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
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.limit.per_second).min(self.limit.burst);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
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
