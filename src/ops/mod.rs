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

pub mod admin;
pub mod credentials;
pub mod migrate;
pub mod reload;
