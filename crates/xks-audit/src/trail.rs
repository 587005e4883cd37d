//! The handle requests and the lockdown poller write through, and the
//! accounting that keeps the trail from losing records silently.
//!
//! Requests never wait for the disk: records go through a queue to one
//! writer thread (see `super::writer`). The queue is bounded by
//! *reservations*: a request that passed authentication takes a [`Slot`]
//! before it may use a key, and commits its record into it when it is
//! answered (or, if the client goes away first, the slot's owner commits an
//! `abandoned` record). A slot that was reserved is always written, so:
//!
//! - with `on_failure = "refuse"`, a request that cannot get a slot (queue
//!   full, or the writer cannot write) is answered 503 before any key is
//!   touched: nothing is served that the trail does not record;
//! - with `on_failure = "continue"`, it is served, and the missing record
//!   is counted, logged, and reported in the trail by a `loss` record.
//!
//! Records of requests that never authenticated are taken when there is
//! room and otherwise counted as lost; they are refused anyway, and a flood
//! of them must not crowd out the requests that matter.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::sync::mpsc::Sender;

use super::config::{is_valid_instance_id, AuditConfig, OnFailure};
use super::error::AuditError;
use super::queue::{Entry, Shared};
use super::record::{LockEvent, RequestRecord};
use super::sealer::Sealer;
use super::writer::Writer;
use xks_telemetry::metrics::Metrics;

/// The running trail of this instance.
/// At shutdown, how long requests that hold a slot are waited for.
pub const SLOT_WAIT: Duration = Duration::from_secs(5);

pub struct AuditTrail {
    tx: Sender<Entry>,
    shared: Arc<Shared>,
    on_failure: OnFailure,
    instance: String,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl AuditTrail {
    /// Opens the trail (creating its directory, taking its lock, finding
    /// where this instance's chain left off) and starts the writer, which
    /// writes the `start` record and seals at once. Blocking: file I/O.
    /// `sealer: None` writes an unsealed chain (unit tests only: every
    /// real trail is sealed).
    pub fn start(
        cfg: &AuditConfig,
        instance: String,
        sealer: Option<Box<dyn Sealer>>,
        metrics: &Metrics,
    ) -> Result<AuditTrail, AuditError> {
        if !is_valid_instance_id(&instance) {
            return Err(AuditError::BadInstance(instance));
        }
        let shared = Arc::new(Shared::new(cfg.queue_records, metrics));
        let writer = Writer::open(cfg, &instance, sealer, shared.clone())?;
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("xks-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(AuditError::Thread)?;
        tracing::info!(
            instance = %instance,
            dir = %cfg.dir.display(),
            on_failure = cfg.on_failure.as_str(),
            "audit trail started"
        );
        Ok(AuditTrail {
            tx,
            shared,
            on_failure: cfg.on_failure,
            instance,
            writer: Mutex::new(Some(handle)),
        })
    }

    /// This instance's chain.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// True when a request that cannot get a slot must be refused.
    pub fn refuses(&self) -> bool {
        self.on_failure == OnFailure::Refuse
    }

    /// Whether a reservation would succeed now (for `/ping`).
    pub fn accepting(&self) -> bool {
        !self.shared.failing.load(Ordering::Acquire)
            && self.shared.used.load(Ordering::Acquire) < self.shared.capacity
    }

    /// A slot for one request's record, or `None` when the trail cannot
    /// take it (queue full, or the writer failing).
    pub fn reserve(&self) -> Option<Slot> {
        // Stopping: a record reserved now might miss the final seal, so under
        // "refuse" the request is refused rather than served unrecorded.
        if self.shared.failing.load(Ordering::Acquire) || self.shared.stop.load(Ordering::Acquire) {
            return None;
        }
        let before = self.shared.used.fetch_add(1, Ordering::AcqRel);
        if before >= self.shared.capacity {
            self.shared.release();
            return None;
        }
        Some(Slot {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
            committed: false,
        })
    }

    /// Records a request that holds no slot (it never authenticated, or
    /// it was served under `on_failure = "continue"` without one): written
    /// when there is room, else counted as lost.
    pub fn record(&self, r: RequestRecord) {
        match self.reserve() {
            Some(slot) => slot.commit(r),
            None => self
                .shared
                .note_lost("the audit queue is full or its disk is failing"),
        }
    }

    /// Counts a request that was served without a record (`continue`).
    pub fn lost(&self) {
        self.shared
            .note_lost("the audit queue is full or its disk is failing");
    }

    /// Records a lockdown event (rare: always queued).
    pub fn lock_event(&self, e: LockEvent) {
        if self.tx.send(Entry::Lock(e)).is_err() {
            self.shared.note_lost("the audit writer has stopped");
        }
    }

    /// Writes the `stop` record and the final seal, and waits for the
    /// writer to finish (bounded: a seal gives up after a few seconds, and
    /// so does a disk that cannot be written). First, for up to
    /// [`SLOT_WAIT`], it waits for requests that hold a slot to commit their
    /// records (shutdown's grace period may end while some are still with
    /// the key manager); what is still missing then is recorded as a loss,
    /// with its count, before the stop record. Blocking.
    pub fn close(&self) {
        self.close_within(SLOT_WAIT)
    }

    pub(crate) fn close_within(&self, slot_wait: Duration) {
        // No new reservations from here on (see `reserve`).
        self.shared.stop.store(true, Ordering::Release);
        let give_up = Instant::now() + slot_wait;
        while self.shared.used.load(Ordering::Acquire) > 0 && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.tx.send(Entry::Shutdown);
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("the audit writer thread panicked");
            }
        }
    }
}

/// Room for one request's record in the queue, taken before the request
/// may use a key. Dropped without [`Slot::commit`], it gives the room back.
pub struct Slot {
    tx: Sender<Entry>,
    shared: Arc<Shared>,
    committed: bool,
}

impl Slot {
    /// Queues the record (the writer gives the room back once written).
    pub fn commit(mut self, r: RequestRecord) {
        self.committed = true;
        if self.tx.send(Entry::Request(Box::new(r))).is_err() {
            self.shared.release();
            // After a close, the writer already counted this slot in its
            // last loss record.
            if !self.shared.stop.load(Ordering::Acquire) {
                self.shared.note_lost("the audit writer has stopped");
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.committed {
            self.shared.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    use crate::verify::{expand, verify, SealCheck, SealCheckError, Status, TrailFile};
    use crate::Compression;

    /// Unit tests write unsealed chains (seals need the HSM: see
    /// `tests/audit.rs`).
    struct NoSeals;
    impl SealCheck for NoSeals {
        fn check(&mut self, _: &str, _: &[u8], _: &[u8]) -> Result<bool, SealCheckError> {
            Err(SealCheckError::NoKeyManager("no seals here".into()))
        }
    }

    fn cfg(dir: &std::path::Path, queue: usize) -> AuditConfig {
        AuditConfig {
            dir: dir.to_path_buf(),
            instance_id: None,
            on_failure: OnFailure::Refuse,
            seal_every_records: 1000,
            seal_every: Duration::from_secs(3600),
            rotate_bytes: 2000,
            rotate_every: Duration::from_secs(3600),
            compress: Compression::None,
            queue_records: queue,
            seal_key_label: "seal".into(),
            create_seal_key: false,
        }
    }

    fn request(id: String) -> RequestRecord {
        RequestRecord {
            kms_request_id: Some(id),
            status: 200,
            ..RequestRecord::default()
        }
    }

    #[test]
    fn the_chain_goes_on_across_rotations_and_restarts() {
        the_chain_goes_on_across_rotations_and_restarts_with(Compression::None);
    }

    #[test]
    fn compressed_rotated_files_are_one_chain_with_the_rest() {
        the_chain_goes_on_across_rotations_and_restarts_with(Compression::Gzip);
    }

    fn the_chain_goes_on_across_rotations_and_restarts_with(compress: Compression) {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let cfg = AuditConfig {
            compress,
            ..cfg(dir.path(), 1000)
        };
        for run in 0..2 {
            let t = AuditTrail::start(&cfg, "unit".into(), None, &metrics).unwrap();
            // The run's first file exists once the trail has started.
            let before = expand(&[dir.path().to_path_buf()]).unwrap().len();
            for i in 0..10 {
                t.reserve()
                    .expect("room in the queue")
                    .commit(request(format!("run{run}-{i}")));
            }
            // Over 2000 bytes: the writer rotates after the batch (waited
            // for, bounded, before the stop record goes in).
            let deadline = Instant::now() + Duration::from_secs(10);
            while expand(&[dir.path().to_path_buf()]).unwrap().len() < before + 1
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            t.close();
        }
        let files = expand(&[dir.path().to_path_buf()]).unwrap();
        assert!(
            files.len() >= 4,
            "the files rotated at 2000 bytes: {files:?}"
        );
        if compress == Compression::Gzip {
            // Every file but the newest is compressed, in the background;
            // a run's start compresses what the last one left.
            let deadline = Instant::now() + Duration::from_secs(10);
            let plain = || {
                expand(&[dir.path().to_path_buf()])
                    .unwrap()
                    .iter()
                    .filter(|f| f.extension().is_some_and(|x| x == "jsonl"))
                    .count()
            };
            while plain() > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(plain(), 1, "{:?}", expand(&[dir.path().to_path_buf()]));
        }
        let files = expand(&[dir.path().to_path_buf()]).unwrap();
        let trail: Vec<TrailFile> = files.iter().map(|f| TrailFile::at(f)).collect();
        let v = verify(&trail, &[], &mut NoSeals, &Default::default()).unwrap();
        assert_eq!(v.len(), 1);
        // Every link holds; without a sealer nothing is sealed.
        assert!(
            matches!(&v[0].status, Status::UnsealedTail { from, .. } if from.seq == Some(0)),
            "{:?}",
            v[0]
        );
        assert_eq!(v[0].files, files.len());
        // The second run continued the count and said what it found unsealed.
        let mut text = String::new();
        for f in &trail {
            let mut lines = f.lines().unwrap();
            while let Some(l) = lines.next().unwrap() {
                text.push_str(&String::from_utf8_lossy(l.bytes));
                text.push('\n');
            }
        }
        let seq_of = |id: &str| {
            text.lines()
                .find(|l| l.contains(&format!("\"kmsRequestId\":\"{id}\"")))
                .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .and_then(|v| v["seq"].as_u64())
                .unwrap()
        };
        assert!(seq_of("run1-0") > seq_of("run0-9"));
        assert!(
            v[0].notes.iter().any(|n| n.contains("after its last seal")),
            "{:?}",
            v[0].notes
        );
        assert_eq!(metrics.audit_lost.get(), 0);
    }

    #[test]
    fn reservations_are_bounded_and_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let t = AuditTrail::start(&cfg(dir.path(), 3), "bounded".into(), None, &metrics).unwrap();
        let held: Vec<Slot> = (0..3).map(|_| t.reserve().unwrap()).collect();
        assert!(t.reserve().is_none(), "the queue holds 3");
        assert!(!t.accepting());
        // A request that holds no slot is counted as lost.
        t.record(request("no-room".into()));
        assert_eq!(metrics.audit_lost.get(), 1);
        drop(held);
        assert!(t.reserve().is_some(), "dropped slots give their room back");
        t.close();
        let files = expand(&[dir.path().to_path_buf()]).unwrap();
        let text = std::fs::read_to_string(&files[0]).unwrap();
        assert!(
            text.contains("\"type\":\"loss\",") && text.contains("\"count\":1"),
            "{text}"
        );
    }

    #[test]
    fn closing_waits_for_held_slots_and_records_what_never_came() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let t = Arc::new(
            AuditTrail::start(&cfg(dir.path(), 10), "closing".into(), None, &metrics).unwrap(),
        );
        // A request still with the key manager when shutdown begins.
        let late = t.reserve().unwrap();
        let closer = {
            let t = t.clone();
            std::thread::spawn(move || t.close_within(Duration::from_secs(10)))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(t.reserve().is_none(), "no new slots while closing");
        late.commit(request("late".into()));
        closer.join().unwrap();
        let text =
            std::fs::read_to_string(&expand(&[dir.path().to_path_buf()]).unwrap()[0]).unwrap();
        let late_at = text
            .find("\"kmsRequestId\":\"late\"")
            .expect("the late record is in");
        assert!(late_at < text.find("\"type\":\"stop\"").unwrap());
        assert_eq!(metrics.audit_lost.get(), 0);

        // One that never commits within the wait: a loss, counted once.
        let dir = tempfile::tempdir().unwrap();
        let t = AuditTrail::start(&cfg(dir.path(), 10), "closing".into(), None, &metrics).unwrap();
        let never = t.reserve().unwrap();
        t.close_within(Duration::from_millis(50));
        never.commit(request("too-late".into()));
        let text =
            std::fs::read_to_string(&expand(&[dir.path().to_path_buf()]).unwrap()[0]).unwrap();
        assert!(
            text.contains("\"type\":\"loss\",") && text.contains("\"count\":1"),
            "{text}"
        );
        assert!(!text.contains("too-late"));
        assert_eq!(metrics.audit_lost.get(), 1);
    }

    #[test]
    fn one_chain_has_one_writer() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let first = AuditTrail::start(&cfg(dir.path(), 10), "solo".into(), None, &metrics).unwrap();
        let second = AuditTrail::start(&cfg(dir.path(), 10), "solo".into(), None, &metrics);
        assert!(matches!(second, Err(AuditError::InUse { .. })));
        assert!(matches!(
            AuditTrail::start(&cfg(dir.path(), 10), "../x".into(), None, &metrics),
            Err(AuditError::BadInstance(_))
        ));
        first.close();
    }
}
