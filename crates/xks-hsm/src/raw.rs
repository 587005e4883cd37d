//! The bare PKCS#11 work of one request, for `xks-bench --raw-hsm`: what the
//! proxy asks the HSM for, without the proxy around it, so that a report
//! can state the proxy's CPU per request as a multiple of the HSM's own.
//!
//! One [`RawLane`] per thread, each with its own session and the key handle
//! looked up once: `C_EncryptInit` + `C_Encrypt` with AES-GCM (a 12-byte IV
//! from `C_GenerateRandom`, fetched in batches as the proxy does), then for
//! the CDIV case the verification decrypt the proxy does, and for decrypt a
//! decryption of one fixed ciphertext. The PKCS#11 types stay in this crate.

use cryptoki::error::Error as P11Error;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use super::operation::IvPool;
use super::token::{HsmError, Token};
use xks_spec::aead::TAG_LEN;

/// One thread's session, key and data.
pub struct RawLane {
    session: Session,
    key: ObjectHandle,
    plaintext: Vec<u8>,
    aad: Vec<u8>,
    ivs: IvPool,
    /// For decrypt: one ciphertext (with its tag) and its IV.
    sealed: Vec<u8>,
    sealed_iv: Vec<u8>,
}

fn p11(context: &'static str) -> impl FnOnce(P11Error) -> HsmError {
    move |source| HsmError::Pkcs11 { context, source }
}

impl RawLane {
    /// A lane on a new session of `token`, encrypting `plaintext` under the
    /// key labelled `key` with `aad` (already as the proxy hands it to the
    /// HSM).
    pub fn open(
        token: &Token,
        key: &str,
        plaintext: Vec<u8>,
        aad: Vec<u8>,
    ) -> Result<RawLane, HsmError> {
        let mut lane = RawLane {
            session: token.open_session()?,
            key: token.key_handle(key)?,
            plaintext,
            aad,
            ivs: IvPool::new(),
            sealed: Vec::new(),
            sealed_iv: Vec::new(),
        };
        let (iv, sealed) = lane.seal()?;
        (lane.sealed_iv, lane.sealed) = (iv, sealed);
        Ok(lane)
    }

    fn seal(&mut self) -> Result<(Vec<u8>, Vec<u8>), HsmError> {
        let mut iv = self
            .ivs
            .next(&self.session)
            .map_err(p11("C_GenerateRandom"))?
            .to_vec();
        let params = GcmParams::new(&mut iv, &self.aad, ((TAG_LEN * 8) as u64).into())
            .map_err(p11("GCM parameters"))?;
        let sealed = self
            .session
            .encrypt(&Mechanism::AesGcm(params), self.key, &self.plaintext)
            .map_err(p11("C_Encrypt"))?;
        Ok((iv, sealed))
    }

    fn open_sealed(&self, iv: &[u8], sealed: &[u8]) -> Result<(), HsmError> {
        let mut iv = iv.to_vec();
        let params = GcmParams::new(&mut iv, &self.aad, ((TAG_LEN * 8) as u64).into())
            .map_err(p11("GCM parameters"))?;
        self.session
            .decrypt(&Mechanism::AesGcm(params), self.key, sealed)
            .map(drop)
            .map_err(p11("C_Decrypt"))
    }

    /// One encryption.
    pub fn encrypt(&mut self) -> Result<(), HsmError> {
        self.seal().map(drop)
    }

    /// One encryption and its verification decrypt (a request with a CDIV).
    pub fn encrypt_and_verify(&mut self) -> Result<(), HsmError> {
        let (iv, sealed) = self.seal()?;
        self.open_sealed(&iv, &sealed)
    }

    /// One decryption.
    pub fn decrypt(&mut self) -> Result<(), HsmError> {
        self.open_sealed(&self.sealed_iv, &self.sealed)
    }
}
