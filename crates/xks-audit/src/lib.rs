//! The audit trail: one record per XKS request, in a hash chain sealed in
//! the HSM, so that the key's owner sees every use and can tell when the
//! record of it was edited.
//!
//! - [`record`]: what a record holds, the chain and the seal construction;
//! - [`trail`]: the handle requests write through (reservations, the
//!   `on_failure` rule); `queue`: what it shares with the writer;
//! - [`Sealer`]: what the trail asks of the HSM (seals, the witness);
//! - [`witness`]: the HSM's record of each chain's newest seal, so that a
//!   trail cut back while the proxy was stopped is caught;
//! - `writer`: the one thread that writes files, rotates and seals;
//!   `resume`: where its chain goes on at start;
//! - [`files`]: the trail's files on disk (names, reading them in bounded
//!   memory, compressing the rotated ones);
//! - [`verify`]: checking a trail's links and seals (`audit verify`);
//! - [`report`]: who used which key (`audit report`, `keys disable
//!   --dry-run`);
//! - [`reconcile`]: the trail against CloudTrail (`audit reconcile`);
//! - [`retire`]: closing a chain for good, so its witness can leave the HSM;
//! - [`config`]: what `[audit]` becomes.
//!
//! This layer sits below the API (which produces the records) and above the
//! key managers (whose control threads compute the seals). It is not the
//! access log: that one may drop lines when its destination stalls; this
//! one refuses requests (or counts and reports the loss) instead.
//! docs/audit.md has the format, the guarantees and what they do not cover.
//!
//! **Crate `xks-audit`**, one layer of the workspace (the table of layers is
//! in the `xks-proxy` crate's `src/lib.rs`). It uses `xks-hsm`, `xks-telemetry`, `xks-spec`;
//! its `Cargo.toml` lists exactly those, so the compiler holds it to them.

#![forbid(unsafe_code)]

pub mod config;
mod error;
pub mod files;
mod queue;
pub mod reconcile;
pub mod record;
pub mod report;
mod resume;
pub mod retire;
mod sealer;
pub mod trail;
pub mod verify;
pub mod witness;
mod writer;

#[cfg(test)]
mod restart_tests;

pub use config::{AuditConfig, OnFailure};
pub use error::AuditError;
pub use files::Compression;
pub use record::{Decision, LockEvent, LockEventKind, RequestRecord};
pub use sealer::{HsmSealer, SealError, Sealer};
pub use trail::{AuditTrail, Slot};
pub use witness::Witness;
