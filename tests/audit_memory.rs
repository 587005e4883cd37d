//! `audit verify` reads a trail of any size in bounded memory (the audit
//! issue's item 10): a trail of 200,000 records (about 60 MB as written,
//! rotated into compressed files and one plain one) is verified while the
//! process's peak RSS grows by far less than the trail's size. Before, the
//! verifier read every file whole and kept about 100 bytes per record.
//!
//! Alone in its test binary: the peak RSS is the process's, so no other
//! test may run beside it. The seals are a fake's (a SHA-256 over key and
//! input, checked by the matching `SealCheck`): what is measured is the
//! verifier's memory, not the HSM's.

use std::path::Path;
use std::time::Duration;

use xks_proxy::audit::verify::{expand, verify, SealCheck, SealCheckError, Status, TrailFile};
use xks_proxy::audit::{
    AuditConfig, AuditTrail, Compression, OnFailure, RequestRecord, SealError, Sealer, Witness,
};
use xks_proxy::telemetry::metrics::Metrics;

fn mac(key: &str, input: &[u8]) -> Vec<u8> {
    let mut m = key.as_bytes().to_vec();
    m.extend_from_slice(input);
    ring::digest::digest(&ring::digest::SHA256, &m)
        .as_ref()
        .to_vec()
}

struct FakeSealer;
impl Sealer for FakeSealer {
    fn key_label(&self) -> &str {
        "seal"
    }
    fn seal(&self, input: &[u8], _: Duration) -> Result<(String, Vec<u8>), SealError> {
        Ok(("fake".into(), mac("seal", input)))
    }
    fn put_witness(&self, _: &Witness, _: Duration) -> Result<(), SealError> {
        Ok(())
    }
    fn witness(&self, _: &str, _: Duration) -> Result<Option<Witness>, SealError> {
        Ok(None)
    }
}

struct FakeCheck;
impl SealCheck for FakeCheck {
    fn check(&mut self, key: &str, input: &[u8], m: &[u8]) -> Result<bool, SealCheckError> {
        Ok(mac(key, input) == m)
    }
}

/// A line of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

fn write_trail(dir: &Path, records: u64) {
    let cfg = AuditConfig {
        dir: dir.to_path_buf(),
        instance_id: None,
        on_failure: OnFailure::Refuse,
        seal_every_records: 10_000,
        seal_every: Duration::from_secs(3600),
        rotate_bytes: 8 << 20,
        rotate_every: Duration::from_secs(3600),
        compress: Compression::Gzip,
        queue_records: 16_384,
        seal_key_label: "seal".into(),
        create_seal_key: false,
    };
    let t = AuditTrail::start(
        &cfg,
        "big".into(),
        Some(Box::new(FakeSealer)),
        &Metrics::new(),
    )
    .unwrap();
    let mut n = 0;
    while n < records {
        // The queue is bounded: wait for the writer when it is full.
        let Some(slot) = t.reserve() else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        slot.commit(RequestRecord {
            kms_request_id: Some(format!("d3b07384-d9a0-4c9b-8f1e-{n:012}")),
            operation: Some("Decrypt"),
            key_id: Some("prod-key-0001".into()),
            status: 200,
            ..RequestRecord::default()
        });
        n += 1;
    }
    t.close();
}

#[test]
fn a_trail_far_larger_than_the_bound_verifies_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let records = 200_000;
    write_trail(dir.path(), records);
    let files = expand(&[dir.path().to_path_buf()]).unwrap();
    // The newest file stays plain; the compressor may still be busy with
    // the last rotated one, which reads the same either way.
    assert!(files.len() >= 3, "{files:?}");
    let trail: Vec<TrailFile> = files.iter().map(|f| TrailFile::at(f)).collect();
    let mut bytes = 0u64;
    for f in &trail {
        let mut lines = f.lines().unwrap();
        while let Some(l) = lines.next().unwrap() {
            bytes += l.len as u64 + 1;
        }
    }
    assert!(bytes > 48 << 20, "the trail is {bytes} bytes as written");

    // Peak RSS from here on (writing 5 to clear_refs resets VmHWM).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_kib("VmRSS:");
    let v = verify(
        &trail,
        &["seal".to_string()],
        &mut FakeCheck,
        &Default::default(),
    )
    .unwrap();
    let peak = status_kib("VmHWM:");

    assert_eq!(v.len(), 1);
    assert_eq!(v[0].status, Status::Intact, "{:?}", v[0]);
    assert!(v[0].clean_stop);
    assert!(v[0].records > records, "{:?}", v[0]);
    assert!(v[0].seals_verified >= records / 10_000);
    let grew = peak.saturating_sub(before);
    assert!(
        grew < 16 * 1024,
        "verifying {bytes} bytes grew the peak RSS by {grew} KiB"
    );
}
