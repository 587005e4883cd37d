use super::*;
use crate::record::{hash_line, hex, render, Hash, RequestRecord, GENESIS};
use crate::witness::Witness;

/// Seals need the HSM; these tests check the chain alone.
struct NoSeals;
impl SealCheck for NoSeals {
    fn check(&mut self, _: &str, _: &[u8], _: &[u8]) -> Result<bool, SealCheckError> {
        Err(SealCheckError::NoKeyManager("no seals in this test".into()))
    }
}

/// `n` linked request records of instance "t".
fn chain(n: u64) -> Vec<Vec<u8>> {
    let mut head = GENESIS;
    (0..n)
        .map(|seq| {
            let r = RequestRecord {
                kms_request_id: Some(format!("req-{seq}")),
                status: 200,
                ..RequestRecord::default()
            };
            let line = render(
                seq,
                "request",
                "2026-01-01T00:00:00.000000Z",
                "t",
                &r,
                &head,
            );
            head = hash_line(&line);
            line
        })
        .collect()
}

fn bytes_of(lines: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for l in lines {
        bytes.extend_from_slice(l);
        bytes.push(b'\n');
    }
    bytes
}

fn file(lines: &[Vec<u8>]) -> TrailFile {
    TrailFile::in_memory("t.jsonl", bytes_of(lines))
}

fn verdict(lines: &[Vec<u8>]) -> Status {
    let v = verify(&[file(lines)], &[], &mut NoSeals, &Witnesses::default()).unwrap();
    assert_eq!(v.len(), 1);
    v[0].status.clone()
}

fn problem(lines: &[Vec<u8>]) -> Problem {
    match verdict(lines) {
        Status::Tampered(p) => p,
        other => panic!("not tampered: {other:?}"),
    }
}

/// Every seal verifies: these tests are about what lies between seals.
struct AnySeal;
impl SealCheck for AnySeal {
    fn check(&mut self, _: &str, _: &[u8], _: &[u8]) -> Result<bool, SealCheckError> {
        Ok(true)
    }
}

/// A chain of instance "t" built record by record, as the writer does.
struct Builder {
    lines: Vec<Vec<u8>>,
    seq: u64,
    head: Hash,
}

impl Builder {
    fn new() -> Self {
        Builder {
            lines: Vec::new(),
            seq: 0,
            head: GENESIS,
        }
    }

    fn push<B: serde::Serialize>(&mut self, kind: &str, body: &B) -> &mut Self {
        let line = render(
            self.seq,
            kind,
            "2026-01-01T00:00:00.000000Z",
            "t",
            body,
            &self.head,
        );
        self.head = hash_line(&line);
        self.seq += 1;
        self.lines.push(line);
        self
    }

    fn request(&mut self) -> &mut Self {
        self.push("request", &RequestRecord::default())
    }

    fn seal(&mut self) -> &mut Self {
        use crate::record::SealBody;
        self.push(
            "seal",
            &SealBody {
                count: 0,
                key: "k",
                ekm: "e",
                hmac: "00".into(),
            },
        )
    }

    fn stop(&mut self) -> &mut Self {
        use crate::record::StopBody;
        self.push("stop", &StopBody { reason: "test" })
    }

    /// A new run as the writer starts one: its `file` record links to
    /// `from` (a line's hash), the `start` record names the range left
    /// out, if any.
    fn new_run(&mut self, from: Hash, left_out: Option<(u64, u64)>) -> &mut Self {
        use crate::record::{FileBody, StartBody};
        self.head = from;
        self.push(
            "file",
            &FileBody {
                previous_file: None,
            },
        );
        self.push(
            "start",
            &StartBody {
                version: "test",
                pid: 1,
                on_failure: "refuse",
                unsealed_before: 0,
                witness_seq: None,
                files_next_seq: None,
                tail_from: left_out.map(|(f, _)| f),
                tail_to: left_out.map(|(_, t)| t),
                witness_unchecked: None,
            },
        )
    }

    fn status(&self) -> InstanceVerdict {
        let v = verify(
            &[file(&self.lines)],
            &["k".to_string()],
            &mut AnySeal,
            &Witnesses::default(),
        )
        .unwrap();
        v[0].clone()
    }
}

#[test]
fn records_appended_after_a_clean_stop_are_tampering_not_a_tail() {
    let mut b = Builder::new();
    b.request().seal().request().stop().seal();
    let final_seal = b.head;
    assert_eq!(b.status().status, Status::Intact);
    // Three forged requests, each linked right (SHA-256 is public).
    b.request().request().request();
    let v = b.status();
    assert!(
        matches!(&v.status, Status::Tampered(Problem::AfterFinalSeal { first, count: 3, .. }) if first.seq == Some(5)),
        "{v:?}"
    );
    assert_eq!(v.exit_code(), 3);
    // The next run leaves them out of its chain; still tampering, and
    // its own seals do not make them proven.
    let forged_to = b.seq - 1;
    b.new_run(final_seal, Some((5, forged_to))).request().seal();
    let v = b.status();
    assert!(
        matches!(&v.status, Status::Tampered(Problem::AfterFinalSeal { first, count: 3, .. }) if first.seq == Some(5)),
        "{v:?}"
    );
}

#[test]
fn a_new_run_after_a_clean_stop_is_not_tampering() {
    let mut b = Builder::new();
    b.request().stop().seal();
    let final_seal = b.head;
    b.new_run(final_seal, None).request();
    // The new run is running (or crashed before its first seal).
    assert!(matches!(
        b.status().status,
        Status::UnsealedTail { count: 3, .. }
    ));
    b.seal();
    assert_eq!(b.status().status, Status::Intact);
}

#[test]
fn a_crashed_runs_tail_stays_unproven_after_the_next_run() {
    let mut b = Builder::new();
    b.request().seal();
    let last_seal = b.head;
    b.request().request();
    let v = b.status();
    assert!(
        matches!(v.status, Status::UnsealedTail { count: 2, .. }),
        "{v:?}"
    );
    b.new_run(last_seal, Some((2, 3))).request().seal();
    let v = b.status();
    assert!(
        matches!(&v.status, Status::Unproven { from, count: 2 } if from.seq == Some(2)),
        "{v:?}"
    );
    assert_eq!(v.exit_code(), 5);
    // A range that does not match what was left out is a broken link.
    let mut c = Builder::new();
    c.request().seal();
    let last_seal = c.head;
    c.request().request();
    c.new_run(last_seal, Some((2, 2))).request().seal();
    assert!(matches!(c.status().status, Status::Tampered(_)));
}

#[test]
fn an_intact_chain_without_a_seal_has_an_unsealed_tail() {
    let status = verdict(&chain(5));
    assert_eq!(
        status,
        Status::UnsealedTail {
            from: Place {
                file: "t.jsonl".into(),
                line: 1,
                seq: Some(0)
            },
            count: 5
        }
    );
}

#[test]
fn an_edit_names_the_edited_record() {
    let mut l = chain(6);
    l[2] = String::from_utf8(l[2].clone())
        .unwrap()
        .replace("req-2", "req-X")
        .into_bytes();
    let p = problem(&l);
    assert!(matches!(p, Problem::Modified { .. }), "{p}");
    assert_eq!(p.record().seq, Some(2), "{p}");
}

#[test]
fn a_deletion_names_the_missing_seq() {
    let mut l = chain(6);
    l.remove(3);
    let p = problem(&l);
    assert!(matches!(p, Problem::Deleted { from: 3, to: 3, .. }), "{p}");
}

#[test]
fn an_insertion_names_the_stranger() {
    let mut l = chain(6);
    // A forged record claiming seq 3 and even linking to seq 2.
    let forged = render(
        3,
        "request",
        "2026-01-01T00:00:00.000000Z",
        "t",
        &RequestRecord::default(),
        &hash_line(&l[2]),
    );
    l.insert(3, forged);
    let p = problem(&l);
    assert!(matches!(p, Problem::Inserted { .. }), "{p}");
    assert_eq!(p.record().line, 4, "{p}");
    // A copy of an existing record.
    let mut l = chain(6);
    l.insert(4, l[3].clone());
    let p = problem(&l);
    assert!(matches!(p, Problem::Duplicate { .. }), "{p}");
    assert_eq!(p.record().line, 5, "{p}");
}

#[test]
fn a_swap_is_a_reordering() {
    let mut l = chain(6);
    l.swap(2, 3);
    let p = problem(&l);
    assert!(matches!(p, Problem::Reordered { .. }), "{p}");
    assert_eq!(p.record().seq, Some(2), "{p}");
}

#[test]
fn files_are_put_in_chain_order_and_a_torn_last_line_is_only_a_note() {
    let l = chain(6);
    let mut bytes = bytes_of(&l[3..]);
    bytes.extend_from_slice(b"{\"v\":1,\"seq\"");
    let second = TrailFile::in_memory("a-second.jsonl", bytes);
    let first = file(&l[..3]);
    let v = verify(&[second, first], &[], &mut NoSeals, &Witnesses::default()).unwrap();
    assert!(
        matches!(v[0].status, Status::UnsealedTail { count: 6, .. }),
        "{:?}",
        v[0]
    );
    assert!(
        v[0].notes.iter().any(|n| n.contains("cut-off line")),
        "{:?}",
        v[0].notes
    );
}

#[test]
fn a_record_of_another_chain_is_caught() {
    let mut l = chain(4);
    l[2] = String::from_utf8(l[2].clone())
        .unwrap()
        .replace("\"instance\":\"t\"", "\"instance\":\"u\"")
        .into_bytes();
    assert!(matches!(problem(&l), Problem::ForeignRecord { .. }));
    let mut l = chain(3);
    l[1] = b"not json".to_vec();
    assert!(matches!(problem(&l), Problem::NotARecord { .. }));
    assert_eq!(hex(&GENESIS).len(), 64);
}

/// A witness of record `seq` of `lines` (its hash), as the HSM holds it.
fn witnessed(lines: &[Vec<u8>], seq: u64) -> Witnesses {
    let w = Witness {
        instance: "t".into(),
        seq,
        hash: lines.get(seq as usize).map_or([5; 32], |l| hash_line(l)),
        time: "2026-01-01T00:00:00.000000Z".into(),
    };
    Witnesses {
        newest: BTreeMap::from([("t".to_string(), w)]),
        ..Witnesses::default()
    }
}

fn verdict_with(lines: &[Vec<u8>], w: &Witnesses) -> InstanceVerdict {
    let mut v = verify(&[file(lines)], &[], &mut NoSeals, w).unwrap();
    assert_eq!(v.len(), 1);
    v.remove(0)
}

#[test]
fn a_trail_cut_back_before_the_witnessed_seal_is_tampered() {
    let l = chain(8);
    // Reaching the witnessed record (or past it: a later range is fine).
    let v = verdict_with(&l, &witnessed(&l, 7));
    assert!(matches!(v.status, Status::UnsealedTail { .. }), "{v:?}");
    let v = verdict_with(&l, &witnessed(&l, 3));
    assert!(matches!(v.status, Status::UnsealedTail { .. }), "{v:?}");
    // Cut after seq 4: the records up to the witnessed 7 are gone.
    let w = witnessed(&l, 7);
    let v = verdict_with(&l[..5], &w);
    match &v.status {
        Status::Tampered(p @ Problem::Truncated { witnessed: 7, .. }) => {
            assert_eq!(p.record().seq, Some(4), "{p}")
        }
        other => panic!("{other:?}"),
    }
    // As a declared range of the trail, only a note.
    let partial = Witnesses {
        partial: true,
        ..w.clone()
    };
    let v = verdict_with(&l[..5], &partial);
    assert!(matches!(v.status, Status::UnsealedTail { .. }), "{v:?}");
    assert!(
        v.notes.iter().any(|n| n.contains("was cut")),
        "{:?}",
        v.notes
    );
    // Another record where the witnessed one was: cut back, then
    // rewritten from before it (here: the HSM witnessed other bytes).
    let mut other = chain(8);
    other[7] = l[6].clone();
    let v = verdict_with(&l, &witnessed(&other, 7));
    assert!(
        matches!(&v.status, Status::Tampered(Problem::WitnessMismatch { record, .. }) if record.seq == Some(7)),
        "{v:?}"
    );
}

#[test]
fn a_run_that_started_on_cut_files_needs_the_missing_records() {
    use crate::record::{render, StartBody};
    // The files ended at seq 2 (next 3); the HSM had witnessed seq 5:
    // the new run goes on at 6, linked to the witnessed record.
    let old = chain(6);
    let start = render(
        6,
        "start",
        "2026-01-01T00:00:01.000000Z",
        "t",
        &StartBody {
            version: "test",
            pid: 1,
            on_failure: "refuse",
            unsealed_before: 0,
            witness_seq: Some(5),
            files_next_seq: Some(3),
            tail_from: None,
            tail_to: None,
            witness_unchecked: None,
        },
        &hash_line(&old[5]),
    );
    let new_run = file(std::slice::from_ref(&start));
    let mut kept = file(&old[..3]);
    kept.name = "t0.jsonl".into();
    let none = Witnesses::default();
    // What the directory holds: the gap is named...
    let v = verify(&[kept, new_run], &[], &mut NoSeals, &none).unwrap();
    assert!(
        matches!(
            &v[0].status,
            Status::Tampered(Problem::Deleted { from: 3, to: 5, .. })
        ),
        "{:?}",
        v[0]
    );
    // ...also when every older file is gone too...
    let v = verify(
        &[file(std::slice::from_ref(&start))],
        &[],
        &mut NoSeals,
        &none,
    )
    .unwrap();
    assert!(
        matches!(&v[0].status, Status::Tampered(p @ Problem::Cut { witnessed: 5, files_next: 3, .. }) if p.to_string().contains("seq 3 to 5 were removed")),
        "{:?}",
        v[0]
    );
    // ...and with the archive given, the chain is whole.
    let mut all = old.clone();
    all.push(start);
    let v = verify(&[file(&all)], &[], &mut NoSeals, &none).unwrap();
    assert!(
        matches!(v[0].status, Status::UnsealedTail { .. }),
        "{:?}",
        v[0]
    );
}

#[test]
fn the_configured_instance_without_files_is_gone() {
    let l = chain(3);
    let mut w = witnessed(&l, 2);
    w.expect = Some(("t".into(), "/var/lib/xks-proxy/audit".into()));
    let v = verify(&[], &[], &mut NoSeals, &w).unwrap();
    assert!(
        matches!(&v[0].status, Status::Tampered(p @ Problem::Truncated { .. }) if p.to_string().contains("no file of this instance")),
        "{v:?}"
    );
    // Another instance's witness (another host on the token) is not ours.
    w.expect = Some(("u".into(), "/var/lib/xks-proxy/audit".into()));
    assert!(verify(&[], &[], &mut NoSeals, &w).unwrap().is_empty());
}
