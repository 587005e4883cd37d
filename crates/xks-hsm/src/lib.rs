//! The key managers, reached through PKCS#11.
//!
//! [`KeyManagers`] is what the rest of the proxy sees: async methods for the
//! four XKS needs (key metadata, encrypt, decrypt, health), answering with
//! this layer's own [`Fault`]s. Inside, one module per concern:
//!
//! - [`fleet`]: several key managers: routing, failover, the supervisor that
//!   probes each one and opens those that were not there at startup;
//! - [`agreement`]: whether key managers hold the same key under a label;
//! - [`health`]: what a key manager's ACTIVE / DEGRADED / UNAVAILABLE mean;
//! - [`gcm`]: the AES-GCM core (IV shapes, seal, open), shared with `hsm probe`;
//! - `pool`: one key manager's session pool (bounded queue, deadlines, hang
//!   detection) over its `worker` threads, which do the PKCS#11 calls;
//! - [`lanes`]: which CPU those threads (and the runtime's workers) run on,
//!   so that a request's hand-off stays on one CPU (the second `unsafe`
//!   island: the scheduler's affinity calls);
//! - `module`: a loaded PKCS#11 library shared by key managers, and recovery
//!   (re-initialization) when its device is lost;
//! - [`token`]: opening a token, and the administrative operations;
//! - [`objects`], [`key_spec`], `state`, `keys`: key objects, their spec,
//!   their enabled/disabled state, and the key-handle cache;
//! - [`token_info`]: what a token says of itself, read leniently (the one
//!   `unsafe` island: `cryptoki`'s strict reading rejects real tokens);
//! - [`mechanisms`]: the mechanisms the proxy needs, asked of the token;
//! - [`probe`]: `hsm probe`, whether a token will do and how to configure it;
//! - [`markers`]: small data objects that carry fleet-wide state in the
//!   token (disabled keys, lockdowns);
//! - [`hmac`]: HMAC keys that never leave the token (the audit seal key);
//! - [`fault`]: what can go wrong, in this layer's terms;
//! - [`config`]: what `[hsm]`, `[[hsm.backends]]` and `[health]` become;
//! - [`raw`]: the bare PKCS#11 work of a request, for the benchmark.
//!
//! Nothing here runs PKCS#11 on the async runtime, and nothing here knows HTTP.
//!
//! **Crate `xks-hsm`**, one layer of the workspace (the table of layers is
//! in the `xks-proxy` crate's `src/lib.rs`). It uses `xks-telemetry`, `xks-spec`;
//! its `Cargo.toml` lists exactly those, so the compiler holds it to them.

#![deny(unsafe_code)]

pub mod agreement;
pub mod config;
pub mod fault;
pub mod fleet;
pub mod gcm;
pub mod health;
pub mod hmac;
pub mod key_spec;
mod keys;
pub mod lanes;
pub mod markers;
pub mod mechanisms;
mod module;
pub mod objects;
mod operation;
mod pool;
pub mod probe;
mod queue;
pub mod raw;
mod state;
#[cfg(test)]
mod test_token;
pub mod token;
pub mod token_info;
mod worker;

pub use fault::Fault;
pub use fleet::KeyManagers;
pub use health::EkmStatus;
pub use hmac::HmacKey;
pub use key_spec::KeySpec;
pub use markers::Marker;
pub use objects::{KeyAttributes, KeyDetails, KeyInfo, Protection, Usages};
pub use token::{EkmInfo, HsmError, Token};
