//! The one access-log line each XKS request produces.
//!
//! The line carries what an operator needs to match it with KMS's CloudTrail
//! record (`kmsRequestId`), to see who asked (principal, VPC endpoint, access
//! key id) and what came of it (status, `errorName`, the authorization
//! decision, the time taken). It never carries plaintext, AAD, ciphertext or
//! secrets. Fields a client controls are cut to a bounded length, and lines
//! of requests that did not authenticate are rate-limited (see
//! [`super::log_limit`]), so the log cannot be turned against the proxy.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use serde::Deserialize;

use crate::net::listener::ConnInfo;
use crate::spec::error::XksError;
use crate::spec::wire::{parse_json, RequestMetadata, WithMetadata};
use crate::telemetry::logging::clip;

/// Longest value of a client-supplied access-log field, in bytes.
pub const FIELD_MAX: usize = 256;
/// ARNs may be long; KMS's are well under this.
const ARN_MAX: usize = 512;

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
}

/// How a request ended, for the log line.
pub struct Outcome<'a> {
    pub status: u16,
    pub error_name: Option<&'static str>,
    pub elapsed: Duration,
    /// Lines of this source left out since its last one.
    pub suppressed: u64,
    pub conn: &'a ConnFields,
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
            self.aws_source_vpce = own(&md.aws_source_vpce, FIELD_MAX);
        }
    }

    /// Writes the line: `warn` for answers the proxy is to blame for (5xx),
    /// `info` for the rest.
    pub fn emit(&self, o: &Outcome<'_>) {
        let client_addr = o.conn.client.map(|a| a.to_string());
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
                    proxy_vpce_id = o.conn.vpce_id.as_deref(),
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
}
