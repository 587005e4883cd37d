//! What the proxy knows of each key manager's health, and how it finds out.
//!
//! The spec asks for a *deep* GetHealthStatus (the key manager can really
//! encrypt and decrypt), but a health call must also answer well inside KMS's
//! 250 ms. So a background task probes each key manager with a dedicated
//! health-check key — never a customer key, whose HSM audit log would
//! otherwise show crypto calls with no CloudTrail event behind them — and
//! GetHealthStatus answers from the latest result.
//!
//! The three states mean what the spec says, and what KMS, the load balancer
//! and routing act on:
//!
//! - `ACTIVE`: the last probe succeeded within `degraded_latency_ms`;
//! - `DEGRADED`: it can serve, but slowly (the probe took longer), or the
//!   probe could not get a session because the pool is busy with requests
//!   that do complete, or one of its sessions is stuck;
//! - `UNAVAILABLE`: it cannot serve: the probe failed, or got no answer
//!   within `unresponsive_after` (a hung HSM), or every session has been
//!   inside one call for longer than that, or it is not open, or the last
//!   result is older than 60 s.
//!
//! The stuck-session check is live (see [`Pool::stalled`]), so a key manager
//! that hangs is UNAVAILABLE within `unresponsive_after` even between probes.
//! Probes run every `interval_secs` while ACTIVE and every second otherwise,
//! so recovery is seen as quickly as a failure.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::config::HealthConfig;
use super::fault::Fault;
use super::pool::Pool;
pub use xks_spec::wire::EkmStatus;

/// Oldest probe result the proxy may report (spec: one minute).
pub const MAX_RESULT_AGE: Duration = Duration::from_secs(60);

/// How often a key manager that is not ACTIVE is probed.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
struct Snapshot {
    status: EkmStatus,
    at: Instant,
    detail: Option<String>,
    /// False until the first probe ends: its result is logged even when it
    /// matches the initial UNAVAILABLE, or a backend that never worked would
    /// stay silent about why.
    probed: bool,
}

/// The latest probe result, shared between the probe task and the handlers.
#[derive(Clone)]
pub struct HealthState {
    latest: Arc<RwLock<Snapshot>>,
}

impl Default for HealthState {
    fn default() -> Self {
        HealthState {
            latest: Arc::new(RwLock::new(Snapshot {
                status: EkmStatus::Unavailable,
                at: Instant::now(),
                detail: Some("no health probe has completed yet".into()),
                probed: false,
            })),
        }
    }
}

/// What a probe found, and why.
pub fn classify(
    result: &Result<(), Fault>,
    elapsed: Duration,
    cfg: &HealthConfig,
    stalled: (usize, usize),
) -> (EkmStatus, Option<String>) {
    let (stuck, sessions) = stalled;
    let hung = sessions > 0 && stuck == sessions;
    match result {
        Ok(()) if elapsed <= cfg.degraded_latency => (EkmStatus::Active, None),
        Ok(()) => (
            EkmStatus::Degraded,
            Some(format!("health probe took {} ms", elapsed.as_millis())),
        ),
        // No session in time, or a full queue: busy serving requests that do
        // complete. If nothing completes, it is hung.
        Err(Fault::Busy { .. } | Fault::NoSession { .. }) if !hung => (
            EkmStatus::Degraded,
            Some("every session is busy; the probe could not run in time".into()),
        ),
        Err(Fault::Busy { .. } | Fault::NoSession { .. }) => (
            EkmStatus::Unavailable,
            Some(format!(
                "all {sessions} sessions have been waiting on the key manager for over {} ms",
                cfg.unresponsive_after.as_millis()
            )),
        ),
        Err(Fault::Timeout { .. }) => (
            EkmStatus::Unavailable,
            Some(format!(
                "the key manager did not answer the health probe within {} ms",
                cfg.unresponsive_after.as_millis()
            )),
        ),
        Err(e) => (EkmStatus::Unavailable, Some(e.to_string())),
    }
}

impl HealthState {
    /// Status now, with the reason when not ACTIVE: the last probe's result,
    /// overridden by what the pool shows right now (sessions stuck in a call
    /// for longer than `unresponsive_after`), and UNAVAILABLE when the result
    /// is older than a minute (the probe itself is stuck).
    pub fn current(&self, pool: Option<&Pool>, cfg: &HealthConfig) -> (EkmStatus, Option<String>) {
        let s = self
            .latest
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if s.at.elapsed() > MAX_RESULT_AGE {
            return (
                EkmStatus::Unavailable,
                Some("the last health probe result is older than 60 s".into()),
            );
        }
        if let Some(pool) = pool {
            let (stuck, sessions) = pool.stalled(cfg.unresponsive_after);
            if stuck > 0 && stuck == sessions {
                return (
                    EkmStatus::Unavailable,
                    Some(format!(
                        "all {sessions} sessions have been inside one call for over {} ms",
                        cfg.unresponsive_after.as_millis()
                    )),
                );
            }
            if stuck > 0 && s.status == EkmStatus::Active {
                return (
                    EkmStatus::Degraded,
                    Some(format!(
                        "{stuck} of {sessions} sessions have been inside one call for over {} ms",
                        cfg.unresponsive_after.as_millis()
                    )),
                );
            }
        }
        (s.status, s.detail)
    }

    /// Records a result, logging when the status changes (or on the first).
    pub fn record(&self, ekm: &str, status: EkmStatus, detail: Option<String>) {
        let mut s = self.latest.write().unwrap_or_else(|p| p.into_inner());
        if status != s.status || !s.probed {
            match status {
                EkmStatus::Active => {
                    tracing::info!(ekm = %ekm, status = status.as_str(), "key manager health changed")
                }
                _ => tracing::warn!(
                    ekm = %ekm,
                    status = status.as_str(),
                    detail = detail.as_deref().unwrap_or(""),
                    "key manager health changed"
                ),
            }
        }
        *s = Snapshot {
            status,
            at: Instant::now(),
            detail,
            probed: true,
        };
    }

    /// The status of the last recorded result (for the probe cadence).
    pub fn last(&self) -> EkmStatus {
        self.latest.read().unwrap_or_else(|p| p.into_inner()).status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig {
            key_label: "h".into(),
            interval: Duration::from_secs(20),
            degraded_latency: Duration::from_millis(100),
            unresponsive_after: Duration::from_secs(2),
        }
    }

    #[test]
    fn states_mean_what_the_spec_says() {
        let ekm = || "e".to_string();
        let fast = Duration::from_millis(3);
        let c = cfg();
        let ok = (EkmStatus::Active, None);
        assert_eq!(classify(&Ok(()), fast, &c, (0, 2)), ok);
        assert_eq!(
            classify(&Ok(()), Duration::from_millis(300), &c, (0, 2)).0,
            EkmStatus::Degraded
        );
        // Busy but progressing: degraded. Busy and nothing moves: unavailable.
        let busy = Err(Fault::NoSession { ekm: ekm() });
        assert_eq!(classify(&busy, fast, &c, (1, 2)).0, EkmStatus::Degraded);
        assert_eq!(classify(&busy, fast, &c, (2, 2)).0, EkmStatus::Unavailable);
        // Started but no answer: hung.
        let hung = Err(Fault::Timeout { ekm: ekm() });
        assert_eq!(classify(&hung, fast, &c, (1, 2)).0, EkmStatus::Unavailable);
        let gone = Err(Fault::Unavailable {
            ekm: ekm(),
            why: "device removed".into(),
        });
        let (status, why) = classify(&gone, fast, &c, (0, 2));
        assert_eq!(status, EkmStatus::Unavailable);
        assert!(why.unwrap().contains("device removed"));
    }
}
