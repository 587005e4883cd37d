//! What is wrong with a trail, and its text: the record a problem is
//! named after, its kind (for `--json`), and the sentence an operator reads.

use std::fmt;

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
        let file = xks_spec::text::printable(&self.file);
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
                xks_spec::text::printable(instance)
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
