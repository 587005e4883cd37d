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
//! **Bounded memory, one pass.** Each file is opened once to learn its
//! instance and first seq (one line), then each chain is read once, record
//! by record, in chain order: a trail of any size is verified in a few
//! hundred kilobytes (see `walk`). Only a broken link costs one more read
//! of that chain, to say what broke it. Compressed files (`.jsonl.gz`) are
//! read as they are.
//!
//! Inside: [`problem`] (what is wrong and its text), `verdict` (a chain's
//! status, and the [`SealCheck`] seam), `walk` (the chain walk, one record
//! at a time), `witness_check` (the chain against the HSM's witness),
//! [`token`] (seals and witnesses in the HSM).

use std::collections::BTreeMap;

use crate::record::{hash_line, unhex, Header};

pub mod problem;
pub mod token;
mod verdict;
mod walk;
mod witness_check;

pub use crate::files::{expand, TrailFile};
pub use problem::{Place, Problem};
pub use token::TokenVerifier;
pub use verdict::{InstanceVerdict, SealCheck, SealCheckError, Status, VerifyError, Witnesses};
use walk::{classify, to_hash, End, Facts, Kind, Rec, SealInfo, Walk};
use witness_check::{against_witness, Span};

/// Verifies the chains in `files`. `keys` are the seal key labels seals
/// may name; `check` verifies their MACs in the HSM. `Err` when a file
/// cannot be read or a seal cannot be checked at all.
pub fn verify(
    files: &[TrailFile],
    keys: &[String],
    check: &mut dyn SealCheck,
    witnesses: &Witnesses,
) -> Result<Vec<InstanceVerdict>, VerifyError> {
    // Each file's instance and first seq: its first record.
    let mut by_instance: BTreeMap<String, Vec<(u64, usize)>> = BTreeMap::new();
    let mut orphans = Vec::new();
    for (fi, f) in files.iter().enumerate() {
        match first_record(f)? {
            Some(h) => by_instance.entry(h.instance).or_default().push((h.seq, fi)),
            None => orphans.push(f.name.clone()),
        }
    }
    let mut out = Vec::new();
    for (instance, mut parts) in by_instance {
        parts.sort();
        let order: Vec<usize> = parts.into_iter().map(|(_, fi)| fi).collect();
        out.push(verify_chain(
            files, &order, &instance, keys, check, witnesses,
        )?);
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

fn read_error(f: &TrailFile) -> impl FnOnce(std::io::Error) -> VerifyError + '_ {
    |source| VerifyError::Read {
        file: xks_spec::text::printable(&f.name),
        source,
    }
}

/// The first record of `f`, if it holds one.
fn first_record(f: &TrailFile) -> Result<Option<Header>, VerifyError> {
    let mut lines = f.lines().map_err(read_error(f))?;
    while let Some(line) = lines.next().map_err(read_error(f))? {
        if !line.complete {
            break;
        }
        if let (Rec { kind, .. }, Some(h)) = parse(&line, 0, 0) {
            if kind != Kind::Bad {
                return Ok(Some(h));
            }
        }
    }
    Ok(None)
}

/// A line as the walk sees it, and its header when it is a record.
fn parse(line: &crate::files::Line<'_>, file: usize, index: u64) -> (Rec, Option<Header>) {
    let bad = Rec {
        index,
        file,
        line: line.number,
        seq: u64::MAX,
        kind: Kind::Bad,
        hash: hash_line(line.bytes),
        prev: None,
        seal: None,
        tail: None,
    };
    // A line cut at the reading limit is no record the proxy wrote.
    if line.len > line.bytes.len() {
        return (bad, None);
    }
    let h = match serde_json::from_slice::<Header>(line.bytes) {
        Ok(h) if h.v == 1 => h,
        _ => return (bad, None),
    };
    let kind = match h.kind.as_str() {
        "seal" => Kind::Seal,
        "stop" => Kind::Stop,
        "file" => Kind::File,
        "retire" => Kind::Retire,
        "loss" => Kind::Loss,
        _ => Kind::Other,
    };
    let rec = Rec {
        seq: h.seq,
        kind,
        prev: to_hash(&h.prev),
        seal: (kind == Kind::Seal).then(|| {
            Box::new(SealInfo {
                time: h.time.clone(),
                count: h.count,
                key: h.key.clone(),
                hmac: h.hmac.as_deref().and_then(unhex),
            })
        }),
        tail: match (h.kind.as_str(), h.tail_from, h.tail_to) {
            ("start", Some(from), Some(to)) => Some((from, to)),
            _ => None,
        },
        ..bad
    };
    (rec, Some(h))
}

/// What [`read_chain`] hands out (one at a time: the size difference
/// costs nothing).
#[allow(clippy::large_enum_variant)]
enum Item {
    /// A line as a record (`index` counting from 0 across the files), with
    /// its header when it is one.
    Line(Rec, Option<Header>),
    /// A file's cut-off last line: the file, its length.
    Torn(usize, usize),
}

/// Every line of the files in `order`, in order.
fn read_chain(
    files: &[TrailFile],
    order: &[usize],
    each: &mut dyn FnMut(Item) -> Result<(), SealCheckError>,
) -> Result<(), VerifyError> {
    let mut index = 0u64;
    for &fi in order {
        let f = &files[fi];
        let mut lines = f.lines().map_err(read_error(f))?;
        while let Some(line) = lines.next().map_err(read_error(f))? {
            if !line.complete {
                each(Item::Torn(fi, line.len))?;
                break;
            }
            let (rec, header) = parse(&line, fi, index);
            index += 1;
            each(Item::Line(rec, header))?;
        }
    }
    Ok(())
}

/// Verifies one instance's chain: the files in `order` (chain order).
fn verify_chain(
    files: &[TrailFile],
    order: &[usize],
    instance: &str,
    keys: &[String],
    check: &mut dyn SealCheck,
    witnesses: &Witnesses,
) -> Result<InstanceVerdict, VerifyError> {
    let place = |r: &Rec| Place {
        file: files[r.file].name.clone(),
        line: r.line,
        seq: (r.kind != Kind::Bad).then_some(r.seq),
    };
    let witness = witnesses.newest.get(instance);
    let mut v = InstanceVerdict::new(instance, order.len());
    // What the files say of themselves, before what the walk finds.
    let mut file_notes = Vec::new();
    // A record of another instance in this one's files.
    let mut foreign: Option<Problem> = None;
    // Runs that started on cut files (see the module docs).
    let mut cuts = Vec::new();
    // The last record: its seq, file and line (a place only when needed).
    let mut last: Option<(u64, usize, usize)> = None;
    let mut at_witness = None;
    let mut walk = Walk::new(instance, keys, &place);
    read_chain(files, order, &mut |item| {
        let (rec, header) = match item {
            Item::Line(rec, header) => (rec, header),
            Item::Torn(fi, len) => {
                file_notes.push(format!(
                    "{} ends with a cut-off line ({len} bytes, no line break): a write the \
                         proxy did not finish (a crash); it is not part of the chain",
                    xks_spec::text::printable(&files[fi].name)
                ));
                return Ok(());
            }
        };
        let Some(h) = header else {
            return walk.push(rec, check, &mut v);
        };
        let at = || Place {
            seq: Some(h.seq),
            ..place(&rec)
        };
        let file = || xks_spec::text::printable(&files[rec.file].name);
        if h.instance != instance && foreign.is_none() {
            foreign = Some(Problem::ForeignRecord {
                at: at(),
                instance: h.instance.clone(),
            });
        }
        v.records += 1;
        v.first_seq.get_or_insert(h.seq);
        v.last_seq = Some(h.seq);
        last = Some((h.seq, rec.file, rec.line));
        if rec.kind == Kind::Loss {
            v.lost += h.count.unwrap_or(0);
        }
        if witness.is_some_and(|w| w.seq == h.seq) && at_witness.is_none() {
            at_witness = Some((at(), rec.hash));
        }
        if h.kind == "start" {
            if let (Some(w), Some(n)) = (h.witness_seq, h.files_next_seq) {
                cuts.push((at(), w, n));
            }
            if h.witness_unchecked == Some(true) {
                file_notes.push(format!(
                    "the run that started at seq {} ({} line {}) could not read the HSM's \
                         witness and did not check the files against it (audit.on_failure = \
                         \"continue\"): a cut made before it would show only as that run's \
                         witness being refused",
                    h.seq,
                    file(),
                    rec.line
                ));
            }
            if let Some(n) = h.unsealed_before.filter(|n| *n > 0) {
                file_notes.push(format!(
                    "the run that started at seq {} ({} line {}) found {n} record(s) of the \
                         previous run after its last seal (a crash or kill); they are proven \
                         only from this run's first seal on",
                    h.seq,
                    file(),
                    rec.line
                ));
            }
        }
        walk.push(rec, check, &mut v)
    })?;
    let end = walk.finish(check, &mut v)?;
    let mut walk_notes = std::mem::replace(&mut v.notes, file_notes);
    if let Some(p) = foreign {
        // The files are not one chain: nothing the walk found counts.
        v.seals_verified = 0;
        v.last_seal = None;
        v.clean_stop = false;
        v.retired = false;
        v.status = Status::Tampered(p);
        return Ok(v);
    }
    v.notes.append(&mut walk_notes);
    v.status = match end {
        End::Status(s) => s,
        End::Break(b) => {
            // What broke the link: one more read of the chain.
            let mut facts = Facts::default();
            read_chain(files, order, &mut |item| {
                if let Item::Line(rec, _) = item {
                    facts.add(&rec, &b);
                }
                Ok(())
            })?;
            Status::Tampered(classify(&b, &facts, &place))
        }
    };
    if !matches!(v.status, Status::Tampered(_)) {
        if let (Some(first), Some((seq, file, line))) = (v.first_seq, last) {
            let at = Place {
                file: files[file].name.clone(),
                line,
                seq: Some(seq),
            };
            let span = Span {
                first,
                last: (seq, at),
                at_witness,
            };
            if let Some(p) = against_witness(span, witness, cuts, witnesses.partial, &mut v.notes) {
                v.status = Status::Tampered(p);
            }
        }
    }
    if let Some(first) = v.first_seq.filter(|s| *s > 0) {
        v.notes.push(format!(
            "the chain starts at seq {first}: the files before it were not given (or are gone); \
             records from there on are still proven by the seals after them"
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
    Ok(v)
}

#[cfg(test)]
mod tests;
