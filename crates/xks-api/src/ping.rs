//! `/ping`: the load balancer's health check. No authentication, no body,
//! no HSM call: it reports what the probes already know.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{header, Method, StatusCode};

use super::app::AppState;
use super::body::{self, BodyLimits};
use super::key_service::KeyService;
use super::response::close_after;
use xks_hsm::EkmStatus;

/// 200 while this instance can serve (one of its key managers is not
/// UNAVAILABLE, the XKS listener can take a connection, and an audit trail
/// with `on_failure = "refuse"` can take records), else 503 so the
/// balancer routes elsewhere.
pub async fn ping<K: KeyService>(State(app): State<Arc<AppState<K>>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    // Like every answer, this one waits for the body (see `body`).
    let limits = BodyLimits {
        max: 0,
        discard_max: body::DISCARD_MAX,
        timeout: app.body_timeout,
    };
    let drained = body::discard(body, limits).await;
    let mut response = if parts.method != Method::GET && parts.method != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
            "use GET or HEAD\n",
        )
            .into_response()
    } else {
        let status = EkmStatus::best(app.keys.health().into_iter().map(|(_, s)| s));
        let saturated = app.xks_conns.saturated();
        let unrecorded = app
            .audit
            .as_ref()
            .is_some_and(|a| a.refuses() && !a.accepting());
        let code = if status == EkmStatus::Unavailable || saturated || unrecorded {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        let body = match status {
            EkmStatus::Unavailable => "unavailable\n",
            _ if saturated => "saturated: the XKS listener cannot accept connections\n",
            _ if unrecorded => "the audit trail cannot take records; requests are refused\n",
            EkmStatus::Active => "ok\n",
            EkmStatus::Degraded => "degraded\n",
        };
        (code, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
    };
    if !drained {
        close_after(&mut response, parts.version);
    }
    response
}
