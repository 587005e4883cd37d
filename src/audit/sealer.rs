//! What the trail asks of the HSM: seals (an HMAC-SHA256 computed inside
//! it) and the witness of the newest seal (a marker stored in it, see
//! [`super::witness`]).

use std::time::Duration;

use super::witness::{Witness, APPLICATION};
use crate::hsm::KeyManagers;

/// Computes a seal's HMAC inside the HSM, and keeps the witness of the
/// newest seal there.
pub trait Sealer: Send {
    /// The seal key's label (it is part of what is sealed).
    fn key_label(&self) -> &str;
    /// HMAC-SHA256 of `input` with the seal key, within `within`: (the key
    /// manager that computed it, the MAC).
    fn seal(&self, input: &[u8], within: Duration) -> Result<(String, Vec<u8>), String>;
    /// Stores `w` as the newest seal of its instance, within `within`.
    fn put_witness(&self, w: &Witness, within: Duration) -> Result<(), String>;
    /// The newest seal of `instance` the HSM witnessed, if any.
    fn witness(&self, instance: &str, within: Duration) -> Result<Option<Witness>, String>;
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

    /// Into every open key manager (a seal may come from any of them);
    /// fine when one took it: the reader takes the newest copy.
    fn put_witness(&self, w: &Witness, within: Duration) -> Result<(), String> {
        let label = Witness::label(&w.instance);
        let results = self
            .keys
            .put_marker_blocking(APPLICATION, &label, &w.value(), within);
        if results.iter().any(Result::is_ok) {
            return Ok(());
        }
        Err(match results.into_iter().find_map(Result::err) {
            Some(e) => e.to_string(),
            None => "no key manager is open".into(),
        })
    }

    /// The newest copy among the key managers that answered; an error only
    /// when none did.
    fn witness(&self, instance: &str, within: Duration) -> Result<Option<Witness>, String> {
        let mut copies = Vec::new();
        let mut error = None;
        let mut answered = false;
        for r in self.keys.markers_blocking(APPLICATION, within) {
            match r {
                Ok(markers) => {
                    answered = true;
                    copies.extend(
                        markers
                            .iter()
                            .filter_map(|m| Witness::parse(&m.label, &m.value)),
                    );
                }
                Err(e) => error = Some(e.to_string()),
            }
        }
        if !answered {
            return Err(error.unwrap_or_else(|| "no key manager is open".into()));
        }
        Ok(Witness::newest_per_instance(copies).remove(instance))
    }
}
