//! The key manager, reached through PKCS#11.
//!
//! [`Hsm`] is what the API layer sees: async methods for the four XKS needs
//! (key metadata, encrypt, decrypt, health probe). Behind it, a fixed pool of OS
//! threads each owns one logged-in session and takes jobs from a bounded queue
//! (see [`worker`]). The async side only enqueues and awaits a reply, with two
//! deadlines taken from the config:
//!
//! - `queue_timeout`: a job not started by then is dropped unrun and the caller
//!   answers 503 `DependencyTimeoutException`;
//! - `operation_timeout`: the caller stops waiting and answers 503 even if the
//!   HSM is still busy (KMS would have given up at 250 ms anyway).
//!
//! A full queue answers 429 `ThrottlingException` at once. So overload becomes
//! fast, bounded errors instead of unbounded memory and latency.

pub mod fleet;
pub mod key_spec;
mod keys;
mod module;
mod state;
pub mod token;
mod worker;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use zeroize::Zeroizing;

pub use fleet::KeyManagers;
pub use key_spec::KeySpec;
pub use token::{EkmInfo, HsmError, KeyDetails, KeyInfo, Token, Usages};

use crate::aead::AadLayout;
use crate::config::HsmConfig;
use crate::error::XksError;
use crate::metrics::Metrics;
use keys::KeyCache;
use module::ModuleSlot;
use worker::{check_key, Job, OpKind, Shared, Worker};

/// Input of one Encrypt, already decoded and validated. The ciphertext
/// metadata is chosen by the HSM layer: it records the key version used.
pub struct EncryptInput {
    pub plaintext: Zeroizing<Vec<u8>>,
    pub aad: Vec<u8>,
    pub cdiv: bool,
}

/// Output of one Encrypt.
#[derive(Debug)]
pub struct EncryptOutput {
    pub ciphertext: Vec<u8>,
    pub iv: Vec<u8>,
    pub tag: Vec<u8>,
    pub metadata: Vec<u8>,
    pub cdiv: Option<[u8; 32]>,
}

/// Input of one Decrypt, already decoded and validated.
pub struct DecryptInput {
    pub ciphertext: Vec<u8>,
    pub iv: Vec<u8>,
    pub tag: Vec<u8>,
    /// The request's AAD; `None` when it had no AAD field.
    pub aad: Option<Vec<u8>>,
    pub metadata: Vec<u8>,
    /// The AAD constructions to try, in order (see `aead::decrypt_layouts`).
    pub layouts: &'static [AadLayout],
}

/// Output of one Decrypt: the plaintext, and the construction that
/// authenticated (the AWS sample's counts toward the compat metric).
pub struct DecryptOutput {
    pub plaintext: Zeroizing<Vec<u8>>,
    pub layout: AadLayout,
}

struct Inner {
    tx: Option<crossbeam_channel::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    ekm: EkmInfo,
    queue_timeout: Duration,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the workers; joining them closes their sessions
        // before the module is finalized.
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        // Log out explicitly rather than relying on the last session closing:
        // some HSMs keep a login alive per client until told otherwise.
        let m = &self.shared.module;
        let Some(slot) = m.slot() else { return };
        match m
            .ctx()
            .open_ro_session(slot)
            .and_then(|session| session.logout())
        {
            Ok(()) => tracing::info!(ekm = %self.ekm.id, "logged out of the HSM"),
            Err(e) => tracing::warn!(ekm = %self.ekm.id, error = %e, "HSM logout failed"),
        }
    }
}

/// Handle to the key manager; cheap to clone.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Inner>,
}

impl Hsm {
    /// Starts the session pool of one key manager on its opened token.
    /// Blocking: call it from `spawn_blocking` or before the runtime serves.
    /// `index` names the pool's threads (`hsm-<index>-<n>`).
    pub(crate) fn start(
        cfg: &HsmConfig,
        sessions: usize,
        module: ModuleSlot,
        token: &Token,
        index: usize,
        health_key: &str,
        metrics: &Metrics,
    ) -> Result<Hsm, HsmError> {
        metrics.hsm_sessions.add(sessions as i64);
        let shared = Arc::new(Shared {
            module,
            ekm_id: token.ekm_info().id.clone(),
            pin: token.pin.clone(),
            keys: KeyCache::new(cfg.key_cache_ttl),
            iv_source: cfg.iv_source,
            health_key: health_key.to_string(),
            metrics: metrics.clone(),
        });
        let (tx, rx) = crossbeam_channel::bounded::<Job>(cfg.queue_depth);
        let mut workers = Vec::with_capacity(sessions);
        for i in 0..sessions {
            let rx = rx.clone();
            let worker = Worker::new(shared.clone());
            let handle = std::thread::Builder::new()
                .name(format!("hsm-{index}-{i}"))
                .spawn(move || worker.run(rx))
                .map_err(|e| HsmError::Key(format!("cannot start HSM worker thread: {e}")))?;
            workers.push(handle);
        }
        let hsm = Hsm {
            inner: Arc::new(Inner {
                tx: Some(tx),
                workers,
                shared,
                ekm: token.ekm_info().clone(),
                queue_timeout: cfg.queue_timeout,
            }),
        };
        Ok(hsm)
    }

    /// Vendor, id and model of the token, for GetHealthStatus.
    pub fn ekm_info(&self) -> &EkmInfo {
        &self.inner.ekm
    }

    /// Jobs waiting for a free session right now.
    pub fn queue_len(&self) -> usize {
        self.inner.tx.as_ref().map_or(0, |tx| tx.len())
    }

    /// Runs `f` on a pool thread. It must start within the queue timeout and
    /// answer by `deadline` (the request's whole HSM budget, shared with any
    /// failover attempts); `kind` labels the job in the latency metric.
    async fn run<T: Send + 'static>(
        &self,
        kind: &'static str,
        deadline: Instant,
        f: impl FnOnce(&mut Worker) -> Result<T, XksError> + Send + 'static,
    ) -> Result<T, XksError> {
        let (reply, rx) = oneshot::channel();
        let now = Instant::now();
        let job = Job {
            kind,
            enqueued: now,
            start_by: (now + self.inner.queue_timeout).min(deadline),
            work: Box::new(move |w| {
                let _ = reply.send(f(w));
            }),
        };
        let tx = self
            .inner
            .tx
            .as_ref()
            .ok_or_else(|| XksError::Internal("the HSM pool is shut down".into()))?;
        match tx.try_send(job) {
            Ok(()) => {}
            Err(crossbeam_channel::TrySendError::Full(_)) => {
                return Err(XksError::Throttling(
                    "the proxy's HSM queue is full; it cannot keep up with the request rate".into(),
                ))
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                return Err(XksError::Internal("the HSM pool is shut down".into()))
            }
        }
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(XksError::DependencyTimeout(format!(
                "no session of key manager '{}' became free in time",
                self.inner.ekm.id
            ))),
            Err(_) => Err(XksError::DependencyTimeout(format!(
                "key manager '{}' did not answer in time",
                self.inner.ekm.id
            ))),
        }
    }

    /// Checks a cached key before queueing, so a request that must fail
    /// (wrong usage, disabled) costs no HSM session.
    fn precheck(&self, label: &str, kind: OpKind) -> Result<(), XksError> {
        match self.inner.shared.keys.get_fresh(label) {
            Some(key) => check_key(&key, kind),
            None => Ok(()),
        }
    }

    /// Fresh attributes of a key (never from the cache).
    pub async fn key_info(&self, label: &str, deadline: Instant) -> Result<KeyInfo, XksError> {
        let label = label.to_owned();
        self.run("metadata", deadline, move |w| {
            let key = w.resolve(&label, true)?;
            check_key(&key, OpKind::Lookup)?;
            Ok(key)
        })
        .await
    }

    pub async fn encrypt(
        &self,
        label: &str,
        input: Arc<EncryptInput>,
        deadline: Instant,
    ) -> Result<EncryptOutput, XksError> {
        self.precheck(label, OpKind::Encrypt)?;
        let label = label.to_owned();
        self.run("encrypt", deadline, move |w| w.encrypt(&label, &input))
            .await
    }

    pub async fn decrypt(
        &self,
        label: &str,
        input: Arc<DecryptInput>,
        deadline: Instant,
    ) -> Result<DecryptOutput, XksError> {
        self.precheck(label, OpKind::Decrypt)?;
        let label = label.to_owned();
        self.run("decrypt", deadline, move |w| w.decrypt(&label, &input))
            .await
    }

    /// One deep health probe with the health-check key.
    pub async fn probe(&self, health_key: &str, deadline: Instant) -> Result<(), XksError> {
        let label = health_key.to_owned();
        self.run("health_probe", deadline, move |w| w.probe(&label))
            .await
    }
}
