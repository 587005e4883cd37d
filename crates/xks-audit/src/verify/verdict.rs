//! What verifying says: a chain's status and verdict, what was witnessed to
//! compare it with, and how a seal is checked (the seam to the HSM).

use std::collections::BTreeMap;

use super::problem::{Place, Problem};
use crate::witness::Witness;

/// Checks a seal's MAC in the HSM.
pub trait SealCheck {
    /// Whether `mac` is the HMAC-SHA256 of `input` under the seal key
    /// `key`. `Err` when it cannot be checked at all (no HSM, no key).
    fn check(&mut self, key: &str, input: &[u8], mac: &[u8]) -> Result<bool, SealCheckError>;
}

/// Why a seal could not be checked at all (not: why it is wrong).
#[derive(Debug, thiserror::Error)]
pub enum SealCheckError {
    #[error("no configured key manager holds the seal key '{key}'")]
    NoKey { key: String },
    #[error(
        "the seal key '{key}' in key manager {ekm} can leave the token (extractable, not \
         sensitive, or not generated in the token): a seal made with it proves nothing"
    )]
    Unprotected { key: String, ekm: String },
    #[error("cannot open the key managers: {0}")]
    NoKeyManager(String),
    #[error("cannot read the audit witnesses from the key managers: {0}")]
    NoWitness(String),
    #[error("key manager {ekm}: {source}")]
    Hsm {
        ekm: String,
        #[source]
        source: xks_hsm::HsmError,
    },
}

/// Why a trail could not be verified at all (not: what is wrong with it).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot verify the seals: {0}")]
    Seal(#[from] SealCheckError),
    #[error("cannot read {file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
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
    /// Nothing read yet of `instance`'s chain in `files` files.
    pub(super) fn new(instance: &str, files: usize) -> InstanceVerdict {
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
            status: Status::Intact,
            notes: Vec::new(),
        }
    }

    /// The verdict on `files` files that hold no record of `instance`.
    pub(super) fn without_records(
        instance: &str,
        files: usize,
        problem: Problem,
        note: Option<&str>,
    ) -> InstanceVerdict {
        InstanceVerdict {
            status: Status::Tampered(problem),
            notes: note.map(str::to_string).into_iter().collect(),
            ..InstanceVerdict::new(instance, files)
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
