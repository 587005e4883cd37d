//! The key managers, reached through PKCS#11.
//!
//! [`KeyManagers`] is what the rest of the proxy sees: async methods for the
//! four XKS needs (key metadata, encrypt, decrypt, health), answering with
//! this layer's own [`Fault`]s. Inside, one module per concern:
//!
//! - [`fleet`]: several key managers: routing, failover, the supervisor that
//!   probes each one and opens those that were not there at startup;
//! - [`health`]: what a key manager's ACTIVE / DEGRADED / UNAVAILABLE mean;
//! - `pool`: one key manager's session pool (bounded queue, deadlines, hang
//!   detection) over its `worker` threads, which do the PKCS#11 calls;
//! - `module`: a loaded PKCS#11 library shared by key managers, and recovery
//!   (re-initialization) when its device is lost;
//! - [`token`]: opening a token, and the administrative operations;
//! - [`objects`], [`key_spec`], `state`, `keys`: key objects, their spec,
//!   their enabled/disabled state, and the key-handle cache;
//! - [`fault`]: what can go wrong, in this layer's terms.
//!
//! Nothing here runs PKCS#11 on the async runtime, and nothing here knows HTTP.

pub mod fault;
pub mod fleet;
pub mod health;
pub mod key_spec;
mod keys;
mod module;
pub mod objects;
mod pool;
mod state;
pub mod token;
mod worker;

use zeroize::Zeroizing;

pub use fault::Fault;
pub use fleet::KeyManagers;
pub use health::EkmStatus;
pub use key_spec::KeySpec;
pub use objects::{KeyDetails, KeyInfo, Usages};
pub use token::{EkmInfo, HsmError, Token};

use crate::aead::AadLayout;

/// Input of one Encrypt, already decoded and validated. The ciphertext
/// metadata is chosen by the HSM layer: it records the key version used.
pub struct EncryptInput {
    pub plaintext: Zeroizing<Vec<u8>>,
    pub aad: Vec<u8>,
    pub cdiv: bool,
}

/// Output of one Encrypt.
#[derive(Debug)]
pub struct EncryptOutput {
    pub ciphertext: Vec<u8>,
    pub iv: Vec<u8>,
    pub tag: Vec<u8>,
    pub metadata: Vec<u8>,
    pub cdiv: Option<[u8; 32]>,
}

/// Input of one Decrypt, already decoded and validated.
pub struct DecryptInput {
    pub ciphertext: Vec<u8>,
    pub iv: Vec<u8>,
    pub tag: Vec<u8>,
    /// The request's AAD; `None` when it had no AAD field.
    pub aad: Option<Vec<u8>>,
    pub metadata: Vec<u8>,
    /// The AAD constructions to try, in order (see `aead::decrypt_layouts`).
    pub layouts: &'static [AadLayout],
}

/// Output of one Decrypt: the plaintext, and the construction that
/// authenticated (the AWS sample's counts toward the compat metric).
pub struct DecryptOutput {
    pub plaintext: Zeroizing<Vec<u8>>,
    pub layout: AadLayout,
}
