//! What the trail asks of the HSM: seals (an HMAC-SHA256 computed inside
//! it) and the witness of the newest seal (a marker stored in it, see
//! [`super::witness`]).

use std::time::Duration;

use super::witness::{Witness, APPLICATION};
use xks_hsm::{Fault, KeyManagers};

/// Why a seal or a witness could not be made or read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SealError {
    /// What the key managers said (busy, hung, gone, no such key…).
    #[error(transparent)]
    KeyManager(#[from] Fault),
    /// The witness only moves forward: storing this one would lower it.
    #[error(
        "the HSM witnesses seq {held} of this chain; storing seq {offered} would move the witness \
         back (were the files cut or replaced while the witness could not be read?)"
    )]
    Backwards { held: u64, offered: u64 },
    #[error("no key manager is open")]
    NoKeyManager,
}

/// Computes a seal's HMAC inside the HSM, and keeps the witness of the
/// newest seal there.
pub trait Sealer: Send {
    /// The seal key's label (it is part of what is sealed).
    fn key_label(&self) -> &str;
    /// HMAC-SHA256 of `input` with the seal key, within `within`: (the key
    /// manager that computed it, the MAC).
    fn seal(&self, input: &[u8], within: Duration) -> Result<(String, Vec<u8>), SealError>;
    /// Stores `w` as the newest seal of its instance, within `within`;
    /// never lowers the witness ([`SealError::Backwards`]).
    fn put_witness(&self, w: &Witness, within: Duration) -> Result<(), SealError>;
    /// The newest seal of `instance` the HSM witnessed, if any.
    fn witness(&self, instance: &str, within: Duration) -> Result<Option<Witness>, SealError>;
}

/// Whether storing `offered` over `held` keeps the witness moving forward:
/// a later seal, or the same one again.
pub fn moves_forward(held: &Witness, offered: &Witness) -> bool {
    offered.seq > held.seq || (offered.seq == held.seq && offered.hash == held.hash)
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

    fn seal(&self, input: &[u8], within: Duration) -> Result<(String, Vec<u8>), SealError> {
        Ok(self.keys.hmac_blocking(&self.label, input, within)?)
    }

    /// Into every open key manager (a seal may come from any of them);
    /// fine when one took it: the reader takes the newest copy. The
    /// witness held is read first, and a lower one is never stored.
    fn put_witness(&self, w: &Witness, within: Duration) -> Result<(), SealError> {
        let deadline = std::time::Instant::now() + within;
        if let Some(held) = self.witness(&w.instance, within / 2)? {
            if !moves_forward(&held, w) {
                return Err(SealError::Backwards {
                    held: held.seq,
                    offered: w.seq,
                });
            }
        }
        let label = Witness::label(&w.instance);
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let results = self
            .keys
            .put_marker_blocking(APPLICATION, &label, &w.value(), left);
        if results.iter().any(Result::is_ok) {
            return Ok(());
        }
        Err(match results.into_iter().find_map(Result::err) {
            Some(e) => e.into(),
            None => SealError::NoKeyManager,
        })
    }

    /// The newest copy among the key managers that answered; an error only
    /// when none did.
    fn witness(&self, instance: &str, within: Duration) -> Result<Option<Witness>, SealError> {
        Witness::newest_among(self.keys.markers_blocking(APPLICATION, within))
            .map(|mut newest| newest.remove(instance))
            .map_err(|mut errors| {
                errors
                    .pop()
                    .map_or(SealError::NoKeyManager, SealError::from)
            })
    }
}
