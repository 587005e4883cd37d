//! The threads that talk to the HSM.
//!
//! PKCS#11 calls block, sometimes for milliseconds on a network HSM, so they
//! must never run on the async runtime's worker threads. Each pool worker is a
//! plain OS thread that owns one logged-in session (a `Session` may not be used
//! from two threads at once) and takes jobs from a bounded queue. A job that
//! waited in the queue past its start deadline is dropped unrun: its caller has
//! already answered 503, and doing the work anyway would only deepen overload.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cryptoki::context::Function;
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::session::Session;
use zeroize::Zeroizing;

use super::config::{IvSource, SessionKind};
use super::fault::Fault;
use super::gcm::IvInput;
use super::hmac;
use super::keys::KeyCache;
use super::markers::{self, Marker};
use super::module::{module_lost, ModuleSlot};
use super::objects::{find_keys, latest_version, read_key_info, KeyInfo};
use super::operation::{
    check_key, decrypt_once, encrypt_once, is_bad_ciphertext, rv, IvPool, OpError, OpKind,
};
use super::queue::{pop_lanes, JobQueue};
use super::token::login_raw;
use xks_spec::aead::{metadata_for_version, version_from_metadata, version_label, IV_LEN};
use xks_spec::wire::{DecryptInput, DecryptOutput, EncryptInput, EncryptOutput};
use xks_telemetry::metrics::Metrics;

/// When each pool thread started its current job (ms since the pool
/// started, plus one; 0 while idle).
pub(crate) struct Busy {
    epoch: Instant,
    since: Vec<AtomicU64>,
}

impl Busy {
    pub(super) fn new(threads: usize) -> Busy {
        Busy {
            epoch: Instant::now(),
            since: (0..threads).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub(super) fn threads(&self) -> usize {
        self.since.len()
    }

    /// Whether this thread is inside a job now.
    pub(super) fn in_job(&self, thread: usize) -> bool {
        self.since[thread].load(Ordering::Relaxed) != 0
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    pub fn enter(&self, thread: usize) {
        self.since[thread].store(self.now_ms(), Ordering::Relaxed);
    }

    pub fn leave(&self, thread: usize) {
        self.since[thread].store(0, Ordering::Relaxed);
    }

    /// Threads that have been inside one job for longer than `after`.
    pub(super) fn stuck(&self, after: Duration) -> usize {
        let now = self.now_ms();
        let limit = after.as_millis() as u64;
        self.since
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&t| t != 0 && now.saturating_sub(t) > limit)
            .count()
    }
}

/// Work for a pool thread.
pub(crate) struct Job {
    /// Label for the latency metric.
    pub kind: &'static str,
    pub enqueued: Instant,
    pub start_by: Instant,
    /// Set when a thread takes the job: a caller that times out can tell
    /// "never started" (no free session) from "no answer" (a hung HSM).
    pub started: Arc<std::sync::atomic::AtomicBool>,
    pub work: Box<dyn FnOnce(&mut Worker) + Send>,
}

/// State shared by all workers of one token.
pub(crate) struct Shared {
    /// The module and the token's slot, re-initialized after device loss.
    pub module: ModuleSlot,
    /// For logs: which key manager this is.
    pub ekm_id: String,
    pub pin: cryptoki::types::AuthPin,
    pub keys: KeyCache,
    pub iv_source: IvSource,
    /// Which kind of session the request threads open.
    pub sessions: SessionOpener,
    /// The health-check key, used to tell a bad ciphertext from a sick HSM.
    pub health_key: String,
    pub metrics: Metrics,
}

/// Opens the request threads' sessions as `hsm.session_kind` says, and
/// remembers (for every thread of the key manager) when `auto` found that
/// the token refuses read-only sessions.
pub(crate) struct SessionOpener {
    kind: SessionKind,
    refused_read_only: std::sync::atomic::AtomicBool,
}

impl SessionOpener {
    pub fn new(kind: SessionKind) -> Self {
        SessionOpener {
            kind,
            refused_read_only: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A session that is not closed on drop (see [`Worker::discard_session`]).
    fn open(
        &self,
        ctx: &cryptoki::context::Pkcs11,
        slot: cryptoki::slot::Slot,
        ekm: &str,
    ) -> Result<Session, P11Error> {
        let read_only = match self.kind {
            SessionKind::ReadOnly => true,
            SessionKind::ReadWrite => false,
            SessionKind::Auto => !self.refused_read_only.load(Ordering::Relaxed),
        };
        if !read_only {
            return ctx.open_rw_session_no_drop(slot);
        }
        match ctx.open_ro_session_no_drop(slot) {
            Ok(s) => Ok(s),
            // Some tokens refuse read-only sessions outright (AWS CloudHSM
            // SDK 5). If a read-write one opens where a read-only one did
            // not, that was a refusal, not a fault: use read-write from now.
            Err(ro) if self.kind == SessionKind::Auto => {
                let Ok(s) = ctx.open_rw_session_no_drop(slot) else {
                    return Err(ro);
                };
                if !self.refused_read_only.swap(true, Ordering::Relaxed) {
                    tracing::warn!(ekm = %ekm, error = %ro, "the token refused a read-only session; using read-write sessions (set hsm.session_kind = \"read-write\" to skip the attempt)");
                }
                Ok(s)
            }
            Err(e) => Err(e),
        }
    }
}

/// One pool thread's state: its session (opened lazily, reopened after faults).
pub(crate) struct Worker {
    shared: Arc<Shared>,
    session: Option<Session>,
    /// The module generation the session belongs to (see [`super::module`]).
    session_generation: u64,
    ivs: IvPool,
    /// Where this thread records how long it has been inside a job.
    busy: Arc<Busy>,
    index: usize,
    /// A read-write session (the control thread: it stores markers); the
    /// request threads' sessions are read-only, which is all they need.
    writes: bool,
}

/// An error that a key handle from the cache may have caused because the
/// key behind it is gone (deleted or replaced behind the proxy's back):
/// worth one fresh lookup. SoftHSM says so (`CKR_KEY_HANDLE_INVALID`,
/// `CKR_OBJECT_HANDLE_INVALID`); Kryoptic answers `CKR_GENERAL_ERROR` from
/// `C_EncryptInit`/`C_DecryptInit` for a deleted key's handle. Only the
/// init calls, where the key is used: a failing `C_Decrypt` is about the
/// data (SoftHSM reports a bad tag as a general error there).
fn stale_handle(e: &P11Error) -> bool {
    use cryptoki::context::Function;
    matches!(
        e,
        P11Error::Pkcs11(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid, _)
            | P11Error::Pkcs11(
                RvError::GeneralError | RvError::FunctionFailed,
                Function::EncryptInit | Function::DecryptInit,
            )
    )
}

impl Worker {
    pub fn new(shared: Arc<Shared>, busy: Arc<Busy>, index: usize) -> Self {
        Worker {
            shared,
            session: None,
            session_generation: 0,
            ivs: IvPool::new(),
            busy,
            index,
            writes: false,
        }
    }

    /// The same, with a read-write session.
    pub fn writable(mut self) -> Self {
        self.writes = true;
        self
    }

    fn ekm(&self) -> String {
        self.shared.ekm_id.clone()
    }

    fn failed(&self, why: impl std::fmt::Display) -> Fault {
        Fault::Failed {
            ekm: self.ekm(),
            why: why.to_string(),
        }
    }

    /// Thread body: run jobs from its lane `own` of `lanes` (and from the
    /// others', see [`pop_lanes`]) until its lane is closed; then close the
    /// session. `before_job` runs before each job (the pool's placement).
    pub fn run(mut self, lanes: &[Arc<JobQueue<Job>>], own: usize, mut before_job: impl FnMut()) {
        let m = self.shared.metrics.clone();
        let queue = &lanes[own];
        while let Some(job) = pop_lanes(lanes, own) {
            before_job();
            let picked = Instant::now();
            m.hsm_queue_wait_seconds
                .observe((picked - job.enqueued).as_secs_f64());
            if picked > job.start_by {
                // Dropping the job drops its reply channel: the caller sees 503.
                queue.done();
                continue;
            }
            job.started
                .store(true, std::sync::atomic::Ordering::Relaxed);
            m.hsm_sessions_busy.inc();
            self.busy.enter(self.index);
            {
                // In the module's gate for the whole job (see `super::module`).
                let module = self.shared.module.module.clone();
                let _inside = module.enter();
                (job.work)(&mut self);
            }
            self.busy.leave(self.index);
            queue.done();
            m.hsm_sessions_busy.dec();
            m.hsm_seconds
                .with_label_values(&[self.shared.ekm_id.as_str(), job.kind])
                .observe(picked.elapsed().as_secs_f64());
        }
        self.discard_session();
    }

    /// Lets go of the session. Pool sessions are opened "no close on drop" so
    /// that this is the one place that closes them: one from an older module
    /// generation is *not* closed (after `C_Initialize` its handle number may
    /// belong to another thread's new session), and a failed close after a
    /// device error is expected and logged at debug level only.
    fn discard_session(&mut self) {
        if let Some(s) = self.session.take() {
            if self.session_generation == self.shared.module.module.generation() {
                if let Err(e) = s.close() {
                    tracing::debug!(ekm = %self.shared.ekm_id, error = %e, "closing a failed session");
                }
            }
        }
    }

    fn open_session(&self) -> Result<Session, P11Error> {
        let m = &self.shared.module;
        let slot = m.slot().ok_or(P11Error::Pkcs11(
            RvError::SlotIdInvalid,
            cryptoki::context::Function::OpenSession,
        ))?;
        let s = match self.writes {
            true => match m.ctx().open_rw_session_no_drop(slot) {
                Ok(s) => s,
                // A token that takes no writes: read-only, so that locks
                // and seals still work; storing markers fails, and says so.
                Err(P11Error::Pkcs11(RvError::TokenWriteProtected, _)) => {
                    m.ctx().open_ro_session_no_drop(slot)?
                }
                Err(e) => return Err(e),
            },
            false => self
                .shared
                .sessions
                .open(m.ctx(), slot, &self.shared.ekm_id)?,
        };
        if let Err(e) = login_raw(&s, &self.shared.pin) {
            let _ = s.close();
            return Err(e);
        }
        Ok(s)
    }

    fn session(&mut self) -> Result<&Session, Fault> {
        let generation = self.shared.module.module.generation();
        if self.session.is_some() && self.session_generation != generation {
            self.discard_session();
        }
        if self.session.is_none() {
            let opened = match self.open_session() {
                Ok(s) => Ok(s),
                // The device or token is gone: recover (see `super::module`)
                // and try once more; meanwhile requests fail fast.
                Err(e) if module_lost(&e) && self.shared.module.recover(&self.shared.ekm_id) => {
                    self.open_session()
                }
                Err(e) => Err(e),
            };
            let s = opened.map_err(|e| Fault::Unavailable {
                ekm: self.ekm(),
                why: format!("cannot open a session: {e}"),
            })?;
            self.session_generation = self.shared.module.module.generation();
            self.session = Some(s);
            self.shared
                .metrics
                .hsm_sessions_opened
                .with_label_values(&[self.shared.ekm_id.as_str()])
                .inc();
        }
        self.shared.keys.sync_generation(self.session_generation);
        let ekm = self.ekm();
        self.session.as_ref().ok_or(Fault::Unavailable {
            ekm,
            why: "no session".into(),
        })
    }

    /// Maps a PKCS#11 error to a fault, and drops the session when the
    /// error says it is no longer usable.
    fn map_p11(&mut self, e: P11Error, kind: OpKind) -> Fault {
        use RvError::*;
        match (rv(&e), &e) {
            (Some(KeyFunctionNotPermitted), _) => {
                Fault::WrongUsage("the key does not permit this operation".into())
            }
            (Some(r), _) if kind == OpKind::Decrypt && is_bad_ciphertext(r) => Fault::BadCiphertext,
            // Some modules (SoftHSM among them) report a GCM tag mismatch as a
            // generic failure of C_Decrypt. Rather than guess, ask the HSM: if a
            // known-good operation on the same session succeeds, the HSM is fine
            // and the ciphertext was at fault; otherwise it is a key manager error.
            (Some(GeneralError | FunctionFailed), P11Error::Pkcs11(_, Function::Decrypt))
                if kind == OpKind::Decrypt =>
            {
                match self.probe() {
                    Ok(()) => Fault::BadCiphertext,
                    Err(_) => {
                        self.discard_session();
                        self.failed(&e)
                    }
                }
            }
            (
                Some(r @ (DeviceRemoved | DeviceError | TokenNotPresent | CryptokiNotInitialized)),
                _,
            ) => {
                self.discard_session();
                Fault::Unavailable {
                    ekm: self.ekm(),
                    why: format!("{r}"),
                }
            }
            (Some(r), _) => {
                if matches!(
                    r,
                    SessionHandleInvalid
                        | SessionClosed
                        | UserNotLoggedIn
                        | OperationActive
                        | GeneralError
                ) {
                    self.discard_session();
                }
                self.failed(&e)
            }
            (None, _) => self.failed(&e),
        }
    }

    fn next_iv(&mut self) -> Result<[u8; IV_LEN], Fault> {
        self.session()?;
        let result = match self.session.as_ref() {
            Some(s) => self.ivs.next(s),
            None => return Err(self.failed("no HSM session")),
        };
        result.map_err(|e| self.map_p11(e, OpKind::Encrypt))
    }

    /// Looks a key up by label, from the cache unless `fresh`.
    pub fn resolve(&mut self, label: &str, fresh: bool) -> Result<KeyInfo, Fault> {
        // First the session: opening it may re-initialize the module, which
        // empties the cache of handles from the old instance.
        self.session()?;
        if !fresh {
            if let Some(k) = self.shared.keys.get_fresh(label) {
                return Ok(k);
            }
        }
        let ekm = self.ekm();
        let result = (|| -> Result<KeyInfo, OpError> {
            let session = self.session()?;
            let handles = find_keys(session, label)?;
            match handles.len() {
                0 => Err(Fault::KeyNotFound { key: label.to_string(), ekm }.into()),
                1 => Ok(read_key_info(session, handles[0], label, SystemTime::now())?),
                n => Err(Fault::Failed {
                    ekm,
                    why: format!(
                        "{n} keys carry the label '{label}'; an external key id must name exactly one key"
                    ),
                }
                .into()),
            }
        })();
        match result {
            Ok(info) => {
                self.shared.keys.insert(info.clone());
                Ok(info)
            }
            Err(e) => {
                let fault = self.fault_of(e, OpKind::Lookup);
                if matches!(fault, Fault::KeyNotFound { .. }) {
                    self.shared.keys.remove(label);
                }
                Err(fault)
            }
        }
    }

    /// A failed operation as a fault: the one mapping of [`OpError`].
    fn fault_of(&mut self, e: OpError, kind: OpKind) -> Fault {
        match e {
            OpError::Fault(f) => f,
            OpError::P11(e) => self.map_p11(e, kind),
            OpError::Misconfigured(why) => self.failed(why),
        }
    }

    /// Runs `op` with the key; if the HSM says the cached handle is stale (key
    /// deleted and recreated, token re-inserted), looks the key up again once.
    fn with_key<T>(
        &mut self,
        label: &str,
        kind: OpKind,
        op: impl Fn(&Session, &KeyInfo, &Shared) -> Result<T, OpError>,
    ) -> Result<T, Fault> {
        let mut key = self.resolve(label, false)?;
        for attempt in 0..2 {
            check_key(&key, kind)?;
            let shared = self.shared.clone();
            let session = self.session()?;
            match op(session, &key, &shared) {
                Ok(v) => return Ok(v),
                Err(OpError::P11(e)) if attempt == 0 && stale_handle(&e) => {
                    self.shared.keys.remove(label);
                    key = self.resolve(label, true)?;
                }
                Err(e) => return Err(self.fault_of(e, kind)),
            }
        }
        Err(self.failed("key handle stayed invalid after a fresh lookup"))
    }

    /// The newest version of external key `id` (0 when never rotated),
    /// cached for the key cache TTL: a rotation reaches every instance
    /// within it.
    fn latest_version(&mut self, id: &str) -> Result<u32, Fault> {
        if let Some(v) = self.shared.keys.fresh_version(id) {
            return Ok(v);
        }
        let probed = latest_version(self.session()?, id);
        match probed {
            Ok(v) => {
                self.shared.keys.set_version(id, v);
                Ok(v)
            }
            Err(e) => Err(self.map_p11(e, OpKind::Lookup)),
        }
    }

    /// For a version other than 0, the base key (the external key id itself)
    /// must allow the operation too: disabling a key disables all its versions.
    fn check_family(&mut self, id: &str, version: u32, kind: OpKind) -> Result<(), Fault> {
        if version > 0 {
            let base = self.resolve(id, false)?;
            check_key(&base, kind)?;
        }
        Ok(())
    }

    /// Encrypts under the newest version of `id`, recording it in the metadata.
    pub fn encrypt(&mut self, id: &str, input: &EncryptInput) -> Result<EncryptOutput, Fault> {
        let version = self.latest_version(id)?;
        self.check_family(id, version, OpKind::Encrypt)?;
        let metadata = metadata_for_version(version);
        // Taken before the key lookup: an attempt that fails on a stale key
        // handle encrypts nothing, so its retry may use the same IV.
        let iv = IvInput::for_source(self.shared.iv_source, || self.next_iv())?;
        self.with_key(&version_label(id, version), OpKind::Encrypt, |s, key, _| {
            encrypt_once(s, key.handle, iv, &metadata, input)
        })
    }

    /// Decrypts with the version of `id` that the ciphertext metadata names,
    /// trying the input's AAD layouts in order (see `spec::aead::decrypt_layouts`):
    /// a layout that does not authenticate moves on to the next, and only
    /// the last one's failure is reported.
    pub fn decrypt(&mut self, id: &str, input: &DecryptInput) -> Result<DecryptOutput, Fault> {
        let version = version_from_metadata(&input.metadata);
        self.check_family(id, version, OpKind::Decrypt)?;
        let label = version_label(id, version);
        let result = self.with_key(&label, OpKind::Decrypt, |s, key, _| {
            decrypt_once(s, key.handle, input)
        });
        match result {
            // The base key exists (checked above); a missing version means the
            // metadata does not describe a ciphertext of this key.
            Err(Fault::KeyNotFound { .. }) if version > 0 => Err(Fault::UnknownVersion {
                key: id.to_string(),
                version,
            }),
            other => other,
        }
    }

    /// The markers of one kind (see [`super::markers`]).
    pub fn markers(&mut self, application: &[u8]) -> Result<Vec<Marker>, Fault> {
        let result = markers::list(self.session()?, application);
        result.map_err(|e| self.map_p11(e, OpKind::Lookup))
    }

    /// Stores a marker, replacing one of the same kind and label (see
    /// [`super::markers::put`]).
    pub fn put_marker(
        &mut self,
        application: &[u8],
        label: &str,
        value: &[u8],
    ) -> Result<(), Fault> {
        let result = markers::put(self.session()?, application, label, value);
        result.map_err(|e| self.map_p11(e, OpKind::Lookup))
    }

    /// Whether the token holds exactly one HMAC key labelled `label`, and
    /// it cannot leave the token (see [`super::hmac`]).
    pub fn has_hmac_key(&mut self, label: &str) -> Result<bool, Fault> {
        let result = hmac::describe(self.session()?, label);
        match result {
            Ok(keys) => Ok(matches!(&keys[..], [k] if k.is_protected())),
            Err(e) => Err(self.map_p11(e, OpKind::Lookup)),
        }
    }

    /// HMAC-SHA256 of `data` under the HMAC key labelled `label`, computed
    /// in the token. The key is looked up each time: seals are rare, and a
    /// key replaced in the token is then never used by a stale handle.
    pub fn hmac(&mut self, label: &str, data: &[u8]) -> Result<Vec<u8>, Fault> {
        let ekm = self.ekm();
        let result = (|| -> Result<Vec<u8>, OpError> {
            let session = self.session()?;
            match &hmac::describe(session, label)?[..] {
                [] => Err(Fault::KeyNotFound {
                    key: label.to_string(),
                    ekm,
                }
                .into()),
                [k] if k.is_protected() => Ok(hmac::sign(session, k.handle, data)?),
                [_] => Err(OpError::Misconfigured(format!(
                    "the HMAC key '{label}' is extractable or not sensitive; it cannot seal"
                ))),
                keys => Err(OpError::Misconfigured(format!(
                    "{} HMAC keys carry the label '{label}'; a seal must name exactly one",
                    keys.len()
                ))),
            }
        })();
        result.map_err(|e| self.fault_of(e, OpKind::Lookup))
    }

    /// A cheap sign of life between deep probes: one `C_GetSessionInfo`. It
    /// touches no key, so it leaves nothing in the HSM's audit log, but a
    /// hung HSM does not answer it either.
    pub fn heartbeat(&mut self) -> Result<(), Fault> {
        let result = self.session()?.get_session_info();
        result
            .map(|_| ())
            .map_err(|e| self.map_p11(e, OpKind::Lookup))
    }

    /// Deep health probe: a real encrypt and decrypt with the health-check key.
    ///
    /// The proxy made that key itself at startup, so when it is not found the
    /// token has most likely lost its objects (SoftHSM forgets them when it
    /// runs out of file descriptors, or its token directory went away): that
    /// is recovered like a lost device (see `super::module`), and the probe
    /// tried once more.
    pub fn probe(&mut self) -> Result<(), Fault> {
        let label = self.shared.health_key.clone();
        let mut plaintext = Zeroizing::new(vec![0u8; 32]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut plaintext)
            .map_err(|_| self.failed("the system RNG failed"))?;
        let input = EncryptInput {
            plaintext,
            aad: b"xks-proxy health probe".to_vec(),
            cdiv: true,
        };
        // `cdiv: true` makes encrypt do its verification decrypt in the HSM.
        match self.encrypt(&label, &input) {
            Err(Fault::KeyNotFound { .. }) => {
                if self.shared.module.recover(&self.shared.ekm_id) {
                    self.discard_session();
                    if self.encrypt(&label, &input).is_ok() {
                        return Ok(());
                    }
                }
                Err(Fault::Unavailable {
                    ekm: self.ekm(),
                    why: format!(
                        "its health-check key '{label}' is missing from the token (the token lost \
                         its objects, or the key was deleted: then re-create it with \
                         `xks-proxy keys create --label {label}`)"
                    ),
                })
            }
            other => other.map(|_| ()),
        }
    }
}
