//! Opening a PKCS#11 token and the administrative operations on it (creating,
//! finding and describing keys). Everything here blocks: it is called at startup,
//! from the CLI, or from inside a pool worker thread, never from an async task.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::config::{BackendConfig, HsmConfig, IvSource, TokenSelector};
use super::gcm::{self, IvInput, PROBE_AAD};
use super::hmac::HmacKey;
use super::markers::Marker;
use super::objects::{
    find_keys, find_secret_keys, protected_key_template, read_key_info, KeyDetails, KeyInfo,
    Protection, Usages,
};
use super::token_info::TokenInfo;

/// A probe ciphertext and what it must decrypt to.
pub struct Probe {
    plaintext: Zeroizing<Vec<u8>>,
    sealed: gcm::Sealed,
}

/// A failure to reach or use the token outside a request (startup, CLI).
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    #[error("cannot load PKCS#11 module {}: {source}", .module.display())]
    Load { module: PathBuf, source: P11Error },
    #[error("no token found: the module lists no slot")]
    NoSlot,
    #[error("no token found: no initialized token in slot {slot} ({seen})")]
    NoTokenInSlot { slot: u64, seen: SlotsSeen },
    #[error(
        "no token found: no initialized token labelled '{label}' ({seen}); for SoftHSM check \
         that SOFTHSM2_CONF points at the right token directory"
    )]
    NoTokenLabelled { label: String, seen: SlotsSeen },
    #[error("token '{token}' cannot serve KMS: {why}")]
    MissingMechanism { token: String, why: String },
    #[error("login to the token failed: {0} (check hsm.pin_file / hsm.pin_env)")]
    Login(P11Error),
    #[error("{context}: {why}")]
    Info { context: &'static str, why: String },
    #[error("{context}: {source}")]
    Pkcs11 {
        context: &'static str,
        source: P11Error,
    },
    #[error("a secret key labelled '{0}' already exists")]
    KeyExists(String),
    #[error("no secret key labelled '{0}'")]
    NoKey(String),
    #[error(
        "{count} secret keys carry the label '{label}'; an external key id must name exactly one"
    )]
    AmbiguousLabel { label: String, count: usize },
    #[error("'{0}' is not an AES-256 key; only keys that can back KMS are rotated")]
    NotAes256(String),
    #[error("cannot start HSM worker thread: {0}")]
    Thread(std::io::Error),
}

impl HsmError {
    /// The token was not found (as opposed to found and failing).
    pub fn is_token_missing(&self) -> bool {
        matches!(
            self,
            HsmError::NoSlot | HsmError::NoTokenInSlot { .. } | HsmError::NoTokenLabelled { .. }
        )
    }

    /// Worth trying again in a moment at startup: the token was not found
    /// (SoftHSM leaves a token out of its slot list, or lists its slot as
    /// uninitialized, while another process is writing that token's files:
    /// two instances starting together on one token see it), or the module
    /// failed generally.
    pub fn is_transient(&self) -> bool {
        match self {
            // SoftHSM also fails a login with CKR_GENERAL_ERROR while
            // another process writes the token.
            HsmError::Pkcs11 { source, .. } | HsmError::Login(source) => matches!(
                source,
                P11Error::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _)
            ),
            e => e.is_token_missing(),
        }
    }
}

/// What looking for a token saw in each slot, so that a token that is not
/// found is never a silent skip: every slot is named with why it was not
/// the one.
#[derive(Debug, Clone, Default)]
pub struct SlotsSeen(Vec<(u64, SlotSeen)>);

/// One slot, as the search saw it.
#[derive(Debug, Clone)]
pub enum SlotSeen {
    /// An initialized token with another label (or in another slot).
    Other(String),
    /// A token that is not initialized.
    Uninitialized(String),
    /// `C_GetTokenInfo` failed.
    Unreadable(String),
}

impl std::fmt::Display for SlotsSeen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("the module lists no slot with a token");
        }
        f.write_str("slots seen: ")?;
        for (n, (slot, seen)) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str("; ")?;
            }
            match seen {
                SlotSeen::Other(l) => write!(f, "slot {slot}: token '{l}'")?,
                SlotSeen::Uninitialized(l) => {
                    write!(f, "slot {slot}: token '{l}', not initialized")?
                }
                SlotSeen::Unreadable(e) => write!(f, "slot {slot}: token info unreadable ({e})")?,
            }
        }
        Ok(())
    }
}

pub(crate) fn p11(context: &'static str) -> impl FnOnce(P11Error) -> HsmError {
    move |source| HsmError::Pkcs11 { context, source }
}

/// What the token says about itself, for GetHealthStatus's `ekm*` fields.
#[derive(Debug, Clone)]
pub struct EkmInfo {
    pub vendor: String,
    pub id: String,
    pub model: String,
}

/// An opened token: the loaded module, the slot and a logged-in R/W session.
pub struct Token {
    ctx: Pkcs11,
    pub(crate) slot: Slot,
    pub(crate) pin: AuthPin,
    session: Session,
    info: EkmInfo,
}

impl Token {
    /// Loads the module, finds the key manager's token and logs in (the CLI).
    pub fn open(cfg: &HsmConfig, backend: &BackendConfig) -> Result<Token, HsmError> {
        let ctx = load_module(&backend.module)?;
        Self::open_in(ctx, backend, cfg.ekm_vendor.as_deref())
    }

    /// Finds the key manager's token in an already loaded module and logs in.
    pub(crate) fn open_in(
        ctx: Pkcs11,
        backend: &BackendConfig,
        ekm_vendor: Option<&str>,
    ) -> Result<Token, HsmError> {
        let (slot, ti) = find_slot(&ctx, &backend.module, &backend.token)?;
        for quirk in ti.quirks() {
            tracing::info!(token = %ti.label, "{quirk}");
        }
        if let Some(why) = super::mechanisms::missing_required(&ctx, slot) {
            return Err(HsmError::MissingMechanism {
                token: ti.label,
                why,
            });
        }
        let info = EkmInfo {
            vendor: ekm_vendor
                .map(str::to_owned)
                .unwrap_or_else(|| ti.manufacturer.clone()),
            id: backend
                .name
                .clone()
                .unwrap_or_else(|| format!("{}-{}", ti.label, ti.serial)),
            model: format!(
                "{} {} (hw {}.{}, fw {}.{})",
                ti.manufacturer,
                ti.model,
                ti.hardware_version.0,
                ti.hardware_version.1,
                ti.firmware_version.0,
                ti.firmware_version.1
            ),
        };
        let pin = AuthPin::from(backend.pin.as_str().to_owned());
        let session = ctx.open_rw_session(slot).map_err(p11("C_OpenSession"))?;
        login(&session, &pin)?;
        Ok(Token {
            ctx,
            slot,
            pin,
            session,
            info,
        })
    }

    pub fn ekm_info(&self) -> &EkmInfo {
        &self.info
    }

    /// Creates an AES-256 key that is a token object, private, sensitive and
    /// non-extractable, with the given usages. Refuses a label that exists.
    pub fn create_aes_key(&self, label: &str, usages: Usages) -> Result<KeyInfo, HsmError> {
        if !find_secret_keys(&self.session, label)
            .map_err(p11("C_FindObjects"))?
            .is_empty()
        {
            return Err(HsmError::KeyExists(label.to_string()));
        }
        let mut template = protected_key_template(KeyType::AES, label);
        template.extend([
            Attribute::Modifiable(true),
            Attribute::Encrypt(usages.encrypt),
            Attribute::Decrypt(usages.decrypt),
            Attribute::Wrap(usages.wrap),
            Attribute::Unwrap(usages.unwrap),
            Attribute::Sign(usages.sign),
            Attribute::Verify(usages.verify),
            Attribute::Derive(usages.derive),
        ]);
        let handle = self
            .session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(p11("C_GenerateKey"))?;
        read_key_info(&self.session, handle, label, SystemTime::now())
            .map_err(p11("C_GetAttributeValue"))
    }

    /// Another read-only session on this token, logged in like the first
    /// (a PKCS#11 login holds for the whole application): one per thread
    /// for tools that drive the token from several threads (the benchmark's
    /// raw-HSM mode).
    pub(crate) fn open_session(&self) -> Result<Session, HsmError> {
        self.ctx
            .open_ro_session(self.slot)
            .map_err(p11("C_OpenSession"))
    }

    /// The handle of the one secret key labelled `label`.
    pub(crate) fn key_handle(&self, label: &str) -> Result<ObjectHandle, HsmError> {
        self.find_one(label)
    }

    /// The one secret key carrying `label`.
    fn find_one(&self, label: &str) -> Result<ObjectHandle, HsmError> {
        let handles = find_keys(&self.session, label).map_err(p11("C_FindObjects"))?;
        match handles[..] {
            [h] => Ok(h),
            [] => Err(HsmError::NoKey(label.to_string())),
            _ => Err(HsmError::AmbiguousLabel {
                label: label.to_string(),
                count: handles.len(),
            }),
        }
    }

    /// Everything an operator may want to know about one key.
    pub fn key_details(&self, label: &str) -> Result<KeyDetails, HsmError> {
        let handle = self.find_one(label)?;
        let info = read_key_info(&self.session, handle, label, SystemTime::now())
            .map_err(p11("C_GetAttributeValue"))?;
        let show = |b: [u8; 8]| {
            let s: String = b
                .iter()
                .map(|c| if c.is_ascii_digit() { *c as char } else { '?' })
                .collect();
            format!("{}-{}-{}", &s[..4], &s[4..6], &s[6..])
        };
        let (start_date, end_date) = match super::state::dates(&self.session, handle) {
            Ok((s, e)) => (s.map(show), e.map(show)),
            Err(e) => (None, Some(format!("unreadable ({e})"))),
        };
        Ok(KeyDetails {
            info,
            start_date,
            end_date,
            protection: Protection::read(&self.session, handle)
                .map_err(p11("C_GetAttributeValue"))?,
        })
    }

    /// Enables or disables a key for KMS; see [`super::state`] for how the
    /// state is kept in the token.
    pub fn set_enabled(&self, label: &str, enabled: bool) -> Result<KeyInfo, HsmError> {
        let handle = self.find_one(label)?;
        if enabled {
            super::state::enable(&self.session, label).map_err(p11("C_DestroyObject"))?;
        } else {
            super::state::disable(&self.session, label).map_err(p11("C_CreateObject"))?;
        }
        read_key_info(&self.session, handle, label, SystemTime::now())
            .map_err(p11("C_GetAttributeValue"))
    }

    /// The newest version of external key `id` (0 when never rotated).
    pub fn latest_version(&self, id: &str) -> Result<u32, HsmError> {
        super::objects::latest_version(&self.session, id).map_err(p11("C_FindObjects"))
    }

    /// Creates the next version of external key `id`: a new AES-256 key
    /// labelled `id#N` with the base key's usages. Encrypt uses it (after the
    /// key cache TTL); ciphertexts of earlier versions still decrypt, because
    /// their metadata names the version they were made with.
    pub fn rotate(&self, id: &str) -> Result<(u32, KeyInfo), HsmError> {
        let handle = self.find_one(id)?;
        let base = read_key_info(&self.session, handle, id, SystemTime::now())
            .map_err(p11("C_GetAttributeValue"))?;
        if !base.spec.is_aes256() {
            return Err(HsmError::NotAes256(id.to_string()));
        }
        let next = self.latest_version(id)? + 1;
        let key = self.create_aes_key(&xks_spec::aead::version_label(id, next), base.usages)?;
        Ok((next, key))
    }

    /// Encrypts a random probe under the key labelled `label` with a fresh
    /// IV from `iv_source`, to learn whether another key manager holds the
    /// same key ([`Self::decrypts`]); see [`super::agreement`].
    pub fn agreement_probe(&self, label: &str, iv_source: IvSource) -> Result<Probe, HsmError> {
        let key = self.find_one(label)?;
        let mut plaintext = Zeroizing::new(vec![0u8; 32]);
        self.session
            .generate_random_slice(&mut plaintext)
            .map_err(p11("C_GenerateRandom"))?;
        let iv = IvInput::for_source(iv_source, || IvInput::random_iv(&self.session))
            .map_err(p11("C_GenerateRandom"))?;
        let sealed = gcm::seal(&self.session, key, iv, PROBE_AAD, &plaintext).map_err(|e| {
            HsmError::Info {
                context: "C_Encrypt",
                why: e.to_string(),
            }
        })?;
        Ok(Probe { plaintext, sealed })
    }

    /// Whether this token's key labelled `label` decrypts `probe` (made by
    /// another key manager's [`Self::agreement_probe`]) to its plaintext.
    pub fn decrypts(&self, label: &str, probe: &Probe) -> Result<bool, HsmError> {
        let key = self.find_one(label)?;
        let s = &probe.sealed;
        Ok(
            match gcm::open(&self.session, key, &s.iv, PROBE_AAD, &s.ciphertext, &s.tag) {
                Ok(out) => bool::from(out.as_slice().ct_eq(probe.plaintext.as_slice())),
                Err(_) => false,
            },
        )
    }

    /// The HMAC key labelled `label`, if there is one (see
    /// [`super::hmac`]); several with one label are an error.
    pub fn hmac_key(&self, label: &str) -> Result<Option<HmacKey>, HsmError> {
        let keys = super::hmac::describe(&self.session, label).map_err(p11("C_FindObjects"))?;
        match keys[..] {
            [] => Ok(None),
            [k] => Ok(Some(k)),
            _ => Err(HsmError::AmbiguousLabel {
                label: label.to_string(),
                count: keys.len(),
            }),
        }
    }

    /// Generates the HMAC key `label` in the token: sensitive,
    /// non-extractable, sign and verify only. Refuses a label that exists.
    pub fn create_hmac_key(&self, label: &str) -> Result<HmacKey, HsmError> {
        if self.hmac_key(label)?.is_some()
            || !find_secret_keys(&self.session, label)
                .map_err(p11("C_FindObjects"))?
                .is_empty()
        {
            return Err(HsmError::KeyExists(label.to_string()));
        }
        super::hmac::generate(&self.session, label).map_err(p11("C_GenerateKey"))?;
        self.hmac_key(label)?
            .ok_or_else(|| HsmError::NoKey(label.to_string()))
    }

    /// HMAC-SHA256 of `data` under `key`, computed in the token (a seal
    /// made by the CLI: `audit retire`).
    pub fn sign_hmac(&self, key: &HmacKey, data: &[u8]) -> Result<Vec<u8>, HsmError> {
        super::hmac::sign(&self.session, key.handle, data).map_err(p11("C_Sign"))
    }

    /// Whether `mac` is the HMAC-SHA256 of `data` under `key`, checked in
    /// the token.
    pub fn verify_hmac(&self, key: &HmacKey, data: &[u8], mac: &[u8]) -> Result<bool, HsmError> {
        super::hmac::verify(&self.session, key.handle, data, mac).map_err(p11("C_Verify"))
    }

    /// The markers of one kind (see [`super::markers`]).
    pub fn markers(&self, application: &[u8]) -> Result<Vec<Marker>, HsmError> {
        super::markers::list(&self.session, application).map_err(p11("C_FindObjects"))
    }

    /// Stores a marker, replacing one of the same kind and label.
    pub fn put_marker(
        &self,
        application: &[u8],
        label: &str,
        value: &[u8],
    ) -> Result<(), HsmError> {
        super::markers::put(&self.session, application, label, value).map_err(p11("C_CreateObject"))
    }

    /// Removes the markers of one kind with this label (or all of that
    /// kind); returns how many.
    pub fn remove_markers(
        &self,
        application: &[u8],
        label: Option<&str>,
    ) -> Result<usize, HsmError> {
        super::markers::remove(&self.session, application, label).map_err(p11("C_DestroyObject"))
    }

    /// Every secret key in the token, sorted by label.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>, HsmError> {
        let handles = self
            .session
            .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
            .map_err(p11("C_FindObjects"))?;
        let now = SystemTime::now();
        let mut keys = Vec::with_capacity(handles.len());
        for h in handles {
            let label = match self.session.get_attributes(h, &[AttributeType::Label]) {
                Ok(attrs) => attrs
                    .into_iter()
                    .find_map(|a| match a {
                        Attribute::Label(l) => Some(String::from_utf8_lossy(&l).into_owned()),
                        _ => None,
                    })
                    .unwrap_or_default(),
                Err(e) => return Err(p11("C_GetAttributeValue")(e)),
            };
            keys.push(
                read_key_info(&self.session, h, &label, now).map_err(p11("C_GetAttributeValue"))?,
            );
        }
        keys.sort_by(|a, b| a.label.cmp(&b.label));
        Ok(keys)
    }
}

/// The label of the token in the first slot `module` lists (tokens present
/// or not), which is the one the AWS sample proxy logs in to.
pub fn first_slot_token_label(module: &Path) -> Result<String, HsmError> {
    let ctx = load_module(module)?;
    let slot = ctx
        .get_all_slots()
        .map_err(p11("C_GetSlotList"))?
        .into_iter()
        .next()
        .ok_or(HsmError::NoSlot)?;
    let info = super::token_info::read(&ctx, module, slot).map_err(|e| HsmError::Info {
        context: "C_GetTokenInfo",
        why: e.to_string(),
    })?;
    Ok(info.label)
}

/// Loads a PKCS#11 module and initializes it for multi-threaded use.
pub(crate) fn load_module(module: &Path) -> Result<Pkcs11, HsmError> {
    let load = |source| HsmError::Load {
        module: module.to_path_buf(),
        source,
    };
    let ctx = Pkcs11::new(module).map_err(load)?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(ctx),
        Err(e) => Err(load(e)),
    }
}

/// Finds the slot of a key manager's token in the module loaded from
/// `module`, and what the token says of itself. A slot whose token cannot
/// describe itself (a lost token in SoftHSM answers `CKR_GENERAL_ERROR`) is
/// not the one, but it must not hide another key manager's token: it is
/// skipped, and named with its error if the token is not found.
pub(crate) fn find_slot(
    ctx: &Pkcs11,
    module: &Path,
    selector: &TokenSelector,
) -> Result<(Slot, TokenInfo), HsmError> {
    let slots = ctx.get_slots_with_token().map_err(p11("C_GetSlotList"))?;
    let mut seen = SlotsSeen::default();
    for slot in slots {
        let wanted_slot = matches!(selector, TokenSelector::Slot(id) if slot.id() == *id);
        let ti = match super::token_info::read(ctx, module, slot) {
            Ok(ti) => ti,
            Err(e) => {
                seen.0
                    .push((slot.id(), SlotSeen::Unreadable(e.to_string())));
                continue;
            }
        };
        if !ti.initialized {
            seen.0.push((slot.id(), SlotSeen::Uninitialized(ti.label)));
            continue;
        }
        let found = match selector {
            TokenSelector::Slot(_) => wanted_slot,
            TokenSelector::Label(label) => ti.label == *label,
        };
        if found {
            return Ok((slot, ti));
        }
        seen.0.push((slot.id(), SlotSeen::Other(ti.label)));
    }
    Err(match selector {
        TokenSelector::Slot(id) => HsmError::NoTokenInSlot { slot: *id, seen },
        TokenSelector::Label(label) => HsmError::NoTokenLabelled {
            label: label.clone(),
            seen,
        },
    })
}

/// Logs the user in; "already logged in" is success (login state is per
/// application and token, shared by all its sessions).
pub(crate) fn login(session: &Session, pin: &AuthPin) -> Result<(), HsmError> {
    login_raw(session, pin).map_err(HsmError::Login)
}

/// [`login`] with the PKCS#11 error as it came.
pub(crate) fn login_raw(session: &Session, pin: &AuthPin) -> Result<(), P11Error> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(e),
    }
}
