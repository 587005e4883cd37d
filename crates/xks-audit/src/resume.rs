//! Where a chain goes on at start: the newest file's last complete line and
//! last seal, checked against the HSM's witness.
//!
//! - Files that end before the witnessed seal were cut while the proxy was
//!   stopped: the chain goes on from the witnessed seal, and the `start`
//!   record says where the files ended (`verify` names the gap).
//! - Records of the previous run after its last seal (a crash, a kill) are
//!   never sealed by this run as if proven: the chain goes on from that
//!   seal, and the `start` record names the range left out.
//! - A witness that cannot be read refuses the start under
//!   `on_failure = "refuse"`; under `"continue"` the start record says the
//!   files were not checked.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use super::config::OnFailure;
use super::error::AuditError;
use super::files::chain_files;
use super::record::{hash_line, Hash, Header, GENESIS};
use super::sealer::Sealer;
use super::witness::Witness;

/// How far back from the end of the newest file a restart looks for the
/// last seal.
const RESUME_WINDOW: u64 = 16 * 1024 * 1024;
/// How long reading the witness at startup may take.
const WITNESS_READ_WITHIN: Duration = Duration::from_secs(2);
/// The newest file of a chain and where it left off.
pub(super) struct Resume {
    pub file: String,
    /// The next record's `seq`.
    pub seq: u64,
    pub head: Hash,
    /// Records after the last seal seen.
    unsealed: u64,
    /// The last seal seen, if any.
    seal: Option<LastSeal>,
}

/// The newest seal of the previous run's files.
#[derive(Clone, Copy)]
struct LastSeal {
    seq: u64,
    hash: Hash,
    /// It closes a clean stop, and records that are not a new run follow
    /// it: they can only have been added while the proxy was stopped.
    final_then_more: bool,
}

/// Where this run's chain starts, and what its `start` record says.
pub(super) struct Start {
    /// The next record's `seq`, and the hash it links to.
    pub seq: u64,
    pub head: Hash,
    /// The previous run's newest file, named by this run's `file` record.
    pub previous: Option<String>,
    /// Records of the previous run after its last seal, when they are not
    /// left out (no sealer: nothing is sealed anyway).
    pub unsealed: u64,
    /// Files cut back: (the witnessed seq, the seq the files went on with).
    pub behind: Option<(u64, u64)>,
    /// The previous run's records after its last seal, left out: (first, last).
    pub tail: Option<(u64, u64)>,
    /// The witness could not be read (`on_failure = "continue"`).
    pub witness_unchecked: Option<bool>,
}

/// Where the chain of `instance` in `dir` goes on (see the module docs).
pub(super) fn plan(
    dir: &Path,
    instance: &str,
    on_failure: OnFailure,
    sealer: Option<&dyn Sealer>,
) -> Result<Start, AuditError> {
    let dir_err = |source| AuditError::Dir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut resume = None;
    for name in chain_files(dir, instance).map_err(dir_err)?.iter().rev() {
        if let Some(r) = resume_from(dir, name)? {
            resume = Some(r);
            break;
        }
    }
    let (mut seq, mut head, previous, mut unsealed) = match &resume {
        Some(r) => (r.seq, r.head, Some(r.file.clone()), r.unsealed),
        None => (0, GENESIS, None, 0),
    };
    let mut witness_unchecked = None;
    let witness = match sealer {
        Some(s) => match s.witness(instance, WITNESS_READ_WITHIN) {
            Ok(w) => w,
            // Files that cannot be checked against the witness may have
            // been cut; a chain started on them would hide it.
            Err(e) if on_failure == OnFailure::Refuse => return Err(AuditError::Witness(e)),
            Err(e) => {
                tracing::error!(instance = %instance, error = %e, "cannot read the audit chain's witness from the HSM; audit.on_failure = \"continue\": continuing from the files as they are, unchecked (the start record says so; the witness is never lowered by this run's seals)");
                witness_unchecked = Some(true);
                None
            }
        },
        None => None,
    };
    let mut behind = None;
    if let Some(w) = witness.filter(|w| files_behind(w, seq, &head)) {
        tracing::error!(
            instance = %instance,
            witnessed_seq = w.seq,
            witnessed_time = %w.time,
            files_next_seq = seq,
            "the audit files end before the newest seal the HSM witnessed: records were removed while the proxy was stopped; the chain goes on from the witnessed seal, and `xks-proxy audit verify` reports the gap"
        );
        behind = Some((w.seq, seq));
        (seq, head, unsealed) = (w.seq + 1, w.hash, 0);
    }
    // Records after the previous run's last seal are never sealed by
    // this run as if they were proven: the chain goes on from that seal
    // (seq numbers go on after them), and the start record names them.
    let mut tail = None;
    if let (None, Some(_), Some(r)) = (behind, sealer, &resume) {
        if let (Some(last), true) = (r.seal, r.unsealed > 0) {
            let (from, to) = (last.seq + 1, seq - 1);
            if last.final_then_more {
                tracing::error!(instance = %instance, from, to, "records follow the final seal of the previous run's clean stop: they were added while the proxy was stopped; they are left out of the chain, and `xks-proxy audit verify` reports them as tampering");
            } else {
                tracing::warn!(instance = %instance, from, to, "the previous run of this audit chain ended without its final seal (a crash or kill): its records after its last seal are left out of the chain and stay unproven (`xks-proxy audit verify` reports them)");
            }
            tail = Some((from, to));
            (head, unsealed) = (last.hash, 0);
        }
    }
    Ok(Start {
        seq,
        head,
        previous,
        unsealed,
        behind,
        tail,
        witness_unchecked,
    })
}

/// The tail of a file: its last `window` bytes (all of it when smaller),
/// and whether that is all of it. A compressed file (an older one, when the
/// newest are empty) is read through, keeping the last `window` bytes.
fn read_tail(path: &Path, window: u64) -> std::io::Result<(Vec<u8>, bool)> {
    if path.to_string_lossy().ends_with(".gz") {
        let mut whole = true;
        let mut buf = Vec::new();
        let file = super::files::TrailFile::at(path);
        let mut lines = file.lines()?;
        while let Some(line) = lines.next()? {
            buf.extend_from_slice(line.bytes);
            if line.complete {
                buf.push(b'\n');
            }
            if buf.len() as u64 > 2 * window {
                buf.drain(..buf.len() - window as usize);
                whole = false;
            }
        }
        return Ok((buf, whole));
    }
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(window);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.read_to_end(&mut buf)?;
    Ok((buf, start == 0))
}

/// Where the chain in `file` left off: its last complete line (a cut-off
/// last line is skipped) and the records after the last seal. A line that
/// is not a record still counts and is linked to: `verify` will say what
/// is wrong with it; the proxy does not refuse to start over it.
pub(super) fn resume_from(dir: &Path, file: &str) -> Result<Option<Resume>, AuditError> {
    let path = dir.join(file);
    let (tail, whole) = read_tail(&path, RESUME_WINDOW).map_err(|e| AuditError::Resume {
        file: path.clone(),
        why: e.to_string(),
    })?;
    let mut lines: Vec<&[u8]> = tail.split(|b| *b == b'\n').collect();
    // The piece after the last line break is empty or cut off.
    lines.pop();
    if !whole && !lines.is_empty() {
        // The window may start mid-line.
        lines.remove(0);
    }
    let Some(last) = lines.last() else {
        return Ok(None);
    };
    let head = hash_line(last);
    let mut unsealed = 0u64;
    let mut after_parsed = 0u64;
    let mut seq = None;
    let mut seal = None;
    for (n, line) in lines.iter().enumerate().rev() {
        match serde_json::from_slice::<Header>(line) {
            Ok(h) => {
                if seq.is_none() {
                    // A number from disk: it must not overflow (a crafted
                    // file would otherwise wrap the chain back to 0).
                    seq = Some(h.seq.checked_add(1 + after_parsed).ok_or_else(|| {
                        AuditError::Resume {
                            file: path.clone(),
                            why: "a record's seq is too large to continue the chain".into(),
                        }
                    })?);
                }
                if h.kind == "seal" {
                    let kind = |i: usize| {
                        lines
                            .get(i)
                            .and_then(|l| serde_json::from_slice::<Header>(l).ok())
                            .map(|h| h.kind)
                    };
                    seal = Some(LastSeal {
                        seq: h.seq,
                        hash: hash_line(line),
                        final_then_more: n > 0
                            && kind(n - 1).as_deref() == Some("stop")
                            && n + 1 < lines.len()
                            && kind(n + 1).as_deref() != Some("file"),
                    });
                    break;
                }
                unsealed += 1;
            }
            Err(_) => {
                if seq.is_none() {
                    after_parsed += 1;
                }
                unsealed += 1;
            }
        }
    }
    let seq = seq.ok_or_else(|| AuditError::Resume {
        file: path.clone(),
        why: format!(
            "no audit record in its last {} bytes; move the file away if it is not a trail file",
            RESUME_WINDOW
        ),
    })?;
    if after_parsed > 0 {
        tracing::warn!(file = %path.display(), lines = after_parsed, "the newest audit file ends with lines that are not audit records; continuing the chain after them (`xks-proxy audit verify` will report them)");
    }
    Ok(Some(Resume {
        file: file.to_string(),
        seq,
        head,
        unsealed,
        seal,
    }))
}

/// Whether files that would go on at `next_seq` from `head` end before the
/// witnessed seal: it is not among them (`next_seq` not past it), or the
/// record in its place is another one.
fn files_behind(w: &Witness, next_seq: u64, head: &Hash) -> bool {
    next_seq <= w.seq || (next_seq == w.seq + 1 && *head != w.hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_behind_the_witness_when_they_end_before_its_seal() {
        let w = Witness {
            instance: "a".into(),
            seq: 10,
            hash: [1; 32],
            time: "t".into(),
        };
        // Files that end at the witnessed seal, or went on after it (a crash
        // between the seal and storing its witness; the newer seals prove
        // what follows).
        assert!(!files_behind(&w, 11, &[1; 32]));
        assert!(!files_behind(&w, 15, &[9; 32]));
        // Cut back, gone, or another record where the seal was.
        assert!(files_behind(&w, 7, &[9; 32]));
        assert!(files_behind(&w, 0, &GENESIS));
        assert!(files_behind(&w, 11, &[9; 32]));
    }
}
