//! The locks in force, as every request sees them.
//!
//! The poller replaces the whole set at once; a request reads it with one
//! atomic load, and when no lock exists (the normal case) that is all it
//! costs. Expiry is checked when a request looks, so a lock with `--for`
//! lifts itself on time whatever the poll cadence.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use super::lock::{Lock, ALL};

#[derive(Default)]
struct Locks {
    all: Option<Arc<Lock>>,
    stores: HashMap<String, Arc<Lock>>,
}

/// The current locks, and whether they are known at all.
pub struct LockBoard {
    current: ArcSwap<Locks>,
    /// No key manager has been read yet: until one is, the locks in force
    /// are unknown, and Encrypt and Decrypt are refused (a kill switch that
    /// cannot be read must not fail open).
    unread: AtomicBool,
}

impl Default for LockBoard {
    /// A board whose locks have not been read yet.
    fn default() -> Self {
        LockBoard {
            current: ArcSwap::default(),
            unread: AtomicBool::new(true),
        }
    }
}

impl LockBoard {
    /// True until the first successful read of the lock markers.
    pub fn unread(&self) -> bool {
        self.unread.load(Ordering::Acquire)
    }

    /// The lock in force on `key_store` now, if any (its own, else one on
    /// every key store).
    pub fn check(&self, key_store: &str) -> Option<Arc<Lock>> {
        let locks = self.current.load();
        if locks.all.is_none() && locks.stores.is_empty() {
            return None;
        }
        let now = SystemTime::now();
        locks
            .stores
            .get(key_store)
            .filter(|l| l.active_at(now))
            .or_else(|| locks.all.as_ref().filter(|l| l.active_at(now)))
            .cloned()
    }

    /// Replaces the locks (one per scope; see the poller for the choice).
    pub fn set(&self, locks: Vec<Lock>) {
        let mut next = Locks::default();
        for l in locks {
            if l.scope == ALL {
                next.all = Some(Arc::new(l));
            } else {
                next.stores.insert(l.scope.clone(), Arc::new(l));
            }
        }
        self.current.store(Arc::new(next));
        self.unread.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_lock_and_an_all_lock_apply_and_expire() {
        let b = LockBoard::default();
        assert!(b.unread());
        b.set(Vec::new());
        assert!(!b.unread());
        assert!(b.check("a").is_none());
        b.set(vec![Lock::new("a", "r", None, "me")]);
        assert!(b.check("a").is_some());
        assert!(b.check("b").is_none());
        b.set(vec![Lock::new(ALL, "r", None, "me")]);
        assert_eq!(b.check("b").unwrap().scope, ALL);
        let mut ended = Lock::new("a", "r", None, "me");
        ended.until = Some("2000-01-01T00:00:00Z".into());
        b.set(vec![ended]);
        assert!(b.check("a").is_none(), "an expired lock lifts itself");
    }
}
