//! The pure chain walk: links, seals, what a broken link is (modified,
//! deleted, inserted, reordered), and the ranges a restart left out. No
//! I/O: the records come parsed, the seals are checked through a
//! [`SealCheck`].

use std::collections::BTreeMap;

use super::problem::{Place, Problem};
use super::verdict::{InstanceVerdict, SealCheck, Status};
use crate::audit::record::{seal_input, unhex, Hash, GENESIS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
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
pub(super) type Tails = BTreeMap<u64, (u64, u64)>;

/// The records `l[from..i]` when they are exactly the range a new run
/// left out (`l[i]` its `file` record, `l[i + 1]` its `start` record
/// declaring the range, and `l[i]` linked to the seal before the range).
pub(super) fn left_out(l: &[Rec], i: usize, tails: &Tails) -> Option<usize> {
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
pub(super) fn after_final_seal(l: &[Rec], seal: usize) -> bool {
    seal > 0
        && matches!(l[seal - 1].kind, Kind::Stop | Kind::Retire)
        && l.get(seal + 1).is_some_and(|r| r.kind != Kind::File)
}

/// What the walk keeps of a record (about 100 bytes).
pub(super) struct Rec {
    pub(super) file: usize,
    pub(super) line: usize,
    pub(super) seq: u64,
    pub(super) kind: Kind,
    pub(super) hash: Hash,
    pub(super) prev: Option<Hash>,
    /// The index into `seals` for a seal, the lost count for a loss.
    pub(super) extra: u64,
}

/// A seal's fields (kept apart: there are few).
pub(super) struct SealInfo {
    pub(super) time: String,
    pub(super) count: Option<u64>,
    pub(super) key: Option<String>,
    pub(super) hmac: Option<Vec<u8>>,
}

pub(super) fn to_hash(s: &str) -> Option<Hash> {
    unhex(s).and_then(|v| v.try_into().ok())
}

/// Walks one instance's records in chain order: links, seals, the tail.
#[allow(clippy::too_many_arguments)]
pub(super) fn walk(
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

/// What broke the link between `l[i-1]` and `l[i]`; see the module docs.
pub(super) fn classify(l: &[Rec], i: usize, place: &dyn Fn(&Rec) -> Place) -> Problem {
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
