//! HMAC keys that never leave the token: the audit trail's seal key.
//!
//! The audit trail (see the `audit` layer) seals its hash chain with an
//! HMAC-SHA256 computed *inside* the HSM, so that whoever can write the
//! trail's files but cannot use the HSM cannot forge a seal. That only
//! holds if the key cannot be read out: it is generated in the token
//! (`CKM_GENERIC_SECRET_KEY_GEN`), sensitive, non-extractable, usable only
//! to sign and verify (`CKM_SHA256_HMAC`), never to encrypt, wrap or
//! derive. [`HmacKey`] reports the attributes a verifier must check before
//! trusting a seal made with it.

use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::objects::{protected_key_template, Protection};

/// An HMAC key found in the token, with what makes its seals trustworthy.
#[derive(Debug, Clone, Copy)]
pub struct HmacKey {
    pub(crate) handle: ObjectHandle,
    pub protection: Protection,
}

impl HmacKey {
    /// A key whose value can leave the token (or once could) proves nothing.
    pub fn is_protected(&self) -> bool {
        self.protection.is_protected()
    }
}

/// The generic-secret keys carrying `label`.
pub(crate) fn find(session: &Session, label: &str) -> Result<Vec<ObjectHandle>, P11Error> {
    session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Label(label.as_bytes().to_vec()),
    ])
}

/// The HMAC keys labelled `label`, with their protection attributes
/// (normally one; a seal must name exactly one key, which callers check).
pub(crate) fn describe(session: &Session, label: &str) -> Result<Vec<HmacKey>, P11Error> {
    let mut keys = Vec::new();
    for handle in find(session, label)? {
        keys.push(HmacKey {
            handle,
            protection: Protection::read(session, handle)?,
        });
    }
    Ok(keys)
}

/// Generates a 256-bit HMAC key in the token: private, sensitive,
/// non-extractable, sign and verify only. Needs a read-write session.
pub(crate) fn generate(session: &Session, label: &str) -> Result<ObjectHandle, P11Error> {
    let mut template = protected_key_template(KeyType::GENERIC_SECRET, label);
    template.extend([
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]);
    session.generate_key(&Mechanism::GenericSecretKeyGen, &template)
}

/// HMAC-SHA256 of `data`, computed in the token.
pub(crate) fn sign(session: &Session, key: ObjectHandle, data: &[u8]) -> Result<Vec<u8>, P11Error> {
    session.sign(&Mechanism::Sha256Hmac, key, data)
}

/// Whether `mac` is the HMAC-SHA256 of `data` under `key`, checked in the
/// token (`C_Verify`).
pub(crate) fn verify(
    session: &Session,
    key: ObjectHandle,
    data: &[u8],
    mac: &[u8],
) -> Result<bool, P11Error> {
    match session.verify(&Mechanism::Sha256Hmac, key, data, mac) {
        Ok(()) => Ok(true),
        Err(P11Error::Pkcs11(RvError::SignatureInvalid | RvError::SignatureLenRange, _)) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
