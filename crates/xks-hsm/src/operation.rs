//! One key operation on a session, once its key is known: the GCM work a
//! request needs, apart from the session's lifecycle (see `worker`).
//!
//! - Encrypt: the IV where `iv_source` says it comes from (the HSM's RNG in
//!   batches: [`IvPool`]), the seal, then, when KMS asks for a CDIV, the
//!   CDIV computed *first* and a verification decrypt in the HSM, as the
//!   spec's Appendix C prescribes;
//! - Decrypt: each AAD layout in turn (the spec's, then the AWS sample's
//!   when the key store takes its ciphertexts);
//! - [`check_key`]: a key that cannot serve the operation is refused before
//!   the HSM is touched;
//! - [`OpError`]: a failure inside an operation, before the worker maps it
//!   to a fault (its meaning depends on the operation and the session).
//!
//! Tested against a real token (SoftHSM in a temp dir, see `test_token`).

use cryptoki::context::Function;
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use subtle::ConstantTimeEq;

use super::fault::Fault;
use super::gcm::{self, GcmError, IvInput, Sealed};
use super::objects::KeyInfo;
use xks_spec::aead::{cdiv_sha256, hsm_aad, IV_LEN};
use xks_spec::wire::{DecryptInput, DecryptOutput, EncryptInput, EncryptOutput};

/// Which operation a PKCS#11 error came from; decides how it maps to XKS.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum OpKind {
    Lookup,
    Encrypt,
    Decrypt,
}

/// GCM IVs from the HSM's random generator, fetched in batches: one
/// `C_GenerateRandom` per [`IV_BATCH`] encryptions instead of one each. An IV
/// must be unique and unpredictable, not secret, and each one in the buffer is
/// handed out exactly once, so batching changes nothing but the cost.
pub(crate) struct IvPool {
    buf: Vec<u8>,
    pos: usize,
}

/// IVs fetched per `C_GenerateRandom`.
const IV_BATCH: usize = 256;

impl IvPool {
    pub(crate) fn new() -> Self {
        IvPool {
            buf: vec![0; IV_LEN * IV_BATCH],
            // Empty: the first use fills it.
            pos: IV_LEN * IV_BATCH,
        }
    }

    pub(crate) fn next(&mut self, s: &Session) -> Result<[u8; IV_LEN], P11Error> {
        if self.pos + IV_LEN > self.buf.len() {
            s.generate_random_slice(&mut self.buf)?;
            self.pos = 0;
        }
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&self.buf[self.pos..self.pos + IV_LEN]);
        self.pos += IV_LEN;
        Ok(iv)
    }
}

/// Failure inside an operation: either already a fault, or a raw PKCS#11
/// error whose meaning depends on the operation.
pub(crate) enum OpError {
    Fault(Fault),
    P11(P11Error),
    /// The key manager answered, but not as the configuration says it would.
    Misconfigured(String),
}

impl From<Fault> for OpError {
    fn from(e: Fault) -> Self {
        OpError::Fault(e)
    }
}
impl From<P11Error> for OpError {
    fn from(e: P11Error) -> Self {
        OpError::P11(e)
    }
}
impl From<GcmError> for OpError {
    fn from(e: GcmError) -> Self {
        match e {
            GcmError::P11(e) => OpError::P11(e),
            GcmError::Misconfigured(why) => OpError::Misconfigured(why),
        }
    }
}

/// The PKCS#11 return value of an error, if it is one.
pub(crate) fn rv(e: &P11Error) -> Option<RvError> {
    match e {
        P11Error::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// The codes the spec and tokens use for a ciphertext that does not
/// authenticate (a tag mismatch, a wrong length). The one list: the worker
/// maps these to a bad ciphertext, and a decrypt tries the next AAD layout
/// on them.
pub(crate) fn is_bad_ciphertext(r: RvError) -> bool {
    matches!(
        r,
        RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::DataInvalid
            | RvError::DataLenRange
            | RvError::SignatureInvalid
    )
}

/// A `C_Decrypt` failure that a tag mismatch can cause: the codes above,
/// and the generic ones SoftHSM and others use for it.
pub(crate) fn may_be_auth_failure(e: &P11Error) -> bool {
    rv(e).is_some_and(|r| {
        is_bad_ciphertext(r) || matches!(r, RvError::GeneralError | RvError::FunctionFailed)
    })
}

/// Refuses a key that cannot serve the operation, before touching the HSM.
/// A lookup (GetKeyMetadata) describes any key; only an AES-256 secret key
/// is ever used for cryptography.
pub(crate) fn check_key(key: &KeyInfo, kind: OpKind) -> Result<(), Fault> {
    match kind {
        OpKind::Lookup => Ok(()),
        _ if !key.spec.is_aes256() => Err(Fault::WrongUsage(format!(
            "key '{}' is {}, not an AES-256 secret key; only AES-256 keys back KMS keys",
            key.label, key.spec
        ))),
        _ if !key.enabled => Err(Fault::KeyDisabled {
            key: key.label.clone(),
        }),
        OpKind::Encrypt if !key.usages.encrypt => Err(Fault::WrongUsage(format!(
            "key '{}' does not allow ENCRYPT (CKA_ENCRYPT is false)",
            key.label
        ))),
        OpKind::Decrypt if !key.usages.decrypt => Err(Fault::WrongUsage(format!(
            "key '{}' does not allow DECRYPT (CKA_DECRYPT is false)",
            key.label
        ))),
        _ => Ok(()),
    }
}

/// Encrypt, then (when a CDIV is requested) compute the CDIV *first* and only
/// then prove the output decrypts in the HSM, as Appendix C prescribes: a bit
/// flip after the CDIV was computed is then caught by the verification decrypt.
pub(crate) fn encrypt_once(
    s: &Session,
    key: ObjectHandle,
    iv_input: IvInput,
    metadata: &[u8],
    input: &EncryptInput,
) -> Result<EncryptOutput, OpError> {
    let aad = hsm_aad(&input.aad, metadata);
    let Sealed {
        ciphertext,
        tag,
        iv,
    } = gcm::seal(s, key, iv_input, &aad, &input.plaintext)?;
    let cdiv = input
        .cdiv
        .then(|| cdiv_sha256(&input.aad, metadata, &iv, &ciphertext, &tag));
    if input.cdiv {
        let check = gcm::open(s, key, &iv, &aad, &ciphertext, &tag)?;
        if !bool::from(check.as_slice().ct_eq(input.plaintext.as_slice())) {
            return Err(OpError::Misconfigured(
                "the verification decrypt of the fresh ciphertext did not return the plaintext"
                    .into(),
            ));
        }
    }
    Ok(EncryptOutput {
        ciphertext,
        iv,
        tag,
        metadata: metadata.to_vec(),
        cdiv,
    })
}

/// Decrypts `input` with `key`, trying its AAD layouts in order (see
/// `spec::aead::decrypt_layouts`): a layout that does not authenticate moves
/// on to the next, and only the last one's failure is reported.
pub(crate) fn decrypt_once(
    s: &Session,
    key: ObjectHandle,
    input: &DecryptInput,
) -> Result<DecryptOutput, OpError> {
    let mut layouts = input.layouts.iter().peekable();
    while let Some(&layout) = layouts.next() {
        let aad = layout.hsm_aad(input.aad.as_deref(), &input.metadata);
        match gcm::open(s, key, &input.iv, &aad, &input.ciphertext, &input.tag) {
            Ok(plaintext) => return Ok(DecryptOutput { plaintext, layout }),
            Err(e) if layouts.peek().is_some() && may_be_auth_failure(&e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(OpError::P11(P11Error::Pkcs11(
        RvError::ArgumentsBad,
        Function::Decrypt,
    )))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use zeroize::Zeroizing;

    use super::*;
    use crate::key_spec::KeySpec;
    use crate::objects::Usages;
    use crate::test_token::token;
    use xks_spec::aead::{metadata_for_version, AadLayout};

    const AAD: &[u8] = b"kms encryption context";

    fn encrypt(s: &Session, key: ObjectHandle, cdiv: bool) -> (EncryptOutput, Vec<u8>) {
        let metadata = metadata_for_version(0);
        let input = EncryptInput {
            plaintext: Zeroizing::new(b"a data key of thirty-two bytes!!".to_vec()),
            aad: AAD.to_vec(),
            cdiv,
        };
        let iv = IvInput::random_iv(s).unwrap();
        let out = encrypt_once(s, key, IvInput::Given(iv), &metadata, &input)
            .ok()
            .expect("encrypt");
        assert_eq!(out.iv, iv);
        (out, input.plaintext.to_vec())
    }

    fn decrypt_input(out: &EncryptOutput, layouts: &'static [AadLayout]) -> DecryptInput {
        DecryptInput {
            ciphertext: out.ciphertext.clone(),
            iv: out.iv.clone(),
            tag: out.tag.clone(),
            aad: Some(AAD.to_vec()),
            metadata: out.metadata.clone(),
            layouts,
        }
    }

    #[test]
    fn the_iv_pool_hands_out_each_iv_once_and_refills() {
        let s = token().session();
        let mut pool = IvPool::new();
        let ivs: HashSet<[u8; IV_LEN]> = (0..2 * IV_BATCH + 1)
            .map(|_| pool.next(&s).unwrap())
            .collect();
        assert_eq!(ivs.len(), 2 * IV_BATCH + 1, "an IV came out twice");
    }

    #[test]
    fn encrypt_and_decrypt_round_trip_with_the_cdiv_of_appendix_c() {
        let t = token();
        let s = t.session();
        let key = t.aes_key(&s);
        let (out, plaintext) = encrypt(&s, key, true);
        assert_eq!(out.tag.len(), 16);
        assert_eq!(out.ciphertext.len(), plaintext.len());
        let expected = cdiv_sha256(AAD, &out.metadata, &out.iv, &out.ciphertext, &out.tag);
        assert_eq!(out.cdiv, Some(expected));
        let back = decrypt_once(&s, key, &decrypt_input(&out, &[AadLayout::Spec]))
            .ok()
            .expect("decrypt");
        assert_eq!(back.plaintext.as_slice(), plaintext.as_slice());
        assert_eq!(back.layout, AadLayout::Spec);
        // No CDIV asked, none computed.
        assert_eq!(encrypt(&s, key, false).0.cdiv, None);
    }

    #[test]
    fn a_changed_ciphertext_tag_or_aad_does_not_decrypt() {
        let t = token();
        let s = t.session();
        let key = t.aes_key(&s);
        let (out, _) = encrypt(&s, key, false);
        let mut bad = [
            decrypt_input(&out, &[AadLayout::Spec]),
            decrypt_input(&out, &[AadLayout::Spec]),
            decrypt_input(&out, &[AadLayout::Spec]),
        ];
        bad[0].ciphertext[0] ^= 1;
        bad[1].tag[15] ^= 0x80;
        bad[2].aad = Some(b"another context".to_vec());
        for input in &bad {
            match decrypt_once(&s, key, input) {
                Err(OpError::P11(e)) => assert!(may_be_auth_failure(&e), "{e}"),
                Ok(_) => panic!("a forged ciphertext decrypted"),
                Err(_) => panic!("not a PKCS#11 failure"),
            }
        }
    }

    #[test]
    fn decrypt_tries_each_layout_in_order_and_says_which_one_held() {
        let t = token();
        let s = t.session();
        let key = t.aes_key(&s);
        let (out, plaintext) = encrypt(&s, key, false);
        const BOTH: &[AadLayout] = &[AadLayout::AwsSample, AadLayout::Spec];
        let back = decrypt_once(&s, key, &decrypt_input(&out, BOTH))
            .ok()
            .expect("the second layout holds");
        assert_eq!(back.layout, AadLayout::Spec);
        assert_eq!(back.plaintext.as_slice(), plaintext.as_slice());
        // Only the sample's layout: nothing holds.
        const SAMPLE: &[AadLayout] = &[AadLayout::AwsSample];
        assert!(decrypt_once(&s, key, &decrypt_input(&out, SAMPLE)).is_err());
    }

    #[test]
    fn a_key_that_cannot_serve_is_refused_before_the_hsm() {
        let t = token();
        let handle = t.aes_key(&t.session());
        let key = |spec, enabled, encrypt, decrypt| KeyInfo {
            handle,
            label: "k".into(),
            spec,
            usages: Usages {
                encrypt,
                decrypt,
                ..Usages::default()
            },
            enabled,
        };
        let aes = || KeySpec::Aes(256);
        assert!(check_key(&key(aes(), true, true, true), OpKind::Encrypt).is_ok());
        assert!(matches!(
            check_key(&key(KeySpec::Aes(128), true, true, true), OpKind::Encrypt),
            Err(Fault::WrongUsage(_))
        ));
        assert!(matches!(
            check_key(&key(aes(), false, true, true), OpKind::Decrypt),
            Err(Fault::KeyDisabled { .. })
        ));
        assert!(matches!(
            check_key(&key(aes(), true, false, true), OpKind::Encrypt),
            Err(Fault::WrongUsage(_))
        ));
        assert!(matches!(
            check_key(&key(aes(), true, true, false), OpKind::Decrypt),
            Err(Fault::WrongUsage(_))
        ));
        // A lookup describes any key.
        assert!(check_key(
            &key(KeySpec::Rsa(2048), false, false, false),
            OpKind::Lookup
        )
        .is_ok());
    }
}
