//! Signed calls over the checked connection, and what their answers mean to
//! KMS.
//!
//! Every call is one timed step within KMS's budget. A transport error, a
//! timeout or a non-2xx answer becomes the `ConnectionErrorCode` KMS would
//! report, except the key-level errors, which KMS reports against the key and
//! a key step may hand back instead.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde_json::Value;

use super::report::{
    failure, mark_last, push, step_failed, transport_failure, Failure, Report, Verdict,
};
use crate::{ClientError, Connection, XksClient, XksResponse};

/// The established connection and how long each call may take.
pub(super) struct Wire {
    pub(super) client: XksClient,
    pub(super) conn: Connection,
    pub(super) budget: Duration,
}

/// Which non-2xx answers a step hands back instead of failing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyErrors {
    /// Every non-2xx answer is a connection verdict.
    Fail,
    /// Key-level errors (not found, usage, disabled) come back as responses.
    Return,
}

/// What KMS would say about a key: (code, why).
pub(super) type KeyProblem = (&'static str, String);

/// A fresh `kmsRequestId` (a random UUID, as KMS sends), so the check's calls
/// can be found in the proxy's access log.
pub(super) fn request_id() -> String {
    let mut b = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// One signed call within the budget; maps transport and HTTP failures to
/// the verdict KMS would give.
pub(super) async fn call(
    wire: &mut Wire,
    suffix: &str,
    body: &Value,
    report: &mut Report,
    name: &'static str,
    key_errors: KeyErrors,
) -> Result<XksResponse, Failure> {
    let r = send(wire, suffix, body, report, name).await?;
    if r.status.is_success() {
        return Ok(r);
    }
    if key_errors == KeyErrors::Return {
        if let Some((_, why)) = key_problem(&r) {
            mark_last(report, false, why);
            return Ok(r);
        }
    }
    Err(status_failure(&r, report))
}

/// Signs and sends, and records the step with whatever HTTP status came back;
/// only an answer that never arrived (or is too large to be XKS) fails here.
async fn send(
    wire: &mut Wire,
    suffix: &str,
    body: &Value,
    report: &mut Report,
    name: &'static str,
) -> Result<XksResponse, Failure> {
    let budget = wire.budget;
    let req = wire
        .client
        .signed_request(suffix, Bytes::from(body.to_string()), SystemTime::now())
        .map_err(|e| failure(Verdict::InvalidCredentials, format!("cannot sign: {e}")))?;
    let started = Instant::now();
    let r = match tokio::time::timeout(budget, wire.conn.send(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            // An answer too large to be XKS is the server's fault, not the network's.
            let verdict = match e {
                ClientError::ResponseTooLarge => Verdict::XksProxyInvalidResponse,
                _ => Verdict::XksProxyNotReachable,
            };
            return Err(transport_failure(
                report,
                name,
                started,
                e.to_string(),
                verdict,
                format!("the connection failed during {name}: {e}"),
            ));
        }
        Err(_) => {
            return Err(transport_failure(
                report,
                name,
                started,
                "no answer".into(),
                Verdict::XksProxyTimedOut,
                format!("{name} got no answer within {} ms", budget.as_millis()),
            ));
        }
    };
    let error_name = r.error_name();
    push(
        report,
        name,
        r.status.is_success(),
        started,
        Some(r.status.as_u16()),
        error_name,
        String::new(),
    );
    Ok(r)
}

/// The verdict for a non-2xx answer.
fn status_failure(r: &XksResponse, report: &mut Report) -> Failure {
    let status = r.status.as_u16();
    let v = r.json();
    let name = v["errorName"].as_str().unwrap_or("").to_string();
    let message = v["errorMessage"].as_str().unwrap_or("").to_string();
    let said = if name.is_empty() {
        format!("HTTP {status} without an XKS error body")
    } else {
        format!("HTTP {status} {name}: {message}")
    };
    let verdict = match (status, name.as_str()) {
        (401, _) => Verdict::InvalidCredentials,
        (403, _) => Verdict::XksProxyAccessDenied,
        (404, "InvalidUriPathException") => Verdict::XksProxyInvalidConfiguration,
        (429 | 503, _) => Verdict::XksProxyNotReachable,
        _ => Verdict::XksProxyInvalidResponse,
    };
    step_failed(report, verdict, said)
}

/// Key-level errors KMS reports against the key rather than the connection.
pub(super) fn key_problem(r: &XksResponse) -> Option<KeyProblem> {
    if r.status.is_success() {
        return None;
    }
    let name = r.error_name().unwrap_or_default();
    let code = match name.as_str() {
        "KeyNotFoundException" => "XKS_KEY_NOT_FOUND",
        "InvalidKeyUsageException" => "XKS_KEY_INVALID_CONFIGURATION",
        "InvalidStateException" => "XKS_KEY_DISABLED",
        _ => return None,
    };
    let msg = r.json()["errorMessage"].as_str().unwrap_or("").to_string();
    Some((code, format!("{name}: {msg}")))
}
