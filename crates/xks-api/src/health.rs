//! GetHealthStatus.

use axum::response::Response;

use super::app::AppState;
use super::context::RequestContext;
use super::key_service::KeyService;
use super::response::to_json;
use xks_spec::error::XksError;
use xks_spec::wire::{require_health_metadata, EkmDetail, HealthResponse, MetadataOnlyRequest};
use xks_state::Live;

/// Its body must carry `requestMetadata` with `kmsRequestId` and
/// `kmsOperation` (the spec marks both REQUIRED, KMS always sends them, and
/// the official compliance client expects `400 ValidationException` without
/// them, although the spec's error table lists ValidationException for every
/// operation "except GetHealthStatus"). Any `kmsOperation` value is
/// accepted: KMS adds new ones.
///
/// The answer is 200 with every key manager's true state, UNAVAILABLE
/// included: KMS then reports the key managers as unavailable (its
/// `XksExternalKeyManagerStates` metric) rather than the proxy as timing
/// out, which a 503 `DependencyTimeoutException` would say.
pub(super) fn answer<K: KeyService>(
    app: &AppState<K>,
    live: &Live,
    body: &[u8],
    ctx: &mut RequestContext,
) -> Result<Response, XksError> {
    let req: MetadataOnlyRequest = ctx.parse(body)?;
    require_health_metadata(req.request_metadata.as_ref())?;
    let details = app.keys.health();
    to_json(&HealthResponse {
        xks_proxy_fleet_size: live.service.fleet_size,
        xks_proxy_vendor: live.service.vendor.clone(),
        xks_proxy_model: live.service.model.clone(),
        ekm_vendor: details
            .first()
            .map(|(ekm, _)| ekm.vendor.clone())
            .unwrap_or_default(),
        ekm_fleet_details: details
            .into_iter()
            .map(|(ekm, health_status)| EkmDetail {
                id: ekm.id.clone(),
                model: ekm.model.clone(),
                health_status,
            })
            .collect(),
    })
}
