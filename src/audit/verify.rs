//! `xks-proxy audit verify`: is the trail what the proxy wrote?
//!
//! Files are grouped by instance (each instance has its own chain) and put
//! in chain order by the `seq` of their first record, whatever their names
//! or the order they were given in. Then every link is checked (each
//! record's `prev` is the SHA-256 of the line before it, and `seq` counts
//! up by one) and every seal's HMAC is checked *in the HSM* with the seal
//! key, which must be one that cannot leave the token.
//!
//! At the first broken link the verifier says what happened and names the
//! record, looking at the records around it:
//!
//! - **modified**: record N's bytes no longer hash to what record N+1
//!   carries;
//! - **deleted**: `seq` jumps (N, then N+3) and the missing ones are
//!   nowhere in the files;
//! - **inserted**: a record no other record links to, with the chain
//!   going on around it (or a second copy of a record);
//! - **reordered**: the missing `seq` turns up later in the files;
//! - **rewritten**: the links are all right but a seal does not verify —
//!   someone changed, removed or added records and recomputed every link
//!   after, which anyone can; the seal's HMAC they could not. The verifier
//!   then names the range between the last good seal and this one: which
//!   record in it changed cannot be known.
//!
//! **Truncation.** A trail that ends with anything but a seal has an
//! *unsealed tail*: records nothing has proven yet (the proxy is still
//! running, it crashed, or the end was cut off and possibly changed). That
//! is its own verdict (exit code 4), distinct from tampering (3). A trail
//! cut exactly after a seal cannot be told from one whose instance simply
//! stopped there, except that a clean stop ends with `stop` and a seal; the
//! verifier says which it is.
//!
//! **The witness.** The HSM also holds which seal of each chain is the
//! newest (see [`super::witness`]), read before the files. A trail that
//! ends before that seal, or holds another record in its place, was cut
//! back: tampered, unless the files are declared a range of the trail
//! (`--partial`), when it is a note. A run that started on files already
//! cut says so in its `start` record; the records it found missing must be
//! in the files given.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use super::record::{hash_line, seal_input, unhex, Hash, Header, GENESIS};
use super::witness::{Witness, APPLICATION};
use crate::hsm::config::HsmConfig;
use crate::hsm::{HmacKey, Token};

/// Checks a seal's MAC in the HSM.
pub trait SealCheck {
    /// Whether `mac` is the HMAC-SHA256 of `input` under the seal key
    /// `key`. `Err` when it cannot be checked at all (no HSM, no key).
    fn check(&mut self, key: &str, input: &[u8], mac: &[u8]) -> Result<bool, String>;
}

/// One file to verify.
pub struct TrailFile {
    pub name: String,
    pub bytes: Vec<u8>,
}

impl TrailFile {
    pub fn read(path: &std::path::Path) -> std::io::Result<TrailFile> {
        Ok(TrailFile {
            name: path.display().to_string(),
            bytes: std::fs::read(path)?,
        })
    }
}

/// Where a record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub file: String,
    /// 1-based.
    pub line: usize,
    pub seq: Option<u64>,
}

impl fmt::Display for Place {
    // File names are shown escaped: whoever can write the directory chose them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = crate::spec::text::printable(&self.file);
        match self.seq {
            Some(s) => write!(f, "seq {s} ({file} line {})", self.line),
            None => write!(f, "{file} line {}", self.line),
        }
    }
}

/// What is wrong with a trail: the first problem found, naming the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    NotARecord {
        at: Place,
    },
    ForeignRecord {
        at: Place,
        instance: String,
    },
    BadGenesis {
        at: Place,
    },
    Modified {
        record: Place,
        next: Place,
    },
    Deleted {
        from: u64,
        to: u64,
        after: Place,
        before: Place,
    },
    Inserted {
        record: Place,
    },
    Duplicate {
        record: Place,
        first: Place,
    },
    Reordered {
        record: Place,
        after: Place,
    },
    SealInvalid {
        seal: Place,
        since: Option<Place>,
        counted: u64,
        claimed: u64,
    },
    SealKey {
        seal: Place,
        key: String,
    },
    SealMalformed {
        seal: Place,
    },
    /// The files end before the seal the HSM witnessed (`last`: their
    /// last record; no seq when there is none).
    Truncated {
        last: Place,
        witnessed: u64,
        time: String,
    },
    /// Another record where the HSM witnessed the newest seal.
    WitnessMismatch {
        record: Place,
        time: String,
    },
    /// A run started on files that ended before the witnessed seal, and the
    /// records it found missing are not in the files given.
    Cut {
        start: Place,
        witnessed: u64,
        files_next: u64,
    },
    /// Records after a clean stop's final seal that are not a new run:
    /// written while the proxy was stopped (`first` of `count`).
    AfterFinalSeal {
        first: Place,
        seal: Place,
        count: u64,
    },
}

impl Problem {
    /// The record the problem is named after.
    pub fn record(&self) -> &Place {
        match self {
            Problem::NotARecord { at }
            | Problem::ForeignRecord { at, .. }
            | Problem::BadGenesis { at } => at,
            Problem::Modified { record, .. }
            | Problem::Inserted { record }
            | Problem::Duplicate { record, .. }
            | Problem::Reordered { record, .. } => record,
            Problem::Deleted { before, .. } => before,
            Problem::SealInvalid { seal, .. }
            | Problem::SealKey { seal, .. }
            | Problem::SealMalformed { seal } => seal,
            Problem::Truncated { last, .. } => last,
            Problem::WitnessMismatch { record, .. } => record,
            Problem::Cut { start, .. } => start,
            Problem::AfterFinalSeal { first, .. } => first,
        }
    }

    /// A short name of the kind of problem (for `--json`).
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::NotARecord { .. } => "not-a-record",
            Problem::ForeignRecord { .. } => "foreign-record",
            Problem::BadGenesis { .. } => "bad-genesis",
            Problem::Modified { .. } => "modified",
            Problem::Deleted { .. } => "deleted",
            Problem::Inserted { .. } => "inserted",
            Problem::Duplicate { .. } => "duplicate",
            Problem::Reordered { .. } => "reordered",
            Problem::SealInvalid { .. } => "seal-invalid",
            Problem::SealKey { .. } => "seal-key",
            Problem::SealMalformed { .. } => "seal-malformed",
            Problem::Truncated { .. } => "truncated",
            Problem::WitnessMismatch { .. } => "witness-mismatch",
            Problem::Cut { .. } => "cut-while-stopped",
            Problem::AfterFinalSeal { .. } => "after-final-seal",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotARecord { at } => write!(f, "{at} is not an audit record"),
            Problem::ForeignRecord { at, instance } => write!(
                f,
                "{at} belongs to instance '{}', not to the chain of the file it is in \
                 (inserted from another trail)",
                crate::spec::text::printable(instance)
            ),
            Problem::BadGenesis { at } => write!(
                f,
                "{at} is the first record of the chain but does not start it (its prev is not \
                 all zeros)"
            ),
            Problem::Modified { record, next } => write!(
                f,
                "record {record} was modified: the next record, {next}, carries another hash \
                 for it (or that record's link was changed)"
            ),
            Problem::Deleted {
                from,
                to,
                after,
                before,
            } => {
                if from == to {
                    write!(f, "record seq {from} was deleted: it should come between {after} and {before}")
                } else {
                    write!(f, "records seq {from} to {to} were deleted: they should come between {after} and {before}")
                }
            }
            Problem::Inserted { record } => write!(
                f,
                "record {record} was inserted: no record links to it, and the chain goes on \
                 around it"
            ),
            Problem::Duplicate { record, first } => write!(
                f,
                "record {record} repeats the seq of {first}: it was inserted or copied"
            ),
            Problem::Reordered { record, after } => {
                write!(f, "record {record} is out of order: it comes after {after}")
            }
            Problem::SealInvalid {
                seal,
                since,
                counted,
                claimed,
            } => {
                let range = match since {
                    Some(s) => format!("after the seal {s}"),
                    None => "since the start of the given files".into(),
                };
                write!(
                    f,
                    "the seal {seal} does not verify in the HSM: records {range} up to it were \
                     changed, deleted or inserted and every link after the change recomputed"
                )?;
                if counted != claimed {
                    write!(
                        f,
                        " ({counted} records found where the seal counts {claimed})"
                    )?;
                }
                Ok(())
            }
            Problem::SealKey { seal, key } => write!(
                f,
                "the seal {seal} names the key '{key}', which is not a seal key being verified \
                 with (see --seal-key)"
            ),
            Problem::SealMalformed { seal } => {
                write!(f, "the seal {seal} lacks its count, key or HMAC")
            }
            Problem::Truncated {
                last,
                witnessed,
                time,
            } => match last.seq {
                Some(_) => write!(
                    f,
                    "the trail was cut: it ends at {last}, but the HSM witnessed a seal at seq \
                     {witnessed} ({time}); the records after {last} were removed"
                ),
                None => write!(
                    f,
                    "the trail is gone: no file of this instance in {}, but the HSM witnessed a \
                     seal at seq {witnessed} ({time})",
                    last.file
                ),
            },
            Problem::WitnessMismatch { record, time } => write!(
                f,
                "record {record} is not the seal the HSM witnessed there ({time}): the trail \
                 was cut back and rewritten from before it"
            ),
            Problem::Cut {
                start,
                witnessed,
                files_next,
            } => {
                if files_next <= witnessed {
                    write!(
                        f,
                        "records seq {files_next} to {witnessed} were removed while the instance \
                         was stopped: the HSM witnessed the seal at seq {witnessed}, the run that \
                         started at {start} found the files ending before seq {files_next}, and \
                         those records are not in the files given"
                    )
                } else {
                    write!(
                        f,
                        "the seal at seq {witnessed} was replaced while the instance was stopped: \
                         the run that started at {start} found another record in its place, and \
                         the witnessed seal is not in the files given"
                    )
                }
            }
            Problem::AfterFinalSeal { first, seal, count } => write!(
                f,
                "{count} record(s) from {first} on follow the final seal of a clean stop \
                 ({seal}) and are not a new run: they were added while the instance was \
                 stopped"
            ),
        }
    }
}

/// The verdict on one instance's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Every link holds, every seal verifies, and the last record is a seal.
    Intact,
    /// Every link and seal holds, but records after the last seal are
    /// proven by nothing (see the module docs).
    UnsealedTail {
        from: Place,
        count: u64,
    },
    /// Every link and seal holds, but a run that ended without its final
    /// seal (a crash, a kill) left records after its last seal, and the
    /// next run went on from that seal: nothing proves those records, and
    /// nothing ever will (`from`: the first such range; `count`: records in
    /// all of them).
    Unproven {
        from: Place,
        count: u64,
    },
    Tampered(Problem),
}

/// What the HSM witnessed, to compare the files with (see the module
/// docs). The default: nothing witnessed.
#[derive(Debug, Clone, Default)]
pub struct Witnesses {
    /// The newest seal of each instance, read before the files.
    pub newest: BTreeMap<String, Witness>,
    /// The files are a range of the trail, not all of it: where they end
    /// says nothing, so an end before the witness is a note, not tampering.
    pub partial: bool,
    /// This instance's files were expected (the configured instance, when
    /// verifying the configured directory): with a witness and no file, the
    /// trail is gone. Other instances' witnesses without files belong to
    /// other hosts sharing the token.
    pub expect: Option<(String, String)>,
}

/// One instance's chain, verified.
#[derive(Debug, Clone)]
pub struct InstanceVerdict {
    pub instance: String,
    pub files: usize,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub seals_verified: u64,
    /// The newest verified seal: its seq and time.
    pub last_seal: Option<(u64, String)>,
    /// The trail ends with a clean stop (`stop`, then a seal).
    pub clean_stop: bool,
    /// The trail ends with its retirement (`retire`, then a seal): closed
    /// for good, its witness removed from the HSM.
    pub retired: bool,
    /// Records reported lost by `loss` records.
    pub lost: u64,
    pub status: Status,
    /// What a reader should know that is not tampering.
    pub notes: Vec<String>,
}

impl InstanceVerdict {
    /// The verdict on `files` files that hold no record of `instance`.
    fn without_records(
        instance: &str,
        files: usize,
        problem: Problem,
        note: Option<&str>,
    ) -> InstanceVerdict {
        InstanceVerdict {
            instance: instance.to_string(),
            files,
            records: 0,
            first_seq: None,
            last_seq: None,
            seals_verified: 0,
            last_seal: None,
            clean_stop: false,
            retired: false,
            lost: 0,
            status: Status::Tampered(problem),
            notes: note.map(str::to_string).into_iter().collect(),
        }
    }

    /// 0 intact, 4 unsealed tail, 5 unproven records of an earlier run,
    /// 3 tampered (the CLI's exit codes).
    pub fn exit_code(&self) -> u8 {
        match self.status {
            Status::Intact => 0,
            Status::UnsealedTail { .. } => 4,
            Status::Unproven { .. } => 5,
            Status::Tampered(_) => 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Seal,
    Stop,
    /// The first record of a file (a rotation, or a new run).
    File,
    /// The chain closed for good (`audit retire`).
    Retire,
    Loss,
    Other,
    /// Not a record at all.
    Bad,
}

/// Runs that left the previous run's records after its last seal out of
/// the chain: the `start` record's seq → (first, last) seq left out.
type Tails = BTreeMap<u64, (u64, u64)>;

/// The records `l[from..i]` when they are exactly the range a new run
/// left out (`l[i]` its `file` record, `l[i + 1]` its `start` record
/// declaring the range, and `l[i]` linked to the seal before the range).
fn left_out(l: &[Rec], i: usize, tails: &Tails) -> Option<usize> {
    let c = &l[i];
    let start = l.get(i + 1)?;
    let &(from, to) = tails.get(&start.seq)?;
    let n = usize::try_from(to.checked_sub(from)? + 1).ok()?;
    let first = i.checked_sub(n)?;
    let seal = l.get(first.checked_sub(1)?)?;
    let range_ok = l[first].seq == from
        && l[i - 1].seq == to
        && l[first..i].iter().all(|r| r.kind != Kind::Bad);
    (c.kind == Kind::File
        && start.seq == c.seq + 1
        && c.seq == to + 1
        && seal.kind == Kind::Seal
        && c.prev == Some(seal.hash)
        && range_ok)
        .then_some(first)
}

/// Whether records after the seal `l[seal]` can only have been added while
/// the instance was stopped: the seal closes a clean stop (`stop`, then
/// the seal), and what follows is not a new run's `file` record.
fn after_final_seal(l: &[Rec], seal: usize) -> bool {
    seal > 0
        && matches!(l[seal - 1].kind, Kind::Stop | Kind::Retire)
        && l.get(seal + 1).is_some_and(|r| r.kind != Kind::File)
}

/// What the walk keeps of a record (about 100 bytes).
struct Rec {
    file: usize,
    line: usize,
    seq: u64,
    kind: Kind,
    hash: Hash,
    prev: Option<Hash>,
    /// The index into `seals` for a seal, the lost count for a loss.
    extra: u64,
}

/// A seal's fields (kept apart: there are few).
struct SealInfo {
    time: String,
    count: Option<u64>,
    key: Option<String>,
    hmac: Option<Vec<u8>>,
}

fn to_hash(s: &str) -> Option<Hash> {
    unhex(s).and_then(|v| v.try_into().ok())
}

/// Verifies the chains in `files`. `keys` are the seal key labels seals
/// may name; `check` verifies their MACs in the HSM. `Err` when a seal
/// could not be checked at all.
pub fn verify(
    files: &[TrailFile],
    keys: &[String],
    check: &mut dyn SealCheck,
    witnesses: &Witnesses,
) -> Result<Vec<InstanceVerdict>, String> {
    // Per instance: its records, file by file.
    let mut by_instance: BTreeMap<String, Vec<(u64, Vec<Rec>)>> = BTreeMap::new();
    let mut seals: Vec<SealInfo> = Vec::new();
    let mut early: BTreeMap<String, Problem> = BTreeMap::new();
    let mut notes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Per instance: runs that started on cut files (see the module docs).
    let mut cuts: BTreeMap<String, Vec<(Place, u64, u64)>> = BTreeMap::new();
    // Per instance: runs that went on from the previous run's last seal,
    // leaving the records after it out of the chain: (the start record's
    // seq, first and last seq left out).
    let mut tails: BTreeMap<String, Tails> = BTreeMap::new();
    let mut orphans = Vec::new();
    for (fi, f) in files.iter().enumerate() {
        let mut pieces: Vec<&[u8]> = f.bytes.split(|b| *b == b'\n').collect();
        let torn = pieces.pop().filter(|p| !p.is_empty());
        let mut instance: Option<String> = None;
        let mut recs = Vec::with_capacity(pieces.len());
        for (li, line) in pieces.iter().enumerate() {
            let place = || Place {
                file: f.name.clone(),
                line: li + 1,
                seq: None,
            };
            let rec = match serde_json::from_slice::<Header>(line) {
                Ok(h) if h.v == 1 => {
                    match &instance {
                        None => instance = Some(h.instance.clone()),
                        Some(i) if *i != h.instance => {
                            early.entry(i.clone()).or_insert(Problem::ForeignRecord {
                                at: Place {
                                    seq: Some(h.seq),
                                    ..place()
                                },
                                instance: h.instance.clone(),
                            });
                        }
                        Some(_) => {}
                    }
                    let kind = match h.kind.as_str() {
                        "seal" => Kind::Seal,
                        "stop" => Kind::Stop,
                        "file" => Kind::File,
                        "retire" => Kind::Retire,
                        "loss" => Kind::Loss,
                        _ => Kind::Other,
                    };
                    let extra = match kind {
                        Kind::Seal => {
                            seals.push(SealInfo {
                                time: h.time.clone(),
                                count: h.count,
                                key: h.key.clone(),
                                hmac: h.hmac.as_deref().and_then(unhex),
                            });
                            (seals.len() - 1) as u64
                        }
                        Kind::Loss => h.count.unwrap_or(0),
                        _ => 0,
                    };
                    if let (true, Some(w), Some(n)) =
                        (h.kind == "start", h.witness_seq, h.files_next_seq)
                    {
                        let at = Place {
                            seq: Some(h.seq),
                            ..place()
                        };
                        cuts.entry(h.instance.clone()).or_default().push((at, w, n));
                    }
                    if let (true, Some(from), Some(to)) =
                        (h.kind == "start", h.tail_from, h.tail_to)
                    {
                        tails
                            .entry(h.instance.clone())
                            .or_default()
                            .insert(h.seq, (from, to));
                    }
                    if h.kind == "start" && h.witness_unchecked == Some(true) {
                        notes.entry(h.instance.clone()).or_default().push(format!(
                            "the run that started at seq {} ({} line {}) could not read the HSM's \
                             witness and did not check the files against it (audit.on_failure = \
                             \"continue\"): a cut made before it would show only as that run's \
                             witness being refused",
                            h.seq,
                            crate::spec::text::printable(&f.name),
                            li + 1
                        ));
                    }
                    if h.kind == "start" && h.unsealed_before.is_some_and(|n| n > 0) {
                        notes.entry(h.instance.clone()).or_default().push(format!(
                            "the run that started at seq {} ({} line {}) found {} record(s) of \
                             the previous run after its last seal (a crash or kill); they are \
                             proven only from this run's first seal on",
                            h.seq,
                            crate::spec::text::printable(&f.name),
                            li + 1,
                            h.unsealed_before.unwrap_or(0)
                        ));
                    }
                    Rec {
                        file: fi,
                        line: li + 1,
                        seq: h.seq,
                        kind,
                        hash: hash_line(line),
                        prev: to_hash(&h.prev),
                        extra,
                    }
                }
                _ => Rec {
                    file: fi,
                    line: li + 1,
                    seq: u64::MAX,
                    kind: Kind::Bad,
                    hash: hash_line(line),
                    prev: None,
                    extra: 0,
                },
            };
            recs.push(rec);
        }
        match instance {
            Some(i) => {
                if let Some(t) = torn {
                    notes.entry(i.clone()).or_default().push(format!(
                        "{} ends with a cut-off line ({} bytes, no line break): a write the \
                         proxy did not finish (a crash); it is not part of the chain",
                        crate::spec::text::printable(&f.name),
                        t.len()
                    ));
                }
                let first = recs
                    .iter()
                    .find(|r| r.kind != Kind::Bad)
                    .map_or(0, |r| r.seq);
                by_instance.entry(i).or_default().push((first, recs));
            }
            None => orphans.push(f.name.clone()),
        }
    }

    let mut out = Vec::new();
    for (instance, mut parts) in by_instance {
        parts.sort_by_key(|(first, _)| *first);
        let files_n = parts.len();
        let l: Vec<Rec> = parts.into_iter().flat_map(|(_, r)| r).collect();
        let mut v = InstanceVerdict {
            instance: instance.clone(),
            files: files_n,
            records: l.iter().filter(|r| r.kind != Kind::Bad).count() as u64,
            first_seq: l.iter().find(|r| r.kind != Kind::Bad).map(|r| r.seq),
            last_seq: l.iter().rev().find(|r| r.kind != Kind::Bad).map(|r| r.seq),
            seals_verified: 0,
            last_seal: None,
            clean_stop: false,
            retired: false,
            lost: l
                .iter()
                .filter(|r| r.kind == Kind::Loss)
                .map(|r| r.extra)
                .sum(),
            status: Status::Intact,
            notes: notes.remove(&instance).unwrap_or_default(),
        };
        let place = |r: &Rec| Place {
            file: files[r.file].name.clone(),
            line: r.line,
            seq: (r.kind != Kind::Bad).then_some(r.seq),
        };
        if let Some(p) = early.remove(&instance) {
            v.status = Status::Tampered(p);
            out.push(v);
            continue;
        }
        let tails = tails.remove(&instance).unwrap_or_default();
        v.status = walk(&instance, &l, &seals, &tails, keys, check, &place, &mut v)?;
        if !matches!(v.status, Status::Tampered(_)) {
            if let Some(p) = against_witness(
                &l,
                &place,
                witnesses.newest.get(&instance),
                cuts.remove(&instance).unwrap_or_default(),
                witnesses.partial,
                &mut v.notes,
            ) {
                v.status = Status::Tampered(p);
            }
        }
        if v.first_seq.is_some_and(|s| s > 0) {
            v.notes.push(format!(
                "the chain starts at seq {}: the files before it were not given (or are gone); \
                 records from there on are still proven by the seals after them",
                v.first_seq.unwrap_or(0)
            ));
        }
        if v.lost > 0 {
            v.notes.push(format!(
                "{} record(s) were lost when the trail could not take them (audit.on_failure = \
                 \"continue\", or requests that never authenticated); `loss` records mark where",
                v.lost
            ));
        }
        if v.status == Status::Intact && !v.clean_stop {
            v.notes.push(
                "the trail ends at a periodic seal, not at a clean stop: the instance is still \
                 running, was killed, or records after this seal were deleted (see docs/audit.md)"
                    .into(),
            );
        }
        out.push(v);
    }
    if let Some((instance, dir)) = &witnesses.expect {
        let seen = out
            .iter()
            .any(|v: &InstanceVerdict| v.instance == *instance);
        if let (false, false, Some(w)) = (seen, witnesses.partial, witnesses.newest.get(instance)) {
            let gone = Problem::Truncated {
                last: Place {
                    file: dir.clone(),
                    line: 0,
                    seq: None,
                },
                witnessed: w.seq,
                time: w.time.clone(),
            };
            out.push(InstanceVerdict::without_records(instance, 0, gone, None));
        }
    }
    for name in orphans {
        let at = Place {
            file: name,
            line: 1,
            seq: None,
        };
        let note = "this file holds no audit record";
        out.push(InstanceVerdict::without_records(
            "?",
            1,
            Problem::NotARecord { at },
            Some(note),
        ));
    }
    Ok(out)
}

/// Walks one instance's records in chain order: links, seals, the tail.
#[allow(clippy::too_many_arguments)]
fn walk(
    instance: &str,
    l: &[Rec],
    seals: &[SealInfo],
    tails: &Tails,
    keys: &[String],
    check: &mut dyn SealCheck,
    place: &dyn Fn(&Rec) -> Place,
    v: &mut InstanceVerdict,
) -> Result<Status, String> {
    let mut last_seal: Option<usize> = None;
    let mut since_seal = 0u64;
    // Records left out by a run that went on from the last seal before them.
    let mut unproven: Option<(Place, u64)> = None;
    for (i, c) in l.iter().enumerate() {
        if c.kind == Kind::Bad {
            return Ok(Status::Tampered(Problem::NotARecord { at: place(c) }));
        }
        if i == 0 {
            if c.seq == 0 && c.prev != Some(GENESIS) {
                return Ok(Status::Tampered(Problem::BadGenesis { at: place(c) }));
            }
        } else {
            let p = &l[i - 1];
            if !(c.seq == p.seq.wrapping_add(1) && c.prev == Some(p.hash)) {
                let Some(first) = left_out(l, i, tails) else {
                    return Ok(Status::Tampered(classify(l, i, place)));
                };
                // The new run went on from the seal before `first`: what
                // lies between was never sealed, and never will be.
                let count = (i - first) as u64;
                if after_final_seal(l, first - 1) {
                    return Ok(Status::Tampered(Problem::AfterFinalSeal {
                        first: place(&l[first]),
                        seal: place(&l[first - 1]),
                        count,
                    }));
                }
                match &mut unproven {
                    Some((_, n)) => *n += count,
                    None => unproven = Some((place(&l[first]), count)),
                }
                since_seal = 0;
            }
        }
        if c.kind != Kind::Seal {
            since_seal += 1;
            continue;
        }
        let s = &seals[c.extra as usize];
        let (Some(count), Some(key), Some(mac), Some(head)) =
            (s.count, s.key.as_deref(), s.hmac.as_deref(), c.prev)
        else {
            return Ok(Status::Tampered(Problem::SealMalformed { seal: place(c) }));
        };
        if !keys.iter().any(|k| k == key) {
            return Ok(Status::Tampered(Problem::SealKey {
                seal: place(c),
                key: key.to_string(),
            }));
        }
        let input = seal_input(instance, c.seq, &s.time, count, key, &head);
        if !check.check(key, &input, mac)? {
            return Ok(Status::Tampered(Problem::SealInvalid {
                seal: place(c),
                since: last_seal.map(|j| place(&l[j])),
                counted: since_seal,
                claimed: count,
            }));
        }
        // The MAC covers the writer's own count; a difference here is the
        // writer's (a restart that could not count the whole previous
        // tail, or files before the first one given), not tampering.
        if count != since_seal && last_seal.is_some() {
            v.notes.push(format!(
                "the seal {} counts {count} records since the previous seal; {since_seal} were \
                 found (the previous run's tail was longer than a restart reads)",
                place(c)
            ));
        }
        v.seals_verified += 1;
        v.last_seal = Some((c.seq, s.time.clone()));
        v.clean_stop = i > 0 && matches!(l[i - 1].kind, Kind::Stop | Kind::Retire);
        v.retired = i > 0 && l[i - 1].kind == Kind::Retire;
        last_seal = Some(i);
        since_seal = 0;
    }
    let tail_from = last_seal.map_or(0, |j| j + 1);
    if tail_from < l.len() {
        v.clean_stop = false;
        v.retired = false;
        let count = (l.len() - tail_from) as u64;
        if let Some(seal) = last_seal.filter(|&j| after_final_seal(l, j)) {
            return Ok(Status::Tampered(Problem::AfterFinalSeal {
                first: place(&l[tail_from]),
                seal: place(&l[seal]),
                count,
            }));
        }
        if unproven.is_none() {
            return Ok(Status::UnsealedTail {
                from: place(&l[tail_from]),
                count,
            });
        }
        v.notes.push(format!(
            "{count} record(s) from {} on come after the last seal (the proxy is running, or \
             crashed)",
            place(&l[tail_from])
        ));
    }
    Ok(match unproven {
        Some((from, count)) => Status::Unproven { from, count },
        None => Status::Intact,
    })
}

/// The chain `l` (whose links and seals hold) against what the HSM
/// witnessed: its newest seal `w`, and the `cuts` runs found at their
/// start (place, witnessed seq, seq the files went on with). A problem
/// when the files lack what was witnessed; with `partial` files, a note.
fn against_witness(
    l: &[Rec],
    place: &dyn Fn(&Rec) -> Place,
    w: Option<&Witness>,
    cuts: Vec<(Place, u64, u64)>,
    partial: bool,
    notes: &mut Vec<String>,
) -> Option<Problem> {
    let at_seq = |seq: u64| l.iter().find(|r| r.kind != Kind::Bad && r.seq == seq);
    for (start, witnessed, files_next) in cuts {
        if at_seq(witnessed).is_some() {
            // The missing records were given: the links decided.
            continue;
        }
        let p = Problem::Cut {
            start,
            witnessed,
            files_next,
        };
        if !partial {
            return Some(p);
        }
        notes.push(format!(
            "{p} (if these files are the whole trail, it was tampered with)"
        ));
    }
    let w = w?;
    let last = l.iter().rev().find(|r| r.kind != Kind::Bad)?;
    match at_seq(w.seq) {
        Some(r) if r.hash == w.hash => None,
        Some(r) => Some(Problem::WitnessMismatch {
            record: place(r),
            time: w.time.clone(),
        }),
        None if last.seq < w.seq => {
            let p = Problem::Truncated {
                last: place(last),
                witnessed: w.seq,
                time: w.time.clone(),
            };
            if !partial {
                return Some(p);
            }
            notes.push(format!(
                "{p} (if these files are the whole trail, it was tampered with)"
            ));
            None
        }
        // The witnessed seal is older than the files given: a later range.
        None => None,
    }
}

/// What broke the link between `l[i-1]` and `l[i]`; see the module docs.
fn classify(l: &[Rec], i: usize, place: &dyn Fn(&Rec) -> Place) -> Problem {
    let (p, c) = (&l[i - 1], &l[i]);
    let expect = p.seq.wrapping_add(1);
    let linked = |h: &Hash| l.iter().any(|r| r.prev.as_ref() == Some(h));
    let next = l.get(i + 1);
    if c.hash == p.hash {
        return Problem::Duplicate {
            record: place(c),
            first: place(p),
        };
    }
    // The chain goes on from p past c, and nothing links to c.
    if next.is_some_and(|n| n.seq == expect && n.prev == Some(p.hash)) && !linked(&c.hash) {
        return Problem::Inserted { record: place(c) };
    }
    if c.seq > expect && c.seq != u64::MAX {
        if let Some(j) = (i + 1..l.len()).find(|&j| l[j].seq == expect) {
            return Problem::Reordered {
                record: place(&l[j]),
                after: place(c),
            };
        }
        return Problem::Deleted {
            from: expect,
            to: c.seq - 1,
            after: place(p),
            before: place(c),
        };
    }
    if c.seq <= p.seq {
        // c links to the record before p: p is the stranger.
        if i >= 2
            && c.seq == l[i - 2].seq.wrapping_add(1)
            && c.prev == Some(l[i - 2].hash)
            && !linked(&p.hash)
        {
            return Problem::Inserted { record: place(p) };
        }
        if let Some(k) = (0..i).find(|&k| l[k].seq == c.seq) {
            return Problem::Duplicate {
                record: place(c),
                first: place(&l[k]),
            };
        }
        return Problem::Reordered {
            record: place(c),
            after: place(p),
        };
    }
    Problem::Modified {
        record: place(p),
        next: place(c),
    }
}

/// Checks seals with the seal key in the configured key managers (the
/// first that holds the key and says yes). Tokens are opened on first use.
pub struct TokenVerifier {
    hsm: HsmConfig,
    tokens: Vec<Option<Result<Token, String>>>,
    /// Per (key manager, label): the key, once found and checked.
    keys: BTreeMap<(usize, String), Option<HmacKey>>,
}

impl TokenVerifier {
    pub fn new(hsm: &HsmConfig) -> TokenVerifier {
        TokenVerifier {
            hsm: hsm.clone(),
            tokens: hsm.backends.iter().map(|_| None).collect(),
            keys: BTreeMap::new(),
        }
    }

    /// The newest witness of each instance among the configured key
    /// managers (see [`super::witness`]). An error when none could be read.
    pub fn witnesses(&mut self) -> Result<BTreeMap<String, Witness>, String> {
        let mut errors = Vec::new();
        let mut read = false;
        let mut copies = Vec::new();
        for i in 0..self.hsm.backends.len() {
            let markers = match open_token(&mut self.tokens, &self.hsm, i) {
                Ok(t) => t.markers(APPLICATION).map_err(|e| e.to_string()),
                Err(e) => Err(e.clone()),
            };
            match markers {
                Ok(markers) => {
                    read = true;
                    copies.extend(
                        markers
                            .iter()
                            .filter_map(|m| Witness::parse(&m.label, &m.value)),
                    );
                }
                Err(e) => errors.push(e),
            }
        }
        if !read {
            return Err(format!(
                "cannot read the audit witnesses from the key managers: {}",
                errors.join("; ")
            ));
        }
        Ok(Witness::newest_per_instance(copies))
    }
}

/// Key manager `i`'s token, opened on first use.
fn open_token<'a>(
    tokens: &'a mut [Option<Result<Token, String>>],
    hsm: &HsmConfig,
    i: usize,
) -> &'a Result<Token, String> {
    tokens[i].get_or_insert_with(|| Token::open(hsm, &hsm.backends[i]).map_err(|e| e.to_string()))
}

impl SealCheck for TokenVerifier {
    fn check(&mut self, key: &str, input: &[u8], mac: &[u8]) -> Result<bool, String> {
        let mut errors = Vec::new();
        let mut holders = 0;
        for i in 0..self.hsm.backends.len() {
            let token = match open_token(&mut self.tokens, &self.hsm, i) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(e.clone());
                    continue;
                }
            };
            let k = match self.keys.get(&(i, key.to_string())) {
                Some(k) => *k,
                None => {
                    let found = token.hmac_key(key).map_err(|e| e.to_string())?;
                    if let Some(k) = found {
                        if !k.is_protected() {
                            return Err(format!(
                                "the seal key '{key}' in key manager {} can leave the token \
                                 (extractable, not sensitive, or not generated in the token): a seal made with it proves \
                                 nothing",
                                token.ekm_info().id
                            ));
                        }
                    }
                    self.keys.insert((i, key.to_string()), found);
                    found
                }
            };
            let Some(k) = k else { continue };
            holders += 1;
            if token
                .verify_hmac(&k, input, mac)
                .map_err(|e| e.to_string())?
            {
                return Ok(true);
            }
        }
        if holders == 0 {
            return Err(if errors.is_empty() {
                format!("no configured key manager holds the seal key '{key}'")
            } else {
                format!("cannot open the key managers: {}", errors.join("; "))
            });
        }
        Ok(false)
    }
}

/// The trail files under `paths` (files as given; directories: their
/// `*.jsonl` files).
pub fn expand(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "jsonl") && f.is_file())
                .collect();
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{hex, render, RequestRecord};

    /// Seals need the HSM; these tests check the chain alone.
    struct NoSeals;
    impl SealCheck for NoSeals {
        fn check(&mut self, _: &str, _: &[u8], _: &[u8]) -> Result<bool, String> {
            Err("no seals in this test".into())
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

    fn file(lines: &[Vec<u8>]) -> TrailFile {
        let mut bytes = Vec::new();
        for l in lines {
            bytes.extend_from_slice(l);
            bytes.push(b'\n');
        }
        TrailFile {
            name: "t.jsonl".into(),
            bytes,
        }
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
        fn check(&mut self, _: &str, _: &[u8], _: &[u8]) -> Result<bool, String> {
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
            use crate::audit::record::SealBody;
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
            use crate::audit::record::StopBody;
            self.push("stop", &StopBody { reason: "test" })
        }

        /// A new run as the writer starts one: its `file` record links to
        /// `from` (a line's hash), the `start` record names the range left
        /// out, if any.
        fn new_run(&mut self, from: Hash, left_out: Option<(u64, u64)>) -> &mut Self {
            use crate::audit::record::{FileBody, StartBody};
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
        let mut second = file(&l[3..]);
        second.name = "a-second.jsonl".into();
        second.bytes.extend_from_slice(b"{\"v\":1,\"seq\"");
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
        use crate::audit::record::{render, StartBody};
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
}
