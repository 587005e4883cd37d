//! The trail's restart and witness rules, in-process, with a sealer that
//! needs no HSM: its "MAC" is a SHA-256 over the key label and the input,
//! which the matching [`SealCheck`] recomputes. What is tested is the
//! writer's and the verifier's logic; the real HMAC in a token is
//! `tests/audit.rs`'s.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::config::{AuditConfig, OnFailure};
use super::record::RequestRecord;
use super::sealer::{moves_forward, SealError, Sealer};
use super::trail::AuditTrail;
use super::verify::{
    expand, verify, Problem, SealCheck, SealCheckError, Status, TrailFile, Witnesses,
};
use super::witness::Witness;
use super::AuditError;
use xks_telemetry::metrics::Metrics;

/// What the fake HSM holds, shared with the test.
#[derive(Default)]
struct Hsm {
    witness: Option<Witness>,
    /// Reading the witness fails (a key manager that does not answer).
    unreadable: bool,
    /// Seals fail (the HSM is down).
    down: bool,
}

struct FakeSealer(Arc<Mutex<Hsm>>);

fn mac(key: &str, input: &[u8]) -> Vec<u8> {
    let mut m = key.as_bytes().to_vec();
    m.extend_from_slice(input);
    ring::digest::digest(&ring::digest::SHA256, &m)
        .as_ref()
        .to_vec()
}

impl Sealer for FakeSealer {
    fn key_label(&self) -> &str {
        "seal"
    }
    fn seal(&self, input: &[u8], _: Duration) -> Result<(String, Vec<u8>), SealError> {
        if self.0.lock().unwrap().down {
            return Err(SealError::NoKeyManager);
        }
        Ok(("fake".into(), mac("seal", input)))
    }
    fn put_witness(&self, w: &Witness, _: Duration) -> Result<(), SealError> {
        let mut hsm = self.0.lock().unwrap();
        if let Some(held) = &hsm.witness {
            if !moves_forward(held, w) {
                return Err(SealError::Backwards {
                    held: held.seq,
                    offered: w.seq,
                });
            }
        }
        hsm.witness = Some(w.clone());
        Ok(())
    }
    fn witness(&self, _: &str, _: Duration) -> Result<Option<Witness>, SealError> {
        let hsm = self.0.lock().unwrap();
        if hsm.unreadable {
            return Err(SealError::NoKeyManager);
        }
        Ok(hsm.witness.clone())
    }
}

struct FakeCheck;
impl SealCheck for FakeCheck {
    fn check(&mut self, key: &str, input: &[u8], m: &[u8]) -> Result<bool, SealCheckError> {
        Ok(mac(key, input) == m)
    }
}

fn cfg(dir: &Path, on_failure: OnFailure) -> AuditConfig {
    AuditConfig {
        dir: dir.to_path_buf(),
        instance_id: None,
        on_failure,
        seal_every_records: 1000,
        seal_every: Duration::from_secs(3600),
        rotate_bytes: 1 << 30,
        rotate_every: Duration::from_secs(3600),
        compress: Default::default(),
        queue_records: 100,
        seal_key_label: "seal".into(),
        create_seal_key: false,
    }
}

fn run(dir: &Path, hsm: &Arc<Mutex<Hsm>>, on_failure: OnFailure, requests: usize) {
    let t = start(dir, hsm, on_failure).unwrap();
    for i in 0..requests {
        t.reserve().unwrap().commit(RequestRecord {
            kms_request_id: Some(format!("r{i}")),
            status: 200,
            ..RequestRecord::default()
        });
    }
    t.close();
}

fn start(
    dir: &Path,
    hsm: &Arc<Mutex<Hsm>>,
    on_failure: OnFailure,
) -> Result<AuditTrail, AuditError> {
    AuditTrail::start(
        &cfg(dir, on_failure),
        "unit".into(),
        Some(Box::new(FakeSealer(hsm.clone()))),
        &Metrics::new(),
    )
}

fn verdict(dir: &Path, hsm: &Arc<Mutex<Hsm>>) -> super::verify::InstanceVerdict {
    let files: Vec<TrailFile> = expand(&[dir.to_path_buf()])
        .unwrap()
        .iter()
        .map(|f| TrailFile::at(f))
        .collect();
    let mut w = Witnesses::default();
    if let Some(x) = hsm.lock().unwrap().witness.clone() {
        w.newest.insert("unit".into(), x);
    }
    let v = verify(&files, &["seal".to_string()], &mut FakeCheck, &w).unwrap();
    v.into_iter().next().unwrap()
}

fn newest_file(dir: &Path) -> std::path::PathBuf {
    expand(&[dir.to_path_buf()]).unwrap().pop().unwrap()
}

#[test]
fn a_clean_trail_verifies_intact_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = Arc::new(Mutex::new(Hsm::default()));
    run(dir.path(), &hsm, OnFailure::Refuse, 3);
    run(dir.path(), &hsm, OnFailure::Refuse, 2);
    let v = verdict(dir.path(), &hsm);
    assert_eq!(v.status, Status::Intact, "{v:?}");
    assert!(v.clean_stop);
}

#[test]
fn forged_records_after_a_clean_stop_are_never_sealed_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = Arc::new(Mutex::new(Hsm::default()));
    run(dir.path(), &hsm, OnFailure::Refuse, 3);
    // Forge: copy the last request line, renumber and relink it.
    let file = newest_file(dir.path());
    let text = std::fs::read_to_string(&file).unwrap();
    let last = text.lines().last().unwrap();
    let last_seq = serde_json::from_str::<serde_json::Value>(last).unwrap()["seq"]
        .as_u64()
        .unwrap();
    let template = text
        .lines()
        .find(|l| l.contains("\"type\":\"request\""))
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(template).unwrap();
    v["seq"] = (last_seq + 1).into();
    v["prev"] = super::record::hex(&super::record::hash_line(last.as_bytes())).into();
    let forged = serde_json::to_string(&v).unwrap();
    std::fs::write(&file, format!("{text}{forged}\n")).unwrap();
    run(dir.path(), &hsm, OnFailure::Refuse, 1);
    let v = verdict(dir.path(), &hsm);
    assert!(
        matches!(&v.status, Status::Tampered(Problem::AfterFinalSeal { first, count: 1, .. }) if first.seq == Some(last_seq + 1)),
        "{v:?}"
    );
    assert_eq!(v.exit_code(), 3);
}

#[test]
fn an_unreadable_witness_refuses_or_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = Arc::new(Mutex::new(Hsm::default()));
    run(dir.path(), &hsm, OnFailure::Refuse, 2);
    hsm.lock().unwrap().unreadable = true;
    assert!(matches!(
        start(dir.path(), &hsm, OnFailure::Refuse),
        Err(AuditError::Witness(_))
    ));
    // "continue": the run starts, and its start record says so.
    run(dir.path(), &hsm, OnFailure::Continue, 1);
    let text = std::fs::read_to_string(newest_file(dir.path())).unwrap();
    assert!(text.contains("\"witnessUnchecked\":true"), "{text}");
    hsm.lock().unwrap().unreadable = false;
    let v = verdict(dir.path(), &hsm);
    assert!(
        v.notes
            .iter()
            .any(|n| n.contains("could not read the HSM's witness")),
        "{v:?}"
    );
}

#[test]
fn the_witness_never_moves_back() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = Arc::new(Mutex::new(Hsm::default()));
    run(dir.path(), &hsm, OnFailure::Refuse, 2);
    let held = hsm.lock().unwrap().witness.clone().unwrap();
    // The files cut back to nothing while the witness could not be read:
    // this run's seals are lower than the witness, which stays.
    for f in expand(&[dir.path().to_path_buf()]).unwrap() {
        std::fs::remove_file(f).unwrap();
    }
    hsm.lock().unwrap().unreadable = true;
    let t = start(dir.path(), &hsm, OnFailure::Continue).unwrap();
    hsm.lock().unwrap().unreadable = false;
    t.close();
    assert_eq!(hsm.lock().unwrap().witness.as_ref(), Some(&held));
    let lower = Witness {
        seq: held.seq - 1,
        ..held.clone()
    };
    assert!(!moves_forward(&held, &lower));
    assert!(moves_forward(&held, &held));
    let other = Witness {
        hash: [7; 32],
        ..held.clone()
    };
    assert!(
        !moves_forward(&held, &other),
        "another record at the same seq"
    );
    // verify still compares the (cut) files with the witness it holds.
    assert!(matches!(
        verdict(dir.path(), &hsm).status,
        Status::Tampered(_)
    ));
}

#[test]
fn no_witness_for_a_seal_that_failed() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = Arc::new(Mutex::new(Hsm::default()));
    let t = start(dir.path(), &hsm, OnFailure::Refuse).unwrap();
    let first = hsm.lock().unwrap().witness.clone();
    hsm.lock().unwrap().down = true;
    t.reserve().unwrap().commit(RequestRecord::default());
    t.close();
    // The final seal failed: the witness is the start's, not a later one.
    assert_eq!(hsm.lock().unwrap().witness, first);
    let v = verdict(dir.path(), &hsm);
    assert!(matches!(v.status, Status::UnsealedTail { .. }), "{v:?}");
}

/// `audit retire` on a chain whose newest file is compressed (the plain
/// files after it were empty, or gone): the retirement and its seal go in
/// as a gzip member of their own, and the chain verifies as retired.
#[test]
fn a_chain_whose_newest_file_is_compressed_is_retired_in_a_gzip_member() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = Arc::new(Mutex::new(Hsm::default()));
    run(dir.path(), &hsm, OnFailure::Refuse, 3);
    let newest = newest_file(dir.path());
    let name = newest.file_name().unwrap().to_str().unwrap().to_string();
    super::files::compress(dir.path(), &name).unwrap();
    assert!(newest_file(dir.path())
        .to_string_lossy()
        .ends_with(".jsonl.gz"));

    let mut seal = |input: &[u8]| Ok(("fake".to_string(), mac("seal", input)));
    let seq = super::retire::retire(dir.path(), "unit", "seal", "test", &mut seal).unwrap();
    let v = verdict(dir.path(), &hsm);
    assert_eq!(v.status, Status::Intact, "{v:?}");
    assert!(v.retired && v.clean_stop, "{v:?}");
    assert_eq!(v.last_seal.as_ref().map(|(s, _)| *s), Some(seq));
    // Still one well-formed gzip stream of members, as zcat reads it.
    let out = std::process::Command::new("gzip")
        .arg("-t")
        .arg(newest_file(dir.path()))
        .status()
        .unwrap();
    assert!(out.success());
}
