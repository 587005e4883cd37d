//! Test harness: a real `xks-proxy` process over real TLS against a fresh
//! SoftHSM token in a temporary directory. Each [`Proxy`] is fully isolated
//! (own token, certificates, secrets, port), so tests run in parallel.
//!
//! Every test binary declares `mod common;` and imports `use common::*;`:
//! the modules below are re-exported here, so their items are reached as
//! `common::X` wherever they live. `load`, `network_hsm`, `audit` and
//! `prometheus` are reached by their own path (`common::load::Load`,
//! `common::network_hsm::*`, `common::audit::*`, `common::prometheus::*`).
//!
//! - [`certs`]: the test CA and server certificate, private files.
//! - [`token`]: test tokens (SoftHSM, or Kryoptic with `XKS_TEST_PKCS11=kryoptic`), `pkcs11-tool`, the vendor-behaviour filter module.
//! - [`config`]: key stores, credentials, keys, [`Options`], the TOML template.
//! - [`proxy`]: the proxy process ([`Proxy`]): start, CLI, restart, signals.
//! - [`client`]: requests, raw TLS, `/ping`, metrics, polling, `check` args.
//! - [`load`]: continuous encrypt → decrypt round trips from a thread.
//! - [`network_hsm`]: a token served over `p11-kit server`, to kill and stop.
//! - [`audit`]: the audit trail's files, records and `audit verify` (`tests/audit*.rs`).
//! - [`prometheus`]: a real Prometheus server with the shipped rules (`tests/prometheus*.rs`).
// Not every test binary uses every helper.
#![allow(dead_code)]

mod certs;
mod client;
mod config;
mod proxy;
mod token;

pub mod audit;
pub mod load;
pub mod network_hsm;
pub mod prometheus;

pub use certs::*;
pub use client::*;
pub use config::*;
pub use proxy::*;
pub use token::*;
