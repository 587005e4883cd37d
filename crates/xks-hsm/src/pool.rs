//! One key manager's session pool: the async face of its worker threads.
//!
//! A fixed pool of OS threads each owns one logged-in session and takes jobs
//! from a bounded queue (see [`super::worker`]). With CPU lanes (see
//! [`super::lanes`]) the threads are split over one queue per CPU, each
//! thread pinned to its lane's CPU, so that a request's hand-off stays on
//! the CPU it came from. The async side only enqueues and awaits a reply,
//! with two deadlines:
//!
//! - `queue_timeout`: a job not started by then is dropped unrun, and the
//!   caller learns that no session became free ([`Fault::NoSession`]);
//! - the request's deadline: the caller stops waiting even if the HSM is
//!   still busy ([`Fault::Timeout`]: KMS would have given up at 250 ms).
//!
//! A full queue is [`Fault::Busy`] at once. So overload becomes fast, bounded
//! errors instead of unbounded memory and latency.
//!
//! Beside the request threads, each pool has one **control** thread with
//! its own session and its own small queue, for the proxy's own work that
//! must not wait behind requests: reading the lockdown markers twice a
//! second, sealing the audit trail and storing its witness (the one write:
//! this session alone is read-write). A flood of requests (the very moment
//! a lockdown is called for) fills the request queue, not this one.
//!
//! The pool also knows how long each thread has been inside its current job:
//! a key manager whose threads all sit in one call for seconds is hung (a
//! network HSM whose packets vanish), not merely slow, and health reports it
//! so within that time (see [`Pool::stalled`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::config::HsmConfig;
use super::fault::Fault;
use super::keys::KeyCache;
use super::lanes::Placement;
use super::markers::Marker;
use super::module::ModuleSlot;
use super::objects::KeyInfo;
use super::operation::{check_key, OpKind};
use super::queue::{JobQueue, PushError};
use super::token::{EkmInfo, HsmError, Token};
use super::worker::{Busy, Job, SessionOpener, Shared, Worker};
use xks_spec::wire::{DecryptInput, DecryptOutput, EncryptInput, EncryptOutput};
use xks_telemetry::metrics::Metrics;

/// At shutdown, how long a pool thread still inside a job is waited for
/// before it counts as hung (and the logout is skipped).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Jobs the control thread may have queued (a few polls and seals).
const CONTROL_QUEUE: usize = 16;

/// Request jobs that come at least this far apart go to a thread on the
/// sender's own CPU (see [`Pool::enqueue`]). A request and its HSM work cost
/// one CPU some 115–140 µs at rates up to a few thousand per second
/// (docs/performance.md, round three), so one CPU keeps up with jobs this
/// far apart (≈ 6,700 per second); closer together, the HSM work must go to
/// the other CPUs.
const LOCAL_GAP: Duration = Duration::from_micros(150);

/// The longest gap the moving average of [`Pool::enqueue`] counts.
const GAP_CAP: Duration = Duration::from_millis(1);

struct Inner {
    /// The request threads' queues: one per lane (see [`super::lanes`]),
    /// thread `i` on lane `i % lanes.len()`; a thread whose lane is empty
    /// takes what waits in another's (`super::queue::pop_lanes`).
    lanes: Vec<Arc<JobQueue<Job>>>,
    placement: Placement,
    /// When the last request job was sent, in nanoseconds since `started`,
    /// and the moving average of the gaps between them (see
    /// [`Pool::enqueue`]).
    last_sent: AtomicU64,
    mean_gap: AtomicU64,
    started: Instant,
    /// The pool is busy: request jobs come on average closer together than
    /// [`LOCAL_GAP`], and its threads leave their lanes (see
    /// [`Pool::enqueue`]).
    spread: Arc<AtomicBool>,
    /// Taken (and joined) by the first [`Inner::close`].
    workers: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// The control thread's queue and thread (see the module docs).
    control_queue: Arc<JobQueue<Job>>,
    control: std::sync::Mutex<Option<JoinHandle<()>>>,
    control_busy: Arc<Busy>,
    shared: Arc<Shared>,
    ekm: EkmInfo,
    queue_timeout: Duration,
    busy: Arc<Busy>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl Inner {
    /// Stops the pool: closing the queues ends the threads (after the jobs
    /// already queued); joining them closes their sessions; then the
    /// explicit logout. A thread stuck in a call that never returns (a hung
    /// network HSM) is not waited for. Only the first call does anything.
    /// Returns whether every thread stopped (none is stuck in the HSM).
    fn close(&self) -> bool {
        for lane in &self.lanes {
            lane.close();
        }
        self.control_queue.close();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        let control = self
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if workers.is_empty() && control.is_none() {
            return true;
        }
        // A thread still in a job (a probe or a marker read the shutdown
        // caught mid-call) finishes it and then sees the closed queue: wait
        // for that, bounded; one still inside after the bound is hung.
        let give_up = Instant::now() + CLOSE_WAIT;
        let busy = |b: &Busy, n: usize| (0..n).any(|i| b.in_job(i));
        while (busy(&self.busy, workers.len()) || busy(&self.control_busy, 1))
            && Instant::now() < give_up
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut hung = false;
        for (i, w) in workers.into_iter().enumerate() {
            if !self.busy.in_job(i) {
                let _ = w.join();
            } else {
                hung = true;
            }
        }
        if let Some(c) = control {
            if !self.control_busy.in_job(0) {
                let _ = c.join();
            } else {
                hung = true;
            }
        }
        if hung {
            tracing::warn!(ekm = %self.ekm.id, "a pool thread is still inside the HSM; not logging out");
            return false;
        }
        // Log out explicitly rather than relying on the last session closing:
        // some HSMs keep a login alive per client until told otherwise.
        let m = &self.shared.module;
        let Some(slot) = m.slot() else { return true };
        match m
            .ctx()
            .open_ro_session(slot)
            // A token that refuses read-only sessions (see SessionKind).
            .or_else(|_| m.ctx().open_rw_session(slot))
            .and_then(|session| session.logout())
        {
            Ok(()) => tracing::info!(ekm = %self.ekm.id, "logged out of the HSM"),
            // PKCS#11 ends the login when an application's last session
            // closes; tokens that keep it (SoftHSM) need the explicit
            // logout, others (Kryoptic) have already done it.
            Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserNotLoggedIn, _)) => {
                tracing::info!(ekm = %self.ekm.id, "logged out of the HSM (the login ended with the last session)")
            }
            Err(e) => tracing::warn!(ekm = %self.ekm.id, error = %e, "HSM logout failed"),
        }
        true
    }
}

/// Where [`Pool::enqueue`] put a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placed {
    /// To a free thread pinned to the caller's own CPU.
    ThisCpu,
    /// Anywhere else (another CPU, a queue, no pinning).
    Elsewhere,
}

/// A job sent to a control thread, its answer still to come.
pub(crate) struct Pending<T> {
    rx: std::sync::mpsc::Receiver<Result<T, Fault>>,
    started: Arc<AtomicBool>,
    pool: Pool,
}

impl<T> Pending<T> {
    /// Blocks the calling (non-runtime) thread until the answer, or
    /// `deadline`.
    pub fn wait(self, deadline: Instant) -> Result<T, Fault> {
        match self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(result) => result,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(self.pool.fault_timeout(false))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(self
                .pool
                .fault_timeout(self.started.load(Ordering::Relaxed))),
        }
    }
}

/// Handle to one key manager's pool; cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    /// Starts the session pool of one key manager on its opened token.
    /// Blocking: call it from `spawn_blocking` or before the runtime serves.
    /// `index` names the pool's threads (`hsm-<index>-<n>`); `placement`
    /// says where they run.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        cfg: &HsmConfig,
        placement: &Placement,
        sessions: usize,
        module: ModuleSlot,
        token: &Token,
        index: usize,
        health_key: &str,
        metrics: &Metrics,
    ) -> Result<Pool, HsmError> {
        // The request sessions (the control thread's is not one of them).
        metrics.hsm_sessions.add(sessions as i64);
        let shared = Arc::new(Shared {
            module,
            ekm_id: token.ekm_info().id.clone(),
            pin: token.pin.clone(),
            keys: KeyCache::new(cfg.key_cache_ttl),
            iv_source: cfg.iv_source,
            sessions: SessionOpener::new(cfg.session_kind),
            health_key: health_key.to_string(),
            metrics: metrics.clone(),
        });
        let busy = Arc::new(Busy::new(sessions));
        let spread = Arc::new(AtomicBool::new(false));
        // No more lanes than threads; the queue depth is shared out.
        let n = placement.lanes().min(sessions).max(1);
        let lanes: Vec<_> = (0..n)
            .map(|l| {
                let threads = (l..sessions).step_by(n).count();
                Arc::new(JobQueue::new(cfg.queue_depth.div_ceil(n), threads))
            })
            .collect();
        let mut workers = Vec::with_capacity(sessions);
        for i in 0..sessions {
            let lane = i % n;
            let all = lanes.clone();
            let worker = Worker::new(shared.clone(), busy.clone(), i);
            let placement = placement.clone();
            let spread = spread.clone();
            let handle = std::thread::Builder::new()
                .name(format!("hsm-{index}-{i}"))
                .spawn(move || {
                    // Pinned to its lane's CPU while the pool is quiet, free
                    // to go where the kernel finds room while it is busy (see
                    // `Pool::enqueue`); checked before each job, changed
                    // only when the pool's mode changed.
                    let mut pinned = false;
                    worker.run(&all, lane, || {
                        let want = placement.pinned() && !spread.load(Ordering::Relaxed);
                        if want != pinned {
                            if want {
                                placement.pin_pool_thread(lane);
                            } else {
                                placement.unpin_current();
                            }
                            pinned = want;
                        }
                    })
                })
                .map_err(HsmError::Thread)?;
            workers.push(handle);
        }
        let control_busy = Arc::new(Busy::new(1));
        let control_queue = Arc::new(JobQueue::new(CONTROL_QUEUE, 1));
        let worker = Worker::new(shared.clone(), control_busy.clone(), 0).writable();
        let control = {
            let queue = control_queue.clone();
            std::thread::Builder::new()
                .name(format!("hsm-{index}-ctl"))
                .spawn(move || worker.run(&[queue], 0, || {}))
        }
        .map_err(HsmError::Thread)?;
        Ok(Pool {
            inner: Arc::new(Inner {
                lanes,
                placement: placement.clone(),
                last_sent: AtomicU64::new(0),
                mean_gap: AtomicU64::new(GAP_CAP.as_nanos() as u64),
                started: Instant::now(),
                spread,
                workers: std::sync::Mutex::new(workers),
                control_queue,
                control: std::sync::Mutex::new(Some(control)),
                control_busy,
                shared,
                ekm: token.ekm_info().clone(),
                queue_timeout: cfg.queue_timeout,
                busy,
            }),
        })
    }

    /// Vendor, id and model of the token, for GetHealthStatus.
    /// Stops the pool's threads, closes their sessions and logs out (see
    /// `Inner::close`); jobs sent afterwards fail at once.
    pub(crate) fn close(&self) -> bool {
        self.inner.close()
    }

    pub fn ekm_info(&self) -> &EkmInfo {
        &self.inner.ekm
    }

    /// Jobs waiting for a free session right now.
    pub fn queue_len(&self) -> usize {
        self.inner.lanes.iter().map(|l| l.len()).sum()
    }

    /// How many of the pool's threads have been inside one job for longer
    /// than `after`, and how many threads there are.
    pub fn stalled(&self, after: Duration) -> (usize, usize) {
        (self.inner.busy.stuck(after), self.inner.busy.threads())
    }

    /// Records whether this key manager can serve, for the module it shares
    /// with others (see `super::module`).
    pub(crate) fn set_usable(&self, usable: bool) {
        let slot = &self.inner.shared.module;
        slot.module.set_usable(slot.backend(), usable);
    }

    fn fault_timeout(&self, started: bool) -> Fault {
        let ekm = self.inner.ekm.id.clone();
        if started {
            Fault::Timeout { ekm }
        } else {
            Fault::NoSession { ekm }
        }
    }

    /// Runs `f` on a pool thread. It must start within the queue timeout and
    /// answer by `deadline` (the request's whole HSM budget, shared with any
    /// failover attempts); `kind` labels the job in the latency metric.
    async fn run<T: Send + 'static>(
        &self,
        kind: &'static str,
        deadline: Instant,
        f: impl FnOnce(&mut Worker) -> Result<T, Fault> + Send + 'static,
    ) -> Result<T, Fault> {
        let start_by = (Instant::now() + self.inner.queue_timeout).min(deadline);
        self.run_on(false, kind, start_by, deadline, f).await
    }

    /// Runs `f` on the control thread (see the module docs), answering by
    /// `deadline`.
    pub(crate) async fn run_control<T: Send + 'static>(
        &self,
        kind: &'static str,
        deadline: Instant,
        f: impl FnOnce(&mut Worker) -> Result<T, Fault> + Send + 'static,
    ) -> Result<T, Fault> {
        self.run_on(true, kind, deadline, deadline, f).await
    }

    async fn run_on<T: Send + 'static>(
        &self,
        control: bool,
        kind: &'static str,
        start_by: Instant,
        deadline: Instant,
        f: impl FnOnce(&mut Worker) -> Result<T, Fault> + Send + 'static,
    ) -> Result<T, Fault> {
        let (reply, rx) = oneshot::channel();
        let started = Arc::new(AtomicBool::new(false));
        let job = Job {
            kind,
            enqueued: Instant::now(),
            start_by,
            started: started.clone(),
            work: Box::new(move |w| {
                let _ = reply.send(f(w));
            }),
        };
        if self.enqueue(control, job)? == Placed::ThisCpu {
            // The thread just woken for the job is runnable on this CPU, and
            // this worker, between requests that come on average no faster
            // than every LOCAL_GAP, most likely has nothing to do but wait
            // for it.
            // Yielding the CPU now lets it run the job at once; the answer is
            // then usually there when this task polls for it, so the thread
            // never has to wake this worker back, and the worker never parks
            // and wakes in between: three context switches per request
            // instead of four or five (docs/performance.md, round three). A
            // job that blocks (a network HSM) gives the CPU back at its first
            // wait. One `sched_yield`, never a wait.
            std::thread::yield_now();
        }
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(result)) => result,
            // Dropped unrun: it waited past its start deadline.
            Ok(Err(_)) => Err(self.fault_timeout(false)),
            Err(_) => Err(self.fault_timeout(started.load(Ordering::Relaxed))),
        }
    }

    /// [`Self::run_control`] for a plain thread that may block (the audit
    /// trail's writer): waits for the answer until `deadline`.
    pub(crate) fn run_control_blocking<T: Send + 'static>(
        &self,
        kind: &'static str,
        deadline: Instant,
        f: impl FnOnce(&mut Worker) -> Result<T, Fault> + Send + 'static,
    ) -> Result<T, Fault> {
        self.send_control(kind, deadline, f)?.wait(deadline)
    }

    /// Queues a job for the control thread and returns at once: the caller
    /// waits for the answer with [`Pending::wait`]. So a caller that asks
    /// several key managers sends to all of them first, and one that hangs
    /// costs the others nothing.
    pub(crate) fn send_control<T: Send + 'static>(
        &self,
        kind: &'static str,
        deadline: Instant,
        f: impl FnOnce(&mut Worker) -> Result<T, Fault> + Send + 'static,
    ) -> Result<Pending<T>, Fault> {
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        let started = Arc::new(AtomicBool::new(false));
        let job = Job {
            kind,
            enqueued: Instant::now(),
            start_by: deadline,
            started: started.clone(),
            work: Box::new(move |w| {
                let _ = reply.send(f(w));
            }),
        };
        self.enqueue(true, job)?;
        Ok(Pending {
            rx,
            started,
            pool: self.clone(),
        })
    }

    /// Queues a job for the request threads or the control thread; a full
    /// queue is [`Fault::Busy`] at once.
    ///
    /// A request job goes to a free thread if there is one, else into the
    /// shortest queue. Which free thread: while the pool is quiet (request
    /// jobs on average [`LOCAL_GAP`] or more apart; see [`Pool::quiet`]),
    /// one on the caller's own CPU, so that the hand-off stays there (see
    /// [`super::lanes`]); while it is busy, one on another CPU first, so
    /// that the HSM work spreads over the CPUs instead of taking the runtime
    /// worker's, and the threads unpin themselves. Measured at saturation
    /// (docs/performance.md, round three): 14,600 requests/s with the HSM
    /// work beside the worker, 17,500 spread but pinned, 18,100 spread and
    /// unpinned.
    fn enqueue(&self, control: bool, job: Job) -> Result<Placed, Fault> {
        let lanes = &self.inner.lanes;
        let placement = &self.inner.placement;
        if control {
            return self.pushed(self.inner.control_queue.push(job));
        }
        // Unpinned, there is one lane and nothing to weigh.
        let quiet = placement.pinned() && self.quiet();
        let cpu_lane = placement.lane_here();
        let here = placement.pool_lane(cpu_lane, lanes.len());
        // The own lane first when quiet, last otherwise.
        let first = if quiet { 0 } else { 1 };
        let mut job = job;
        for k in first..first + lanes.len() {
            let l = (here + k) % lanes.len();
            match lanes[l].push_to_idle(job) {
                Ok(()) if quiet && placement.is_cpu_of_pool_lane(cpu_lane, l) => {
                    return Ok(Placed::ThisCpu)
                }
                Ok(()) => return Ok(Placed::Elsewhere),
                Err(j) => job = j,
            }
        }
        let shortest = (0..lanes.len())
            .map(|k| (here + k) % lanes.len())
            .min_by_key(|&l| lanes[l].len())
            .unwrap_or(0);
        self.pushed(lanes[shortest].push(job))
    }

    /// Records a request job sent now, and says whether the pool is quiet:
    /// request jobs on average at least [`LOCAL_GAP`] apart. It turns busy
    /// below two thirds of that, so that a rate near the line does not
    /// flip it at every request; the threads follow at their next job.
    fn quiet(&self) -> bool {
        let mean = self.mean_gap();
        let spread = &self.inner.spread;
        let was_busy = spread.load(Ordering::Relaxed);
        let line = LOCAL_GAP.as_nanos() as u64;
        let busy = if was_busy {
            mean < line
        } else {
            mean < line * 2 / 3
        };
        if busy != was_busy {
            spread.store(busy, Ordering::Relaxed);
        }
        !busy
    }

    /// Records a request job sent now and returns the moving average of the
    /// gaps between request jobs, in nanoseconds: over the last sixteen or
    /// so, so that a pair arriving together does not count as a busy proxy
    /// nor one pause as a quiet one; a gap counts as at most [`GAP_CAP`], so
    /// that after an idle spell a burst is recognised within a few dozen
    /// requests. Relaxed and racy by design: an estimate.
    fn mean_gap(&self) -> u64 {
        let inner = &self.inner;
        let now = u64::try_from(inner.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let cap = GAP_CAP.as_nanos() as u64;
        let gap = now
            .saturating_sub(inner.last_sent.swap(now, Ordering::Relaxed))
            .min(cap);
        let mean = inner.mean_gap.load(Ordering::Relaxed);
        let mean = (mean * 15 + gap) / 16;
        inner.mean_gap.store(mean, Ordering::Relaxed);
        mean
    }

    /// A queue's answer to a push, in this layer's terms.
    fn pushed(&self, pushed: Result<(), PushError<Job>>) -> Result<Placed, Fault> {
        match pushed {
            Ok(()) => Ok(Placed::Elsewhere),
            Err(PushError::Full(_)) => Err(Fault::Busy {
                ekm: self.inner.ekm.id.clone(),
            }),
            Err(PushError::Closed(_)) => Err(Fault::Unavailable {
                ekm: self.inner.ekm.id.clone(),
                why: "its session pool is shut down".into(),
            }),
        }
    }

    /// Checks a cached key before queueing, so a request that must fail
    /// (wrong usage, disabled) costs no HSM session.
    fn precheck(&self, label: &str, kind: OpKind) -> Result<(), Fault> {
        match self.inner.shared.keys.get_fresh(label) {
            Some(key) => check_key(&key, kind),
            None => Ok(()),
        }
    }

    /// Fresh attributes of a key (never from the cache).
    pub async fn key_info(&self, label: &str, deadline: Instant) -> Result<KeyInfo, Fault> {
        let label = label.to_owned();
        self.run("metadata", deadline, move |w| w.resolve(&label, true))
            .await
    }

    pub async fn encrypt(
        &self,
        label: &str,
        input: Arc<EncryptInput>,
        deadline: Instant,
    ) -> Result<EncryptOutput, Fault> {
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
    ) -> Result<DecryptOutput, Fault> {
        self.precheck(label, OpKind::Decrypt)?;
        let label = label.to_owned();
        self.run("decrypt", deadline, move |w| w.decrypt(&label, &input))
            .await
    }

    /// A sign of life (see `Worker::heartbeat`).
    pub async fn heartbeat(&self, deadline: Instant) -> Result<(), Fault> {
        self.run("heartbeat", deadline, |w| w.heartbeat()).await
    }

    /// One deep health probe with the health-check key.
    pub async fn probe(&self, deadline: Instant) -> Result<(), Fault> {
        self.run("health_probe", deadline, |w| w.probe()).await
    }

    /// The markers of one kind in the token (control thread).
    pub async fn markers(
        &self,
        application: &'static [u8],
        deadline: Instant,
    ) -> Result<Vec<Marker>, Fault> {
        self.run_control("markers", deadline, move |w| w.markers(application))
            .await
    }

    /// [`Self::markers`] for a plain thread that may block.
    pub(crate) fn send_markers(
        &self,
        application: &'static [u8],
        deadline: Instant,
    ) -> Result<Pending<Vec<Marker>>, Fault> {
        self.send_control("markers", deadline, move |w| w.markers(application))
    }

    /// Stores a marker (control thread); blocks the calling (non-runtime)
    /// thread until `deadline`.
    pub(crate) fn send_put_marker(
        &self,
        application: &'static [u8],
        label: &str,
        value: &[u8],
        deadline: Instant,
    ) -> Result<Pending<()>, Fault> {
        let (label, value) = (label.to_owned(), value.to_vec());
        self.send_control("marker_put", deadline, move |w| {
            w.put_marker(application, &label, &value)
        })
    }

    /// Whether the token holds a protected HMAC key labelled `label`
    /// (control thread).
    pub async fn has_hmac_key(&self, label: &str, deadline: Instant) -> Result<bool, Fault> {
        let label = label.to_owned();
        self.run_control("hmac_key", deadline, move |w| w.has_hmac_key(&label))
            .await
    }

    /// HMAC-SHA256 of `data` with the key labelled `label`, computed in the
    /// token by the control thread; blocks the calling (non-runtime) thread
    /// until `deadline`.
    pub fn hmac_blocking(
        &self,
        label: &str,
        data: Vec<u8>,
        deadline: Instant,
    ) -> Result<Vec<u8>, Fault> {
        let label = label.to_owned();
        self.run_control_blocking("hmac", deadline, move |w| w.hmac(&label, &data))
    }
}
