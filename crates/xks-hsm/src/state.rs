//! Whether a key is enabled for KMS, kept in the token itself.
//!
//! The state must survive restarts and be the same for every proxy instance
//! using the token, so it cannot live in the proxy. `keys disable` records it
//! as a **marker object**: a private token data object labelled
//! `xks-proxy-disabled:<key id>`, created and destroyed with the standard
//! object calls that every module implements correctly.
//!
//! The obvious alternative, setting the key's `CKA_END_DATE`, corrupts keys on
//! SoftHSM 2: it stores a date written by `C_SetAttributeValue` unencrypted but
//! decrypts it on read for private objects, after which the date (and any read
//! that includes it) fails with `CKR_GENERAL_ERROR` for good. So the proxy never
//! writes dates; it does *honour* a validity window set by other tools: a key
//! outside its `CKA_START_DATE`..`CKA_END_DATE` window is disabled too.
//!
//! A key is enabled when no marker exists and today is inside its window. A
//! date the module cannot give back counts as disabled: refusing is the safe
//! reading of an attribute meant to limit a key's use.

use std::time::SystemTime;

use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;

/// Label prefix of the marker objects.
pub const MARKER_PREFIX: &str = "xks-proxy-disabled:";

/// A `CK_DATE` as its `YYYYMMDD` ASCII digits.
pub(crate) type CkDate = [u8; 8];

/// The kind (`CKA_APPLICATION`) of the markers `keys disable` writes.
const APPLICATION: &[u8] = b"xks-proxy";

fn marker_label(label: &str) -> String {
    format!("{MARKER_PREFIX}{label}")
}

/// The key's markers, of any kind: one made with an HSM's own tools (a
/// data object with just the label) disables the key too.
fn markers(session: &Session, label: &str) -> Result<Vec<ObjectHandle>, P11Error> {
    super::markers::handles(session, None, Some(&marker_label(label)))
}

/// The key's start and end dates as `YYYYMMDD` (None when empty), or `Err`
/// when the module fails to return them.
pub(crate) fn dates(
    session: &Session,
    handle: ObjectHandle,
) -> Result<(Option<CkDate>, Option<CkDate>), P11Error> {
    let mut start = None;
    let mut end = None;
    for a in session.get_attributes(handle, &[AttributeType::StartDate, AttributeType::EndDate])? {
        match a {
            Attribute::StartDate(d) if !d.is_empty() => start = Some(date_bytes(&d)),
            Attribute::EndDate(d) if !d.is_empty() => end = Some(date_bytes(&d)),
            _ => {}
        }
    }
    Ok((start, end))
}

/// True when the key may be used today.
pub(crate) fn is_enabled(
    session: &Session,
    handle: ObjectHandle,
    label: &str,
    now: SystemTime,
) -> Result<bool, P11Error> {
    let today = xks_spec::time::yyyymmdd(now);
    match dates(session, handle) {
        Ok((start, end)) => {
            if start.is_some_and(|s| s > today) || end.is_some_and(|e| e < today) {
                return Ok(false);
            }
        }
        Err(P11Error::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _)) => {
            tracing::warn!(key = %label, "the module cannot return this key's start/end date; treating the key as disabled");
            return Ok(false);
        }
        Err(e) => return Err(e),
    }
    Ok(markers(session, label)?.is_empty())
}

/// Disables the key by creating its marker object (idempotent).
pub(crate) fn disable(session: &Session, label: &str) -> Result<(), P11Error> {
    if markers(session, label)?.is_empty() {
        super::markers::put(session, APPLICATION, &marker_label(label), b"disabled")?;
    }
    Ok(())
}

/// Enables the key by removing its marker object(s) (idempotent). A validity
/// window that excludes today is left alone: it was set by someone else, on
/// purpose, with the HSM's own tools.
pub(crate) fn enable(session: &Session, label: &str) -> Result<(), P11Error> {
    for m in markers(session, label)? {
        session.destroy_object(m)?;
    }
    Ok(())
}

/// A `CK_DATE` as its eight ASCII digits.
pub(crate) fn date_bytes(d: &cryptoki::types::Date) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&d.year);
    out[4..6].copy_from_slice(&d.month);
    out[6..].copy_from_slice(&d.day);
    out
}
