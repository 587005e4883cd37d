//! The HTTP surface: XKS API routing, request handling and the access log.
//!
//! Key stores are looked up by their full `XksProxyUriPath`, so routing is done
//! here rather than by a static route table: `<uri_path>/health` and
//! `<uri_path>/keys/<externalKeyId>/{metadata,encrypt,decrypt}`.
//!
//! The order of checks is deliberate:
//! 1. path → 404 `InvalidUriPathException` (KMS reports a wrong prefix as
//!    XKS_PROXY_INVALID_CONFIGURATION; we cannot authenticate without knowing
//!    the key store anyway);
//! 2. method → 405;
//! 3. body size (declared, then actual) → 501 before reading more than the limit;
//! 4. SigV4 → 401, so nothing below is reachable without the secret;
//! 5. the key store's rate quota → 429 (GetHealthStatus is exempt);
//! 6. key id allowed for this key store → 404 `KeyNotFoundException`;
//! 7. JSON and field validation → 400, before any HSM work;
//! 8. secondary authorization (Cedar) → 403 (GetHealthStatus is exempt);
//! 9. the HSM.

pub mod body;
pub mod log_limit;
pub mod types;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use http::{header, HeaderValue, Method, StatusCode};

use crate::aead::{decrypt_layouts, AadLayout, SampleCompat};
use crate::auth::{self, CredentialSet};
use crate::authz::{AuthzRequest, Policies};
use crate::config::{AllowedKeys, Config, HealthConfig};
use crate::error::{sanitize_message, ErrorName, XksError};
use crate::hsm::{DecryptInput, EkmStatus, EncryptInput, Fault, KeyManagers};
use crate::logging::clip;
use crate::metrics::Metrics;
use crate::net::limits::Registry;
use crate::replay::ReplayCache;
use crate::server::ConnInfo;
use crate::throttle::TokenBucket;
use body::BodyLimits;
use tokio::sync::Semaphore;
use types::*;

/// One key store at run time.
#[derive(Debug)]
pub struct KeyStore {
    pub name: String,
    pub uri_path: String,
    pub keys: AllowedKeys,
    pub credentials: CredentialSet,
    /// Access key id and creation (or secret file modification) time of each
    /// credential, for the credential-age metric.
    pub credential_ages: Vec<(String, Option<SystemTime>)>,
    /// Cedar policies (secondary authorization), if configured.
    pub policies: Option<Arc<Policies>>,
    /// Request-rate quota, if configured.
    pub bucket: Option<Arc<TokenBucket>>,
    /// Decrypt also accepts the AWS sample proxy's ciphertexts.
    pub compat: Option<SampleCompat>,
    /// The AWS Region requests must be signed for, when pinned.
    pub region: Option<String>,
    /// Signatures already used, when replay protection is on.
    pub replay: Option<Arc<ReplayCache>>,
}

impl KeyStore {
    /// Whether this key store may use `key_id`. The health-check keys (the
    /// running one and the configured one, which differ after a reload until
    /// the next restart) never serve KMS, whatever a list says.
    fn allows(&self, key_id: &str, health_keys: [&str; 2]) -> bool {
        if health_keys.contains(&key_id) {
            return false;
        }
        match &self.keys {
            AllowedKeys::All => true,
            AllowedKeys::Only(set) => set.contains(key_id),
        }
    }
}

/// The part of the state that a configuration reload replaces as a whole.
/// Each request takes one snapshot at its start, so a reload never changes
/// the rules under a request in flight.
pub struct Live {
    pub stores: HashMap<String, KeyStore>,
    pub max_body_bytes: usize,
    pub fleet_size: u32,
    pub vendor: String,
    pub model: String,
    /// The configured health-check key label (the running one is in
    /// [`AppState::health_cfg`]).
    pub health_key: String,
}

impl Live {
    /// Builds the live state. Rate-limit buckets of key stores whose quota did
    /// not change are carried over from `previous`, so a reload does not hand
    /// every key store a fresh burst.
    pub fn from_config(cfg: &Config, previous: Option<&Live>) -> Live {
        let stores = cfg
            .key_stores
            .iter()
            .map(|ks| {
                let bucket = ks.rate_limit.map(|limit| {
                    previous
                        .and_then(|p| p.stores.get(&ks.uri_path))
                        .and_then(|old| old.bucket.clone())
                        .filter(|b| b.limit() == limit)
                        .unwrap_or_else(|| Arc::new(TokenBucket::new(limit)))
                });
                (
                    ks.uri_path.clone(),
                    KeyStore {
                        name: ks.name.clone(),
                        uri_path: ks.uri_path.clone(),
                        keys: ks.keys.clone(),
                        credentials: CredentialSet::new(&ks.credentials),
                        credential_ages: ks
                            .credentials
                            .iter()
                            .map(|c| (c.access_key_id.clone(), c.created_or_modified()))
                            .collect(),
                        policies: ks.authorization.clone(),
                        bucket,
                        compat: ks.compat.clone(),
                        region: ks.region.clone(),
                        replay: ks.replay_protection.then(|| {
                            previous
                                .and_then(|p| p.stores.get(&ks.uri_path))
                                .and_then(|old| old.replay.clone())
                                .unwrap_or_else(|| Arc::new(ReplayCache::new(auth::MAX_CLOCK_SKEW)))
                        }),
                    },
                )
            })
            .collect();
        Live {
            stores,
            max_body_bytes: cfg.server.max_body_bytes,
            fleet_size: cfg.server.fleet_size,
            vendor: cfg.server.vendor.clone(),
            model: cfg.server.model.clone(),
            health_key: cfg.health.key_label.clone(),
        }
    }
}

/// Everything a request handler needs.
pub struct AppState {
    pub live: ArcSwap<Live>,
    /// The key managers, each with its health.
    pub hsm: KeyManagers,
    pub health_cfg: HealthConfig,
    pub body_timeout: Duration,
    /// Bytes of request bodies held at once, across all requests: bodies are
    /// read before SigV4 can be checked, so this bounds what unauthenticated
    /// clients can make the proxy hold.
    pub body_budget: Arc<Semaphore>,
    pub metrics: Metrics,
    /// The XKS listener's connections: `/ping` fails while it cannot accept.
    pub xks_conns: Arc<Registry>,
    /// Bounds the access lines of requests that did not authenticate.
    pub log_limiter: log_limit::LogLimiter,
}

impl AppState {
    pub fn new(
        cfg: &Config,
        hsm: KeyManagers,
        metrics: Metrics,
        xks_conns: Arc<Registry>,
    ) -> AppState {
        AppState {
            live: ArcSwap::from_pointee(Live::from_config(cfg, None)),
            hsm,
            health_cfg: cfg.health.clone(),
            body_timeout: cfg.server.header_read_timeout,
            body_budget: Arc::new(Semaphore::new(cfg.server.body_buffer_budget)),
            metrics,
            xks_conns,
            log_limiter: log_limit::LogLimiter::default(),
        }
    }
}

/// The spec's answer for each fault of the key manager layer: the only
/// place where what went wrong there becomes an HTTP status.
impl From<Fault> for XksError {
    fn from(f: Fault) -> Self {
        let message = f.to_string();
        match f {
            Fault::KeyNotFound { .. } => XksError::KeyNotFound(message),
            Fault::KeyDisabled { .. } => XksError::InvalidState(message),
            Fault::WrongUsage(_) => XksError::InvalidKeyUsage(message),
            Fault::BadCiphertext | Fault::UnknownVersion { .. } => {
                XksError::InvalidCiphertext(message)
            }
            Fault::Busy { .. } => XksError::Throttling(message),
            Fault::NoSession { .. } | Fault::Timeout { .. } => XksError::DependencyTimeout(message),
            Fault::Unavailable { .. } | Fault::Failed { .. } => XksError::Internal(message),
        }
    }
}

/// The router: `/ping` for load balancers, everything else is the XKS API.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ping", any(ping))
        .fallback(xks)
        .with_state(state)
}

/// Router for the optional plain-HTTP health-check listener: `/ping` only.
pub fn ping_router(state: Arc<AppState>) -> Router {
    Router::new().route("/ping", any(ping)).with_state(state)
}

/// Load-balancer check: no auth, 200 while this instance can serve (one of
/// its key managers is not UNAVAILABLE and the XKS listener can take a
/// connection), else 503 so the balancer routes elsewhere.
async fn ping(State(app): State<Arc<AppState>>, req: Request) -> Response {
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
        let (status, _) = app.hsm.overall();
        let saturated = app.xks_conns.saturated();
        let code = if status == EkmStatus::Unavailable || saturated {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        let body = match status {
            EkmStatus::Unavailable => "unavailable\n",
            _ if saturated => "saturated: the XKS listener cannot accept connections\n",
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

/// Asks hyper to close an HTTP/1 connection after this answer, because the
/// client may still be sending the body. HTTP/2 ends just the stream by
/// itself (and forbids the header).
fn close_after(response: &mut Response, version: http::Version) {
    if version < http::Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// The four XKS operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    GetHealthStatus,
    GetKeyMetadata,
    Encrypt,
    Decrypt,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::GetHealthStatus => "GetHealthStatus",
            Operation::GetKeyMetadata => "GetKeyMetadata",
            Operation::Encrypt => "Encrypt",
            Operation::Decrypt => "Decrypt",
        }
    }
}

/// Splits an XKS URI path into (key store path, operation, key id).
pub fn parse_path(path: &str) -> Option<(&str, Operation, Option<&str>)> {
    if let Some(base) = path.strip_suffix("/health") {
        return Some((base, Operation::GetHealthStatus, None));
    }
    let (rest, op) = path.rsplit_once('/')?;
    let op = match op {
        "metadata" => Operation::GetKeyMetadata,
        "encrypt" => Operation::Encrypt,
        "decrypt" => Operation::Decrypt,
        _ => return None,
    };
    let (rest, key_id) = rest.rsplit_once('/')?;
    let base = rest.strip_suffix("/keys")?;
    Some((base, op, Some(key_id)))
}

/// Fields of the one access-log line each request produces.
#[derive(Default)]
struct AccessLog {
    key_store: Option<String>,
    operation: Option<&'static str>,
    key_id: Option<String>,
    kms_request_id: Option<String>,
    kms_operation: Option<String>,
    aws_principal_arn: Option<String>,
    kms_key_arn: Option<String>,
    kms_via_service: Option<String>,
    aws_source_vpce: Option<String>,
    access_key_id: Option<String>,
    error_message: Option<String>,
    /// Secondary authorization: `allow`, `deny` or `would-deny`...
    authz_decision: Option<&'static str>,
    /// ...and the ids of the policies that decided.
    authz_policies: Option<String>,
    /// The client may still be sending: close the (HTTP/1) connection after
    /// the answer rather than read the next request from the middle of a body.
    close_connection: bool,
}

/// The connection's client and VPC endpoint (from a PROXY header) for the log.
fn conn_fields(req: &Request) -> (Option<std::net::SocketAddr>, Option<Arc<str>>) {
    match req.extensions().get::<ConnInfo>() {
        Some(c) => (Some(c.client), c.vpce_id.clone()),
        None => (None, None),
    }
}

/// Longest value of a client-supplied access-log field, in bytes.
const FIELD_MAX: usize = 256;
/// ARNs may be long; KMS's are well under this.
const ARN_MAX: usize = 512;

impl AccessLog {
    /// Copies `requestMetadata` into the log line, each field cut to a
    /// bounded length (the body is the client's to fill).
    fn record_metadata(&mut self, md: Option<&RequestMetadata<'_>>) {
        if let Some(md) = md {
            let own = |v: &Option<std::borrow::Cow<'_, str>>, max| {
                v.as_deref().map(|v| clip(v, max).into_owned())
            };
            self.kms_request_id = own(&md.kms_request_id, FIELD_MAX);
            self.kms_operation = own(&md.kms_operation, FIELD_MAX);
            self.aws_principal_arn = own(&md.aws_principal_arn, ARN_MAX);
            self.kms_key_arn = own(&md.kms_key_arn, ARN_MAX);
            self.kms_via_service = own(&md.kms_via_service, FIELD_MAX);
            self.aws_source_vpce = own(&md.aws_source_vpce, FIELD_MAX);
        }
    }
}

/// Entry point for every non-`/ping` request.
async fn xks(State(app): State<Arc<AppState>>, req: Request) -> Response {
    let started = Instant::now();
    let mut log = AccessLog::default();
    let (client_addr, proxy_vpce_id) = conn_fields(&req);
    let version = req.version();
    let mut response = match handle(&app, req, &mut log).await {
        Ok(r) => r,
        Err(e) => {
            // The same text the client gets: printable ASCII, < 512 bytes.
            log.error_message = Some(sanitize_message(e.message()));
            e.into_response()
        }
    };
    if log.close_connection {
        close_after(&mut response, version);
    }
    let status = response.status().as_u16();
    let error_name = response.extensions().get::<ErrorName>().map(|e| e.0);
    let elapsed = started.elapsed();
    let micros = elapsed.as_micros() as u64;
    app.metrics.observe_request(
        log.key_store.as_deref().unwrap_or(""),
        log.operation.unwrap_or("unknown"),
        status,
        error_name.unwrap_or(""),
        elapsed,
    );
    // Requests that never authenticated may not flood the log (see `log_limit`).
    let suppressed = match (log.access_key_id.is_some(), client_addr) {
        (false, Some(addr)) => match app.log_limiter.admit(addr.ip()) {
            Some(n) => n,
            None => {
                app.metrics.log_lines_suppressed.inc();
                return response;
            }
        },
        _ => 0,
    };
    let client_addr = client_addr.map(|a| a.to_string());
    let level_warn = status >= 500;
    macro_rules! access {
        ($lvl:ident) => {
            tracing::$lvl!(
                target: "xks_proxy::access",
                kms_request_id = log.kms_request_id.as_deref(),
                kms_operation = log.kms_operation.as_deref(),
                aws_principal_arn = log.aws_principal_arn.as_deref(),
                kms_key_arn = log.kms_key_arn.as_deref(),
                kms_via_service = log.kms_via_service.as_deref(),
                aws_source_vpce = log.aws_source_vpce.as_deref(),
                client_addr = client_addr.as_deref(),
                proxy_vpce_id = proxy_vpce_id.as_deref(),
                key_store = log.key_store.as_deref(),
                access_key_id = log.access_key_id.as_deref(),
                operation = log.operation,
                key_id = log.key_id.as_deref(),
                status,
                error_name,
                error_message = log.error_message.as_deref(),
                authz_decision = log.authz_decision,
                authz_policies = log.authz_policies.as_deref(),
                micros,
                suppressed = (suppressed > 0).then_some(suppressed),
                "request"
            )
        };
    }
    if level_warn {
        access!(warn);
    } else {
        access!(info);
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
    log: &mut AccessLog,
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
    log.key_store = Some(store.name.clone());
    log.operation = Some(op.as_str());
    log.key_id = key_id.map(|k| clip(k, FIELD_MAX).into_owned());
    if method != Method::POST {
        return Err(XksError::MethodNotAllowed(format!(
            "{method} is not allowed; XKS API calls use POST"
        )));
    }
    Ok(Route { store, op, key_id })
}

async fn handle(app: &AppState, req: Request, log: &mut AccessLog) -> Result<Response, XksError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let live = app.live.load_full();
    let limits = BodyLimits {
        max: live.max_body_bytes,
        discard_max: body::DISCARD_MAX.max(live.max_body_bytes),
        timeout: app.body_timeout,
    };
    // Every answer, errors included, goes out only after the whole body came
    // in (see `body`): a refused request's body is read and dropped.
    let Route { store, op, key_id } = match route(&live, path, &parts.method, log) {
        Ok(r) => r,
        Err(e) => {
            log.close_connection = !body::discard(body, limits).await;
            return Err(e);
        }
    };
    let body = body::read(body, &parts.headers, limits, &app.body_budget)
        .await
        .map_err(|e| {
            log.close_connection = e.must_close();
            XksError::from(e)
        })?;

    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or(path);
    let who = auth::verify(
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
    log.access_key_id = Some(who.access_key_id);
    // The connection belongs to a key store's holder now: never evicted.
    if let Some(c) = parts.extensions.get::<ConnInfo>() {
        c.conn.mark_authenticated();
    }

    if op == Operation::GetHealthStatus {
        // Never throttled or authorized: KMS's health checks are few, and a
        // refused one would make KMS think the proxy is down.
        return health(app, &live, &body, log);
    }
    if let Some(bucket) = &store.bucket {
        if !bucket.try_acquire() {
            return Err(XksError::Throttling(format!(
                "key store '{}' is over its quota of {} requests/s",
                store.name,
                bucket.limit().per_second
            )));
        }
    }
    let key_id =
        key_id.ok_or_else(|| XksError::InvalidUriPath("missing external key id".into()))?;
    let health_keys = [app.health_cfg.key_label.as_str(), live.health_key.as_str()];
    if !crate::config::is_valid_key_id(key_id) || !store.allows(key_id, health_keys) {
        // Parse first so the log still carries kmsRequestId.
        if let Ok(r) = parse_json::<MetadataOnlyRequest>(&body) {
            log.record_metadata(r.request_metadata.as_ref());
        }
        return Err(XksError::KeyNotFound(format!(
            "external key id '{}' is not a key of key store '{}'",
            clip(key_id, 128),
            store.name
        )));
    }
    let target = Target { store, op, key_id };
    match op {
        Operation::GetKeyMetadata => key_metadata(app, &target, &body, log).await,
        Operation::Encrypt => encrypt(app, &target, &body, log).await,
        _ => decrypt(app, &target, &body, log).await,
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Response, XksError> {
    let body = serde_json::to_vec(v)
        .map_err(|_| XksError::Internal("cannot serialize the response".into()))?;
    Ok(json_response(StatusCode::OK, Bytes::from(body)))
}

/// GetHealthStatus. Its body must carry `requestMetadata` with `kmsRequestId`
/// and `kmsOperation` (the spec marks both REQUIRED, KMS always sends them,
/// and the official compliance client expects `400 ValidationException`
/// without them, although the spec's error table lists ValidationException
/// for every operation "except GetHealthStatus"). Any `kmsOperation` value
/// is accepted: KMS adds new ones.
///
/// The answer is 200 with every key manager's true state, UNAVAILABLE
/// included: KMS then reports the key managers as unavailable (its
/// `XksExternalKeyManagerStates` metric) rather than the proxy as timing
/// out, which a 503 `DependencyTimeoutException` would say.
fn health(
    app: &AppState,
    live: &Live,
    body: &[u8],
    log: &mut AccessLog,
) -> Result<Response, XksError> {
    let req: MetadataOnlyRequest = parse_json(body)?;
    log.record_metadata(req.request_metadata.as_ref());
    require_health_metadata(req.request_metadata.as_ref())?;
    let details = app.hsm.details();
    to_json(&HealthResponse {
        xks_proxy_fleet_size: live.fleet_size,
        xks_proxy_vendor: live.vendor.clone(),
        xks_proxy_model: live.model.clone(),
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

/// What a key operation acts on.
struct Target<'a> {
    store: &'a KeyStore,
    op: Operation,
    key_id: &'a str,
}

/// Secondary authorization, after validation and before any HSM work.
fn authorize(
    t: &Target<'_>,
    md: &RequestMetadata<'_>,
    log: &mut AccessLog,
) -> Result<(), XksError> {
    let Some(policies) = &t.store.policies else {
        return Ok(());
    };
    let verdict = policies.decide(&AuthzRequest {
        key_store: &t.store.name,
        action: t.op.as_str(),
        key_id: t.key_id,
        principal_arn: md.aws_principal_arn.as_deref().unwrap_or(""),
        kms_operation: md.kms_operation.as_deref().unwrap_or(""),
        kms_request_id: md.kms_request_id.as_deref().unwrap_or(""),
        kms_key_arn: md.kms_key_arn.as_deref(),
        kms_via_service: md.kms_via_service.as_deref(),
        aws_source_vpc: md.aws_source_vpc.as_deref(),
        aws_source_vpce: md.aws_source_vpce.as_deref(),
    });
    if !verdict.errors.is_empty() {
        tracing::warn!(key_store = %t.store.name, errors = ?verdict.errors, "policy evaluation errors");
    }
    log.authz_decision = Some(verdict.decision);
    log.authz_policies = Some(verdict.policies.join(","));
    if verdict.allowed {
        return Ok(());
    }
    let why = if verdict.policies.is_empty() {
        "no policy permits this request".to_string()
    } else {
        format!("denied by policy {}", verdict.policies.join(", "))
    };
    Err(XksError::AccessDenied(format!(
        "{} on key '{}' of key store '{}': {why}",
        t.op.as_str(),
        t.key_id,
        t.store.name
    )))
}

async fn key_metadata(
    app: &AppState,
    t: &Target<'_>,
    body: &[u8],
    log: &mut AccessLog,
) -> Result<Response, XksError> {
    let req: MetadataOnlyRequest = parse_json(body)?;
    log.record_metadata(req.request_metadata.as_ref());
    let md = require_metadata(req.request_metadata.as_ref(), false)?;
    authorize(t, md, log)?;
    let key = app.hsm.key_info(t.key_id).await?;
    to_json(&KeyMetadataResponse {
        key_spec: key.spec.to_string(),
        key_usage: key.usages.names(),
        key_status: if key.enabled { "ENABLED" } else { "DISABLED" },
    })
}

async fn encrypt(
    app: &AppState,
    t: &Target<'_>,
    body: &[u8],
    log: &mut AccessLog,
) -> Result<Response, XksError> {
    let req: EncryptRequest = parse_json(body)?;
    log.record_metadata(req.request_metadata.as_ref());
    let v = req.validate()?;
    authorize(
        t,
        require_metadata(req.request_metadata.as_ref(), true)?,
        log,
    )?;
    let out = app
        .hsm
        .encrypt(
            t.key_id,
            EncryptInput {
                plaintext: v.plaintext,
                aad: v.aad,
                cdiv: v.cdiv,
            },
        )
        .await?;
    to_json(&EncryptResponse::from(out))
}

async fn decrypt(
    app: &AppState,
    t: &Target<'_>,
    body: &[u8],
    log: &mut AccessLog,
) -> Result<Response, XksError> {
    let req: DecryptRequest = parse_json(body)?;
    log.record_metadata(req.request_metadata.as_ref());
    let v = req.validate()?;
    authorize(
        t,
        require_metadata(req.request_metadata.as_ref(), true)?,
        log,
    )?;
    let layouts = decrypt_layouts(&v.metadata, v.aad_present, t.store.compat.as_ref());
    let out = app
        .hsm
        .decrypt(
            t.key_id,
            DecryptInput {
                ciphertext: v.ciphertext,
                iv: v.iv,
                tag: v.tag,
                aad: v.aad_present.then_some(v.aad),
                metadata: v.metadata,
                layouts,
            },
        )
        .await?;
    if out.layout == AadLayout::AwsSample {
        app.metrics
            .compat_decrypts
            .with_label_values(&[&t.store.name])
            .inc();
    }
    // The body owns a zeroizing buffer: wiped when hyper drops it after sending.
    let body = Bytes::from_owner(decrypt_response(&out.plaintext));
    Ok(json_response(StatusCode::OK, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            parse_path("/kms/xks/v1/health"),
            Some(("/kms/xks/v1", Operation::GetHealthStatus, None))
        );
        assert_eq!(
            parse_path("/p/kms/xks/v1/keys/k-1/encrypt"),
            Some(("/p/kms/xks/v1", Operation::Encrypt, Some("k-1")))
        );
        assert_eq!(
            parse_path("/p/kms/xks/v1/keys/k/metadata"),
            Some(("/p/kms/xks/v1", Operation::GetKeyMetadata, Some("k")))
        );
        assert_eq!(parse_path("/p/kms/xks/v1/keys/k/sign"), None);
        assert_eq!(parse_path("/p/kms/xks/v1/key/k/encrypt"), None);
        assert_eq!(parse_path("/"), None);
    }
}
