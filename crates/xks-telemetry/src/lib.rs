//! What the proxy tells its operator: logs and metrics.
//!
//! - [`logging`]: log setup, and the rules that keep logging from being
//!   turned against the proxy (bounded lines, one line per line, a lossy
//!   queue that never stalls a request);
//! - [`log_sink`]: where the lines go: a bounded buffer written out in
//!   batches by one thread, lossy rather than blocking;
//! - [`metrics`]: the Prometheus registry every layer records into.
//!
//! Everything that reports (the HSM layer, the listeners, the API) sits
//! above this module; it knows none of them. There is no global recorder:
//! the one [`metrics::Metrics`] is handed to whoever records.
//!
//! **Crate `xks-telemetry`**, one layer of the workspace (the table of layers is
//! in the `xks-proxy` crate's `src/lib.rs`). It uses no other crate of the workspace;
//! its `Cargo.toml` lists exactly those, so the compiler holds it to them.

#![forbid(unsafe_code)]

pub mod log_sink;
pub mod logging;
pub mod metrics;
