//! What kind of key an external key id names, in KMS's words.
//!
//! Only an AES-256 secret key can back a KMS key in an external key store,
//! and only such a key is ever used for cryptography. GetKeyMetadata still
//! reports any other key under its real spec (`AES_128`, `RSA_2048`,
//! `ECC_NIST_P256`, …) rather than "not found": KMS's CreateKey then fails
//! with "not a 256-bit symmetric key", which tells the operator what is
//! wrong, where `KeyNotFoundException` would send them looking for a typo.

use std::fmt;

use cryptoki::object::{Attribute, KeyType, ObjectClass};

/// The key spec of one PKCS#11 key object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    /// `CKK_AES`, with its length in bits.
    Aes(u64),
    /// `CKK_GENERIC_SECRET` (HMAC and derivation keys), length in bits.
    GenericSecret(u64),
    /// `CKK_RSA`, modulus length in bits.
    Rsa(u64),
    /// `CKK_EC` on a named curve (KMS's name), or `None` when unknown.
    Ec(Option<&'static str>),
    /// Any other key type: its PKCS#11 name without `CKK_`.
    Other(String),
}

impl KeySpec {
    /// True for the one spec that can back a KMS key.
    pub fn is_aes256(&self) -> bool {
        *self == KeySpec::Aes(256)
    }

    /// Derives the spec from a key's attributes (class, key type, value
    /// length, modulus bits or modulus, EC parameters); missing ones count
    /// as unknown.
    pub fn from_attributes(attrs: &[Attribute]) -> KeySpec {
        let mut class = None;
        let mut key_type = None;
        let mut value_len = 0u64;
        let mut modulus_bits = 0u64;
        let mut modulus_len = 0u64;
        let mut ec_params: &[u8] = &[];
        for a in attrs {
            match a {
                Attribute::Class(c) => class = Some(*c),
                Attribute::KeyType(t) => key_type = Some(*t),
                Attribute::ValueLen(l) => value_len = (*l).into(),
                Attribute::ModulusBits(b) => modulus_bits = (*b).into(),
                // A private key has the modulus but not its length in bits.
                Attribute::Modulus(m) => modulus_len = m.len() as u64 * 8,
                Attribute::EcParams(p) => ec_params = p,
                _ => {}
            }
        }
        let secret = class.is_none_or(|c| c == ObjectClass::SECRET_KEY);
        match key_type {
            Some(KeyType::AES) if secret => KeySpec::Aes(value_len * 8),
            Some(KeyType::GENERIC_SECRET) if secret => KeySpec::GenericSecret(value_len * 8),
            Some(KeyType::RSA) => KeySpec::Rsa(modulus_bits.max(modulus_len)),
            Some(KeyType::EC) => KeySpec::Ec(curve_name(ec_params)),
            Some(t) => KeySpec::Other(t.to_string().trim_start_matches("CKK_").to_string()),
            None => KeySpec::Other("UNKNOWN".into()),
        }
    }
}

impl fmt::Display for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySpec::Aes(bits) => write!(f, "AES_{bits}"),
            KeySpec::GenericSecret(bits) => write!(f, "GENERIC_SECRET_{bits}"),
            KeySpec::Rsa(bits) => write!(f, "RSA_{bits}"),
            KeySpec::Ec(Some(name)) => f.write_str(name),
            KeySpec::Ec(None) => f.write_str("ECC_OTHER"),
            KeySpec::Other(name) => f.write_str(name),
        }
    }
}

/// KMS's name for the curve whose OID `CKA_EC_PARAMS` holds (DER).
fn curve_name(params: &[u8]) -> Option<&'static str> {
    const CURVES: &[(&[u8], &str)] = &[
        // 1.2.840.10045.3.1.7
        (
            &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
            "ECC_NIST_P256",
        ),
        // 1.3.132.0.34
        (&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22], "ECC_NIST_P384"),
        // 1.3.132.0.35
        (&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23], "ECC_NIST_P521"),
        // 1.3.132.0.10
        (
            &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a],
            "ECC_SECG_P256K1",
        ),
    ];
    CURVES
        .iter()
        .find(|(oid, _)| *oid == params)
        .map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kms() {
        let spec = |attrs: Vec<Attribute>| KeySpec::from_attributes(&attrs).to_string();
        let secret = |t, len: u64| {
            vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(t),
                Attribute::ValueLen(len.into()),
            ]
        };
        assert_eq!(spec(secret(KeyType::AES, 32)), "AES_256");
        assert!(KeySpec::from_attributes(&secret(KeyType::AES, 32)).is_aes256());
        assert_eq!(spec(secret(KeyType::AES, 16)), "AES_128");
        assert!(!KeySpec::from_attributes(&secret(KeyType::AES, 16)).is_aes256());
        assert_eq!(
            spec(secret(KeyType::GENERIC_SECRET, 32)),
            "GENERIC_SECRET_256"
        );
        assert_eq!(
            spec(vec![
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::RSA),
                Attribute::ModulusBits(2048.into()),
            ]),
            "RSA_2048"
        );
        assert_eq!(
            spec(vec![
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::RSA),
                Attribute::Modulus(vec![0xff; 384]),
            ]),
            "RSA_3072"
        );
        assert_eq!(
            spec(vec![
                Attribute::KeyType(KeyType::EC),
                Attribute::EcParams(vec![0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22]),
            ]),
            "ECC_NIST_P384"
        );
        assert_eq!(spec(secret(KeyType::DES3, 24)), "DES3");
        // An AES key object that is not a secret key is not AES-256.
        let odd = vec![
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
        ];
        assert!(!KeySpec::from_attributes(&odd).is_aes256());
    }
}
