//! What the pipeline knows about one XKS request while it goes through it
//! ([`RequestContext`]): where it goes, who sent it, how far it got, the
//! lock and the authorization decision that concerned it, its room in the
//! audit trail. Its fields are private; its methods say what may change at
//! which stage. When the request ends, both of its records are rendered
//! from it: the access-log line (`access_line`) and the audit record
//! (`audit_record`).
//!
//! The line carries what an operator needs to match it with KMS's CloudTrail
//! record (`kmsRequestId`), to see who asked (principal, VPC endpoint, access
//! key id) and what came of it (status, `errorName`, the authorization
//! decision, the time taken). It never carries plaintext, AAD, ciphertext or
//! secrets. Fields a client controls are cut to a bounded length, and lines
//! of requests that did not authenticate are rate-limited (see
//! [`super::log_limit`]), so the log cannot be turned against the proxy.
//!
//! With an audit trail, the same fields become the request's audit record
//! (see the `audit` layer), with the stage that refused the request and the
//! key version that served it. A request that passed SigV4 holds a slot in
//! the trail; if it never gets to its answer (the client went away and its
//! future was dropped), dropping its [`Trace`] commits an `abandoned`
//! record, so no authenticated request leaves the trail without a record.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::Request;
use serde::Deserialize;

use xks_audit::Slot;
use xks_net::listener::ConnInfo;
use xks_spec::error::XksError;
use xks_spec::wire::{parse_json, RequestMetadata, WithMetadata};
use xks_telemetry::logging::clip;

/// Longest value of a client-supplied access-log field, in bytes.
pub const FIELD_MAX: usize = 256;
/// ARNs may be long; KMS's are well under this.
const ARN_MAX: usize = 512;

mod access_line;
mod audit_record;

pub use audit_record::Trace;

/// The stages of the pipeline, in order; a refused request is denied by
/// the stage it was in (see `RequestRecord::denied_by`). A request only
/// moves forward (GetHealthStatus skips from `Audit` to `Validation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Stage {
    #[default]
    Routing,
    Body,
    Authentication,
    Audit,
    Quota,
    KeyStore,
    Validation,
    Lockdown,
    Authorization,
    /// Passed every check: what goes wrong now is the key manager's answer.
    KeyManager,
}

impl Stage {
    /// Its name in the audit record's `deniedBy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Routing => "routing",
            Stage::Body => "body",
            Stage::Authentication => "authentication",
            Stage::Audit => "audit",
            Stage::Quota => "quota",
            Stage::KeyStore => "key-store",
            Stage::Validation => "validation",
            Stage::Lockdown => "lockdown",
            Stage::Authorization => "authorization",
            Stage::KeyManager => "key-manager",
        }
    }
}

/// What the pipeline knows about one request, filled in as it goes through
/// the stages: whatever stage it stops at, its records say how far it got.
#[derive(Default)]
pub struct RequestContext {
    /// Where it goes (set once, when routed).
    key_store: Option<String>,
    operation: Option<&'static str>,
    key_id: Option<String>,
    /// KMS's `requestMetadata`, each field clipped (the body is the
    /// client's to fill).
    kms_request_id: Option<String>,
    kms_operation: Option<String>,
    aws_principal_arn: Option<String>,
    kms_key_arn: Option<String>,
    kms_via_service: Option<String>,
    aws_source_vpc: Option<String>,
    aws_source_vpce: Option<String>,
    /// Set once SigV4 passed: the line is then never rate-limited.
    access_key_id: Option<String>,
    error_message: Option<String>,
    /// Secondary authorization: `allow`, `deny` or `would-deny`...
    authz_decision: Option<&'static str>,
    /// ...and the ids of the policies that decided.
    authz_policies: Option<String>,
    /// The client may still be sending: close the (HTTP/1) connection after
    /// the answer rather than read the next request from the middle of a body.
    close_connection: bool,
    /// The client and VPC endpoint of the connection.
    conn: ConnFields,
    /// When the request arrived (the audit record's time), and the clock
    /// for its latency.
    received: Option<SystemTime>,
    started: Option<Instant>,
    stage: Stage,
    /// The version of the key that served it (Encrypt, Decrypt).
    key_version: Option<u32>,
    /// The lockdown that refused it, or made the key DISABLED.
    lock_id: Option<String>,
    /// Its room in the audit trail, once it authenticated.
    audit_slot: Option<Slot>,
    /// It has no record: it was refused for want of one (`refuse`), or
    /// served without one and counted as lost (`continue`).
    audit_skipped: bool,
}

/// How a request ended, for the log line.
pub struct Outcome {
    pub status: u16,
    pub error_name: Option<&'static str>,
    pub elapsed: Duration,
    /// Lines of this source left out since its last one.
    pub suppressed: u64,
}

/// The connection's client and VPC endpoint (from a PROXY header).
#[derive(Default)]
pub struct ConnFields {
    pub client: Option<SocketAddr>,
    pub vpce_id: Option<Arc<str>>,
}

impl ConnFields {
    pub fn of(req: &Request) -> ConnFields {
        match req.extensions().get::<ConnInfo>() {
            Some(c) => ConnFields {
                client: Some(c.client),
                vpce_id: c.vpce_id.clone(),
            },
            None => ConnFields::default(),
        }
    }
}

impl RequestContext {
    /// A request that arrived now, on this connection.
    pub fn start(conn: ConnFields) -> RequestContext {
        RequestContext {
            conn,
            received: Some(SystemTime::now()),
            started: Some(Instant::now()),
            ..RequestContext::default()
        }
    }

    /// The request moves on to `stage` (never back).
    pub fn enter(&mut self, stage: Stage) {
        debug_assert!(stage >= self.stage, "{stage:?} after {:?}", self.stage);
        self.stage = self.stage.max(stage);
    }

    /// Where it goes: its key store, operation and key id (clipped: the
    /// path is the client's). Set once, at routing.
    pub fn routed(&mut self, key_store: &str, operation: &'static str, key_id: Option<&str>) {
        self.key_store = Some(key_store.to_string());
        self.operation = Some(operation);
        self.key_id = key_id.map(|k| clip(k, FIELD_MAX).into_owned());
    }

    /// SigV4 passed, with this access key id.
    pub fn authenticated(&mut self, access_key_id: String) {
        self.access_key_id = Some(access_key_id);
    }

    /// Whether SigV4 passed (its lines are then never rate-limited).
    pub fn is_authenticated(&self) -> bool {
        self.access_key_id.is_some()
    }

    /// Its room in the audit trail (after SigV4).
    pub fn hold_audit_slot(&mut self, slot: Slot) {
        self.audit_slot = Some(slot);
    }

    pub fn has_audit_slot(&self) -> bool {
        self.audit_slot.is_some()
    }

    /// It will have no audit record: refused for want of one, or served
    /// without one and counted as lost.
    pub fn without_audit_record(&mut self) {
        self.audit_skipped = true;
    }

    /// The lockdown that refused it, or made its key DISABLED.
    pub fn locked_by(&mut self, lock_id: &str) {
        self.lock_id = Some(lock_id.to_string());
    }

    /// The key version that served it (Encrypt, Decrypt).
    pub fn served_by_version(&mut self, version: u32) {
        self.key_version = Some(version);
    }

    /// Secondary authorization's decision and the policies that made it.
    pub fn authorized(&mut self, decision: &'static str, policies: String) {
        self.authz_decision = Some(decision);
        self.authz_policies = Some(policies);
    }

    /// It failed with this message (the text the client gets).
    pub fn failed(&mut self, message: String) {
        self.error_message = Some(message);
    }

    /// The client may still be sending: the connection is closed after the
    /// answer.
    pub fn close_connection(&mut self) {
        self.close_connection = true;
    }

    pub fn closes_connection(&self) -> bool {
        self.close_connection
    }

    pub fn key_store(&self) -> &str {
        self.key_store.as_deref().unwrap_or("")
    }

    pub fn operation(&self) -> &'static str {
        self.operation.unwrap_or("unknown")
    }

    /// The client's address, when the connection knows it.
    pub fn client(&self) -> Option<SocketAddr> {
        self.conn.client
    }

    /// Time since it arrived.
    pub fn elapsed(&self) -> Duration {
        self.started.map(|s| s.elapsed()).unwrap_or_default()
    }

    /// Parses the request body and copies its `requestMetadata` in, so that
    /// even a request refused later is traceable to KMS's request id.
    pub fn parse<'b, T>(&mut self, body: &'b [u8]) -> Result<T, XksError>
    where
        T: Deserialize<'b> + WithMetadata<'b>,
    {
        let req: T = parse_json(body)?;
        self.record_metadata(req.request_metadata());
        Ok(req)
    }

    /// Copies `requestMetadata` in, each field cut to a bounded length.
    fn record_metadata(&mut self, md: Option<&RequestMetadata<'_>>) {
        if let Some(md) = md {
            let own =
                |v: &Option<Cow<'_, str>>, max| v.as_deref().map(|v| clip(v, max).into_owned());
            self.kms_request_id = own(&md.kms_request_id, FIELD_MAX);
            self.kms_operation = own(&md.kms_operation, FIELD_MAX);
            self.aws_principal_arn = own(&md.aws_principal_arn, ARN_MAX);
            self.kms_key_arn = own(&md.kms_key_arn, ARN_MAX);
            self.kms_via_service = own(&md.kms_via_service, FIELD_MAX);
            self.aws_source_vpc = own(&md.aws_source_vpc, FIELD_MAX);
            self.aws_source_vpce = own(&md.aws_source_vpce, FIELD_MAX);
        }
    }
}
