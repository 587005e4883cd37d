//! The PKCS#11 mechanisms the proxy needs from a token, asked of the token
//! (`C_GetMechanismInfo`) instead of assumed.
//!
//! Why ask: tokens differ. openCryptoki's soft token has AES-ECB and -CBC
//! but no `CKM_AES_GCM`; without asking, the first Encrypt would fail with
//! `CKR_MECHANISM_INVALID` and the operator would see a generic HSM error
//! on every request. Asked once when the token opens, the answer is one
//! sentence naming the missing mechanism, in the log, in the key manager's
//! health and in `check-config` and `hsm probe`.

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::{MechanismInfo, MechanismType};
use cryptoki::slot::Slot;

/// What a mechanism must be able to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    EncryptDecrypt,
    Generate,
    SignVerify,
}

impl Use {
    fn met_by(self, info: &MechanismInfo) -> bool {
        match self {
            Use::EncryptDecrypt => info.encrypt() && info.decrypt(),
            Use::Generate => info.generate(),
            Use::SignVerify => info.sign() && info.verify(),
        }
    }

    fn words(self) -> &'static str {
        match self {
            Use::EncryptDecrypt => "encrypt and decrypt",
            Use::Generate => "key generation",
            Use::SignVerify => "sign and verify",
        }
    }
}

/// One mechanism the proxy uses, and for what.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    pub name: &'static str,
    pub mechanism: MechanismType,
    pub to: Use,
    /// What uses it, for the report.
    pub for_what: &'static str,
    /// Without it the key manager cannot serve KMS at all.
    pub required: bool,
}

/// Everything the proxy may ask of a token, the required ones first.
pub const NEEDS: [Need; 4] = [
    Need {
        name: "CKM_AES_GCM",
        mechanism: MechanismType::AES_GCM,
        to: Use::EncryptDecrypt,
        for_what: "Encrypt, Decrypt and the health probe (AES-256-GCM)",
        required: true,
    },
    Need {
        name: "CKM_AES_KEY_GEN",
        mechanism: MechanismType::AES_KEY_GEN,
        to: Use::Generate,
        for_what: "keys create/rotate and the health-check key",
        required: true,
    },
    Need {
        name: "CKM_SHA256_HMAC",
        mechanism: MechanismType::SHA256_HMAC,
        to: Use::SignVerify,
        for_what: "the audit trail's seals ([audit])",
        required: false,
    },
    Need {
        name: "CKM_GENERIC_SECRET_KEY_GEN",
        mechanism: MechanismType::GENERIC_SECRET_KEY_GEN,
        to: Use::Generate,
        for_what: "the audit trail's seal key (audit init-key)",
        required: false,
    },
];

/// What the token said of one needed mechanism.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    Supported,
    /// Listed, but without the flags the proxy needs.
    WithoutFlags,
    Missing,
    /// The question itself failed (not "mechanism invalid").
    Unknown(String),
}

impl Support {
    pub fn ok(&self) -> bool {
        *self == Support::Supported
    }
}

/// Asks the token in `slot` about one mechanism.
pub fn support(ctx: &Pkcs11, slot: Slot, need: &Need) -> Support {
    match ctx.get_mechanism_info(slot, need.mechanism) {
        Ok(info) if need.to.met_by(&info) => Support::Supported,
        Ok(_) => Support::WithoutFlags,
        Err(P11Error::Pkcs11(RvError::MechanismInvalid, _)) => Support::Missing,
        Err(e) => Support::Unknown(e.to_string()),
    }
}

/// The sentence for a needed mechanism the token does not support as
/// needed; `None` when it does.
pub fn shortfall(need: &Need, support: &Support) -> Option<String> {
    let what = match support {
        Support::Supported => return None,
        Support::WithoutFlags => format!("lists {} without {}", need.name, need.to.words()),
        Support::Missing => format!("does not support {}", need.name),
        Support::Unknown(e) => format!("did not say whether it supports {} ({e})", need.name),
    };
    Some(format!(
        "the token {what}, which the proxy needs for {}",
        need.for_what
    ))
}

/// The first required mechanism the token lacks, as one sentence.
pub fn missing_required(ctx: &Pkcs11, slot: Slot) -> Option<String> {
    NEEDS
        .iter()
        .filter(|n| n.required)
        .find_map(|n| shortfall(n, &support(ctx, slot, n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sentence_names_the_mechanism_and_its_use() {
        let gcm = &NEEDS[0];
        assert_eq!(shortfall(gcm, &Support::Supported), None);
        let s = shortfall(gcm, &Support::Missing).unwrap();
        assert!(s.contains("does not support CKM_AES_GCM"), "{s}");
        assert!(s.contains("Encrypt, Decrypt"), "{s}");
        let s = shortfall(gcm, &Support::WithoutFlags).unwrap();
        assert!(s.contains("without encrypt and decrypt"), "{s}");
        assert!(NEEDS.iter().take_while(|n| n.required).count() == 2);
    }
}
