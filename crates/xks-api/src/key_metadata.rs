//! GetKeyMetadata.

use axum::response::Response;

use super::call::KeyCall;
use super::key_service::KeyService;
use super::response::{spec_error, to_json};
use xks_spec::error::XksError;
use xks_spec::wire::{require_metadata, KeyMetadataResponse, MetadataOnlyRequest};

/// The key's spec, usages and status. The status is the proxy's own view
/// (a disabled key answers `DISABLED`, not an error), so that KMS's
/// DescribeKey shows it; a key store under lockdown reports its keys
/// `DISABLED` too (the lock is recorded with the request).
pub(super) async fn answer<K: KeyService>(mut call: KeyCall<'_, K>) -> Result<Response, XksError> {
    let req: MetadataOnlyRequest = call.parse()?;
    let md = require_metadata(req.request_metadata.as_ref(), false)?;
    let locked = call.app.locks.check(&call.target.store.name);
    call.authorize(md)?;
    call.reach_key_manager();
    let key = call
        .app
        .keys
        .key_info(call.target.key_id)
        .await
        .map_err(spec_error)?;
    if let Some(lock) = &locked {
        call.ctx.locked_by(&lock.id);
    }
    to_json(&KeyMetadataResponse {
        key_spec: key.spec.to_string(),
        key_usage: key.usages.names(),
        key_status: if key.enabled && locked.is_none() {
            "ENABLED"
        } else {
            "DISABLED"
        },
    })
}
