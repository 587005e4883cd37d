//! The fleet-wide kill switch: `xks-proxy lockdown` makes every proxy
//! instance sharing the HSM refuse Encrypt and Decrypt for a key store (or
//! all of them) within one poll ([`poller::POLL_INTERVAL`], plus the read
//! that follows it), without a restart or a
//! configuration change; `xks-proxy unlock` lifts it, and a lock set
//! `--for` a while lifts itself.
//!
//! - [`lock`]: a lock and its marker object in the token;
//! - [`board`]: the locks in force, read by every request;
//! - [`poller`]: each instance reading the markers every
//!   [`poller::POLL_INTERVAL`].
//!
//! Why the token: it is the one thing every instance of a fleet shares,
//! and whoever may lock a key store must be able to log in to it anyway.
//! While a key store is locked, Encrypt and Decrypt answer `400
//! InvalidStateException` (the spec's "key store is disabled … or
//! blocked"), GetKeyMetadata reports `keyStatus: DISABLED`, and
//! GetHealthStatus is unaffected: the proxy is healthy, the key store is
//! not available, and KMS tells its callers exactly that.
//!
//! **Crate `xks-lockdown`**, one layer of the workspace (the table of layers is
//! in the `xks-proxy` crate's `src/lib.rs`). It uses `xks-audit`, `xks-hsm`, `xks-telemetry`, `xks-spec`;
//! its `Cargo.toml` lists exactly those, so the compiler holds it to them.

#![forbid(unsafe_code)]

pub mod board;
pub mod lock;
pub mod poller;

pub use board::LockBoard;
pub use lock::Lock;
pub use poller::{Poller, POLL_INTERVAL};
