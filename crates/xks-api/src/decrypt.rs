//! Decrypt.

use axum::response::Response;
use bytes::Bytes;
use http::StatusCode;

use super::call::KeyCall;
use super::key_service::KeyService;
use super::response::{json_response, spec_error};
use xks_spec::aead::{decrypt_layouts, version_from_metadata, AadLayout};
use xks_spec::error::XksError;
use xks_spec::wire::{decrypt_response, DecryptRequest};

/// Validated once, checked against lockdowns, authorized, then decrypted. A key store migrated from
/// the AWS sample proxy also tries that proxy's AAD construction (see
/// `spec::aead`), and such decrypts are counted, so an operator can tell
/// when the last old ciphertext has been re-encrypted.
pub(super) async fn answer<K: KeyService>(mut call: KeyCall<'_, K>) -> Result<Response, XksError> {
    let req: DecryptRequest = call.parse()?;
    let (md, mut input) = req.validate()?;
    call.check_lock()?;
    call.authorize(md)?;
    call.reach_key_manager();
    call.ctx
        .served_by_version(version_from_metadata(&input.metadata));
    let store = call.target.store;
    input.layouts = decrypt_layouts(&input.metadata, input.aad.is_some(), store.compat.as_ref());
    let out = call
        .app
        .keys
        .decrypt(call.target.key_id, input)
        .await
        .map_err(spec_error)?;
    if out.layout == AadLayout::AwsSample {
        call.app
            .metrics
            .compat_decrypts
            .with_label_values(&[&store.name])
            .inc();
    }
    // The body owns a zeroizing buffer: wiped when hyper drops it after sending.
    let body = Bytes::from_owner(decrypt_response(&out.plaintext));
    Ok(json_response(StatusCode::OK, body))
}
