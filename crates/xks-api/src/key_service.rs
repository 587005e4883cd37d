//! The narrow interface between the API and the key managers.

use std::future::Future;
use std::sync::Arc;

use xks_hsm::{EkmInfo, EkmStatus, Fault, KeyAttributes, KeyManagers};
use xks_spec::wire::{DecryptInput, DecryptOutput, EncryptInput, EncryptOutput};

/// What the API needs from the key managers: the four XKS needs, answered
/// in the key manager layer's own terms ([`Fault`]s, which only
/// `api::response` turns into HTTP). [`KeyManagers`] is the real one; the
/// pipeline's unit tests script their own.
pub trait KeyService: Send + Sync + 'static {
    /// A key's spec, usages and state (GetKeyMetadata).
    fn key_info(&self, key_id: &str) -> impl Future<Output = Result<KeyAttributes, Fault>> + Send;
    fn encrypt(
        &self,
        key_id: &str,
        input: EncryptInput,
    ) -> impl Future<Output = Result<EncryptOutput, Fault>> + Send;
    fn decrypt(
        &self,
        key_id: &str,
        input: DecryptInput,
    ) -> impl Future<Output = Result<DecryptOutput, Fault>> + Send;
    /// Each key manager and its current status (GetHealthStatus, `/ping`).
    /// Cheap and non-blocking: the status is kept up to date by probes.
    fn health(&self) -> Vec<(Arc<EkmInfo>, EkmStatus)>;
}

impl KeyService for KeyManagers {
    async fn key_info(&self, key_id: &str) -> Result<KeyAttributes, Fault> {
        KeyManagers::key_info(self, key_id)
            .await
            .map(|k| k.attributes())
    }

    async fn encrypt(&self, key_id: &str, input: EncryptInput) -> Result<EncryptOutput, Fault> {
        KeyManagers::encrypt(self, key_id, input).await
    }

    async fn decrypt(&self, key_id: &str, input: DecryptInput) -> Result<DecryptOutput, Fault> {
        KeyManagers::decrypt(self, key_id, input).await
    }

    fn health(&self) -> Vec<(Arc<EkmInfo>, EkmStatus)> {
        self.details()
    }
}
