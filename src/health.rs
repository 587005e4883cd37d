//! Deep health checking.
//!
//! The spec asks for a *deep* GetHealthStatus (the key manager can really
//! encrypt and decrypt), but a health call must also answer well inside KMS's
//! 250 ms. So a background task probes the HSM at a fixed interval (at most 60 s)
//! with a dedicated health-check key — never a customer key, whose HSM audit log
//! would otherwise show crypto calls with no CloudTrail event behind them — and
//! GetHealthStatus answers from the latest result.
//!
//! Status of the key manager:
//! - `ACTIVE`: the last probe succeeded within the degraded-latency threshold;
//! - `DEGRADED`: it succeeded slowly, or failed only because the proxy was
//!   saturated (queue full / no free session): the HSM can still serve traffic;
//! - `UNAVAILABLE`: it failed otherwise, or the result is older than 60 s.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::HealthConfig;
use crate::error::XksError;
use crate::hsm::Hsm;

/// The spec's `healthStatus` of one key manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EkmStatus {
    Active,
    Degraded,
    Unavailable,
}

impl EkmStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EkmStatus::Active => "ACTIVE",
            EkmStatus::Degraded => "DEGRADED",
            EkmStatus::Unavailable => "UNAVAILABLE",
        }
    }
}

/// How long one probe may take before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Oldest probe result the proxy may report (spec: one minute).
const MAX_RESULT_AGE: Duration = Duration::from_secs(60);

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

impl HealthState {
    /// Status now, with the reason when not ACTIVE. A result older than a
    /// minute counts as UNAVAILABLE: the probe itself is stuck.
    pub fn current(&self) -> (EkmStatus, Option<String>) {
        let s = self
            .latest
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if s.at.elapsed() > MAX_RESULT_AGE {
            return (
                EkmStatus::Unavailable,
                Some("the last successful health probe is older than 60 s".into()),
            );
        }
        (s.status, s.detail)
    }

    fn set(&self, status: EkmStatus, detail: Option<String>) {
        let mut s = self.latest.write().unwrap_or_else(|p| p.into_inner());
        *s = Snapshot {
            status,
            at: Instant::now(),
            detail,
            probed: true,
        };
    }

    /// Runs one probe and records its result.
    pub async fn probe_once(&self, hsm: &Hsm, cfg: &HealthConfig) -> EkmStatus {
        let started = Instant::now();
        // The probe measures latency, so it gets more time than a request.
        let result = hsm.probe(&cfg.key_label, started + PROBE_TIMEOUT).await;
        let elapsed = started.elapsed();
        let (status, detail) = match result {
            Ok(()) if elapsed <= cfg.degraded_latency => (EkmStatus::Active, None),
            Ok(()) => (
                EkmStatus::Degraded,
                Some(format!("health probe took {} ms", elapsed.as_millis())),
            ),
            Err(e @ (XksError::Throttling(_) | XksError::DependencyTimeout(_))) => {
                (EkmStatus::Degraded, Some(e.message().to_string()))
            }
            Err(e) => (EkmStatus::Unavailable, Some(e.message().to_string())),
        };
        let previous = self.current().0;
        let first = !self.latest.read().unwrap_or_else(|p| p.into_inner()).probed;
        if status != previous || first {
            let ekm = &hsm.ekm_info().id;
            match status {
                EkmStatus::Active => {
                    tracing::info!(ekm = %ekm, status = ?status, "key manager health changed")
                }
                _ => {
                    tracing::warn!(ekm = %ekm, status = ?status, detail = detail.as_deref().unwrap_or(""), "key manager health changed")
                }
            }
        }
        self.set(status, detail);
        status
    }

    /// Probes forever at the configured interval. Spawn it; it ends with the runtime.
    pub async fn run(self, hsm: Hsm, cfg: HealthConfig) {
        let mut tick = tokio::time::interval(cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.probe_once(&hsm, &cfg).await;
        }
    }
}
