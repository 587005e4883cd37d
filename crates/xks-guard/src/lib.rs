//! Who may do what, before any key is touched.
//!
//! - [`sigv4`]: SigV4 verification (spec Appendix A) against a key store's
//!   credentials;
//! - [`authz`]: secondary authorization with Cedar policies (its engine is
//!   the `authorization` feature, on by default);
//! - [`throttle`]: per-key-store request-rate quotas;
//! - [`replay`]: the optional cache that refuses a signed request seen before.
//!
//! Pure decisions over a request's parts: no I/O, no HTTP framework. The API
//! layer calls them in a fixed order (see `xks_api`).
//!
//! **Crate `xks-guard`**, one layer of the workspace (the table of layers is
//! in the `xks-proxy` crate's `src/lib.rs`). It uses `xks-spec`;
//! its `Cargo.toml` lists exactly those, so the compiler holds it to them.

#![forbid(unsafe_code)]

pub mod authz;
pub mod replay;
pub mod sigv4;
pub mod throttle;
