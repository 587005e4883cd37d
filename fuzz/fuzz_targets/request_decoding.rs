//! Request bodies: JSON decoding and the spec's field validation for all three
//! key operations. Any input must give Ok, a 400 ValidationException, or a
//! 501 UnsupportedOperationException for an AAD longer than the spec's u16
//! length prefix can carry (the spec's answer for an input it allows but this
//! proxy cannot take); never a panic or another error. An accepted request
//! must satisfy the invariants the HSM layer relies on (AAD length fits the
//! u16 prefix, IV and tag sizes, metadata at most 20 bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use xks_proxy::spec::wire::{
    parse_json, require_metadata, DecryptRequest, EncryptRequest, MetadataOnlyRequest,
};
use xks_proxy::XksError;

/// Only ValidationException (and UnsupportedOperation for an AAD past the
/// u16 prefix) may come out of decoding and validation.
fn only_validation<T>(r: Result<T, XksError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(XksError::Validation(m)) => {
            assert!(m.len() < 512 && m.bytes().all(|b| (0x20..0x7f).contains(&b)));
            None
        }
        Err(XksError::UnsupportedOperation(m)) if m.contains("additionalAuthenticatedData") => {
            assert!(m.len() < 512 && m.bytes().all(|b| (0x20..0x7f).contains(&b)));
            None
        }
        Err(other) => panic!("unexpected error kind: {other:?}"),
    }
}

fuzz_target!(|body: &[u8]| {
    if let Some(r) = only_validation(parse_json::<MetadataOnlyRequest>(body)) {
        let _ = only_validation(require_metadata(r.request_metadata.as_ref(), false));
    }
    if let Some(r) = only_validation(parse_json::<EncryptRequest>(body)) {
        if let Some((_, v)) = only_validation(r.validate()) {
            assert!(v.aad.len() <= u16::MAX as usize);
        }
    }
    if let Some(r) = only_validation(parse_json::<DecryptRequest>(body)) {
        if let Some((_, v)) = only_validation(r.validate()) {
            assert_eq!(v.tag.len(), 16);
            assert!(v.iv.len() == 12 || v.iv.len() == 16);
            assert!(v.metadata.len() <= 20);
            assert!(v.aad.as_ref().map_or(0, Vec::len) <= u16::MAX as usize);
        }
    }
});
