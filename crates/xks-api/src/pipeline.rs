//! One XKS request, from its head to its answer, in the order of checks the
//! module documentation gives (path, method, body, SigV4, quota, key id,
//! validation, authorization, the key service).
//!
//! Every stage either passes the request on or returns the spec's error;
//! nothing answers before the whole body arrived (see `super::body`), and
//! every request, whatever stage it stopped at, produces one metrics
//! observation, one access-log line and, with an audit trail, one audit
//! record (unless it never authenticated and its source is over its log
//! budget, see `super::log_limit`).
//!
//! With an audit trail, a request that passed SigV4 reserves its record's
//! room before anything else happens to it; under `audit.on_failure =
//! "refuse"` one that cannot is answered 503 `DependencyTimeoutException`
//! (the trail is a dependency that could not take the request in time; it
//! is the spec's only 503, and KMS retries it) before any key is used.
//! GetHealthStatus is never refused for it: the key managers are fine, and
//! `/ping` already sends the load balancer elsewhere.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::response::Response;
use http::Method;

use super::app::AppState;
use super::body::{self, BodyLimits};
use super::call::{KeyCall, Target};
use super::context::{ConnFields, Outcome, RequestContext, Stage, Trace};
use super::key_service::KeyService;
use super::response::{close_after, error_response, ErrorName};
use super::{decrypt, encrypt, health, key_metadata};
use xks_guard::sigv4;
use xks_net::listener::ConnInfo;
use xks_spec::error::{sanitize_message, XksError};
use xks_spec::names::is_valid_key_id;
use xks_spec::path::{parse_path, Operation};
use xks_spec::wire::MetadataOnlyRequest;
use xks_state::{KeyStore, Live};
use xks_telemetry::logging::clip;

/// Entry point for every non-`/ping` request on the XKS listener.
pub async fn xks<K: KeyService>(State(app): State<Arc<AppState<K>>>, req: Request) -> Response {
    let mut trace = Trace(RequestContext::start(ConnFields::of(&req)));
    let ctx = &mut trace.0;
    let version = req.version();
    let mut response = match handle(&app, req, ctx).await {
        Ok(r) => r,
        Err(e) => {
            // The same text the client gets: printable ASCII, < 512 bytes.
            ctx.failed(sanitize_message(e.message()));
            error_response(e)
        }
    };
    if ctx.closes_connection() {
        close_after(&mut response, version);
    }
    let status = response.status().as_u16();
    let error_name = response.extensions().get::<ErrorName>().map(|e| e.0);
    let elapsed = ctx.elapsed();
    app.metrics.observe_request(
        ctx.key_store(),
        ctx.operation(),
        status,
        error_name.unwrap_or(""),
        elapsed,
    );
    // Requests that never authenticated may not flood the log (see `log_limit`).
    let suppressed = match (ctx.is_authenticated(), ctx.client()) {
        (false, Some(addr)) => match app.log_limiter.admit(addr.ip()) {
            Some(n) => n,
            None => {
                app.metrics.log_lines_suppressed.inc();
                return response;
            }
        },
        _ => 0,
    };
    let outcome = Outcome {
        status,
        error_name,
        elapsed,
        suppressed,
    };
    ctx.emit_access_line(&outcome);
    if let Some(trail) = &app.audit {
        ctx.audit(trail, &outcome);
    }
    response
}

/// Where a request is going: its key store, operation and key id.
struct Route<'l> {
    store: &'l KeyStore,
    op: Operation,
    key_id: Option<&'l str>,
}

/// Path and method checks (404, 405), which need no body.
fn route<'l>(
    live: &'l Live,
    path: &'l str,
    method: &Method,
    ctx: &mut RequestContext,
) -> Result<Route<'l>, XksError> {
    let (base, op, key_id) = parse_path(path).ok_or_else(|| {
        XksError::InvalidUriPath(format!(
            "'{}' is not an XKS API URI (expected <XksProxyUriPath>/health or \
             <XksProxyUriPath>/keys/<externalKeyId>/metadata|encrypt|decrypt)",
            clip(path, 128)
        ))
    })?;
    let store = live.stores.get(base).ok_or_else(|| {
        XksError::InvalidUriPath(format!(
            "no key store is configured with XksProxyUriPath '{}'",
            clip(base, 128)
        ))
    })?;
    ctx.routed(&store.name, op.as_str(), key_id);
    if method != Method::POST {
        return Err(XksError::MethodNotAllowed(format!(
            "{method} is not allowed; XKS API calls use POST"
        )));
    }
    Ok(Route { store, op, key_id })
}

async fn handle<K: KeyService>(
    app: &AppState<K>,
    req: Request,
    ctx: &mut RequestContext,
) -> Result<Response, XksError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let live = app.live.load_full();
    let max_body = live.service.max_body_bytes;
    let limits = BodyLimits {
        max: max_body,
        discard_max: body::DISCARD_MAX.max(max_body),
        timeout: app.body_timeout,
    };
    // Every answer, errors included, goes out only after the whole body came
    // in (see `body`): a refused request's body is read and dropped.
    let Route { store, op, key_id } = match route(&live, path, &parts.method, ctx) {
        Ok(r) => r,
        Err(e) => {
            if !body::discard(body, limits).await {
                ctx.close_connection();
            }
            return Err(e);
        }
    };
    ctx.enter(Stage::Body);
    let body = body::read(body, &parts.headers, limits, &app.body_budget)
        .await
        .map_err(|e| {
            if e.must_close() {
                ctx.close_connection();
            }
            XksError::from(e)
        })?;

    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or(path);
    ctx.enter(Stage::Authentication);
    let who = sigv4::verify(
        &store.credentials,
        store.region.as_deref(),
        parts.method.as_str(),
        path_and_query,
        parts.uri.authority().map(|a| a.as_str()),
        &parts.headers,
        &body,
        SystemTime::now(),
    )?;
    if let Some(replay) = &store.replay {
        if !replay.first_use(who.signature, who.request_time, SystemTime::now()) {
            return Err(XksError::AuthenticationFailed(
                "this signed request was received before (replay protection is on for this \
                 key store); sign every request anew"
                    .into(),
            ));
        }
    }
    ctx.authenticated(who.access_key_id);
    // The connection belongs to a key store's holder now: never evicted.
    if let Some(c) = parts.extensions.get::<ConnInfo>() {
        c.conn.mark_authenticated();
    }
    if let Some(trail) = &app.audit {
        ctx.enter(Stage::Audit);
        if let Some(slot) = trail.reserve() {
            ctx.hold_audit_slot(slot);
        }
        if !ctx.has_audit_slot() && trail.refuses() && op != Operation::GetHealthStatus {
            ctx.without_audit_record();
            app.metrics.audit_refused.inc();
            return Err(XksError::DependencyTimeout(
                "the audit trail cannot record this request now (audit.on_failure = \"refuse\"); \
                 retry"
                    .into(),
            ));
        }
        if !ctx.has_audit_slot() && !trail.refuses() {
            // Served without a record: counted, and reported in the trail.
            ctx.without_audit_record();
            trail.lost();
        }
    }

    if op == Operation::GetHealthStatus {
        ctx.enter(Stage::Validation);
        // Never throttled or authorized: KMS's health checks are few, and a
        // refused one would make KMS think the proxy is down.
        return health::answer(app, &live, &body, ctx);
    }
    ctx.enter(Stage::Quota);
    if let Some(bucket) = &store.bucket {
        if !bucket.try_acquire() {
            return Err(XksError::Throttling(format!(
                "key store '{}' is over its quota of {} requests/s",
                store.name,
                bucket.limit().per_second
            )));
        }
    }
    ctx.enter(Stage::KeyStore);
    let key_id =
        key_id.ok_or_else(|| XksError::InvalidUriPath("missing external key id".into()))?;
    let health_keys = [app.health_key.as_str(), live.health_key.as_str()];
    let is_seal_key = app.seal_key.as_deref() == Some(key_id);
    if !is_valid_key_id(key_id) || !store.allows(key_id, health_keys) || is_seal_key {
        // Parse first so the log still carries kmsRequestId.
        let _ = ctx.parse::<MetadataOnlyRequest>(&body);
        return Err(XksError::KeyNotFound(format!(
            "external key id '{}' is not a key of key store '{}'",
            clip(key_id, 128),
            store.name
        )));
    }
    ctx.enter(Stage::Validation);
    let call = KeyCall {
        app,
        target: Target { store, op, key_id },
        body: &body,
        ctx,
    };
    match op {
        Operation::GetKeyMetadata => key_metadata::answer(call).await,
        Operation::Encrypt => encrypt::answer(call).await,
        _ => decrypt::answer(call).await,
    }
}
