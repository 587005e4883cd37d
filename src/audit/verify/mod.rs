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
//!
//! Inside: [`problem`] (what is wrong and its text), `verdict` (a chain's
//! status, and the [`SealCheck`] seam), `walk` (the pure chain walk),
//! `witness_check` (the chain against the HSM's witness), [`token`] (seals
//! and witnesses in the HSM).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::audit::record::{hash_line, unhex, Header};

pub mod problem;
pub mod token;
mod verdict;
mod walk;
mod witness_check;

pub use problem::{Place, Problem};
pub use token::TokenVerifier;
pub use verdict::{InstanceVerdict, SealCheck, Status, Witnesses};
use walk::{to_hash, walk, Kind, Rec, SealInfo, Tails};
use witness_check::against_witness;

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
mod tests;
