//! The AES-GCM core: one encryption with the IV where the configuration
//! says it comes from, and one decryption. Shared by the pool workers (the
//! request path) and `hsm probe` (which tries each IV shape on a token), so
//! that the probe's verdict is about exactly the code that serves KMS.
//!
//! The one rule that matters most lives here: GCM under a repeated IV gives
//! the key away, so an HSM said to generate IVs that leaves the IV at zero,
//! or returns a shape other than the configured one, is refused and nothing
//! it produced goes out.

use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use zeroize::Zeroizing;

use super::config::IvSource;
use xks_spec::aead::{IV_LEN, TAG_LEN};

/// Where the IV of one encryption comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvInput {
    /// From the HSM's RNG beforehand, passed in the GCM parameters.
    Given([u8; IV_LEN]),
    /// The HSM generates it and writes it into the parameters' IV buffer
    /// (12 zero bytes going in), as AWS CloudHSM does.
    HsmIntoParameter,
    /// The HSM generates it for an empty IV and appends it to the output,
    /// after the tag, as Thales Luna does.
    HsmAppended,
}

impl IvInput {
    /// The IV input `iv_source` calls for: for `hsm-rng`, a fresh IV from
    /// `random` (the HSM's RNG, or a batch of it); the HSM-generated shapes
    /// need none.
    pub fn for_source<E>(
        iv_source: IvSource,
        random: impl FnOnce() -> Result<[u8; IV_LEN], E>,
    ) -> Result<IvInput, E> {
        Ok(match iv_source {
            IvSource::HsmRng => IvInput::Given(random()?),
            IvSource::HsmGenerated => IvInput::HsmIntoParameter,
            IvSource::HsmGeneratedAppended => IvInput::HsmAppended,
        })
    }

    /// An IV from the session's `C_GenerateRandom` (not batched: for the
    /// CLI and the probe).
    pub(crate) fn random_iv(s: &Session) -> Result<[u8; IV_LEN], P11Error> {
        let mut iv = [0u8; IV_LEN];
        s.generate_random_slice(&mut iv)?;
        Ok(iv)
    }
}

/// The AAD of a probe that compares two key managers' keys, or tries a
/// token's GCM: never a request's.
pub const PROBE_AAD: &[u8] = b"xks-proxy: do the key managers agree?";

/// Why an encryption produced nothing usable.
#[derive(Debug)]
pub enum GcmError {
    P11(P11Error),
    /// The key manager answered, but not in the shape the IV input implies.
    Misconfigured(String),
}

impl From<P11Error> for GcmError {
    fn from(e: P11Error) -> Self {
        GcmError::P11(e)
    }
}

impl std::fmt::Display for GcmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GcmError::P11(e) => e.fmt(f),
            GcmError::Misconfigured(why) => f.write_str(why),
        }
    }
}

/// One encryption's output, split.
pub struct Sealed {
    pub ciphertext: Vec<u8>,
    pub tag: Vec<u8>,
    pub iv: Vec<u8>,
}

/// `C_Encrypt` with `CKM_AES_GCM` (128-bit tag) of `plaintext` under `aad`
/// (already the HSM AAD), the IV as `iv_input` says.
pub(crate) fn seal(
    s: &Session,
    key: ObjectHandle,
    iv_input: IvInput,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Sealed, GcmError> {
    let mut iv = match iv_input {
        IvInput::Given(iv) => iv.to_vec(),
        IvInput::HsmIntoParameter => vec![0u8; IV_LEN],
        IvInput::HsmAppended => Vec::new(),
    };
    let encrypted = {
        let params = GcmParams::new(&mut iv, aad, ((TAG_LEN * 8) as u64).into())?;
        s.encrypt(&Mechanism::AesGcm(params), key, plaintext)
    };
    let mut out = match (encrypted, iv_input) {
        (Ok(out), _) => out,
        // A token that does not generate IVs may refuse the zeroed or empty
        // IV outright (Kryoptic) instead of using it: the same mistake in
        // the configuration, and it should read so.
        (
            Err(e @ P11Error::Pkcs11(RvError::MechanismParamInvalid, _)),
            IvInput::HsmIntoParameter | IvInput::HsmAppended,
        ) => {
            return Err(GcmError::Misconfigured(format!(
                "iv_source = \"{}\", but the key manager refused the GCM parameters that ask \
                 it to generate the IV ({e}); use \"hsm-rng\" for it",
                match iv_input {
                    IvInput::HsmIntoParameter => "hsm-generated",
                    _ => "hsm-generated-appended",
                }
            )))
        }
        (Err(e), _) => return Err(e.into()),
    };
    split(iv_input, iv, &mut out, plaintext.len())
}

/// Checks the shape of `out` against `iv_input` and splits it.
fn split(
    iv_input: IvInput,
    mut iv: Vec<u8>,
    out: &mut Vec<u8>,
    plaintext_len: usize,
) -> Result<Sealed, GcmError> {
    let sealed_len = plaintext_len + TAG_LEN;
    match iv_input {
        IvInput::Given(_) => {}
        // An HSM that does not generate IVs leaves the zeros: GCM under a
        // fixed IV gives the key away, so nothing made with it goes out.
        IvInput::HsmIntoParameter if iv.iter().all(|b| *b == 0) => {
            return Err(GcmError::Misconfigured(
                "iv_source = \"hsm-generated\", but the key manager did not write a generated \
                 IV into the GCM parameters; use \"hsm-rng\" or \"hsm-generated-appended\" for it"
                    .into(),
            ))
        }
        IvInput::HsmIntoParameter => {}
        IvInput::HsmAppended => {
            let appended = out.len().saturating_sub(sealed_len);
            if out.len() < sealed_len || (appended != 12 && appended != 16) {
                return Err(GcmError::Misconfigured(format!(
                    "iv_source = \"hsm-generated-appended\", but the key manager returned {} \
                     bytes for {} bytes of plaintext (expected the ciphertext, a 16-byte tag and \
                     a 12- or 16-byte IV); use \"hsm-rng\" or \"hsm-generated\" for it",
                    out.len(),
                    plaintext_len
                )));
            }
            iv = out.split_off(sealed_len);
        }
    }
    if out.len() != sealed_len {
        return Err(GcmError::Misconfigured(format!(
            "the key manager returned {} bytes for {} bytes of plaintext",
            out.len(),
            plaintext_len
        )));
    }
    let tag = out.split_off(plaintext_len);
    Ok(Sealed {
        ciphertext: std::mem::take(out),
        tag,
        iv,
    })
}

/// `C_Decrypt` with `CKM_AES_GCM` of `ciphertext || tag`.
pub(crate) fn open(
    s: &Session,
    key: ObjectHandle,
    iv: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
    tag: &[u8],
) -> Result<Zeroizing<Vec<u8>>, P11Error> {
    let mut iv = iv.to_vec();
    let mut data = Vec::with_capacity(ciphertext.len() + tag.len());
    data.extend_from_slice(ciphertext);
    data.extend_from_slice(tag);
    let params = GcmParams::new(&mut iv, aad, ((TAG_LEN * 8) as u64).into())?;
    s.decrypt(&Mechanism::AesGcm(params), key, &data)
        .map(Zeroizing::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(len: usize) -> Vec<u8> {
        (0..len as u8).collect()
    }

    #[test]
    fn given_iv_splits_ciphertext_and_tag() {
        let mut o = out(5 + TAG_LEN);
        let s = split(IvInput::Given([7; IV_LEN]), vec![7; IV_LEN], &mut o, 5).unwrap();
        assert_eq!(s.ciphertext, out(5));
        assert_eq!(s.tag.len(), TAG_LEN);
        assert_eq!(s.iv, vec![7; IV_LEN]);
    }

    #[test]
    fn a_generated_iv_left_at_zero_is_refused() {
        let mut o = out(5 + TAG_LEN);
        let e = split(IvInput::HsmIntoParameter, vec![0; IV_LEN], &mut o, 5);
        assert!(matches!(e, Err(GcmError::Misconfigured(m)) if m.contains("did not write")));
        let mut o = out(5 + TAG_LEN);
        assert!(split(IvInput::HsmIntoParameter, vec![1; IV_LEN], &mut o, 5).is_ok());
    }

    #[test]
    fn an_appended_iv_is_taken_from_the_end_and_other_shapes_refused() {
        let mut o = out(5 + TAG_LEN + IV_LEN);
        let s = split(IvInput::HsmAppended, Vec::new(), &mut o, 5).unwrap();
        assert_eq!(s.iv, (21..33).collect::<Vec<u8>>());
        assert_eq!(s.ciphertext.len(), 5);
        for bad in [5 + TAG_LEN, 5 + TAG_LEN + 3, 2] {
            let mut o = out(bad);
            assert!(split(IvInput::HsmAppended, Vec::new(), &mut o, 5).is_err());
        }
    }

    #[test]
    fn a_wrong_length_is_refused_whatever_the_iv() {
        let mut o = out(5 + TAG_LEN + 1);
        assert!(split(IvInput::Given([1; IV_LEN]), vec![1; IV_LEN], &mut o, 5).is_err());
    }
}
