//! What can go wrong in the key manager layer, in its own terms.
//!
//! The HSM layer knows nothing of HTTP: it says *what* happened, and the API
//! layer decides which row of the spec's error table that is. The split that
//! matters most here is between answers about the request (the key does not
//! exist, is disabled, does not allow the operation; the ciphertext does not
//! authenticate) and faults of the key manager itself (busy, hung, gone,
//! failing): only the latter are worth trying on another key manager, and
//! only they say anything about a key manager's health.

/// One failure of a key operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// No key carries this label.
    #[error("no key with id '{key}' in key manager '{ekm}'")]
    KeyNotFound { key: String, ekm: String },
    /// The key is disabled for KMS (marker object or validity window).
    #[error("key '{key}' is disabled in the key manager")]
    KeyDisabled { key: String },
    /// The key does not allow this operation (usage attributes, or it is
    /// not an AES-256 secret key).
    #[error("{0}")]
    WrongUsage(String),
    /// The ciphertext, IV, tag, AAD or metadata do not authenticate.
    #[error(
        "the ciphertext, IV, authentication tag, AAD or ciphertextMetadata do not \
         authenticate under this key"
    )]
    BadCiphertext,
    /// The ciphertext metadata names a key version that does not exist.
    #[error(
        "the ciphertext metadata names version {version} of key '{key}', which does not exist"
    )]
    UnknownVersion { key: String, version: u32 },
    /// The key manager's queue is full: the proxy cannot keep up.
    #[error("the proxy's HSM queue for key manager '{ekm}' is full; it cannot keep up with the request rate")]
    Busy { ekm: String },
    /// No session became free in time (the job never started).
    #[error("no session of key manager '{ekm}' became free in time")]
    NoSession { ekm: String },
    /// The key manager started the job but did not answer in time.
    #[error("key manager '{ekm}' did not answer in time")]
    Timeout { ekm: String },
    /// The key manager cannot be reached: not opened, device or token lost.
    #[error("key manager '{ekm}' is unavailable: {why}")]
    Unavailable { ekm: String, why: String },
    /// The key manager returned an error that says nothing about the request.
    #[error("key manager '{ekm}' failed: {why}")]
    Failed { ekm: String, why: String },
}

impl Fault {
    /// A fault of the key manager rather than an answer about the request:
    /// another key manager may succeed where this one did not.
    pub fn is_key_manager_fault(&self) -> bool {
        matches!(
            self,
            Fault::Busy { .. }
                | Fault::NoSession { .. }
                | Fault::Timeout { .. }
                | Fault::Unavailable { .. }
                | Fault::Failed { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_not_faults_of_the_key_manager() {
        let ekm = || "hsm-a".to_string();
        for f in [
            Fault::KeyNotFound {
                key: "k".into(),
                ekm: ekm(),
            },
            Fault::KeyDisabled { key: "k".into() },
            Fault::WrongUsage("no".into()),
            Fault::BadCiphertext,
            Fault::UnknownVersion {
                key: "k".into(),
                version: 3,
            },
        ] {
            assert!(!f.is_key_manager_fault(), "{f:?}");
        }
        for f in [
            Fault::Busy { ekm: ekm() },
            Fault::NoSession { ekm: ekm() },
            Fault::Timeout { ekm: ekm() },
            Fault::Unavailable {
                ekm: ekm(),
                why: "gone".into(),
            },
            Fault::Failed {
                ekm: ekm(),
                why: "CKR_GENERAL_ERROR".into(),
            },
        ] {
            assert!(f.is_key_manager_fault(), "{f:?}");
        }
    }
}
