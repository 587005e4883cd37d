//! The key objects in a token: what the proxy reads of them, and how it
//! finds them by label. Pure PKCS#11 reads, used by the pool workers on the
//! request path and by the administrative commands alike.

use std::time::SystemTime;

use cryptoki::error::Error as P11Error;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::key_spec::KeySpec;

/// Key usages as PKCS#11 attributes; the XKS `keyUsage` list is derived from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usages {
    pub encrypt: bool,
    pub decrypt: bool,
    pub wrap: bool,
    pub unwrap: bool,
    pub sign: bool,
    pub verify: bool,
    pub derive: bool,
}

impl Usages {
    /// The spec's `keyUsage` strings, ENCRYPT and DECRYPT first (at most 7 < 10).
    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.encrypt, "ENCRYPT"),
            (self.decrypt, "DECRYPT"),
            (self.wrap, "WRAP"),
            (self.unwrap, "UNWRAP"),
            (self.sign, "SIGN"),
            (self.verify, "VERIFY"),
            (self.derive, "DERIVE"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

/// What GetKeyMetadata reports of a key: no handle, nothing of the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAttributes {
    pub spec: KeySpec,
    pub usages: Usages,
    pub enabled: bool,
}

/// What the proxy needs to know about one key.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub(crate) handle: ObjectHandle,
    pub label: String,
    /// What kind of key this is. Only an AES-256 secret key is ever used for
    /// cryptography; GetKeyMetadata reports the others as they are.
    pub spec: KeySpec,
    pub usages: Usages,
    /// False when the key is disabled for KMS: a marker object from
    /// `xks-proxy keys disable`, or a validity window (CKA_START_DATE /
    /// CKA_END_DATE) that excludes today. See [`super::state`].
    pub enabled: bool,
}

impl KeyInfo {
    /// The part of this that leaves the key manager layer.
    pub fn attributes(&self) -> KeyAttributes {
        KeyAttributes {
            spec: self.spec.clone(),
            usages: self.usages,
            enabled: self.enabled,
        }
    }
}

/// [`KeyInfo`] plus the attributes `xks-proxy keys show` reports.
#[derive(Debug, Clone)]
pub struct KeyDetails {
    pub info: KeyInfo,
    pub start_date: Option<String>,
    pub end_date: Option<String>,
    pub protection: Protection,
}

/// Whether a key's value can leave the token, and whether it ever could:
/// what PKCS#11 says of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protection {
    pub sensitive: bool,
    pub extractable: bool,
    /// Sensitive since it was made, and never extractable: a key that was
    /// readable once may have been read.
    pub always_sensitive: bool,
    pub never_extractable: bool,
    /// Generated inside the token (not imported: an imported key's value is
    /// known to whoever imported it).
    pub local: bool,
}

impl Protection {
    /// The attributes of `handle`; the absent ones count as unprotected.
    pub(crate) fn read(session: &Session, handle: ObjectHandle) -> Result<Protection, P11Error> {
        let mut p = Protection {
            sensitive: false,
            extractable: true,
            always_sensitive: false,
            never_extractable: false,
            local: false,
        };
        for a in session.get_attributes(
            handle,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Local,
            ],
        )? {
            match a {
                Attribute::Sensitive(b) => p.sensitive = b,
                Attribute::Extractable(b) => p.extractable = b,
                Attribute::AlwaysSensitive(b) => p.always_sensitive = b,
                Attribute::NeverExtractable(b) => p.never_extractable = b,
                Attribute::Local(b) => p.local = b,
                _ => {}
            }
        }
        Ok(p)
    }

    /// Generated in the token, and its value never readable since.
    pub fn is_protected(&self) -> bool {
        self.sensitive
            && !self.extractable
            && self.always_sensitive
            && self.never_extractable
            && self.local
    }
}

/// Secret keys carrying exactly this label.
/// The attributes every secret key the proxy generates shares: a 256-bit
/// token object, private, sensitive and never extractable (the key's value
/// never leaves the HSM). Callers add the usages.
pub(crate) fn protected_key_template(key_type: KeyType, label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(key_type),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

pub(crate) fn find_secret_keys(
    session: &Session,
    label: &str,
) -> Result<Vec<ObjectHandle>, P11Error> {
    session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ])
}

/// The key objects an external key id may name: its secret keys or, when it
/// has none, its private keys (an RSA or EC key pair shares one label). The
/// latter are only ever described, never used: see [`KeySpec`].
pub(crate) fn find_keys(session: &Session, label: &str) -> Result<Vec<ObjectHandle>, P11Error> {
    let secret = find_secret_keys(session, label)?;
    if !secret.is_empty() {
        return Ok(secret);
    }
    session.find_objects(&[
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ])
}

/// Reads the attributes that make up [`KeyInfo`]. Attributes the token does not
/// report are treated as false/absent, which errs on the side of refusing.
pub(crate) fn read_key_info(
    session: &Session,
    handle: ObjectHandle,
    label: &str,
    now: SystemTime,
) -> Result<KeyInfo, P11Error> {
    let attrs = session.get_attributes(
        handle,
        &[
            AttributeType::Class,
            AttributeType::KeyType,
            AttributeType::ValueLen,
            AttributeType::ModulusBits,
            AttributeType::Modulus,
            AttributeType::EcParams,
            AttributeType::Encrypt,
            AttributeType::Decrypt,
            AttributeType::Wrap,
            AttributeType::Unwrap,
            AttributeType::Sign,
            AttributeType::Verify,
            AttributeType::Derive,
        ],
    )?;
    let mut u = Usages::default();
    for a in &attrs {
        match a {
            Attribute::Encrypt(b) => u.encrypt = *b,
            Attribute::Decrypt(b) => u.decrypt = *b,
            Attribute::Wrap(b) => u.wrap = *b,
            Attribute::Unwrap(b) => u.unwrap = *b,
            Attribute::Sign(b) => u.sign = *b,
            Attribute::Verify(b) => u.verify = *b,
            Attribute::Derive(b) => u.derive = *b,
            _ => {}
        }
    }
    Ok(KeyInfo {
        handle,
        label: label.to_string(),
        spec: KeySpec::from_attributes(&attrs),
        usages: u,
        enabled: super::state::is_enabled(session, handle, label, now)?,
    })
}

/// The newest version of external key `id`: the highest N for which a
/// secret key labelled `id#N` exists (0 when never rotated). One
/// `C_FindObjects` per version, and one more to find the end.
pub(crate) fn latest_version(session: &Session, id: &str) -> Result<u32, P11Error> {
    let mut v = 0;
    while !find_secret_keys(session, &xks_spec::aead::version_label(id, v + 1))?.is_empty() {
        v += 1;
    }
    Ok(v)
}
