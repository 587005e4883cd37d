//! Several key managers: the HSMs (or partitions) that hold the same keys.
//!
//! Each configured key manager is a [`Backend`]: its session pool once it is
//! open, and what the proxy knows of its health. A request goes to the best
//! key manager that can serve (ACTIVE before DEGRADED, the least loaded among
//! equals, round robin among ties; an UNAVAILABLE one only when nothing else
//! is left) and, if that one fails with a fault of its own (busy, hung, gone,
//! failing), to the next, all within one deadline: the request's HSM budget
//! is shared by its attempts (each but the last gets half of what is left),
//! so failover never makes an answer late. A key (or key version) one key
//! manager does not have is looked for in the others too. Answers about the
//! request itself (a bad ciphertext, a disabled key, a wrong usage) are
//! returned as they are.
//!
//! One supervisor task per key manager keeps it honest: it probes the key
//! manager (see [`super::health`]), and opens it when it is not open yet —
//! a key manager that could not be opened at startup (a network HSM that
//! was down, a token not yet created) joins by itself when it answers,
//! without a restart. The proxy starts when at least one key manager opens.
//!
//! Here: routing and failover; `agreement`: which key manager may serve a
//! label several hold; `supervisor`: the per-key-manager health tasks.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};

use super::agreement::{Agreement, Known, Verdict};

mod agreement;
mod supervisor;
use super::config::{BackendConfig, HealthConfig, HsmConfig, TokenSelector};
use super::fault::Fault;
use super::health::{classify, EkmStatus, HealthState, RETRY_INTERVAL};
use super::lanes::Placement;
use super::markers::Marker;
use super::module::{Module, ModuleSlot};
use super::objects::{KeyInfo, Usages};
use super::pool::Pool;
use super::token::{load_module, EkmInfo, HsmError, Token};
use xks_spec::wire::{DecryptInput, DecryptOutput, EncryptInput, EncryptOutput};
use xks_telemetry::metrics::Metrics;

/// Longest wait between attempts to open a key manager that is not open.
const OPEN_RETRY_MAX: Duration = Duration::from_secs(30);
/// The time one background comparison of two key managers' keys may take.
const AGREEMENT_BUDGET: Duration = Duration::from_secs(2);
/// How long startup keeps trying a key manager whose failure looks
/// transient before it counts as not there (and, if it is the only one,
/// the proxy does not start).
const STARTUP_RETRY: Duration = Duration::from_secs(5);

/// One key manager.
pub struct Backend {
    index: usize,
    cfg: BackendConfig,
    /// From the configuration until the token is open, then the token's own.
    info: ArcSwap<EkmInfo>,
    /// The session pool, once the key manager is open.
    pool: ArcSwapOption<Pool>,
    pub health: HealthState,
    /// The AES-256 keys its token held when it opened: the labels to
    /// compare with the other key managers (see [`super::agreement`]).
    labels: Mutex<Vec<String>>,
}

impl Backend {
    pub fn info(&self) -> Arc<EkmInfo> {
        self.info.load_full()
    }

    fn pool(&self) -> Option<Arc<Pool>> {
        self.pool.load_full()
    }

    /// Status now (see [`HealthState::current`]).
    pub fn status(&self, cfg: &HealthConfig) -> (EkmStatus, Option<String>) {
        let pool = self.pool();
        self.health.current(pool.as_deref(), cfg)
    }
}

struct Inner {
    backends: Vec<Backend>,
    /// Loaded PKCS#11 libraries: one per path, shared by the key managers
    /// that use it (a library is initialized once per process).
    modules: Mutex<Vec<(PathBuf, Arc<Module>)>>,
    next: AtomicUsize,
    /// Which key managers hold the same key under a label.
    agreement: Agreement,
    hsm: HsmConfig,
    /// Where the pools' threads run (see `crate::lanes`).
    placement: Placement,
    health: HealthConfig,
    metrics: Metrics,
}

/// All key managers; cheap to clone.
#[derive(Clone)]
pub struct KeyManagers {
    inner: Arc<Inner>,
}

/// The routing preference of a key manager: its status first (ACTIVE, then
/// DEGRADED, then UNAVAILABLE), then its queue, then its turn in the round
/// robin. Smaller sorts first.
fn route_key(
    status: EkmStatus,
    queued: usize,
    turn: usize,
) -> (std::cmp::Reverse<u8>, usize, usize) {
    (std::cmp::Reverse(status.rank()), queued, turn)
}

/// The name a key manager goes by before its token says more.
fn configured_id(b: &BackendConfig) -> String {
    b.name.clone().unwrap_or_else(|| match &b.token {
        TokenSelector::Label(l) => l.clone(),
        TokenSelector::Slot(n) => format!("slot {n}"),
    })
}

impl KeyManagers {
    /// Opens every configured key manager that can be opened now, creating
    /// the health-check key in its token when missing, and starts its session
    /// pool, its threads placed by `placement`. Fails only when none opens.
    /// Blocking: call it off the runtime.
    pub fn open(
        hsm: &HsmConfig,
        placement: &Placement,
        health: &HealthConfig,
        metrics: &Metrics,
    ) -> Result<KeyManagers, HsmError> {
        let backends = hsm
            .backends
            .iter()
            .enumerate()
            .map(|(index, cfg)| Backend {
                index,
                cfg: cfg.clone(),
                info: ArcSwap::from_pointee(EkmInfo {
                    vendor: hsm.ekm_vendor.clone().unwrap_or_else(|| "unknown".into()),
                    id: configured_id(cfg),
                    model: "unknown".into(),
                }),
                pool: ArcSwapOption::empty(),
                health: HealthState::default(),
                labels: Mutex::new(Vec::new()),
            })
            .collect();
        let fleet = KeyManagers {
            inner: Arc::new(Inner {
                backends,
                modules: Mutex::new(Vec::new()),
                next: AtomicUsize::new(0),
                agreement: Agreement::new(hsm.key_cache_ttl),
                hsm: hsm.clone(),
                placement: placement.clone(),
                health: health.clone(),
                metrics: metrics.clone(),
            }),
        };
        let mut first_error = None;
        for b in fleet.backends() {
            match fleet.open_backend_at_startup(b) {
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(
                        ekm = %b.info().id,
                        error = %e,
                        "key manager not available at startup; serving without it, retrying in the background"
                    );
                    b.health.record(
                        &b.info().id,
                        EkmStatus::Unavailable,
                        Some(format!("not open: {e}")),
                    );
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if fleet.backends().iter().all(|b| b.pool().is_none()) => Err(e),
            _ => Ok(fleet),
        }
    }

    pub fn backends(&self) -> &[Backend] {
        &self.inner.backends
    }

    /// The library at `path`, loaded once.
    fn module(&self, path: &PathBuf) -> Result<Arc<Module>, HsmError> {
        let mut modules = self.inner.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, m)) = modules.iter().find(|(p, _)| p == path) {
            return Ok(m.clone());
        }
        let m = Module::new(load_module(path)?, path.clone());
        modules.push((path.clone(), m.clone()));
        Ok(m)
    }

    /// [`Self::open_backend`], tried again for up to [`STARTUP_RETRY`] while
    /// the failure may pass ([`HsmError::is_transient`]): a token that
    /// another process is writing at this instant is not a missing token.
    fn open_backend_at_startup(&self, b: &Backend) -> Result<(), HsmError> {
        let give_up = Instant::now() + STARTUP_RETRY;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.open_backend(b) {
                Err(e) if e.is_transient() && Instant::now() + pause < give_up => {
                    tracing::info!(ekm = %b.info().id, error = %e, "the token did not answer as expected; trying again");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    /// Opens one key manager: its token (re-initializing the module when the
    /// token is not found and no other key manager serves from it), the
    /// health-check key, the session pool. Blocking.
    fn open_backend(&self, b: &Backend) -> Result<(), HsmError> {
        let inner = &self.inner;
        let module = self.module(&b.cfg.module)?;
        let vendor = inner.hsm.ekm_vendor.as_deref();
        let token = match Token::open_in(module.ctx.clone(), &b.cfg, vendor) {
            Ok(t) => t,
            Err(e) if e.is_token_missing() => {
                module.reinitialize_for(b.index, &b.info().id);
                Token::open_in(module.ctx.clone(), &b.cfg, vendor)?
            }
            Err(e) => return Err(e),
        };
        let label = &inner.health.key_label;
        let keys = token.list_keys()?;
        *b.labels.lock().unwrap_or_else(|p| p.into_inner()) = keys
            .iter()
            .filter(|k| k.spec.is_aes256() && &k.label != label && !k.label.contains('#'))
            .map(|k| k.label.clone())
            .collect();
        if !keys.iter().any(|k| &k.label == label) {
            let usages = Usages {
                encrypt: true,
                decrypt: true,
                ..Usages::default()
            };
            token.create_aes_key(label, usages)?;
            tracing::info!(key = %label, ekm = %token.ekm_info().id, "created the health-check key");
        }
        for label in &inner.hsm.hmac_keys {
            if token.hmac_key(label)?.is_none() {
                token.create_hmac_key(label)?;
                tracing::info!(key = %label, ekm = %token.ekm_info().id, "created the HMAC key");
            }
        }
        let slot = ModuleSlot::new(module, b.index, b.cfg.token.clone(), token.slot);
        let sessions = b.cfg.sessions.unwrap_or(inner.hsm.sessions);
        let pool = Pool::start(
            &inner.hsm,
            &inner.placement,
            sessions,
            slot,
            &token,
            b.index,
            label,
            &inner.metrics,
        )?;
        b.info.store(Arc::new(token.ekm_info().clone()));
        b.pool.store(Some(Arc::new(pool)));
        Ok(())
    }

    /// Closes every key manager's pool (threads stopped, sessions closed,
    /// logged out), whoever still holds a handle to it: at shutdown, so
    /// that nothing is inside the PKCS#11 library when the process exits
    /// and the library is torn down. Blocking.
    pub fn close(&self) {
        let mut stopped = true;
        for b in self.backends() {
            if let Some(pool) = b.pool.swap(None) {
                stopped &= pool.close();
            }
        }
        // C_Finalize only once no thread of ours is inside the library
        // (PKCS#11 §5.4: finalizing under a running call is undefined; some
        // vendor libraries crash). With a thread stuck in a hung HSM, the
        // process exits without it.
        if stopped {
            let modules =
                std::mem::take(&mut *self.inner.modules.lock().unwrap_or_else(|p| p.into_inner()));
            for (path, m) in modules {
                if let Err(e) = m.ctx.clone().finalize() {
                    tracing::debug!(module = %path.display(), error = %e, "C_Finalize failed");
                }
            }
        }
    }

    /// Vendor, id, model and status of each key manager, for GetHealthStatus.
    pub fn details(&self) -> Vec<(Arc<EkmInfo>, EkmStatus)> {
        self.backends()
            .iter()
            .map(|b| (b.info(), self.status_of(b).0))
            .collect()
    }

    /// A key manager's status, DEGRADED (at best) while it holds another
    /// key than the reference under some label: it serves, but not every
    /// key.
    pub fn status_of(&self, b: &Backend) -> (EkmStatus, Option<String>) {
        let (status, detail) = b.status(&self.inner.health);
        let diverging = self.inner.agreement.diverging(b.index);
        match diverging.first() {
            Some((key, reference)) if status == EkmStatus::Active => (
                EkmStatus::Degraded,
                Some(format!(
                    "holds different key material than '{reference}' for {} key(s) (first: \
                     '{key}'), not used for them",
                    diverging.len()
                )),
            ),
            _ => (status, detail),
        }
    }

    /// Jobs waiting for a session, over all key managers.
    pub fn queue_len(&self) -> usize {
        self.backends()
            .iter()
            .filter_map(Backend::pool)
            .map(|p| p.queue_len())
            .sum()
    }

    /// Open key managers in the order to try: by status (ACTIVE, DEGRADED,
    /// then UNAVAILABLE), by queue length, round robin among equals.
    fn order(&self) -> Vec<(usize, EkmStatus, Arc<Pool>)> {
        let backends = self.backends();
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<(usize, usize, EkmStatus, Arc<Pool>)> = (0..backends.len())
            .filter_map(|i| {
                let b = &backends[(start + i) % backends.len()];
                let pool = b.pool()?;
                let status = b.health.current(Some(&pool), &self.inner.health).0;
                Some((i, b.index, status, pool))
            })
            .collect();
        order.sort_by_cached_key(|(i, _, status, pool)| route_key(*status, pool.queue_len(), *i));
        order.into_iter().map(|(_, b, s, p)| (b, s, p)).collect()
    }

    /// Runs `op` on key managers in [`Self::order`] until one answers with
    /// something other than a key manager fault, or the deadline passes. An
    /// UNAVAILABLE one is tried only when no other could answer. A key
    /// manager known to hold another key under `label` than the reference
    /// is skipped (see [`super::agreement`]).
    async fn with_failover<T, F, Fut>(&self, label: &str, op: F) -> Result<T, Fault>
    where
        F: Fn(Arc<Pool>, Instant) -> Fut,
        Fut: std::future::Future<Output = Result<T, Fault>>,
    {
        let deadline = Instant::now() + self.inner.hsm.operation_timeout;
        let mut last: Option<Vec<Fault>> = None;
        let mut answer = None;
        let order = self.order();
        let candidates = order.len();
        for (n, (index, status, pool)) in order.into_iter().enumerate() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if status == EkmStatus::Unavailable && (last.is_some() || answer.is_some()) {
                break;
            }
            if !self.may_serve(label, index, deadline).await {
                last.get_or_insert(Vec::new()).push(Fault::Unavailable {
                    ekm: pool.ekm_info().id.clone(),
                    why: format!(
                        "it holds different key material for key '{label}' than the reference \
                         key manager, so it is not used for that key"
                    ),
                });
                continue;
            }
            // With another key manager to try, this one gets half of what is
            // left: one that hangs mid-call leaves time to fail over.
            let attempt_deadline = if n + 1 < candidates {
                now + (deadline - now) / 2
            } else {
                deadline
            };
            let result = match op(pool.clone(), attempt_deadline).await {
                // A key manager known to be down whose queue is full: its
                // queue holds requests it will not answer, which is not the
                // request rate's fault (429) but the key manager's.
                Err(Fault::Busy { ekm }) if status == EkmStatus::Unavailable => {
                    Err(Fault::Unavailable {
                        ekm,
                        why: "it is not answering, and its queue is full".into(),
                    })
                }
                other => other,
            };
            match result {
                Err(e) if e.is_key_manager_fault() => {
                    tracing::debug!(ekm = %pool.ekm_info().id, error = %e, "key manager failed; trying the next");
                    last.get_or_insert(Vec::new()).push(e);
                }
                // Key managers hold the same keys: one that lacks the key (or
                // the version) is out of step or has lost its objects, and
                // another may have it. Only if none does is it the answer.
                Err(e @ (Fault::KeyNotFound { .. } | Fault::UnknownVersion { .. }))
                    if n + 1 < candidates =>
                {
                    tracing::debug!(ekm = %pool.ekm_info().id, error = %e, "key not found here; trying the next key manager");
                    answer.get_or_insert(e);
                }
                other => return other,
            }
        }
        // An answer (the key is missing) beats a fault; else the first fault.
        match (answer, last) {
            (Some(a), _) => Err(a),
            (None, Some(mut faults)) => Err(faults.swap_remove(0)),
            (None, None) => Err(Fault::Unavailable {
                ekm: "all".into(),
                why: "no key manager is open".into(),
            }),
        }
    }

    pub async fn key_info(&self, label: &str) -> Result<KeyInfo, Fault> {
        self.with_failover(label, |pool, deadline| async move {
            pool.key_info(label, deadline).await
        })
        .await
    }

    pub async fn encrypt(&self, label: &str, input: EncryptInput) -> Result<EncryptOutput, Fault> {
        let input = Arc::new(input);
        self.with_failover(label, |pool, deadline| {
            let input = input.clone();
            async move { pool.encrypt(label, input, deadline).await }
        })
        .await
    }

    pub async fn decrypt(&self, label: &str, input: DecryptInput) -> Result<DecryptOutput, Fault> {
        let input = Arc::new(input);
        self.with_failover(label, |pool, deadline| {
            let input = input.clone();
            async move { pool.decrypt(label, input, deadline).await }
        })
        .await
    }

    /// The markers of one kind in each open key manager, read concurrently
    /// by their control threads within `within`: (key manager index,
    /// what it said). A key manager that is not open is left out.
    pub async fn read_markers(
        &self,
        application: &'static [u8],
        within: Duration,
    ) -> Vec<(usize, Result<Vec<Marker>, Fault>)> {
        let deadline = Instant::now() + within;
        let mut reads = tokio::task::JoinSet::new();
        for b in self.backends() {
            if let Some(pool) = b.pool() {
                let index = b.index;
                reads.spawn(async move { (index, pool.markers(application, deadline).await) });
            }
        }
        let mut out = Vec::with_capacity(reads.len());
        while let Some(joined) = reads.join_next().await {
            if let Ok(r) = joined {
                out.push(r);
            }
        }
        out.sort_by_key(|(i, _)| *i);
        out
    }

    /// Whether some open key manager holds a protected HMAC key labelled
    /// `label` (one that cannot leave the token).
    pub async fn has_hmac_key(&self, label: &str, within: Duration) -> Result<bool, Fault> {
        let deadline = Instant::now() + within;
        let mut last = None;
        for b in self.backends() {
            if let Some(pool) = b.pool() {
                match pool.has_hmac_key(label, deadline).await {
                    Ok(true) => return Ok(true),
                    Ok(false) => last = Some(Ok(false)),
                    Err(e) => last = last.or(Some(Err(e))),
                }
            }
        }
        last.unwrap_or(Ok(false))
    }

    /// HMAC-SHA256 of `data` with the HMAC key `label`, computed inside a
    /// key manager (the best one first, the others on a fault; each but the
    /// last gets half of what is left, so one that hangs leaves time for
    /// the next), within `within`; returns which key manager computed it.
    /// Blocks: for plain threads (the audit writer), never a runtime thread.
    pub fn hmac_blocking(
        &self,
        label: &str,
        data: &[u8],
        within: Duration,
    ) -> Result<(String, Vec<u8>), Fault> {
        let deadline = Instant::now() + within;
        let mut first = None;
        let order = self.order();
        let candidates = order.len();
        for (n, (_, _, pool)) in order.into_iter().enumerate() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let attempt = if n + 1 < candidates {
                now + (deadline - now) / 2
            } else {
                deadline
            };
            match pool.hmac_blocking(label, data.to_vec(), attempt) {
                Ok(mac) => return Ok((pool.ekm_info().id.clone(), mac)),
                Err(e) => {
                    tracing::debug!(ekm = %pool.ekm_info().id, error = %e, "HMAC failed here; trying the next key manager");
                    first.get_or_insert(e);
                }
            }
        }
        Err(first.unwrap_or(Fault::Unavailable {
            ekm: "all".into(),
            why: "no key manager is open".into(),
        }))
    }

    /// The markers of one kind in each open key manager, read by their
    /// control threads at the same time within `within`; what each said. A
    /// key manager that hangs costs the others nothing: every one is asked
    /// before any answer is awaited. Blocks: for plain threads (the audit
    /// writer).
    pub fn markers_blocking(
        &self,
        application: &'static [u8],
        within: Duration,
    ) -> Vec<Result<Vec<Marker>, Fault>> {
        let deadline = Instant::now() + within;
        self.backends()
            .iter()
            .filter_map(Backend::pool)
            .map(|pool| pool.send_markers(application, deadline))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|sent| sent.and_then(|p| p.wait(deadline)))
            .collect()
    }

    /// Stores a marker in every open key manager at the same time, within
    /// `within`; what each said (as [`Self::markers_blocking`]). Blocks: for
    /// plain threads (the audit writer).
    pub fn put_marker_blocking(
        &self,
        application: &'static [u8],
        label: &str,
        value: &[u8],
        within: Duration,
    ) -> Vec<Result<(), Fault>> {
        let deadline = Instant::now() + within;
        self.backends()
            .iter()
            .filter_map(Backend::pool)
            .map(|pool| pool.send_put_marker(application, label, value, deadline))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|sent| sent.and_then(|p| p.wait(deadline)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_prefers_active_then_degraded_and_unavailable_last() {
        use EkmStatus::*;
        let mut candidates = [
            (Unavailable, 0, 0),
            (Degraded, 0, 1),
            (Active, 50, 2),
            (Active, 3, 3),
            (Degraded, 1, 4),
        ];
        candidates.sort_by_key(|(s, q, t)| route_key(*s, *q, *t));
        let turns: Vec<usize> = candidates.iter().map(|c| c.2).collect();
        assert_eq!(turns, [3, 2, 1, 4, 0]);
    }
}
