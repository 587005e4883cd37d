//! Several key managers: the HSMs of a cluster that hold the same keys.
//!
//! Each backend has its own session pool ([`Hsm`]) and its own deep health
//! state. A request goes to the least-loaded backend that is not UNAVAILABLE
//! (round robin among equals) and, if that backend fails with a fault of its
//! own (an HSM error, no session in time, a full queue), to the next one,
//! all within one deadline: the request's HSM budget is shared by its
//! attempts, so failover never makes an answer late. Errors about the request
//! itself (a bad ciphertext, a disabled key, a wrong usage) are answers, not
//! faults, and are returned as they are.
//!
//! GetHealthStatus lists every backend in `ekmFleetDetails`; the proxy is
//! healthy while at least one backend can serve.
//!
//! A key manager that cannot be opened at startup while others can does not
//! stop the proxy (a restart during a partial HSM outage must not turn it into
//! a full one): the proxy serves without it, logs why, and lists it as
//! UNAVAILABLE until a restart brings it in.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::module::{Module, ModuleSlot};
use super::token::{load_module, EkmInfo, HsmError, KeyInfo, Token};
use super::{DecryptInput, DecryptOutput, EncryptInput, EncryptOutput, Hsm};
use crate::config::{HealthConfig, HsmConfig, TokenSelector};
use crate::error::XksError;
use crate::health::{EkmStatus, HealthState};
use crate::metrics::Metrics;

/// One key manager and what the proxy knows of its health.
pub struct Backend {
    pub hsm: Hsm,
    pub health: HealthState,
}

/// A configured key manager that could not be opened at startup.
struct Absent {
    info: EkmInfo,
    reason: String,
}

struct Inner {
    backends: Vec<Backend>,
    absent: Vec<Absent>,
    next: AtomicUsize,
    operation_timeout: Duration,
}

/// All key managers; cheap to clone.
#[derive(Clone)]
pub struct KeyManagers {
    inner: Arc<Inner>,
}

/// A failure of the backend rather than of the request: try another one.
fn is_backend_fault(e: &XksError) -> bool {
    matches!(
        e,
        XksError::Internal(_) | XksError::DependencyTimeout(_) | XksError::Throttling(_)
    )
}

impl KeyManagers {
    /// Opens every configured key manager and starts its session pool; returns
    /// the opened tokens too (startup creates the health-check key in each).
    /// Blocking. Backends that share a PKCS#11 module share one loaded copy of
    /// it (a module is initialized once per process).
    pub fn open(
        cfg: &HsmConfig,
        health_key: &str,
        metrics: &Metrics,
    ) -> Result<(KeyManagers, Vec<Token>), HsmError> {
        let mut modules: Vec<(std::path::PathBuf, Arc<Module>)> = Vec::new();
        let mut backends = Vec::with_capacity(cfg.backends.len());
        let mut tokens = Vec::with_capacity(cfg.backends.len());
        let mut absent = Vec::new();
        let mut last_error = None;
        for (i, b) in cfg.backends.iter().enumerate() {
            let opened = (|| -> Result<(Backend, Token), HsmError> {
                let module = match modules.iter().find(|(p, _)| *p == b.module) {
                    Some((_, m)) => m.clone(),
                    None => {
                        let m = Module::new(load_module(&b.module)?);
                        modules.push((b.module.clone(), m.clone()));
                        m
                    }
                };
                let token = Token::open_in(module.ctx.clone(), b, cfg.ekm_vendor.as_deref())?;
                let slot = ModuleSlot::new(module, b.token.clone(), token.slot);
                let sessions = b.sessions.unwrap_or(cfg.sessions);
                let hsm = Hsm::start(cfg, sessions, slot, &token, i, health_key, metrics)?;
                let backend = Backend {
                    hsm,
                    health: HealthState::default(),
                };
                Ok((backend, token))
            })();
            match opened {
                Ok((backend, token)) => {
                    backends.push(backend);
                    tokens.push(token);
                }
                Err(e) if cfg.backends.len() > 1 => {
                    let id = b.name.clone().unwrap_or_else(|| match &b.token {
                        TokenSelector::Label(l) => l.clone(),
                        TokenSelector::Slot(n) => format!("slot {n}"),
                    });
                    tracing::error!(ekm = %id, error = %e, "key manager not available at startup; serving without it until the next restart");
                    absent.push(Absent {
                        info: EkmInfo {
                            vendor: cfg.ekm_vendor.clone().unwrap_or_else(|| "unknown".into()),
                            id,
                            model: "unknown".into(),
                        },
                        reason: format!(
                            "not available at startup ({e}); restart the proxy to bring it in"
                        ),
                    });
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        if backends.is_empty() {
            if let Some(e) = last_error {
                return Err(e);
            }
        }
        let fleet = KeyManagers {
            inner: Arc::new(Inner {
                backends,
                absent,
                next: AtomicUsize::new(0),
                operation_timeout: cfg.operation_timeout,
            }),
        };
        Ok((fleet, tokens))
    }

    pub fn backends(&self) -> &[Backend] {
        &self.inner.backends
    }

    /// The best status of any backend (the proxy can serve if one can), with
    /// the reasons of the others when none is ACTIVE.
    pub fn overall(&self) -> (EkmStatus, Option<String>) {
        let mut best = EkmStatus::Unavailable;
        let mut details = Vec::new();
        for b in self.backends() {
            let (status, detail) = b.health.current();
            if rank(status) > rank(best) {
                best = status;
            }
            if let Some(d) = detail {
                details.push(format!("{}: {d}", b.hsm.ekm_info().id));
            }
        }
        for a in &self.inner.absent {
            details.push(format!("{}: {}", a.info.id, a.reason));
        }
        let detail = (best != EkmStatus::Active && !details.is_empty()).then(|| details.join("; "));
        (best, detail)
    }

    /// Vendor, id, model and status of each backend, for GetHealthStatus.
    pub fn details(&self) -> Vec<(&EkmInfo, EkmStatus)> {
        self.backends()
            .iter()
            .map(|b| (b.hsm.ekm_info(), b.health.current().0))
            .chain(
                self.inner
                    .absent
                    .iter()
                    .map(|a| (&a.info, EkmStatus::Unavailable)),
            )
            .collect()
    }

    /// Jobs waiting for a session, over all backends.
    pub fn queue_len(&self) -> usize {
        self.backends().iter().map(|b| b.hsm.queue_len()).sum()
    }

    /// Backends in the order to try: usable ones by load (round robin among
    /// equals), UNAVAILABLE ones last (still worth a try when nothing else is).
    fn order(&self) -> Vec<&Backend> {
        let backends = self.backends();
        if backends.len() == 1 {
            return vec![&backends[0]];
        }
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<(usize, &Backend)> = (0..backends.len())
            .map(|i| {
                let b = &backends[(start + i) % backends.len()];
                (i, b)
            })
            .collect();
        order.sort_by_key(|(i, b)| {
            let unavailable = b.health.current().0 == EkmStatus::Unavailable;
            (unavailable, b.hsm.queue_len(), *i)
        });
        order.into_iter().map(|(_, b)| b).collect()
    }

    /// Runs `op` on backends in [`Self::order`] until one answers with
    /// something other than a backend fault, or the deadline passes.
    async fn with_failover<T, F, Fut>(&self, op: F) -> Result<T, XksError>
    where
        F: Fn(Hsm, Instant) -> Fut,
        Fut: std::future::Future<Output = Result<T, XksError>>,
    {
        let deadline = Instant::now() + self.inner.operation_timeout;
        let mut last = None;
        for b in self.order() {
            if Instant::now() >= deadline {
                break;
            }
            match op(b.hsm.clone(), deadline).await {
                Err(e) if is_backend_fault(&e) => {
                    tracing::debug!(ekm = %b.hsm.ekm_info().id, error = e.message(), "key manager failed; trying the next");
                    last = Some(e);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| {
            XksError::DependencyTimeout("no key manager answered in time".into())
        }))
    }

    pub async fn key_info(&self, label: &str) -> Result<KeyInfo, XksError> {
        self.with_failover(|hsm, deadline| async move { hsm.key_info(label, deadline).await })
            .await
    }

    pub async fn encrypt(
        &self,
        label: &str,
        input: EncryptInput,
    ) -> Result<EncryptOutput, XksError> {
        let input = Arc::new(input);
        self.with_failover(|hsm, deadline| {
            let input = input.clone();
            async move { hsm.encrypt(label, input, deadline).await }
        })
        .await
    }

    pub async fn decrypt(
        &self,
        label: &str,
        input: DecryptInput,
    ) -> Result<DecryptOutput, XksError> {
        let input = Arc::new(input);
        self.with_failover(|hsm, deadline| {
            let input = input.clone();
            async move { hsm.decrypt(label, input, deadline).await }
        })
        .await
    }

    /// Probes every backend once (at startup, before serving).
    pub async fn probe_all(&self, cfg: &HealthConfig) {
        for b in self.backends() {
            b.health.probe_once(&b.hsm, cfg).await;
        }
    }

    /// Starts one background probe loop per backend.
    pub fn spawn_health(&self, cfg: &HealthConfig) -> Vec<tokio::task::JoinHandle<()>> {
        self.backends()
            .iter()
            .map(|b| tokio::spawn(b.health.clone().run(b.hsm.clone(), cfg.clone())))
            .collect()
    }
}

/// ACTIVE > DEGRADED > UNAVAILABLE.
fn rank(s: EkmStatus) -> u8 {
    match s {
        EkmStatus::Active => 2,
        EkmStatus::Degraded => 1,
        EkmStatus::Unavailable => 0,
    }
}
