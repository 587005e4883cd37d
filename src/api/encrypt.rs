//! Encrypt.

use axum::response::Response;

use super::call::KeyCall;
use super::key_service::KeyService;
use super::response::to_json;
use crate::spec::error::XksError;
use crate::spec::wire::{EncryptRequest, EncryptResponse};

/// Validated once into the key service's input (`EncryptRequest::validate`),
/// authorized, then encrypted; the key manager layer picks the IV and
/// records the key version in the ciphertext metadata.
pub(super) async fn answer<K: KeyService>(mut call: KeyCall<'_, K>) -> Result<Response, XksError> {
    let req: EncryptRequest = call.parse()?;
    let (md, input) = req.validate()?;
    call.authorize(md)?;
    let out = call.app.keys.encrypt(call.target.key_id, input).await?;
    to_json(&EncryptResponse::from(out))
}
