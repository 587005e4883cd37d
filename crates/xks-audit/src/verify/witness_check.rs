//! The chain against what the HSM witnessed: a trail that ends before the
//! newest witnessed seal, holds another record in its place, or started a
//! run on files that were cut.

use super::problem::{Place, Problem};
use crate::record::Hash;
use crate::witness::Witness;

/// What the walk saw of a chain whose links and seals hold. Such a chain
/// counts up by one from `first` to `last` (every link checks it), so a
/// seq is in the files exactly when it lies between them.
pub(super) struct Span {
    pub(super) first: u64,
    /// The last record: its seq and place.
    pub(super) last: (u64, Place),
    /// The record at the witnessed seq, when the files hold it: its place
    /// and hash.
    pub(super) at_witness: Option<(Place, Hash)>,
}

impl Span {
    fn holds(&self, seq: u64) -> bool {
        (self.first..=self.last.0).contains(&seq)
    }
}

/// The chain against what the HSM witnessed: its newest seal `w`, and the
/// `cuts` runs found at their start (place, witnessed seq, seq the files
/// went on with). A problem when the files lack what was witnessed; with
/// `partial` files, a note.
pub(super) fn against_witness(
    span: Span,
    w: Option<&Witness>,
    cuts: Vec<(Place, u64, u64)>,
    partial: bool,
    notes: &mut Vec<String>,
) -> Option<Problem> {
    for (start, witnessed, files_next) in cuts {
        if span.holds(witnessed) {
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
    match &span.at_witness {
        Some((_, hash)) if *hash == w.hash => None,
        Some((place, _)) => Some(Problem::WitnessMismatch {
            record: place.clone(),
            time: w.time.clone(),
        }),
        None if span.last.0 < w.seq => {
            let p = Problem::Truncated {
                last: span.last.1,
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
