//! The network edge: what it costs to hold a connection, and who may.
//!
//! - [`limits`]: per-listener connection caps (total and per source), the
//!   eviction of unauthenticated connections when full, request-level idle
//!   tracking;
//! - [`fds`]: the open-files budget that keeps descriptors for the HSM.

pub mod fds;
pub mod limits;
