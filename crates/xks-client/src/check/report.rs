//! What `check` found, and how it is shown.
//!
//! The verdicts carry KMS's own names and, for the operator, what to look at.
//! The steps are recorded as they happen (a failed step stays in the report),
//! so the report shows how far a connection got, not only that it failed.

use std::time::{Duration, Instant};

use serde::Serialize;

use xks_spec::text::printable;

/// The connection verdicts, as KMS names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    Connected,
    InvalidCredentials,
    XksProxyAccessDenied,
    XksProxyInvalidConfiguration,
    XksProxyInvalidResponse,
    XksProxyInvalidTlsConfiguration,
    XksProxyNotReachable,
    XksProxyTimedOut,
}

impl Verdict {
    /// The `ConnectionErrorCode` KMS would report (`CONNECTED` when it connects),
    /// spelled as in its console and API, so it can be searched for.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Connected => "CONNECTED",
            Verdict::InvalidCredentials => "INVALID_CREDENTIALS",
            Verdict::XksProxyAccessDenied => "XKS_PROXY_ACCESS_DENIED",
            Verdict::XksProxyInvalidConfiguration => "XKS_PROXY_INVALID_CONFIGURATION",
            Verdict::XksProxyInvalidResponse => "XKS_PROXY_INVALID_RESPONSE",
            Verdict::XksProxyInvalidTlsConfiguration => "XKS_PROXY_INVALID_TLS_CONFIGURATION",
            Verdict::XksProxyNotReachable => "XKS_PROXY_NOT_REACHABLE",
            Verdict::XksProxyTimedOut => "XKS_PROXY_TIMED_OUT",
        }
    }

    /// What to look at, for the operator.
    pub fn fix(self) -> &'static str {
        match self {
            Verdict::Connected => "nothing",
            Verdict::InvalidCredentials => {
                "check the access key id and secret given to KMS against the proxy's key store \
                 credentials, the clocks (±5 min), and that nothing between KMS and the proxy \
                 rewrites the Host header or the body"
            }
            Verdict::XksProxyAccessDenied => {
                "the proxy's own authorization (or mTLS) refused the request: allow KMS's \
                 principal and this key store in the proxy's policy"
            }
            Verdict::XksProxyInvalidConfiguration => {
                "the XksProxyUriPath given to KMS is not a key store of this proxy: compare it \
                 with the proxy's [[key_stores]] uri_path"
            }
            Verdict::XksProxyInvalidResponse => {
                "the proxy answered something the XKS API does not allow: see the step's \
                 detail; upgrade or fix the proxy"
            }
            Verdict::XksProxyInvalidTlsConfiguration => {
                "serve TLS 1.2+ with an AES-256-GCM or ChaCha20 suite and a certificate from a \
                 public CA that matches the endpoint's name and is not expired"
            }
            Verdict::XksProxyNotReachable => {
                "start the proxy, check DNS, routes, security groups and the load balancer, \
                 and that at least one key manager is healthy"
            }
            Verdict::XksProxyTimedOut => {
                "the proxy (or its HSM) answered too slowly for KMS's 250 ms budget: check HSM \
                 latency, the proxy's load, and the network path"
            }
        }
    }
}

/// One step's outcome.
#[derive(Debug, Serialize)]
pub struct Step {
    pub name: &'static str,
    pub ok: bool,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_name: Option<String>,
    pub detail: String,
}

/// The negotiated TLS session.
#[derive(Debug, Serialize, Default)]
pub struct TlsReport {
    pub version: String,
    pub cipher_suite: String,
    pub alpn: Option<String>,
    /// The HTTP version the requests went over: `HTTP/2` or `HTTP/1.1`.
    pub protocol: String,
    pub certificate_subject: String,
    pub certificate_issuer: String,
    pub certificate_not_after: String,
    pub certificate_days_left: i64,
}

/// Everything `check` found.
#[derive(Debug, Serialize)]
pub struct Report {
    pub verdict: Verdict,
    pub explanation: String,
    pub fix: &'static str,
    /// `OK`, or what KMS would say about the key (`XKS_KEY_NOT_FOUND`,
    /// `XKS_KEY_INVALID_CONFIGURATION`, `XKS_KEY_DISABLED`); absent without a key id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_verdict: Option<String>,
    pub endpoint: String,
    pub uri_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsReport>,
    pub steps: Vec<Step>,
    pub warnings: Vec<String>,
}

impl Report {
    /// 0 when connected and the key (if any) is usable; 1 for a connection
    /// verdict; 3 for a key problem.
    pub fn exit_code(&self) -> u8 {
        match (&self.verdict, self.key_verdict.as_deref()) {
            (Verdict::Connected, None | Some("OK")) => 0,
            (Verdict::Connected, _) => 3,
            _ => 1,
        }
    }

    /// Human-readable rendering. Everything the server sent (error
    /// messages, certificate names) is shown through [`printable`], so a
    /// hostile server cannot paint lines of its own on the terminal.
    pub fn text(&self) -> String {
        let p = printable;
        let mut out = format!(
            "xks-proxy check {}{}\n",
            p(&self.endpoint),
            p(&self.uri_path)
        );
        for s in &self.steps {
            out.push_str(&format!(
                "  {:<9} {:<4} {:>4} {:>8.1} ms  {}\n",
                s.name,
                if s.ok { "ok" } else { "FAIL" },
                s.http_status.map(|c| c.to_string()).unwrap_or_default(),
                s.latency_ms,
                p(&s.detail)
            ));
        }
        if let Some(t) = &self.tls {
            out.push_str(&format!(
                "certificate: {} (issuer {}), expires {} ({} days)\nprotocol: {} (ALPN {})\n",
                p(&t.certificate_subject),
                p(&t.certificate_issuer),
                p(&t.certificate_not_after),
                t.certificate_days_left,
                t.protocol,
                p(t.alpn.as_deref().unwrap_or("-")),
            ));
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {}\n", p(w)));
        }
        out.push_str(&format!("verdict: {}\n", self.verdict.as_str()));
        if self.verdict != Verdict::Connected {
            out.push_str(&format!(
                "  why: {}\n  fix: {}\n",
                p(&self.explanation),
                self.fix
            ));
        }
        if let Some(k) = &self.key_verdict {
            out.push_str(&format!("key: {}\n", p(k)));
            if k != "OK" {
                out.push_str(&format!("  why: {}\n", p(&self.explanation)));
            }
        }
        out
    }
}

/// A failed step: the verdict it implies and why.
pub(super) struct Failure {
    pub(super) verdict: Verdict,
    pub(super) why: String,
}

/// A [`Failure`] that leaves the steps alone: for what fails outside a timed
/// step (DNS, the server name, signing) or once the step is already judged.
pub(super) fn failure(verdict: Verdict, why: impl Into<String>) -> Failure {
    Failure {
        verdict,
        why: why.into(),
    }
}

/// Milliseconds with one decimal: enough to compare with KMS's 250 ms, short
/// enough to read.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// Records a finished step, timed from `started`, so every step in the report
/// can be held against KMS's budget, the failed ones included.
pub(super) fn push(
    report: &mut Report,
    name: &'static str,
    ok: bool,
    started: Instant,
    http_status: Option<u16>,
    error_name: Option<String>,
    detail: String,
) {
    report.steps.push(Step {
        name,
        ok,
        latency_ms: ms(started.elapsed()),
        http_status,
        error_name,
        detail,
    });
}

/// Records a step that got no HTTP answer and returns the verdict it implies.
pub(super) fn transport_failure(
    report: &mut Report,
    name: &'static str,
    started: Instant,
    detail: String,
    verdict: Verdict,
    why: String,
) -> Failure {
    push(report, name, false, started, None, None, detail);
    failure(verdict, why)
}

/// Judges the last step again: a call is recorded when its answer arrives,
/// but whether it passed is only known once the body has been checked.
pub(super) fn mark_last(report: &mut Report, ok: bool, detail: String) {
    if let Some(s) = report.steps.last_mut() {
        s.ok = ok;
        s.detail = detail;
    }
}

/// Fails the last step with `why` and returns the verdict: for an answer
/// that arrived but is not what KMS accepts.
pub(super) fn step_failed(report: &mut Report, verdict: Verdict, why: String) -> Failure {
    mark_last(report, false, why.clone());
    failure(verdict, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_text_cannot_paint_the_terminal() {
        let hostile = "ok\n\u{1b}[2Kverdict: CONNECTED\u{2028}\u{202e}x";
        let shown = printable(hostile);
        assert!(
            !shown.contains('\n') && !shown.contains('\u{1b}'),
            "{shown}"
        );
        assert!(
            shown.contains("\\u{a}") && shown.contains("\\u{1b}"),
            "{shown}"
        );
        assert!(!shown.contains('\u{2028}') && !shown.contains('\u{202e}'));
        assert_eq!(printable("plain text é"), "plain text é");
    }
}
