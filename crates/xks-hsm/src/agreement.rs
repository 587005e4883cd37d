//! Do the key managers hold the *same* key under a label?
//!
//! Several key managers serving one label is only safe when they hold the
//! same key material: a replicated cluster does, but two tokens initialized
//! separately, a replication that did not happen or a restored backup do
//! not, and each of them encrypts fine. A ciphertext written through one
//! then fails on the other after a failover: silent loss of every data key
//! written meanwhile. So before a key manager serves a label that another
//! also holds, the fleet proves they agree: the *reference* (the first key
//! manager in the configuration that holds the key and answers) encrypts a
//! random probe under a fresh IV (the ordinary encrypt path: a fresh IV
//! from the configured source), and the candidate must decrypt it. A
//! candidate whose key differs is not used for that label.
//!
//! This module keeps the verdicts; [`super::fleet`] runs the comparisons
//! (at startup, when a key manager joins, and again once a verdict is older
//! than the key cache's TTL, in the background while the old one stands).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Verdicts kept at most (labels × key managers). The map is keyed by key
/// ids that requests name; only labels that exist in two key managers ever
/// get a verdict, and past this many the oldest half is dropped (they are
/// compared again when next used).
const MAX_VERDICTS: usize = 10_000;

/// What a comparison found for one label on one key manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It holds the same key as the reference (or is the reference).
    Same,
    /// It holds another key under the label than `reference` does.
    Differs { reference: String },
}

type Verdicts = HashMap<String, HashMap<usize, (Verdict, Instant)>>;

/// The verdicts of one fleet.
pub(crate) struct Agreement {
    ttl: Duration,
    /// Label → key manager → verdict and when it was reached. Keyed by the
    /// label first so that a request's lookup borrows its `&str`.
    verdicts: Mutex<Verdicts>,
}

/// What routing may do with a key manager for a label now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Known {
    /// A verdict younger than the TTL.
    Fresh(Verdict),
    /// An older verdict: it stands while a comparison runs in the background.
    Stale(Verdict),
    Unknown,
}

impl Agreement {
    pub fn new(ttl: Duration) -> Self {
        Agreement {
            ttl,
            verdicts: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Verdicts> {
        self.verdicts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The verdict for `label` on key manager `backend`. A stale one is
    /// marked fresh for the caller that learns it is stale (it starts the
    /// background comparison), so one comparison runs, not one per request.
    pub fn known(&self, label: &str, backend: usize) -> Known {
        let mut map = self.lock();
        match map.get_mut(label).and_then(|m| m.get_mut(&backend)) {
            None => Known::Unknown,
            Some((v, at)) if at.elapsed() < self.ttl => Known::Fresh(v.clone()),
            Some((v, at)) => {
                *at = Instant::now();
                Known::Stale(v.clone())
            }
        }
    }

    /// Records a comparison's verdict; returns the previous one.
    pub fn record(&self, label: &str, backend: usize, verdict: Verdict) -> Option<Verdict> {
        let mut map = self.lock();
        if map.values().map(HashMap::len).sum::<usize>() >= MAX_VERDICTS {
            let mut ages: Vec<Instant> = map
                .values()
                .flat_map(|m| m.values().map(|(_, at)| *at))
                .collect();
            ages.sort();
            let cut = ages[ages.len() / 2];
            map.retain(|_, m| {
                m.retain(|_, (_, at)| *at > cut);
                !m.is_empty()
            });
        }
        map.entry(label.to_string())
            .or_default()
            .insert(backend, (verdict, Instant::now()))
            .map(|(v, _)| v)
    }

    /// Forgets what is known of key manager `backend` (it joined again:
    /// its token may be another one now).
    pub fn forget(&self, backend: usize) {
        self.lock().retain(|_, m| {
            m.remove(&backend);
            !m.is_empty()
        });
    }

    /// The labels key manager `backend` holds other keys for, with the
    /// reference each was compared with, sorted.
    pub fn diverging(&self, backend: usize) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .lock()
            .iter()
            .filter_map(|(label, m)| match m.get(&backend) {
                Some((Verdict::Differs { reference }, _)) => {
                    Some((label.clone(), reference.clone()))
                }
                _ => None,
            })
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_age_once_and_are_bounded() {
        let a = Agreement::new(Duration::ZERO);
        assert_eq!(a.known("k", 1), Known::Unknown);
        a.record("k", 1, Verdict::Same);
        // TTL zero: stale at once; the first to ask starts the comparison.
        assert_eq!(a.known("k", 1), Known::Stale(Verdict::Same));
        let a = Agreement::new(Duration::from_secs(60));
        a.record("k", 1, Verdict::Same);
        assert_eq!(a.known("k", 1), Known::Fresh(Verdict::Same));
        let differs = Verdict::Differs {
            reference: "a".into(),
        };
        assert_eq!(a.record("k", 1, differs.clone()), Some(Verdict::Same));
        assert_eq!(a.diverging(1), vec![("k".to_string(), "a".to_string())]);
        assert!(a.diverging(0).is_empty());
        a.forget(1);
        assert_eq!(a.known("k", 1), Known::Unknown);
        for n in 0..MAX_VERDICTS + 10 {
            a.record(&format!("key-{n}"), 1, Verdict::Same);
        }
        assert!(a.lock().values().map(HashMap::len).sum::<usize>() <= MAX_VERDICTS);
    }
}
