//! Twice a second, each instance reads the lock markers from every open key
//! manager (on their control threads, never a runtime thread) and puts the
//! result on the [`LockBoard`]: a lock set by `xks-proxy lockdown` on any
//! instance's host takes effect here within about a second, with no
//! restart and no configuration change.
//!
//! With several key managers, a lock found in any of them counts (the
//! `lockdown` command writes to all; if one missed it, refusing is the safe
//! side), and one that cannot be read keeps its last known locks. When the
//! locks in force change, this instance writes what it saw into its audit
//! trail (`lockdown`, `unlock`, `lock-expired`) and its log.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::board::LockBoard;
use super::lock::{Lock, APPLICATION};
use xks_audit::{AuditTrail, LockEvent, LockEventKind};
use xks_hsm::KeyManagers;
use xks_telemetry::metrics::Metrics;

/// Between two reads of the markers.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long startup waits for the first read of the locks before it
/// serves (refusing Encrypt and Decrypt until they are read).
pub const STARTUP_READ: Duration = Duration::from_secs(5);
/// How long one read may take.
const READ_WITHIN: Duration = Duration::from_millis(400);

/// Keeps the board in step with the token.
pub struct Poller {
    keys: KeyManagers,
    board: Arc<LockBoard>,
    audit: Option<Arc<AuditTrail>>,
    metrics: Metrics,
    /// What each key manager said last (`None`: never read).
    per_backend: Vec<Option<Vec<Lock>>>,
    failing: Vec<bool>,
    /// The locks in force at the last poll, by (scope, id).
    active: BTreeMap<(String, String), Lock>,
}

/// Of two locks on one scope, the one that lasts longer.
fn longer(a: Lock, b: Lock) -> Lock {
    match (a.until_time(), b.until_time()) {
        (None, _) => a,
        (_, None) => b,
        (Some(x), Some(y)) if x >= y => a,
        _ => b,
    }
}

impl Poller {
    pub fn new(
        keys: KeyManagers,
        board: Arc<LockBoard>,
        audit: Option<Arc<AuditTrail>>,
        metrics: Metrics,
    ) -> Poller {
        let n = keys.backends().len();
        Poller {
            keys,
            board,
            audit,
            metrics,
            per_backend: vec![None; n],
            failing: vec![false; n],
            active: BTreeMap::new(),
        }
    }

    /// Reads the markers once and applies them.
    pub async fn poll_once(&mut self) {
        for (i, result) in self.keys.read_markers(APPLICATION, READ_WITHIN).await {
            match result {
                Ok(markers) => {
                    self.per_backend[i] =
                        Some(markers.iter().filter_map(Lock::from_marker).collect());
                    if std::mem::replace(&mut self.failing[i], false) {
                        tracing::info!(ekm = i, "lockdown markers readable again");
                    }
                }
                Err(e) => {
                    self.metrics.lockdown_poll_failures.inc();
                    if !std::mem::replace(&mut self.failing[i], true) {
                        tracing::warn!(ekm = i, error = %e, "cannot read the lockdown markers; keeping the last known locks");
                    }
                }
            }
        }
        let mut by_scope: BTreeMap<String, Lock> = BTreeMap::new();
        for l in self.per_backend.iter().flatten().flatten() {
            let chosen = match by_scope.remove(&l.scope) {
                Some(other) => longer(other, l.clone()),
                None => l.clone(),
            };
            by_scope.insert(l.scope.clone(), chosen);
        }
        let now = SystemTime::now();
        let active: BTreeMap<(String, String), Lock> = by_scope
            .values()
            .filter(|l| l.active_at(now))
            .map(|l| ((l.scope.clone(), l.id.clone()), l.clone()))
            .collect();
        // Only what was read: with no key manager read yet, the board stays
        // "unread" (Encrypt and Decrypt refused) rather than "no locks".
        if self.per_backend.iter().any(Option::is_some) {
            self.board.set(by_scope.values().cloned().collect());
        }
        // Lifts first, then new locks: a lock replaced on its scope reads
        // as what happened, the old one ending before the new one begins.
        for (k, l) in &self.active {
            if !active.contains_key(k) {
                let kind = if by_scope.get(&l.scope).is_some_and(|s| s.id == l.id) {
                    LockEventKind::Expired
                } else {
                    LockEventKind::Unlocked
                };
                tracing::warn!(scope = %l.scope, lock = %l.id, event = kind.as_str(), "lockdown lifted");
                self.record(kind, l);
            }
        }
        for (k, l) in &active {
            if !self.active.contains_key(k) {
                tracing::warn!(scope = %l.scope, lock = %l.id, reason = %l.reason, until = l.until.as_deref().unwrap_or(""), by = %l.by, "lockdown in force: Encrypt and Decrypt are refused");
                self.record(LockEventKind::Locked, l);
            }
        }
        self.metrics.lockdown_active.set(active.len() as i64);
        self.active = active;
    }

    fn record(&self, kind: LockEventKind, l: &Lock) {
        if let Some(a) = &self.audit {
            let full = kind == LockEventKind::Locked;
            a.lock_event(LockEvent {
                kind,
                scope: l.scope.clone(),
                lock_id: l.id.clone(),
                reason: full.then(|| l.reason.clone()),
                locked_at: (full && !l.created.is_empty()).then(|| l.created.clone()),
                until: if full { l.until.clone() } else { None },
                by: (full && !l.by.is_empty()).then(|| l.by.clone()),
            });
        }
    }

    /// At startup: polls until some key manager's markers are read, for up
    /// to `within` ([`STARTUP_READ`] in `serve`). Past it the proxy serves,
    /// refusing Encrypt and Decrypt until a read succeeds (see
    /// [`LockBoard::unread`]); returns whether the locks are known.
    pub async fn poll_until_read(&mut self, within: Duration) -> bool {
        let give_up = tokio::time::Instant::now() + within;
        loop {
            self.poll_once().await;
            if !self.board.unread() {
                return true;
            }
            if tokio::time::Instant::now() + POLL_INTERVAL > give_up {
                tracing::error!(
                    within_ms = within.as_millis() as u64,
                    "the lockdown markers could not be read from any key manager: Encrypt and Decrypt are refused (503) until they can be"
                );
                return false;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Polls every [`POLL_INTERVAL`] until aborted: an interval rather than
    /// a sleep after each read, so a slow read does not add to the delay.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.poll_once().await;
        }
    }
}
