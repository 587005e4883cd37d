//! The chain walk, one record at a time: links, seals, what a broken link
//! is (modified, deleted, inserted, reordered), and the ranges a restart
//! left out. No I/O: records come parsed, seals are checked through a
//! [`SealCheck`].
//!
//! **Bounded memory.** The walk keeps a few records, never the trail: the
//! two before the current one, one ahead (a restart's `file` record is
//! judged with the `start` record after it), and the last seal with the
//! records around it. What a broken link *is* needs records from anywhere
//! in the trail (does anything link to this one? does the missing seq turn
//! up later?): the walk then stops with a [`Break`], and the caller reads
//! the files once more for the [`Facts`] that [`classify`] needs. An intact
//! trail is read once.

use super::problem::{Place, Problem};
use super::verdict::{InstanceVerdict, SealCheck, SealCheckError, Status};
use crate::record::{seal_input, unhex, Hash, GENESIS};

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

/// What the walk keeps of a record.
#[derive(Debug, Clone)]
pub(super) struct Rec {
    /// Its place in the instance's chain order, from 0.
    pub(super) index: u64,
    pub(super) file: usize,
    pub(super) line: usize,
    pub(super) seq: u64,
    pub(super) kind: Kind,
    pub(super) hash: Hash,
    pub(super) prev: Option<Hash>,
    /// A seal's fields.
    pub(super) seal: Option<Box<SealInfo>>,
    /// A `start` record's declared range of the previous run's records
    /// after its last seal, left out of the chain: (first, last) seq.
    pub(super) tail: Option<(u64, u64)>,
}

/// A seal's fields.
#[derive(Debug, Clone)]
pub(super) struct SealInfo {
    pub(super) time: String,
    pub(super) count: Option<u64>,
    pub(super) key: Option<String>,
    pub(super) hmac: Option<Vec<u8>>,
}

pub(super) fn to_hash(s: &str) -> Option<Hash> {
    unhex(s).and_then(|v| v.try_into().ok())
}

/// The newest seal walked past, with what is around it.
struct LastSeal {
    rec: Rec,
    /// The kind of the record before it.
    before: Option<Kind>,
    /// The first record after it, once walked.
    after: Option<Rec>,
}

impl LastSeal {
    /// Whether records after this seal can only have been added while the
    /// instance was stopped: the seal closes a clean stop (`stop`, then the
    /// seal), and what follows is not a new run's `file` record.
    fn is_final_then_more(&self) -> bool {
        matches!(self.before, Some(Kind::Stop | Kind::Retire))
            && self.after.as_ref().is_some_and(|r| r.kind != Kind::File)
    }
}

/// Where the chain broke, for [`classify`]: the records before the break
/// (`p`, and `pp` before it), the one that does not link (`c`), the one
/// after it.
#[derive(Debug, Clone)]
pub(super) struct Break {
    pub(super) pp: Option<Rec>,
    pub(super) p: Rec,
    pub(super) c: Rec,
    pub(super) next: Option<Rec>,
}

/// What [`classify`] needs from the whole trail, read by the caller.
#[derive(Debug, Default)]
pub(super) struct Facts {
    /// Some record links to `c`.
    pub(super) c_linked: bool,
    /// Some record links to `p`.
    pub(super) p_linked: bool,
    /// The first record after `c` with the seq `p` should be followed by.
    pub(super) missing_later: Option<Rec>,
    /// The first record before `c` with `c`'s seq.
    pub(super) same_seq_before: Option<Rec>,
}

impl Facts {
    /// Takes in one record of the trail (all of them, in chain order).
    pub(super) fn add(&mut self, r: &Rec, b: &Break) {
        self.c_linked |= r.prev == Some(b.c.hash);
        self.p_linked |= r.prev == Some(b.p.hash);
        if r.index > b.c.index && r.seq == b.p.seq.wrapping_add(1) && self.missing_later.is_none() {
            self.missing_later = Some(r.clone());
        }
        if r.index < b.c.index && r.seq == b.c.seq && self.same_seq_before.is_none() {
            self.same_seq_before = Some(r.clone());
        }
    }
}

/// How the walk ended.
pub(super) enum End {
    /// The status is known.
    Status(Status),
    /// A link is broken; what it is needs [`Facts`].
    Break(Box<Break>),
}

/// One instance's chain, walked in order.
pub(super) struct Walk<'a> {
    instance: &'a str,
    keys: &'a [String],
    place: &'a dyn Fn(&Rec) -> Place,
    /// The record waiting for the one after it.
    pending: Option<Rec>,
    pp: Option<Rec>,
    p: Option<Rec>,
    first: Option<Rec>,
    walked: u64,
    last_seal: Option<LastSeal>,
    since_seal: u64,
    /// Records left out by a run that went on from the last seal before
    /// them: the first such record, and how many in all.
    unproven: Option<(Place, u64)>,
    end: Option<End>,
}

impl<'a> Walk<'a> {
    pub(super) fn new(
        instance: &'a str,
        keys: &'a [String],
        place: &'a dyn Fn(&Rec) -> Place,
    ) -> Walk<'a> {
        Walk {
            instance,
            keys,
            place,
            pending: None,
            pp: None,
            p: None,
            first: None,
            walked: 0,
            last_seal: None,
            since_seal: 0,
            unproven: None,
            end: None,
        }
    }

    /// Takes the next record in chain order.
    pub(super) fn push(
        &mut self,
        r: Rec,
        check: &mut dyn SealCheck,
        v: &mut InstanceVerdict,
    ) -> Result<(), SealCheckError> {
        if self.end.is_some() {
            return Ok(());
        }
        if let Some(c) = self.pending.take() {
            self.step(c, Some(&r), check, v)?;
        }
        self.pending = Some(r);
        Ok(())
    }

    /// The end of the chain: the verdict, or the break to classify.
    pub(super) fn finish(
        mut self,
        check: &mut dyn SealCheck,
        v: &mut InstanceVerdict,
    ) -> Result<End, SealCheckError> {
        if let Some(c) = self.pending.take() {
            if self.end.is_none() {
                self.step(c, None, check, v)?;
            }
        }
        if let Some(end) = self.end.take() {
            return Ok(end);
        }
        let place = self.place;
        if let Some(first_after) = match &self.last_seal {
            Some(s) => s.after.clone(),
            None => self.first.clone(),
        } {
            v.clean_stop = false;
            v.retired = false;
            let count = self.walked - first_after.index;
            if let Some(seal) = self.last_seal.as_ref().filter(|s| s.is_final_then_more()) {
                return Ok(End::Status(Status::Tampered(Problem::AfterFinalSeal {
                    first: place(&first_after),
                    seal: place(&seal.rec),
                    count,
                })));
            }
            if self.unproven.is_none() {
                return Ok(End::Status(Status::UnsealedTail {
                    from: place(&first_after),
                    count,
                }));
            }
            v.notes.push(format!(
                "{count} record(s) from {} on come after the last seal (the proxy is running, or \
                 crashed)",
                place(&first_after)
            ));
        }
        Ok(End::Status(match self.unproven {
            Some((from, count)) => Status::Unproven { from, count },
            None => Status::Intact,
        }))
    }

    fn stop(&mut self, s: Status) {
        self.end = Some(End::Status(s));
    }

    /// Walks record `c`, with `next` the record after it.
    fn step(
        &mut self,
        c: Rec,
        next: Option<&Rec>,
        check: &mut dyn SealCheck,
        v: &mut InstanceVerdict,
    ) -> Result<(), SealCheckError> {
        let place = self.place;
        self.walked += 1;
        if self.first.is_none() {
            self.first = Some(c.clone());
        }
        if let Some(s) = self.last_seal.as_mut().filter(|s| s.after.is_none()) {
            s.after = Some(c.clone());
        }
        if c.kind == Kind::Bad {
            self.stop(Status::Tampered(Problem::NotARecord { at: place(&c) }));
            return Ok(());
        }
        match &self.p {
            None => {
                if c.seq == 0 && c.prev != Some(GENESIS) {
                    self.stop(Status::Tampered(Problem::BadGenesis { at: place(&c) }));
                    return Ok(());
                }
            }
            Some(p) if !(c.seq == p.seq.wrapping_add(1) && c.prev == Some(p.hash)) => {
                let Some((first, count)) = self.left_out(p, &c, next) else {
                    self.end = Some(End::Break(Box::new(Break {
                        pp: self.pp.clone(),
                        p: p.clone(),
                        c,
                        next: next.cloned(),
                    })));
                    return Ok(());
                };
                // The new run went on from the last seal: what lies between
                // was never sealed, and never will be.
                if let Some(seal) = self.last_seal.as_ref().filter(|s| s.is_final_then_more()) {
                    self.stop(Status::Tampered(Problem::AfterFinalSeal {
                        first: place(&first),
                        seal: place(&seal.rec),
                        count,
                    }));
                    return Ok(());
                }
                match &mut self.unproven {
                    Some((_, n)) => *n += count,
                    None => self.unproven = Some((place(&first), count)),
                }
                self.since_seal = 0;
            }
            Some(_) => {}
        }
        if c.kind == Kind::Seal {
            if let Some(problem) = self.seal(&c, check, v)? {
                self.stop(Status::Tampered(problem));
                return Ok(());
            }
        } else {
            self.since_seal += 1;
        }
        self.pp = self.p.replace(c);
        Ok(())
    }

    /// When `c` is a new run's `file` record going on from the last seal,
    /// and the records between are exactly the range its `start` record
    /// (`next`) declares left out: the first of them and their count.
    fn left_out(&self, p: &Rec, c: &Rec, next: Option<&Rec>) -> Option<(Rec, u64)> {
        let start = next?;
        let (from, to) = start.tail?;
        let n = to.checked_sub(from)?.checked_add(1)?;
        let seal = self.last_seal.as_ref()?;
        let first = seal.after.as_ref()?;
        (c.kind == Kind::File
            && start.seq == c.seq.wrapping_add(1)
            && c.seq == to.wrapping_add(1)
            && c.prev == Some(seal.rec.hash)
            && c.index - first.index == n
            && first.seq == from
            && p.seq == to)
            .then(|| (first.clone(), n))
    }

    /// Checks the seal `c`; a problem if it does not hold.
    fn seal(
        &mut self,
        c: &Rec,
        check: &mut dyn SealCheck,
        v: &mut InstanceVerdict,
    ) -> Result<Option<Problem>, SealCheckError> {
        let place = self.place;
        let Some(s) = c.seal.as_deref() else {
            return Ok(Some(Problem::SealMalformed { seal: place(c) }));
        };
        let (Some(count), Some(key), Some(mac), Some(head)) =
            (s.count, s.key.as_deref(), s.hmac.as_deref(), c.prev)
        else {
            return Ok(Some(Problem::SealMalformed { seal: place(c) }));
        };
        if !self.keys.iter().any(|k| k == key) {
            return Ok(Some(Problem::SealKey {
                seal: place(c),
                key: key.to_string(),
            }));
        }
        let input = seal_input(self.instance, c.seq, &s.time, count, key, &head);
        if !check.check(key, &input, mac)? {
            return Ok(Some(Problem::SealInvalid {
                seal: place(c),
                since: self.last_seal.as_ref().map(|j| place(&j.rec)),
                counted: self.since_seal,
                claimed: count,
            }));
        }
        // The MAC covers the writer's own count; a difference here is the
        // writer's (a restart that could not count the whole previous
        // tail, or files before the first one given), not tampering.
        if count != self.since_seal && self.last_seal.is_some() {
            v.notes.push(format!(
                "the seal {} counts {count} records since the previous seal; {} were found (the \
                 previous run's tail was longer than a restart reads)",
                place(c),
                self.since_seal
            ));
        }
        let before = self.p.as_ref().map(|p| p.kind);
        v.seals_verified += 1;
        v.last_seal = Some((c.seq, s.time.clone()));
        v.clean_stop = matches!(before, Some(Kind::Stop | Kind::Retire));
        v.retired = before == Some(Kind::Retire);
        self.last_seal = Some(LastSeal {
            rec: c.clone(),
            before,
            after: None,
        });
        self.since_seal = 0;
        Ok(None)
    }
}

/// What broke the link between `b.p` and `b.c`; see the module docs.
pub(super) fn classify(b: &Break, f: &Facts, place: &dyn Fn(&Rec) -> Place) -> Problem {
    let (p, c) = (&b.p, &b.c);
    let expect = p.seq.wrapping_add(1);
    if c.hash == p.hash {
        return Problem::Duplicate {
            record: place(c),
            first: place(p),
        };
    }
    // The chain goes on from p past c, and nothing links to c.
    if b.next
        .as_ref()
        .is_some_and(|n| n.seq == expect && n.prev == Some(p.hash))
        && !f.c_linked
    {
        return Problem::Inserted { record: place(c) };
    }
    if c.seq > expect && c.seq != u64::MAX {
        if let Some(r) = &f.missing_later {
            return Problem::Reordered {
                record: place(r),
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
        if let Some(pp) = &b.pp {
            if c.seq == pp.seq.wrapping_add(1) && c.prev == Some(pp.hash) && !f.p_linked {
                return Problem::Inserted { record: place(p) };
            }
        }
        if let Some(k) = &f.same_seq_before {
            return Problem::Duplicate {
                record: place(c),
                first: place(k),
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
