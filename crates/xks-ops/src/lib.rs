//! Operating a proxy: what an operator does to a running one, or to its files.
//!
//! - [`reload`]: hot reload of key stores, credentials, policies and the
//!   certificate (the running configuration, rebuilt);
//! - [`admin`]: Prometheus metrics and a liveness check on the admin listener;
//! - [`credentials`]: generating, listing and revoking SigV4 credentials in
//!   the configuration file;
//! - [`migrate`]: the AWS sample proxy's settings, converted to our config.
//!
//! This layer sits above `config` (it reads and rewrites configuration
//! files) and `state` (a reload builds a new live state and swaps it in, for
//! the API to read).
//!
//! **Crate `xks-ops`**, one layer of the workspace (the table of layers is
//! in the `xks-proxy` crate's `src/lib.rs`). It uses `xks-config`, `xks-net`, `xks-state`, `xks-hsm`, `xks-telemetry`, `xks-spec`;
//! its `Cargo.toml` lists exactly those, so the compiler holds it to them.

#![forbid(unsafe_code)]

pub mod admin;
pub mod credentials;
pub mod migrate;
pub mod reload;
