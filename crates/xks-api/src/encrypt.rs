//! Encrypt.

use axum::response::Response;

use super::call::KeyCall;
use super::key_service::KeyService;
use super::response::{spec_error, to_json};
use xks_spec::aead::version_from_metadata;
use xks_spec::error::XksError;
use xks_spec::wire::{EncryptRequest, EncryptResponse};

/// Validated once into the key service's input (`EncryptRequest::validate`),
/// checked against lockdowns, authorized, then encrypted; the key manager layer picks the IV and
/// records the key version in the ciphertext metadata.
pub(super) async fn answer<K: KeyService>(mut call: KeyCall<'_, K>) -> Result<Response, XksError> {
    let req: EncryptRequest = call.parse()?;
    let (md, input) = req.validate()?;
    call.check_lock()?;
    call.authorize(md)?;
    call.reach_key_manager();
    let out = call
        .app
        .keys
        .encrypt(call.target.key_id, input)
        .await
        .map_err(spec_error)?;
    call.ctx
        .served_by_version(version_from_metadata(&out.metadata));
    to_json(&EncryptResponse::from(out))
}
