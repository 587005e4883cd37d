//! The bare PKCS#11 work of one request, for `xks-bench --raw-hsm`: what the
//! proxy asks the HSM for, without the proxy around it, so that a report
//! can state the proxy's CPU per request as a multiple of the HSM's own.
//!
//! One [`RawLane`] per thread, each with its own session and the key handle
//! looked up once: `C_EncryptInit` + `C_Encrypt` with AES-GCM (a 12-byte IV
//! from `C_GenerateRandom`, fetched in batches as the proxy does), then for
//! the CDIV case the verification decrypt the proxy does, and for decrypt a
//! decryption of one fixed ciphertext, through the same `gcm::seal` and
//! `gcm::open` the proxy uses. The PKCS#11 types stay in this crate.

use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use super::gcm::{self, GcmError, IvInput, Sealed};
use super::operation::IvPool;
use super::token::{p11, HsmError, Token};

/// One thread's session, key and data.
pub struct RawLane {
    session: Session,
    key: ObjectHandle,
    plaintext: Vec<u8>,
    aad: Vec<u8>,
    ivs: IvPool,
    /// For decrypt: one ciphertext, its tag and its IV.
    sealed: Sealed,
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
        let session = token.open_session()?;
        let key = token.key_handle(key)?;
        let mut ivs = IvPool::new();
        let sealed = seal(&session, key, &mut ivs, &aad, &plaintext)?;
        Ok(RawLane {
            session,
            key,
            plaintext,
            aad,
            ivs,
            sealed,
        })
    }

    fn seal(&mut self) -> Result<Sealed, HsmError> {
        seal(
            &self.session,
            self.key,
            &mut self.ivs,
            &self.aad,
            &self.plaintext,
        )
    }

    fn open_sealed(&self, sealed: &Sealed) -> Result<(), HsmError> {
        gcm::open(
            &self.session,
            self.key,
            &sealed.iv,
            &self.aad,
            &sealed.ciphertext,
            &sealed.tag,
        )
        .map(drop)
        .map_err(p11("C_Decrypt"))
    }

    /// One encryption.
    pub fn encrypt(&mut self) -> Result<(), HsmError> {
        self.seal().map(drop)
    }

    /// One encryption and its verification decrypt (a request with a CDIV).
    pub fn encrypt_and_verify(&mut self) -> Result<(), HsmError> {
        let sealed = self.seal()?;
        self.open_sealed(&sealed)
    }

    /// One decryption.
    pub fn decrypt(&mut self) -> Result<(), HsmError> {
        self.open_sealed(&self.sealed)
    }
}

/// One encryption as the proxy makes it (`gcm::seal`, an IV from the pool).
fn seal(
    s: &Session,
    key: ObjectHandle,
    ivs: &mut IvPool,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Sealed, HsmError> {
    let iv = ivs.next(s).map_err(p11("C_GenerateRandom"))?;
    gcm::seal(s, key, IvInput::Given(iv), aad, plaintext).map_err(|e| match e {
        GcmError::P11(source) => HsmError::Pkcs11 {
            context: "C_Encrypt",
            source,
        },
        GcmError::Misconfigured(why) => HsmError::Info {
            context: "C_Encrypt",
            why,
        },
    })
}
