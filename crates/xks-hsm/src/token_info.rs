//! What a token says about itself (`C_GetTokenInfo`), read leniently.
//!
//! Why this module exists: the `cryptoki` crate converts `CK_TOKEN_INFO`
//! strictly, and fails the whole call when a field is not what the standard
//! says. Real tokens do that: openCryptoki 3.8's soft token sets the clock
//! flag and answers `utcTime` with a time of day (`"07:15:41"`, then a NUL
//! and whatever the caller's buffer held) instead of `YYYYMMDDhhmmss00`, and
//! with the strict conversion the token cannot even be *found* by its label.
//! Its session limits are `0xFFFFFFFFFFFFFFFE`, neither of the standard's
//! special values: a count that large is read as "not reported". The
//! proxy needs only the label, the identification strings, a few flags and
//! the session limits, and all of those are plain fixed-size fields; the
//! clock is informational. So when `cryptoki`'s reading fails on a field
//! (not on the call), this reads the structure itself and keeps the clock
//! as the raw text it was.
//!
//! That fallback is the library's one `unsafe` island (the crate root
//! denies unsafe code everywhere else): a second handle on the already
//! loaded module (`dlopen` of a loaded library only counts a reference),
//! its function list, and one call into `C_GetTokenInfo` with a buffer owned
//! here. It is only the fallback because a second `C_GetFunctionList` is not
//! the same table everywhere: p11-kit's client module hands out a fresh,
//! uninitialized instance per call (`CKR_CRYPTOKI_NOT_INITIALIZED`), so
//! through it a token with a non-standard clock stays unreadable, and the
//! search names the slot with both errors. Every other PKCS#11 call goes
//! through `cryptoki`'s safe API.
#![allow(unsafe_code)]

use std::path::Path;

use cryptoki::context::{Function, Pkcs11};
use cryptoki::error::{Error as P11Error, Rv};
use cryptoki::slot::Slot;
use cryptoki_sys::{
    CKF_CLOCK_ON_TOKEN, CKF_LOGIN_REQUIRED, CKF_RNG, CKF_TOKEN_INITIALIZED,
    CKF_USER_PIN_INITIALIZED, CKF_WRITE_PROTECTED, CK_EFFECTIVELY_INFINITE, CK_FUNCTION_LIST,
    CK_TOKEN_INFO, CK_UNAVAILABLE_INFORMATION,
};

/// A limit the token reports (sessions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The token says there is none.
    Unlimited,
    /// The token does not say.
    Unknown,
    Max(u64),
}

impl Limit {
    fn from_ck(v: u64) -> Limit {
        match v {
            CK_EFFECTIVELY_INFINITE => Limit::Unlimited,
            CK_UNAVAILABLE_INFORMATION => Limit::Unknown,
            // No token has four billion sessions: a value like that is a
            // sentinel of its own (openCryptoki), not a limit.
            n if n > u64::from(u32::MAX) => Limit::Unknown,
            n => Limit::Max(n),
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Unlimited => f.write_str("unlimited"),
            Limit::Unknown => f.write_str("not reported"),
            Limit::Max(n) => write!(f, "{n}"),
        }
    }
}

/// The fields of `CK_TOKEN_INFO` the proxy uses, and the clock as it came.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub label: String,
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
    pub initialized: bool,
    pub user_pin_initialized: bool,
    pub login_required: bool,
    pub write_protected: bool,
    pub has_rng: bool,
    pub max_sessions: Limit,
    pub max_rw_sessions: Limit,
    pub hardware_version: (u8, u8),
    pub firmware_version: (u8, u8),
    /// `utcTime` when the token has a clock: the 16 characters as sent,
    /// and whether they are the standard's `YYYYMMDDhhmmss00`.
    pub clock: Option<(String, bool)>,
}

impl TokenInfo {
    /// What is not as PKCS#11 says, in words (empty when all is standard).
    pub fn quirks(&self) -> Vec<String> {
        match &self.clock {
            Some((raw, false)) => vec![format!(
                "its utcTime field is {raw:?}, not YYYYMMDDhhmmss00 (ignored: informational only)"
            )],
            _ => Vec::new(),
        }
    }
}

/// Blank-padded fixed-size text, as PKCS#11 stores labels and names. Bytes
/// that are not UTF-8 are replaced, never fatal.
fn padded(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_end_matches([' ', '\0'])
        .to_string()
}

fn standard_clock(raw: &[u8; 16]) -> bool {
    raw[..14].iter().all(u8::is_ascii_digit)
}

/// Converts the raw structure; nothing here can fail.
fn convert(ti: &CK_TOKEN_INFO) -> TokenInfo {
    let flag = |f| ti.flags & f != 0;
    TokenInfo {
        label: padded(&ti.label),
        manufacturer: padded(&ti.manufacturerID),
        model: padded(&ti.model),
        serial: padded(&ti.serialNumber),
        initialized: flag(CKF_TOKEN_INITIALIZED),
        user_pin_initialized: flag(CKF_USER_PIN_INITIALIZED),
        login_required: flag(CKF_LOGIN_REQUIRED),
        write_protected: flag(CKF_WRITE_PROTECTED),
        has_rng: flag(CKF_RNG),
        max_sessions: Limit::from_ck(ti.ulMaxSessionCount),
        max_rw_sessions: Limit::from_ck(ti.ulMaxRwSessionCount),
        hardware_version: (ti.hardwareVersion.major, ti.hardwareVersion.minor),
        firmware_version: (ti.firmwareVersion.major, ti.firmwareVersion.minor),
        clock: flag(CKF_CLOCK_ON_TOKEN).then(|| {
            (
                String::from_utf8_lossy(&ti.utcTime).into_owned(),
                standard_clock(&ti.utcTime),
            )
        }),
    }
}

/// Why the token's description could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    #[error("{strict}; read as raw fields instead: {raw}")]
    Lenient {
        strict: P11Error,
        raw: Box<InfoError>,
    },
    #[error("cannot open the PKCS#11 library again to read token info: {0}")]
    Library(String),
    #[error("the library has no C_GetFunctionList/C_GetTokenInfo")]
    NoFunction,
    #[error(transparent)]
    Pkcs11(#[from] P11Error),
}

/// `C_GetTokenInfo` on `slot` of `ctx`, the module loaded from `module`:
/// through `cryptoki`, and when its strict conversion refuses a field,
/// through [`read_raw`].
pub fn read(ctx: &Pkcs11, module: &Path, slot: Slot) -> Result<TokenInfo, InfoError> {
    match ctx.get_token_info(slot) {
        Ok(ti) => Ok(from_cryptoki(&ti)),
        Err(e @ P11Error::Pkcs11(..)) => Err(e.into()),
        Err(strict) => read_raw(module, slot).map_err(|raw| InfoError::Lenient {
            strict,
            raw: Box::new(raw),
        }),
    }
}

fn limit(l: cryptoki::slot::Limit) -> Limit {
    match l {
        cryptoki::slot::Limit::Max(n) => Limit::from_ck(n),
        cryptoki::slot::Limit::Unavailable => Limit::Unknown,
        cryptoki::slot::Limit::Infinite => Limit::Unlimited,
    }
}

fn from_cryptoki(ti: &cryptoki::slot::TokenInfo) -> TokenInfo {
    let version = |v: cryptoki::types::Version| (v.major(), v.minor());
    TokenInfo {
        label: ti.label().trim_end().to_string(),
        manufacturer: ti.manufacturer_id().trim_end().to_string(),
        model: ti.model().trim_end().to_string(),
        serial: ti.serial_number().trim_end().to_string(),
        initialized: ti.token_initialized(),
        user_pin_initialized: ti.user_pin_initialized(),
        login_required: ti.login_required(),
        write_protected: ti.write_protected(),
        has_rng: ti.rng(),
        max_sessions: limit(ti.max_session_count()),
        max_rw_sessions: limit(ti.max_rw_session_count()),
        hardware_version: version(ti.hardware_version()),
        firmware_version: version(ti.firmware_version()),
        clock: ti.utc_time().map(|t| {
            (
                format!(
                    "{:04}{:02}{:02}{:02}{:02}{:02}00",
                    t.year, t.month, t.day, t.hour, t.minute, t.second
                ),
                true,
            )
        }),
    }
}

/// `C_GetTokenInfo` through a function list of its own (see the module
/// docs), converted leniently.
fn read_raw(module: &Path, slot: Slot) -> Result<TokenInfo, InfoError> {
    // SAFETY: the library is already loaded and initialized by the caller,
    // so loading it again runs no initializer and returns the same code;
    // the handle lives until the end of this function, past the last call
    // into it. `C_GetFunctionList` writes one pointer into `list`, which
    // points at a table owned by the library for its lifetime (PKCS#11
    // §5.4). `C_GetTokenInfo` writes one CK_TOKEN_INFO into `ti`, a buffer
    // of exactly that type owned here.
    unsafe {
        let lib =
            cryptoki_sys::Pkcs11::new(module).map_err(|e| InfoError::Library(e.to_string()))?;
        let get_list = lib
            .C_GetFunctionList
            .as_ref()
            .map_err(|_| InfoError::NoFunction)?;
        let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
        Rv::from(get_list(&mut list)).into_result(Function::GetFunctionList)?;
        let get_info = list
            .as_ref()
            .and_then(|l| l.C_GetTokenInfo)
            .ok_or(InfoError::NoFunction)?;
        let mut ti = CK_TOKEN_INFO::default();
        Rv::from(get_info(slot.id(), &mut ti)).into_result(Function::GetTokenInfo)?;
        Ok(convert(&ti))
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    /// A token that says nothing, for tests of what reads it.
    pub fn blank() -> super::TokenInfo {
        super::convert(&super::CK_TOKEN_INFO::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field<const N: usize>(s: &str) -> [u8; N] {
        let mut out = [b' '; N];
        out[..s.len()].copy_from_slice(s.as_bytes());
        out
    }

    #[test]
    fn a_non_standard_clock_is_kept_as_text_not_fatal() {
        let ti = CK_TOKEN_INFO {
            label: field("xksock"),
            manufacturerID: field("IBM"),
            model: field("Soft"),
            serialNumber: field("123"),
            flags: CKF_TOKEN_INITIALIZED | CKF_CLOCK_ON_TOKEN | CKF_RNG,
            ulMaxSessionCount: CK_UNAVAILABLE_INFORMATION,
            ulMaxRwSessionCount: 0,
            utcTime: *b"07:15:41\0\xaa\xaa\xaa\xaa\xaa\xaa\xaa",
            ..Default::default()
        };
        let info = convert(&ti);
        assert_eq!(info.label, "xksock");
        assert!(info.initialized && info.has_rng && !info.write_protected);
        assert_eq!(info.max_sessions, Limit::Unknown);
        assert_eq!(info.max_rw_sessions, Limit::Unlimited);
        let (raw, standard) = info.clock.clone().unwrap();
        assert!(raw.starts_with("07:15:41\0") && !standard, "{raw:?}");
        assert_eq!(info.quirks().len(), 1);
        let ok = CK_TOKEN_INFO {
            flags: CKF_CLOCK_ON_TOKEN,
            ulMaxSessionCount: 16,
            ulMaxRwSessionCount: 0xFFFF_FFFF_FFFF_FFFE,
            utcTime: *b"2026120706010900",
            ..Default::default()
        };
        let info = convert(&ok);
        assert_eq!(info.max_sessions, Limit::Max(16));
        assert_eq!(info.max_rw_sessions, Limit::Unknown);
        assert!(info.quirks().is_empty());
        assert_eq!(info.label, "");
    }

    #[test]
    fn text_that_is_not_utf8_is_replaced() {
        assert_eq!(padded(b"ab\xffc  \0\0"), "ab\u{fffd}c");
    }
}
