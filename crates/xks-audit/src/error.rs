//! Why the audit trail could not start.

use std::path::PathBuf;

/// Why the trail could not start.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit.dir: cannot create or use {}: {source}", .dir.display())]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another process writes the audit chain of instance '{instance}' in {}; give each \
         instance its own audit.instance_id (or `serve --instance-id`)",
        .dir.display()
    )]
    InUse { instance: String, dir: PathBuf },
    #[error("audit instance id '{0}' must be 1 to 64 characters of A-Z a-z 0-9 . _ - (not starting with a dot)")]
    BadInstance(String),
    #[error("cannot continue the audit chain from {}: {why}", .file.display())]
    Resume { file: PathBuf, why: String },
    #[error("cannot create audit file {}: {source}", .file.display())]
    File {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the audit writer thread: {0}")]
    Thread(std::io::Error),
    #[error(
        "cannot read the audit chain's witness from the HSM ({0}); with audit.on_failure = \
         \"refuse\" no chain is started on files that cannot be checked against it (\"continue\" \
         starts anyway and records that the files were not checked)"
    )]
    Witness(super::sealer::SealError),
}
