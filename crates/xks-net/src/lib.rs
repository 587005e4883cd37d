//! The network edge: listeners, connections and what it costs to hold one.
//!
//! - [`listener`]: the accept loop of each listener: admission, the PROXY
//!   header and TLS handshake, HTTP/1.1 or HTTP/2, idle and eviction;
//! - [`limits`]: per-listener connection caps (total and per source), the
//!   eviction of unauthenticated connections when full, request-level idle
//!   tracking;
//! - [`fds`]: the open-files budget that keeps descriptors for the HSM;
//! - [`tls`], [`client_auth`], [`pem`]: the server's TLS configuration (the
//!   spec's suites only), mutual TLS with name rules, PEM material;
//! - [`proxy_protocol`]: PROXY protocol v2 from a load balancer (NLB);
//! - [`config`]: the listeners' settings.
//!
//! Nothing here knows the XKS API: a listener serves whatever router it is
//! given, and tags each request with its [`listener::ConnInfo`].
//!
//! **Crate `xks-net`**, one layer of the workspace (the table of layers is
//! in the `xks-proxy` crate's `src/lib.rs`). It uses `xks-telemetry`;
//! its `Cargo.toml` lists exactly those, so the compiler holds it to them.

#![forbid(unsafe_code)]

pub mod client_auth;
pub mod config;
pub mod fds;
pub mod limits;
pub mod listener;
pub mod pem;
pub mod proxy_protocol;
pub mod tls;
