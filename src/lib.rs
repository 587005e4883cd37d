//! An AWS KMS External Key Store (XKS) proxy.
//!
//! KMS calls the proxy over HTTPS, signed with SigV4, for every use of a key in
//! an external key store; the proxy does the AES-256-GCM work in the customer's
//! HSM through PKCS#11. Modules, one concept each:
//!
//! - [`config`]: the TOML file, validated at startup;
//! - [`tls`]: the listener's TLS configuration (spec cipher suites only);
//! - [`mtls`]: mutual TLS, the client certificate and name rules;
//! - [`auth`]: SigV4 verification;
//! - [`authz`]: secondary authorization with Cedar policies;
//! - [`throttle`]: per-key-store request-rate quotas;
//! - [`api`]: routing, the four XKS operations, errors as JSON, the access log;
//! - [`aead`]: the spec's AAD construction, ciphertext metadata, CDIV;
//! - [`hsm`]: the key managers through PKCS#11: pools, health, failover, recovery;
//! - [`server`]: listeners, connections, graceful shutdown;
//! - [`proxy_protocol`]: PROXY protocol v2 from a load balancer (NLB);
//! - [`net`]: connection caps, eviction, idle tracking, the open-files budget;
//! - [`reload`]: hot reload of key stores, credentials and the certificate;
//! - [`replay`]: the optional cache that refuses a signed request seen before;
//! - [`metrics`] and [`admin`]: Prometheus metrics on the admin listener;
//! - [`client`]: a SigV4-signing XKS client (tests, benchmark, tooling);
//! - [`migrate`]: the AWS sample proxy's settings, converted to our config;
//! - [`cli`]: the `xks-proxy` command line.

pub mod admin;
pub mod aead;
pub mod api;
pub mod auth;
pub mod authz;
pub mod check;
pub mod cli;
pub mod client;
pub mod config;
pub mod credentials;
pub mod error;
pub mod hsm;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod mtls;
pub mod net;
pub mod proxy_protocol;
pub mod reload;
pub mod replay;
pub mod server;
pub mod throttle;
pub mod time;
pub mod tls;

pub use error::XksError;
