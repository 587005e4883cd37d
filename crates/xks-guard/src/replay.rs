//! Refusing a signed request seen before (optional, per key store).
//!
//! SigV4 proves who signed a request and that it was not changed, and the
//! ±5-minute clock-skew rule bounds *when* it may be used: a captured request
//! can be sent again, unchanged, for up to 5 minutes after its `X-Amz-Date`.
//! An Encrypt replayed that way yields a fresh ciphertext of a known
//! plaintext under the same key; a Decrypt replayed returns the plaintext
//! again, to whoever could read the first answer anyway. TLS keeps captures
//! out of reach in practice, so this is off by default.
//!
//! With `replay_protection = true` a key store remembers the signature of
//! every request that authenticated, for as long as its timestamp would be
//! accepted, and refuses a second request with the same signature (401).
//! Only authenticated requests are remembered, so nobody without the secret
//! can fill the cache. Caveat: a client that retries by resending the
//! *identical* signed bytes (same second, same body) is refused too; KMS signs
//! every attempt anew.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Signatures seen, grouped by the minute of their request time.
#[derive(Debug)]
pub struct ReplayCache {
    window: Duration,
    minutes: Mutex<VecDeque<(u64, HashSet<[u8; 32]>)>>,
}

fn minute(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() / 60)
        .unwrap_or(0)
}

impl ReplayCache {
    /// A cache for signatures whose request time may be up to `skew` from
    /// the proxy's clock (SigV4's 5 minutes).
    pub fn new(skew: Duration) -> Self {
        ReplayCache {
            window: skew,
            minutes: Mutex::new(VecDeque::new()),
        }
    }

    /// Records the signature of an authenticated request made at
    /// `request_time`; false when it was recorded before (a replay).
    pub fn first_use(
        &self,
        signature: [u8; 32],
        request_time: SystemTime,
        now: SystemTime,
    ) -> bool {
        let mut minutes = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        // Forget what can no longer be replayed: request times more than the
        // skew (plus the minute's width) before now.
        let oldest = minute(
            now.checked_sub(self.window)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        )
        .saturating_sub(1);
        while minutes.front().is_some_and(|(m, _)| *m < oldest) {
            minutes.pop_front();
        }
        let m = minute(request_time);
        if minutes.iter().any(|(_, seen)| seen.contains(&signature)) {
            return false;
        }
        match minutes.iter_mut().find(|(k, _)| *k == m) {
            Some((_, seen)) => {
                seen.insert(signature);
            }
            None => {
                let at = minutes.partition_point(|(k, _)| *k < m);
                minutes.insert(at, (m, HashSet::from([signature])));
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_accepted_once_within_the_window() {
        let c = ReplayCache::new(Duration::from_secs(300));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert!(c.first_use([1; 32], t0, t0));
        assert!(!c.first_use([1; 32], t0, t0 + Duration::from_secs(299)));
        assert!(c.first_use([2; 32], t0, t0));
        // Requests signed at other times do not collide.
        assert!(c.first_use([3; 32], t0 - Duration::from_secs(200), t0));
        // Long after, the entry is gone (and the timestamp would be refused
        // by the skew check anyway).
        let later = t0 + Duration::from_secs(3600);
        assert!(c.first_use([4; 32], later, later));
        assert_eq!(c.minutes.lock().unwrap().len(), 1);
    }
}
