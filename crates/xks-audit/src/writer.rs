//! The writer thread: the only code that touches the trail's files.
//!
//! It takes records from the queue in batches, renders and chains them
//! (SHA-256 of each line into the next one's `prev`), writes each batch
//! with as few `write` calls as it takes, and seals (see `super::record`)
//! every N records or T seconds, then `fdatasync`s. Records reach the
//! operating system within a batch; they are on disk for sure at every
//! seal (a machine crash can lose the unsealed tail, which `verify`
//! reports as such).
//!
//! **Files.** `<instance>.<first seq, 16 digits>-<UTC time>.jsonl` in the
//! audit directory. A new file every `rotate_bytes` or `rotate_secs`, and at
//! every start; it begins with a `file` record naming the previous file and
//! linking to its last record, so rotation never breaks the chain. The
//! proxy never deletes or rewrites a file: archiving is the operator's.
//!
//! **Restarts.** At start the writer finds this instance's newest file and
//! its last complete line (a line cut off by a crash is left where it is and
//! skipped), and continues the chain from it: the same `seq` count, `prev`
//! linking to that line. The `start` record says how many records of the
//! previous run came after its last seal (a clean stop leaves none), and the
//! first seal of the new run follows at once (see `super::resume`).
//!
//! **The witness.** After each seal is on disk, the writer stores which seal
//! is the newest in the HSM (see `super::witness`). At start it reads it
//! back: files that end before the witnessed seal were cut while the proxy
//! was stopped, and the chain then goes on from the witnessed seal rather
//! than from what is left, with the `start` record saying where the files
//! ended (so the missing records are a gap `verify` names).
//!
//! **One writer per chain.** An exclusive lock on `<instance>.lock` (held
//! until the process ends) keeps two processes from writing one chain.
//!
//! **Failures.** A write that fails (disk full, I/O error) is retried every
//! second with the same bytes, so nothing is lost or duplicated; meanwhile
//! the trail reports itself failing, and requests are refused or counted as
//! lost according to `on_failure`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use std::sync::mpsc::{Receiver, RecvTimeoutError};

use super::config::AuditConfig;
use super::error::AuditError;

use super::files::{tidy, Compression, Compressor};
use super::queue::{Entry, Shared};
use super::record::{
    hash_line, hex, render, seal_input, FileBody, Hash, LockEvent, LossBody, RequestRecord,
    SealBody, StartBody, StopBody,
};
use super::resume::{plan, Start};
use super::sealer::Sealer;
use super::witness::Witness;
use xks_spec::time::{format_amz_date, format_timestamp_micros};

/// Records taken from the queue per batch at most.
const MAX_BATCH: usize = 1024;
/// At shutdown, how long a disk that cannot be written is waited for.
const STOP_WRITE_PATIENCE: Duration = Duration::from_secs(5);
/// After a failed seal, the wait before the next attempt.
const SEAL_RETRY: Duration = Duration::from_secs(1);
/// Written records reach the disk (`fdatasync`) at least this often.
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// How long a seal may take in the HSM. The writer waits for it while
/// records queue: short, so that a hung key manager stalls the trail for a
/// fraction of a second (the queue holds that); a failed seal is retried a
/// second later. The last seal, at shutdown, may take longer.
const SEAL_WITHIN: Duration = Duration::from_millis(250);
const LAST_SEAL_WITHIN: Duration = Duration::from_secs(5);

pub(crate) struct Writer {
    dir: PathBuf,
    instance: String,
    cfg: AuditConfig,
    sealer: Option<Box<dyn Sealer>>,
    shared: Arc<Shared>,
    file: File,
    file_name: String,
    file_bytes: u64,
    file_opened: Instant,
    /// The next record's `seq`, and the hash of the last record.
    seq: u64,
    head: Hash,
    since_seal: u64,
    last_seal: Instant,
    next_seal_attempt: Instant,
    /// The last seal failed (logged once until one succeeds).
    seal_failing: bool,
    /// The last witness could not be stored (logged once until one is).
    witness_failing: bool,
    next_rotation_attempt: Instant,
    /// Rendered records not yet written.
    out: Vec<u8>,
    /// Bytes written since the last `fdatasync`, and when that was.
    unsynced: bool,
    last_sync: Instant,
    /// Compresses rotated files (`audit.compress`), when on.
    compressor: Option<super::files::Compressor>,
    /// Held for the life of the process: see the module docs.
    _lock: File,
}

/// Takes the exclusive lock of `instance`'s chain in `dir` (held while the
/// returned file is open): one writer per chain.
pub(super) fn lock_chain(dir: &Path, instance: &str) -> Result<File, AuditError> {
    let dir_err = |source| AuditError::Dir {
        dir: dir.to_path_buf(),
        source,
    };
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{instance}.lock")))
        .map_err(dir_err)?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(AuditError::InUse {
            instance: instance.to_string(),
            dir: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(dir_err(e)),
    }
}

/// Creates a new file for the chain starting at `seq`.
fn create_file(dir: &Path, instance: &str, seq: u64) -> Result<(File, String), AuditError> {
    let stamp = format_amz_date(SystemTime::now());
    for n in 1..100u32 {
        let name = if n == 1 {
            format!("{instance}.{seq:016}-{stamp}.jsonl")
        } else {
            format!("{instance}.{seq:016}-{stamp}-{n}.jsonl")
        };
        let path = dir.join(&name);
        let mut o = OpenOptions::new();
        o.append(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        match o.open(&path) {
            Ok(f) => {
                // The new name must survive a power loss as the records in
                // it do (they are synced at every seal).
                if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
                    tracing::warn!(dir = %dir.display(), error = %e, "fsync of the audit directory failed");
                }
                return Ok((f, name));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(AuditError::File { file: path, source }),
        }
    }
    Err(AuditError::File {
        file: dir.join(format!("{instance}.{seq:016}-{stamp}.jsonl")),
        source: std::io::ErrorKind::AlreadyExists.into(),
    })
}

impl Writer {
    /// Opens the directory, takes the chain's lock, resumes the chain and
    /// opens a new file, with its `file` and `start` records rendered (not
    /// yet written).
    pub(crate) fn open(
        cfg: &AuditConfig,
        instance: &str,
        sealer: Option<Box<dyn Sealer>>,
        shared: Arc<Shared>,
    ) -> Result<Writer, AuditError> {
        let dir = cfg.dir.clone();
        let dir_err = |source| AuditError::Dir {
            dir: dir.clone(),
            source,
        };
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir).map_err(dir_err)?;
        let lock = lock_chain(&dir, instance)?;
        let Start {
            seq,
            head,
            previous,
            unsealed,
            behind,
            tail,
            witness_unchecked,
        } = plan(&dir, instance, cfg.on_failure, sealer.as_deref())?;
        let (file, file_name) = create_file(&dir, instance, seq)?;
        // Rotated files: finish what a crash cut short, and queue what is
        // not compressed yet (every file but the new one).
        let compressor = match cfg.compress {
            Compression::None => None,
            Compression::Gzip => {
                let c = Compressor::start(&dir).map_err(dir_err)?;
                for name in tidy(&dir, instance).map_err(dir_err)? {
                    c.queue(name);
                }
                Some(c)
            }
        };
        let now = Instant::now();
        let mut w = Writer {
            dir,
            instance: instance.to_string(),
            cfg: cfg.clone(),
            sealer,
            shared,
            file,
            file_name,
            file_bytes: 0,
            file_opened: now,
            seq,
            head,
            since_seal: unsealed,
            last_seal: now,
            next_seal_attempt: now,
            seal_failing: false,
            witness_failing: false,
            next_rotation_attempt: now,
            out: Vec::with_capacity(64 * 1024),
            unsynced: false,
            last_sync: now,
            compressor,
            _lock: lock,
        };
        let time = format_timestamp_micros(SystemTime::now());
        w.append(
            "file",
            &time,
            &FileBody {
                previous_file: previous.as_deref(),
            },
        );
        w.append(
            "start",
            &time,
            &StartBody {
                version: env!("CARGO_PKG_VERSION"),
                pid: std::process::id(),
                on_failure: cfg.on_failure.as_str(),
                unsealed_before: unsealed,
                witness_seq: behind.map(|(w, _)| w),
                files_next_seq: behind.map(|(_, f)| f),
                tail_from: tail.map(|(f, _)| f),
                tail_to: tail.map(|(_, t)| t),
                witness_unchecked,
            },
        );
        if unsealed > 0 {
            tracing::warn!(
                instance = %instance,
                records = unsealed,
                "the previous run of this audit chain ended without its final seal; its last records are sealed only now"
            );
        }
        Ok(w)
    }

    /// Renders one record into the output buffer and moves the chain on.
    fn append<B: serde::Serialize>(&mut self, kind: &str, time: &str, body: &B) {
        let line = render(self.seq, kind, time, &self.instance, body, &self.head);
        self.head = hash_line(&line);
        self.out.extend_from_slice(&line);
        self.out.push(b'\n');
        self.seq += 1;
        if kind != "seal" {
            self.since_seal += 1;
        }
        self.shared.metrics.audit_records.inc();
    }

    fn append_request(&mut self, r: &RequestRecord) {
        let time = format_timestamp_micros(r.received.unwrap_or_else(SystemTime::now));
        self.append("request", &time, r);
    }

    fn append_lock(&mut self, e: &LockEvent) {
        let time = format_timestamp_micros(SystemTime::now());
        self.append(e.kind.as_str(), &time, e);
    }

    /// Writes the output buffer, retrying (every second) until it is
    /// written; see the module docs. At shutdown it gives up after
    /// [`STOP_WRITE_PATIENCE`] and says how much was not written.
    /// Writes the rendered records; true when all of them were written
    /// (false only when shutdown gave up on a disk that cannot be written).
    fn flush_out(&mut self) -> bool {
        let mut off = 0;
        let mut failing_since: Option<Instant> = None;
        // Failing already when shutdown began: one more try, not another wait.
        let patience = if self.shared.failing.load(Ordering::Acquire) {
            Duration::ZERO
        } else {
            STOP_WRITE_PATIENCE
        };
        while off < self.out.len() {
            let result = match self.file.write(&self.out[off..]) {
                Ok(0) => Err(std::io::ErrorKind::WriteZero.into()),
                other => other,
            };
            match result {
                Ok(n) => off += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.shared.metrics.audit_write_errors.inc();
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if !self.shared.failing.swap(true, Ordering::AcqRel) {
                        tracing::error!(
                            file = %self.dir.join(&self.file_name).display(),
                            error = %e,
                            "cannot write the audit trail; retrying every second (meanwhile requests are refused or their records counted as lost, per audit.on_failure)"
                        );
                    }
                    if self.shared.stop.load(Ordering::Acquire) && since.elapsed() >= patience {
                        tracing::error!(
                            bytes = self.out.len() - off,
                            "shutting down with audit records that could not be written"
                        );
                        break;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        if failing_since.is_some() && off == self.out.len() {
            self.shared.failing.store(false, Ordering::Release);
            tracing::warn!("the audit trail is writable again");
        }
        self.file_bytes += off as u64;
        self.unsynced |= off > 0;
        let all = off == self.out.len();
        self.out.clear();
        all
    }

    /// `fdatasync` of the current file; a failure is logged and counted.
    /// True when what was written is on disk.
    fn sync(&mut self) -> bool {
        self.last_sync = Instant::now();
        match self.file.sync_data() {
            Ok(()) => {
                self.unsynced = false;
                true
            }
            Err(e) => {
                self.shared.metrics.audit_write_errors.inc();
                tracing::error!(file = %self.dir.join(&self.file_name).display(), error = %e, "fdatasync of the audit file failed: its last records may not be on disk");
                false
            }
        }
    }

    /// Seals the chain head in the HSM (see `super::record`), then writes
    /// and syncs. A failure is logged once, counted, and retried later; the
    /// next seal covers everything since the last good one.
    fn seal(&mut self) {
        self.seal_within(SEAL_WITHIN);
    }

    fn seal_within(&mut self, within: Duration) {
        let Some(sealer) = &self.sealer else {
            return;
        };
        let now = SystemTime::now();
        let time = format_timestamp_micros(now);
        let label = sealer.key_label().to_string();
        let input = seal_input(
            &self.instance,
            self.seq,
            &time,
            self.since_seal,
            &label,
            &self.head,
        );
        match sealer.seal(&input, within) {
            Ok((ekm, mac)) => {
                let seq = self.seq;
                let body = SealBody {
                    count: self.since_seal,
                    key: &label,
                    ekm: &ekm,
                    hmac: hex(&mac),
                };
                self.append("seal", &time, &body);
                let hmac = body.hmac;
                self.since_seal = 0;
                self.last_seal = Instant::now();
                // The witness names a seal only once it is on disk: one
                // that never got there would read as a cut later.
                let on_disk = self.flush_out() && self.sync();
                self.shared
                    .metrics
                    .audit_seals
                    .with_label_values(&["ok"])
                    .inc();
                if self.seal_failing {
                    self.seal_failing = false;
                    tracing::warn!("audit seals work again");
                }
                if on_disk {
                    self.put_witness(seq, &time);
                } else {
                    tracing::error!(
                        seq,
                        "the audit seal could not be written and synced; its witness is not stored"
                    );
                }
                // The log is a second copy of every seal, off this disk
                // when logs are shipped: a witness of the chain head.
                tracing::info!(
                    target: "xks_proxy::audit",
                    instance = %self.instance,
                    seq,
                    head = %hex(&self.head),
                    hmac = %hmac,
                    ekm = %ekm,
                    "audit seal"
                );
            }
            Err(e) => {
                self.shared
                    .metrics
                    .audit_seals
                    .with_label_values(&["failed"])
                    .inc();
                self.next_seal_attempt = Instant::now() + SEAL_RETRY;
                if !self.seal_failing {
                    self.seal_failing = true;
                    tracing::error!(error = %e, key = %label, "cannot seal the audit trail in the HSM; retrying (records keep being chained, unsealed)");
                }
            }
        }
    }

    /// Stores the seal just written and synced (`seq`, the chain head) as
    /// the newest in the HSM. A failure is logged once until one works:
    /// the trail goes on, but a cut made meanwhile is caught only by the
    /// seals the witness did hold.
    fn put_witness(&mut self, seq: u64, time: &str) {
        let Some(sealer) = &self.sealer else {
            return;
        };
        let w = Witness {
            instance: self.instance.clone(),
            seq,
            hash: self.head,
            time: time.to_string(),
        };
        match sealer.put_witness(&w, SEAL_WITHIN) {
            Ok(()) if self.witness_failing => {
                self.witness_failing = false;
                tracing::warn!("the audit witness is stored in the HSM again");
            }
            Ok(()) => {}
            Err(e) if !self.witness_failing => {
                self.witness_failing = true;
                tracing::error!(error = %e, "cannot store the audit chain's witness in the HSM; retrying at every seal");
            }
            Err(_) => {}
        }
    }

    fn seal_due(&self) -> bool {
        self.sealer.is_some()
            && Instant::now() >= self.next_seal_attempt
            && (self.since_seal >= self.cfg.seal_every_records
                || self.last_seal.elapsed() >= self.cfg.seal_every)
    }

    fn rotation_due(&self) -> bool {
        Instant::now() >= self.next_rotation_attempt
            && (self.file_bytes >= self.cfg.rotate_bytes
                || self.file_opened.elapsed() >= self.cfg.rotate_every)
    }

    /// A new file: the old one ends sealed, the new one starts with a
    /// `file` record linking to it.
    fn rotate(&mut self) {
        if self.since_seal > 0 {
            self.seal();
        }
        self.flush_out();
        match create_file(&self.dir, &self.instance, self.seq) {
            Ok((file, name)) => {
                if let Err(e) = self.file.sync_data() {
                    tracing::warn!(error = %e, "fdatasync of the audit file failed");
                }
                let previous = std::mem::replace(&mut self.file_name, name);
                let old = std::mem::replace(&mut self.file, file);
                // Its last bytes are on disk (synced above) before the
                // compressor reads it.
                drop(old);
                self.file_bytes = 0;
                self.file_opened = Instant::now();
                let time = format_timestamp_micros(SystemTime::now());
                self.append(
                    "file",
                    &time,
                    &FileBody {
                        previous_file: Some(&previous),
                    },
                );
                if let Some(c) = &self.compressor {
                    c.queue(previous);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot open a new audit file; staying with the current one");
                self.next_rotation_attempt = Instant::now() + Duration::from_secs(10);
            }
        }
    }

    /// When the loop must wake up at the latest: a seal or a rotation due
    /// (not before its retry time), and at least every second.
    fn next_wakeup(&self) -> Duration {
        let now = Instant::now();
        let mut due = now + Duration::from_secs(1);
        if self.sealer.is_some() {
            due = due.min((self.last_seal + self.cfg.seal_every).max(self.next_seal_attempt));
        }
        due = due.min((self.file_opened + self.cfg.rotate_every).max(self.next_rotation_attempt));
        due.saturating_duration_since(now)
            .max(Duration::from_millis(1))
    }

    fn take(&mut self, e: Entry, stopping: &mut bool) {
        match e {
            Entry::Request(r) => {
                self.append_request(&r);
                self.shared.release();
            }
            Entry::Lock(l) => self.append_lock(&l),
            Entry::Shutdown => *stopping = true,
        }
    }

    /// The thread body.
    pub(crate) fn run(mut self, rx: Receiver<Entry>) {
        // The `file` and `start` records, and the first seal, at once.
        self.flush_out();
        self.seal();
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let mut stopping = false;
            match rx.recv_timeout(self.next_wakeup()) {
                Ok(e) => {
                    batch.push(e);
                    batch.extend(rx.try_iter().take(MAX_BATCH - 1));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stopping = true,
            }
            let lost = self.shared.lost.swap(0, Ordering::AcqRel);
            if lost > 0 {
                let time = format_timestamp_micros(SystemTime::now());
                self.append("loss", &time, &LossBody { count: lost });
            }
            for e in batch.drain(..) {
                self.take(e, &mut stopping);
            }
            self.flush_out();
            self.shared
                .metrics
                .audit_queue
                .set(self.shared.used.load(Ordering::Relaxed) as i64);
            if stopping || self.shared.stop.load(Ordering::Acquire) {
                // Whatever is still queued goes in before the stop record.
                for e in rx.try_iter() {
                    self.take(e, &mut stopping);
                }
                self.finish();
                return;
            }
            if self.seal_due() {
                self.seal();
            }
            // On disk within SYNC_EVERY whether or not seals work (the HSM
            // may be down for hours).
            if self.unsynced && self.last_sync.elapsed() >= SYNC_EVERY {
                self.sync();
            }
            if self.rotation_due() {
                self.rotate();
            }
        }
    }

    /// The `stop` record and the final seal.
    fn finish(&mut self) {
        // The queue is drained: what is still "used" is slots that requests
        // reserved and never committed (the close stopped waiting for them).
        let held = self.shared.used.load(Ordering::Acquire) as u64;
        if held > 0 {
            tracing::error!(records = held, "requests still held audit slots when the trail closed; their records are lost (a loss record says how many)");
            self.shared.metrics.audit_lost.inc_by(held);
        }
        let lost = self.shared.lost.swap(0, Ordering::AcqRel) + held;
        let time = format_timestamp_micros(SystemTime::now());
        if lost > 0 {
            self.append("loss", &time, &LossBody { count: lost });
        }
        self.append("stop", &time, &StopBody { reason: "shutdown" });
        self.flush_out();
        self.seal_within(LAST_SEAL_WITHIN);
        if self.unsynced {
            self.sync();
        }
        tracing::info!(instance = %self.instance, next_seq = self.seq, "audit trail closed");
    }
}
