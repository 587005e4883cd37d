//! The one access-log line, and the one audit record, each XKS request
//! produces.
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

use xks_audit::{AuditTrail, Decision, RequestRecord, Slot};
use xks_net::listener::ConnInfo;
use xks_spec::error::XksError;
use xks_spec::wire::{parse_json, RequestMetadata, WithMetadata};
use xks_telemetry::logging::clip;

/// Longest value of a client-supplied access-log field, in bytes.
pub const FIELD_MAX: usize = 256;
/// ARNs may be long; KMS's are well under this.
const ARN_MAX: usize = 512;

/// The stages of the pipeline, in order; a refused request is denied by
/// the stage it was in (see `RequestRecord::denied_by`).
pub mod stage {
    pub const ROUTING: &str = "routing";
    pub const BODY: &str = "body";
    pub const AUTHENTICATION: &str = "authentication";
    pub const AUDIT: &str = "audit";
    pub const QUOTA: &str = "quota";
    pub const KEY_STORE: &str = "key-store";
    pub const VALIDATION: &str = "validation";
    pub const LOCKDOWN: &str = "lockdown";
    pub const AUTHORIZATION: &str = "authorization";
    /// Passed every check: what goes wrong now is the key manager's answer.
    pub const KEY_MANAGER: &str = "key-manager";
}

/// Fields of the access-log line, filled in as the request goes through the
/// pipeline: whatever stage it stops at, the line says how far it got.
#[derive(Default)]
pub struct AccessLog {
    pub key_store: Option<String>,
    pub operation: Option<&'static str>,
    pub key_id: Option<String>,
    pub kms_request_id: Option<String>,
    pub kms_operation: Option<String>,
    pub aws_principal_arn: Option<String>,
    pub kms_key_arn: Option<String>,
    pub kms_via_service: Option<String>,
    pub aws_source_vpc: Option<String>,
    pub aws_source_vpce: Option<String>,
    /// Set once SigV4 passed: the line is then never rate-limited.
    pub access_key_id: Option<String>,
    pub error_message: Option<String>,
    /// Secondary authorization: `allow`, `deny` or `would-deny`...
    pub authz_decision: Option<&'static str>,
    /// ...and the ids of the policies that decided.
    pub authz_policies: Option<String>,
    /// The client may still be sending: close the (HTTP/1) connection after
    /// the answer rather than read the next request from the middle of a body.
    pub close_connection: bool,
    /// The client and VPC endpoint of the connection.
    pub conn: ConnFields,
    /// When the request arrived (the audit record's time), and the clock
    /// for its latency.
    pub received: Option<SystemTime>,
    pub started: Option<Instant>,
    /// The pipeline stage the request is in (see [`stage`]).
    pub stage: &'static str,
    /// The version of the key that served it (Encrypt, Decrypt).
    pub key_version: Option<u32>,
    /// The lockdown that refused it, or made the key DISABLED.
    pub lock_id: Option<String>,
    /// Its room in the audit trail, once it authenticated.
    pub audit_slot: Option<Slot>,
    /// It has no record: it was refused for want of one (`refuse`), or
    /// served without one and counted as lost (`continue`).
    pub audit_skipped: bool,
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

/// Parses a request body and copies its `requestMetadata` into the log
/// line, so that even a request refused later is traceable to KMS's
/// request id.
pub fn parse_logged<'b, T>(body: &'b [u8], log: &mut AccessLog) -> Result<T, XksError>
where
    T: Deserialize<'b> + WithMetadata<'b>,
{
    let req: T = parse_json(body)?;
    log.record_metadata(req.request_metadata());
    Ok(req)
}

impl AccessLog {
    /// The log of a request that arrived now, on this connection.
    pub fn start(conn: ConnFields) -> AccessLog {
        AccessLog {
            conn,
            received: Some(SystemTime::now()),
            started: Some(Instant::now()),
            stage: stage::ROUTING,
            ..AccessLog::default()
        }
    }

    /// Copies `requestMetadata` into the log line, each field cut to a
    /// bounded length (the body is the client's to fill).
    pub fn record_metadata(&mut self, md: Option<&RequestMetadata<'_>>) {
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

    /// Writes the line: `warn` for answers the proxy is to blame for (5xx),
    /// `info` for the rest.
    pub fn emit(&self, o: &Outcome) {
        let client_addr = self.conn.client.map(|a| a.to_string());
        let micros = o.elapsed.as_micros() as u64;
        let suppressed = (o.suppressed > 0).then_some(o.suppressed);
        macro_rules! access {
            ($lvl:ident) => {
                tracing::$lvl!(
                    target: "xks_proxy::access",
                    kms_request_id = self.kms_request_id.as_deref(),
                    kms_operation = self.kms_operation.as_deref(),
                    aws_principal_arn = self.aws_principal_arn.as_deref(),
                    kms_key_arn = self.kms_key_arn.as_deref(),
                    kms_via_service = self.kms_via_service.as_deref(),
                    aws_source_vpce = self.aws_source_vpce.as_deref(),
                    client_addr = client_addr.as_deref(),
                    proxy_vpce_id = self.conn.vpce_id.as_deref(),
                    key_store = self.key_store.as_deref(),
                    access_key_id = self.access_key_id.as_deref(),
                    operation = self.operation,
                    key_id = self.key_id.as_deref(),
                    status = o.status,
                    error_name = o.error_name,
                    error_message = self.error_message.as_deref(),
                    authz_decision = self.authz_decision,
                    authz_policies = self.authz_policies.as_deref(),
                    micros,
                    suppressed,
                    "request"
                )
            };
        }
        if o.status >= 500 {
            access!(warn);
        } else {
            access!(info);
        }
    }

    /// The request's audit record, its fields taken out of the log (which
    /// has been written by then).
    fn take_record(&mut self, o: &Outcome) -> RequestRecord {
        let reached = self.stage == stage::KEY_MANAGER;
        let decision = match o.status {
            0 => Decision::Abandoned,
            200..=299 => Decision::Allowed,
            _ if reached => Decision::Failed,
            _ => Decision::Denied,
        };
        let denied_by = (decision == Decision::Denied).then_some(self.stage);
        RequestRecord {
            received: self.received,
            kms_request_id: self.kms_request_id.take(),
            kms_operation: self.kms_operation.take(),
            operation: self.operation,
            key_store: self.key_store.take(),
            key_id: self.key_id.take(),
            key_version: self.key_version,
            aws_principal_arn: self.aws_principal_arn.take(),
            kms_key_arn: self.kms_key_arn.take(),
            kms_via_service: self.kms_via_service.take(),
            aws_source_vpc: self.aws_source_vpc.take(),
            aws_source_vpce: self.aws_source_vpce.take(),
            client_addr: self.conn.client,
            proxy_vpce_id: self.conn.vpce_id.as_deref().map(str::to_owned),
            access_key_id: self.access_key_id.take(),
            decision,
            denied_by,
            authz: self.authz_decision,
            authz_policies: self.authz_policies.take(),
            lock_id: self.lock_id.take(),
            status: o.status,
            error_name: o.error_name,
            latency_us: o.elapsed.as_micros() as u64,
            suppressed: o.suppressed,
        }
    }

    /// Writes the request's audit record: into its slot when it holds one,
    /// else when the trail has room (or it is counted as lost).
    pub fn audit(&mut self, trail: &AuditTrail, o: &Outcome) {
        if self.audit_skipped {
            return;
        }
        let slot = self.audit_slot.take();
        let record = self.take_record(o);
        match slot {
            Some(slot) => slot.commit(record),
            None => trail.record(record),
        }
    }
}

/// A request's log while it is in flight: if the request is dropped before
/// its answer (the client went away) and it holds an audit slot, dropping
/// this commits an `abandoned` record.
pub struct Trace(pub AccessLog);

impl Drop for Trace {
    fn drop(&mut self) {
        let log = &mut self.0;
        if let Some(slot) = log.audit_slot.take() {
            let o = Outcome {
                status: 0,
                error_name: None,
                elapsed: log.started.map(|s| s.elapsed()).unwrap_or_default(),
                suppressed: 0,
            };
            let record = log.take_record(&o);
            slot.commit(record);
        }
    }
}
