//! The chain against what the HSM witnessed: a trail that ends before the
//! newest witnessed seal, holds another record in its place, or started a
//! run on files that were cut.

use super::problem::{Place, Problem};
use super::walk::{Kind, Rec};
use crate::audit::witness::Witness;

/// The chain `l` (whose links and seals hold) against what the HSM
/// witnessed: its newest seal `w`, and the `cuts` runs found at their
/// start (place, witnessed seq, seq the files went on with). A problem
/// when the files lack what was witnessed; with `partial` files, a note.
pub(super) fn against_witness(
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
