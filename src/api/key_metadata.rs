//! GetKeyMetadata.

use axum::response::Response;

use super::call::KeyCall;
use super::key_service::KeyService;
use super::response::to_json;
use crate::spec::error::XksError;
use crate::spec::wire::{require_metadata, KeyMetadataResponse, MetadataOnlyRequest};

/// The key's spec, usages and status. The status is the proxy's own view
/// (a disabled key answers `DISABLED`, not an error), so that KMS's
/// DescribeKey shows it.
pub(super) async fn answer<K: KeyService>(mut call: KeyCall<'_, K>) -> Result<Response, XksError> {
    let req: MetadataOnlyRequest = call.parse()?;
    call.authorize(require_metadata(req.request_metadata.as_ref(), false)?)?;
    let key = call.app.keys.key_info(call.target.key_id).await?;
    to_json(&KeyMetadataResponse {
        key_spec: key.spec.to_string(),
        key_usage: key.usages.names(),
        key_status: if key.enabled { "ENABLED" } else { "DISABLED" },
    })
}
