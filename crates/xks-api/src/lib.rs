//! The XKS API over HTTP: routing, the request pipeline, one file per
//! operation, the access log, and the only mapping from what went wrong to
//! the spec's status and `errorName`.
//!
//! Key stores are looked up by their full `XksProxyUriPath`, so routing is
//! done by the pipeline rather than by a static route table:
//! `<uri_path>/health` and `<uri_path>/keys/<externalKeyId>/{metadata,
//! encrypt,decrypt}`.
//!
//! The order of checks is deliberate (see [`pipeline`]; the unit tests in
//! `tests.rs` pin it down):
//! 1. path → 404 `InvalidUriPathException` (KMS reports a wrong prefix as
//!    XKS_PROXY_INVALID_CONFIGURATION; we cannot authenticate without knowing
//!    the key store anyway);
//! 2. method → 405;
//! 3. body size (declared, then actual) → 501 before reading more than the
//!    limit; every answer waits for the whole body ([`body`]);
//! 4. SigV4 → 401, so nothing below is reachable without the secret;
//! 5. the key store's rate quota → 429 (GetHealthStatus is exempt);
//! 6. key id allowed for this key store → 404 `KeyNotFoundException`;
//! 7. JSON and field validation → 400, before any HSM work;
//! 8. secondary authorization (Cedar) → 403 (GetHealthStatus is exempt);
//! 9. the key managers, through the narrow [`KeyService`] trait.
//!
//! The pipeline is generic over [`KeyService`], so the whole HTTP surface
//! runs in-process in unit tests against a scripted key service; the
//! end-to-end tests run it against a real SoftHSM token.
//!
//! **Crate `xks-api`**, one layer of the workspace (the table of layers is
//! in the `xks-proxy` crate's `src/lib.rs`). It uses `xks-lockdown`, `xks-audit`, `xks-net`, `xks-state`, `xks-guard`, `xks-hsm`, `xks-telemetry`, `xks-spec`;
//! its `Cargo.toml` lists exactly those, so the compiler holds it to them.

#![forbid(unsafe_code)]

mod app;
mod body;
mod call;
mod context;
mod decrypt;
mod encrypt;
mod health;
mod key_metadata;
mod key_service;
mod log_limit;
mod ping;
mod pipeline;
mod response;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::routing::any;
use axum::Router;

pub use app::AppState;
pub use key_service::KeyService;

/// The XKS listener's router: `/ping` for load balancers, everything else
/// is the XKS API.
pub fn router<K: KeyService>(state: Arc<AppState<K>>) -> Router {
    Router::new()
        .route("/ping", any(ping::ping::<K>))
        .fallback(pipeline::xks::<K>)
        .with_state(state)
}

/// Router for the optional plain-HTTP health-check listener: `/ping` only.
pub fn ping_router<K: KeyService>(state: Arc<AppState<K>>) -> Router {
    Router::new()
        .route("/ping", any(ping::ping::<K>))
        .with_state(state)
}
