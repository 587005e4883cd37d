//! What the request side and the writer thread share: the queue's
//! entries, and the accounting of its room (see `super::trail`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use super::record::{LockEvent, RequestRecord};
use xks_telemetry::metrics::Metrics;

/// What the request side and the writer share.
pub(crate) struct Shared {
    /// Records reserved or queued and not yet written.
    pub used: AtomicUsize,
    pub capacity: usize,
    /// The writer cannot write right now: new reservations are refused.
    pub failing: AtomicBool,
    /// Records lost since the writer last reported a loss.
    pub lost: AtomicU64,
    /// Set when the trail is closed.
    pub stop: AtomicBool,
    pub metrics: Metrics,
    /// When a loss was last logged (ms since `epoch`), to log at most one
    /// line every ten seconds.
    last_loss_log: AtomicU64,
    epoch: Instant,
}

impl Shared {
    pub(crate) fn new(capacity: usize, metrics: &Metrics) -> Shared {
        Shared {
            used: AtomicUsize::new(0),
            capacity: capacity.max(1),
            failing: AtomicBool::new(false),
            lost: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            metrics: metrics.clone(),
            last_loss_log: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    pub(crate) fn release(&self) {
        let before = self.used.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0);
    }

    pub(crate) fn note_lost(&self, why: &'static str) {
        self.lost.fetch_add(1, Ordering::AcqRel);
        self.metrics.audit_lost.inc();
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.last_loss_log.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 10_000)
            && self
                .last_loss_log
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                reason = why,
                lost_total = self.metrics.audit_lost.get(),
                "audit records lost: the trail could not take them (the trail records the gap)"
            );
        }
    }
}

/// What the writer receives.
pub(crate) enum Entry {
    /// A request's record, in a reserved slot.
    Request(Box<RequestRecord>),
    Lock(LockEvent),
    /// Write the `stop` record and the last seal, then end.
    Shutdown,
}
