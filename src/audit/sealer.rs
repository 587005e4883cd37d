//! What computes a seal: an HMAC-SHA256 inside the HSM.

use std::time::Duration;

use crate::hsm::KeyManagers;

/// Computes a seal's HMAC inside the HSM.
pub trait Sealer: Send {
    /// The seal key's label (it is part of what is sealed).
    fn key_label(&self) -> &str;
    /// HMAC-SHA256 of `input` with the seal key, within `within`: (the key
    /// manager that computed it, the MAC).
    fn seal(&self, input: &[u8], within: Duration) -> Result<(String, Vec<u8>), String>;
}

/// The real sealer: the key managers' control threads (never a runtime
/// thread: the writer is a plain thread and waits for the answer).
pub struct HsmSealer {
    pub keys: KeyManagers,
    pub label: String,
}

impl Sealer for HsmSealer {
    fn key_label(&self) -> &str {
        &self.label
    }

    fn seal(&self, input: &[u8], within: Duration) -> Result<(String, Vec<u8>), String> {
        self.keys
            .hmac_blocking(&self.label, input, within)
            .map_err(|e| e.to_string())
    }
}
