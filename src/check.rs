//! `xks-proxy check`: connect to an XKS proxy the way KMS does, and say what
//! KMS would say.
//!
//! The steps mirror ConnectCustomKeyStore and CreateKey: TCP, TLS (TLS 1.2+,
//! the spec's cipher suites only, a certificate that chains to a trusted root
//! and matches the endpoint's name), GetHealthStatus with `kmsOperation`
//! `ConnectCustomKeyStore`, then, given a key id, GetKeyMetadata as for
//! CreateKey, an Encrypt with a CDIV that is recomputed and compared, and a
//! Decrypt of the result. Every step has KMS's 250 ms budget and every response
//! is checked against the spec's schema, because KMS rejects what a lenient
//! client would let through.
//!
//! The verdict is `CONNECTED` or the `ConnectionErrorCode` KMS would report.
//! Problems with the key itself (not found, wrong spec or usage, disabled) do
//! not stop KMS from connecting; they are reported as a separate key verdict.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

use crate::client::{Connection, HttpVersion, XksClient, XksResponse};

/// What to check.
pub struct CheckOptions {
    /// `https://host[:port]`.
    pub endpoint: String,
    /// Connect here instead of resolving the endpoint's host (like curl's
    /// `--connect-to`); the name is still used for SNI and the certificate.
    pub connect_to: Option<SocketAddr>,
    pub uri_path: String,
    pub access_key_id: String,
    pub secret: Zeroizing<String>,
    pub region: String,
    pub key_id: Option<String>,
    /// An extra CA to trust besides the public roots (private CAs in testing;
    /// KMS itself only trusts public CAs).
    pub extra_ca: Option<PathBuf>,
    /// A client certificate and key to present (proxies that require mTLS).
    pub client_identity: Option<(PathBuf, PathBuf)>,
    pub timeout: Duration,
    /// Offer HTTP/2 (then HTTP/1.1) in ALPN, as KMS does; false offers only
    /// HTTP/1.1.
    pub http2: bool,
}

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

/// Server-provided text made safe for a terminal: control characters, line
/// and paragraph separators and bidirectional overrides are shown escaped
/// (`\u{1b}`), so they cannot move the cursor, start a line or reorder text.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let hostile = c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if hostile {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// A failed step: the verdict it implies and why.
struct Failure {
    verdict: Verdict,
    why: String,
}

fn failure(verdict: Verdict, why: impl Into<String>) -> Failure {
    Failure {
        verdict,
        why: why.into(),
    }
}

/// Host and port of an `https://host[:port][/]` endpoint.
pub fn parse_endpoint(endpoint: &str) -> Result<(String, u16), String> {
    let rest = endpoint
        .strip_prefix("https://")
        .ok_or("the endpoint must start with https:// (KMS only speaks HTTPS)")?;
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') {
        return Err("give the endpoint without a path (the URI path is --uri-path)".into());
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            let port = p
                .parse::<u16>()
                .map_err(|_| format!("'{p}' is not a port number"))?;
            (h, port)
        }
        _ => (rest, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("the endpoint has no host".into());
    }
    Ok((host.to_string(), port))
}

fn client_tls(opts: &CheckOptions) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &opts.extra_ca {
        for cert in crate::tls::load_certs(ca).map_err(|e| e.to_string())? {
            roots.add(cert).map_err(|e| format!("--ca: {e}"))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(crate::tls::provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut cfg = match &opts.client_identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                crate::tls::load_certs(cert).map_err(|e| e.to_string())?,
                crate::tls::load_key(key).map_err(|e| e.to_string())?,
            )
            .map_err(|e| format!("--client-cert/--client-key: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = if opts.http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(cfg))
}

/// Explains a TLS handshake error the way an operator needs it.
fn explain_tls(e: &std::io::Error) -> String {
    use rustls::{CertificateError, Error as TlsErr};
    let inner = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<TlsErr>())
        .cloned();
    match inner {
        Some(TlsErr::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer => "the certificate does not chain to a trusted root \
                 (self-signed or private CA); KMS only trusts public CAs"
                .into(),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the certificate is not valid yet".into()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "the certificate does not match the endpoint's host name".into()
            }
            other => format!("the certificate was refused: {other:?}"),
        },
        Some(TlsErr::AlertReceived(a)) => format!(
            "the server ended the handshake ({a:?}): it offers no TLS 1.2+ version or \
             AES-256-GCM / ChaCha20 cipher suite in common with KMS"
        ),
        Some(TlsErr::PeerIncompatible(p)) => format!("TLS parameters incompatible with KMS: {p:?}"),
        Some(TlsErr::InvalidMessage(_)) | Some(TlsErr::InappropriateMessage { .. }) => {
            "the server does not speak TLS on this port".into()
        }
        Some(other) => format!("TLS handshake failed: {other}"),
        None => format!("TLS handshake failed: {e}"),
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// Runs the check. Never panics on what the server sends.
pub async fn run(opts: &CheckOptions) -> Result<Report, String> {
    let (host, port) = parse_endpoint(&opts.endpoint)?;
    let tls = client_tls(opts)?;
    let mut report = Report {
        verdict: Verdict::Connected,
        explanation: "KMS can connect to this key store".into(),
        fix: Verdict::Connected.fix(),
        key_verdict: None,
        endpoint: opts.endpoint.trim_end_matches('/').to_string(),
        uri_path: opts.uri_path.clone(),
        tls: None,
        steps: Vec::new(),
        warnings: Vec::new(),
    };
    if host.parse::<std::net::IpAddr>().is_ok() {
        report.warnings.push(format!(
            "the endpoint is an IP address ({host}); KMS requires a fully qualified domain name"
        ));
    }
    if port != 443 {
        report.warnings.push(format!(
            "the endpoint uses port {port}; KMS only connects to port 443"
        ));
    }
    if opts.extra_ca.is_some() {
        report.warnings.push(
            "an extra CA (--ca) is trusted for this check; KMS trusts public CAs only".into(),
        );
    }
    if !crate::config::is_valid_uri_path(&opts.uri_path) {
        report.warnings.push(format!(
            "'{}' is not a URI path KMS accepts (10-128 characters, ^(/[a-zA-Z0-9/_-]+/kms/xks/v1)$)",
            opts.uri_path
        ));
    }

    match steps(opts, &host, port, tls, &mut report).await {
        Ok(()) => {}
        Err(f) => {
            report.verdict = f.verdict;
            report.fix = f.verdict.fix();
            report.explanation = f.why;
        }
    }
    Ok(report)
}

async fn steps(
    opts: &CheckOptions,
    host: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    report: &mut Report,
) -> Result<(), Failure> {
    let budget = opts.timeout;
    // 1. Reach the endpoint.
    let addr = match opts.connect_to {
        Some(a) => a,
        None => match tokio::net::lookup_host((host, port)).await {
            Ok(mut addrs) => addrs.next().ok_or_else(|| {
                failure(
                    Verdict::XksProxyNotReachable,
                    format!("{host} resolves to no address"),
                )
            })?,
            Err(e) => {
                return Err(failure(
                    Verdict::XksProxyNotReachable,
                    format!("cannot resolve {host}: {e}"),
                ))
            }
        },
    };
    let started = Instant::now();
    let tcp = match tokio::time::timeout(budget, TcpStream::connect(addr)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return Err(transport_failure(
                report,
                "connect",
                started,
                format!("{addr}: {e}"),
                Verdict::XksProxyNotReachable,
                format!("cannot open a TCP connection to {addr}: {e}"),
            ));
        }
        Err(_) => {
            return Err(transport_failure(
                report,
                "connect",
                started,
                format!("{addr}: no answer"),
                Verdict::XksProxyTimedOut,
                format!(
                    "no TCP connection to {addr} within {} ms",
                    budget.as_millis()
                ),
            ));
        }
    };
    let _ = tcp.set_nodelay(true);
    push(
        report,
        "connect",
        true,
        started,
        None,
        None,
        addr.to_string(),
    );

    // 2. TLS as KMS does it.
    let started = Instant::now();
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| failure(Verdict::XksProxyInvalidTlsConfiguration, e.to_string()))?;
    let tls_for_client = tls.clone();
    let stream =
        match tokio::time::timeout(budget, TlsConnector::from(tls).connect(name, tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let why = explain_tls(&e);
                return Err(transport_failure(
                    report,
                    "tls",
                    started,
                    why.clone(),
                    Verdict::XksProxyInvalidTlsConfiguration,
                    why,
                ));
            }
            Err(_) => {
                return Err(transport_failure(
                    report,
                    "tls",
                    started,
                    "no handshake".into(),
                    Verdict::XksProxyTimedOut,
                    format!(
                        "the TLS handshake did not finish within {} ms",
                        budget.as_millis()
                    ),
                ));
            }
        };
    let tls_report = describe_tls(stream.get_ref().1);
    if tls_report.certificate_days_left < 30 {
        report.warnings.push(format!(
            "the server certificate expires in {} days",
            tls_report.certificate_days_left
        ));
    }
    push(
        report,
        "tls",
        true,
        started,
        None,
        None,
        format!(
            "{} {}, {}",
            tls_report.version, tls_report.cipher_suite, tls_report.protocol
        ),
    );
    let version = if tls_report.protocol == "HTTP/2" {
        HttpVersion::Http2
    } else {
        HttpVersion::Http1
    };
    report.tls = Some(tls_report);
    let client = XksClient::new(
        addr,
        host,
        &opts.uri_path,
        &opts.access_key_id,
        &opts.secret,
        &opts.region,
        tls_for_client,
        version,
    );
    let conn = client
        .http_handshake(stream)
        .await
        .map_err(|e| failure(Verdict::XksProxyInvalidResponse, format!("HTTP: {e}")))?;
    let mut wire = Wire {
        client,
        conn,
        budget,
    };

    // 3. GetHealthStatus, as ConnectCustomKeyStore sends it.
    let body = json!({"requestMetadata": {
        "kmsRequestId": request_id(), "kmsOperation": "ConnectCustomKeyStore"}});
    let r = call(
        &mut wire,
        "/health",
        &body,
        report,
        "health",
        KeyErrors::Fail,
    )
    .await?;
    let health = validate_health(&r.json_value()).map_err(|why| {
        step_failed(
            report,
            Verdict::XksProxyInvalidResponse,
            format!("GetHealthStatus: {why}"),
        )
    })?;
    if health.usable == 0 {
        let why = format!("every key manager is UNAVAILABLE ({} listed)", health.total);
        mark_last(report, false, why.clone());
        return Err(failure(Verdict::XksProxyNotReachable, why));
    }
    mark_last(
        report,
        true,
        format!(
            "fleet size {}, {} of {} key manager(s) usable",
            health.fleet_size, health.usable, health.total
        ),
    );

    // 4. The key, if asked: GetKeyMetadata, Encrypt with CDIV, Decrypt.
    let Some(key_id) = &opts.key_id else {
        return Ok(());
    };
    match check_key(&mut wire, key_id, report).await? {
        Ok(()) => report.key_verdict = Some("OK".into()),
        Err((code, why)) => {
            report.key_verdict = Some(code.into());
            report.explanation = why;
        }
    }
    Ok(())
}

/// Key-level result: `Ok(Ok(()))` usable, `Ok(Err((code, why)))` a key problem,
/// `Err` a connection-level failure.
async fn check_key(
    wire: &mut Wire,
    key_id: &str,
    report: &mut Report,
) -> Result<Result<(), KeyProblem>, Failure> {
    let key_path = format!("/keys/{key_id}");
    let md_body = json!({"requestMetadata": {
        "awsPrincipalArn": "arn:aws:iam::111122223333:role/xks-proxy-check",
        "kmsOperation": "CreateKey", "kmsRequestId": request_id()}});
    let answer = match key_step(wire, &key_path, "metadata", &md_body, report).await? {
        Ok(v) => v,
        Err(problem) => return Ok(Err(problem)),
    };
    let (spec, usages, status) = validate_metadata(&answer).map_err(|why| {
        step_failed(
            report,
            Verdict::XksProxyInvalidResponse,
            format!("GetKeyMetadata: {why}"),
        )
    })?;
    mark_last(
        report,
        true,
        format!("{spec} {} {status}", usages.join(",")),
    );
    if spec != "AES_256" {
        return Ok(Err((
            "XKS_KEY_INVALID_CONFIGURATION",
            format!("keySpec is {spec}; KMS needs AES_256"),
        )));
    }
    if !(usages.iter().any(|u| u == "ENCRYPT") && usages.iter().any(|u| u == "DECRYPT")) {
        return Ok(Err((
            "XKS_KEY_INVALID_CONFIGURATION",
            format!(
                "keyUsage is [{}]; KMS needs ENCRYPT and DECRYPT",
                usages.join(",")
            ),
        )));
    }
    if status != "ENABLED" {
        return Ok(Err((
            "XKS_KEY_DISABLED",
            "the key is DISABLED in the key manager; KMS cannot use it".into(),
        )));
    }

    let mut plaintext = Zeroizing::new([0u8; 32]);
    let mut aad = [0u8; 24];
    let rng = ring::rand::SystemRandom::new();
    ring::rand::SecureRandom::fill(&rng, plaintext.as_mut())
        .and_then(|_| ring::rand::SecureRandom::fill(&rng, &mut aad))
        .map_err(|_| failure(Verdict::XksProxyInvalidResponse, "system RNG failed"))?;
    let arn = "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-0000-0000-000000000000";
    let enc_body = json!({
        "requestMetadata": {"awsPrincipalArn": "arn:aws:iam::111122223333:role/xks-proxy-check",
            "kmsKeyArn": arn, "kmsOperation": "GenerateDataKey", "kmsRequestId": request_id()},
        "plaintext": B64.encode(*plaintext),
        "encryptionAlgorithm": "AES_GCM",
        "additionalAuthenticatedData": B64.encode(aad),
        "ciphertextDataIntegrityValueAlgorithm": "SHA_256",
    });
    let answer = match key_step(wire, &key_path, "encrypt", &enc_body, report).await? {
        Ok(v) => v,
        Err(problem) => return Ok(Err(problem)),
    };
    let enc = validate_encrypt(&answer, &aad, plaintext.len()).map_err(|why| {
        step_failed(
            report,
            Verdict::XksProxyInvalidResponse,
            format!("Encrypt: {why}"),
        )
    })?;
    mark_last(report, true, "ciphertext well-formed, CDIV verified".into());

    let mut dec_body = json!({
        "requestMetadata": {"awsPrincipalArn": "arn:aws:iam::111122223333:role/xks-proxy-check",
            "kmsKeyArn": arn, "kmsOperation": "Decrypt", "kmsRequestId": request_id()},
        "ciphertext": B64.encode(&enc.ciphertext),
        "encryptionAlgorithm": "AES_GCM",
        "initializationVector": B64.encode(&enc.iv),
        "authenticationTag": B64.encode(&enc.tag),
        "additionalAuthenticatedData": B64.encode(aad),
    });
    if let Some(md) = &enc.metadata {
        dec_body["ciphertextMetadata"] = B64.encode(md).into();
    }
    let answer = match key_step(wire, &key_path, "decrypt", &dec_body, report).await? {
        Ok(v) => v,
        Err(problem) => return Ok(Err(problem)),
    };
    let got = answer["plaintext"]
        .as_str()
        .and_then(|p| B64.decode(p).ok())
        .map(Zeroizing::new);
    match got {
        Some(p) if p.as_slice() == plaintext.as_slice() => {
            mark_last(report, true, "plaintext matches".into());
            Ok(Ok(()))
        }
        Some(_) => Err(step_failed(
            report,
            Verdict::XksProxyInvalidResponse,
            "Decrypt returned a different plaintext than was encrypted".into(),
        )),
        None => Err(step_failed(
            report,
            Verdict::XksProxyInvalidResponse,
            "Decrypt: plaintext missing or not base64".into(),
        )),
    }
}

/// What KMS would say about a key: (code, why).
type KeyProblem = (&'static str, String);

/// One key operation (`metadata`, `encrypt`, `decrypt`): its JSON answer, or
/// the key problem KMS would report.
async fn key_step(
    wire: &mut Wire,
    key_path: &str,
    op: &'static str,
    body: &Value,
    report: &mut Report,
) -> Result<Result<Value, KeyProblem>, Failure> {
    let path = format!("{key_path}/{op}");
    let r = call(wire, &path, body, report, op, KeyErrors::Return).await?;
    Ok(match key_problem(&r) {
        Some(problem) => Err(problem),
        None => Ok(r.json_value()),
    })
}

/// Key-level errors KMS reports against the key rather than the connection.
fn key_problem(r: &XksResponse) -> Option<KeyProblem> {
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
    let msg = r.json_value()["errorMessage"]
        .as_str()
        .unwrap_or("")
        .to_string();
    Some((code, format!("{name}: {msg}")))
}

trait JsonValue {
    fn json_value(&self) -> Value;
}

impl JsonValue for XksResponse {
    fn json_value(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

fn request_id() -> String {
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

fn push(
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
fn transport_failure(
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

fn mark_last(report: &mut Report, ok: bool, detail: String) {
    if let Some(s) = report.steps.last_mut() {
        s.ok = ok;
        s.detail = detail;
    }
}

fn step_failed(report: &mut Report, verdict: Verdict, why: String) -> Failure {
    mark_last(report, false, why.clone());
    failure(verdict, why)
}

/// The established connection and how long each call may take.
struct Wire {
    client: XksClient,
    conn: Connection,
    budget: Duration,
}

/// Which non-2xx answers a step hands back instead of failing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyErrors {
    /// Every non-2xx answer is a connection verdict.
    Fail,
    /// Key-level errors (not found, usage, disabled) come back as responses.
    Return,
}

/// One signed call within the budget; maps transport and HTTP failures to
/// the verdict KMS would give.
async fn call(
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
                crate::client::ClientError::ResponseTooLarge => Verdict::XksProxyInvalidResponse,
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
    let v = r.json_value();
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

struct HealthSummary {
    fleet_size: u64,
    total: usize,
    usable: usize,
}

fn req_str<'a>(v: &'a Value, field: &str) -> Result<&'a str, String> {
    v[field]
        .as_str()
        .ok_or_else(|| format!("'{field}' is missing or not a string"))
}

/// Checks a GetHealthStatus answer against the spec's schema.
fn validate_health(v: &Value) -> Result<HealthSummary, String> {
    if !v.is_object() {
        return Err("the body is not a JSON object".into());
    }
    let fleet_size = v["xksProxyFleetSize"]
        .as_u64()
        .filter(|n| *n >= 1)
        .ok_or("'xksProxyFleetSize' is missing or not a positive integer")?;
    for f in ["xksProxyVendor", "xksProxyModel", "ekmVendor"] {
        req_str(v, f)?;
    }
    let details = v["ekmFleetDetails"]
        .as_array()
        .ok_or("'ekmFleetDetails' is missing or not an array")?;
    if details.is_empty() || details.len() > 10 {
        return Err(format!(
            "'ekmFleetDetails' has {} entries; the spec allows 1 to 10",
            details.len()
        ));
    }
    let mut usable = 0;
    for d in details {
        req_str(d, "id")?;
        req_str(d, "model")?;
        match d["healthStatus"].as_str() {
            Some("ACTIVE" | "DEGRADED") => usable += 1,
            Some("UNAVAILABLE") => {}
            other => {
                return Err(format!(
                    "healthStatus {other:?} is not ACTIVE, DEGRADED or UNAVAILABLE"
                ))
            }
        }
    }
    Ok(HealthSummary {
        fleet_size,
        total: details.len(),
        usable,
    })
}

const KEY_USAGES: &[&str] = &[
    "ENCRYPT", "DECRYPT", "SIGN", "VERIFY", "WRAP", "UNWRAP", "DERIVE",
];

/// Checks a GetKeyMetadata answer; returns (keySpec, keyUsage, keyStatus).
fn validate_metadata(v: &Value) -> Result<(String, Vec<String>, String), String> {
    let spec = req_str(v, "keySpec")?.to_string();
    let usages = v["keyUsage"]
        .as_array()
        .ok_or("'keyUsage' is missing or not an array")?;
    if usages.len() > 10 {
        return Err("'keyUsage' has more than 10 entries".into());
    }
    let usages: Vec<String> = usages
        .iter()
        .map(|u| match u.as_str() {
            Some(s) if KEY_USAGES.contains(&s) => Ok(s.to_string()),
            other => Err(format!(
                "keyUsage entry {other:?} is not one the spec defines"
            )),
        })
        .collect::<Result<_, _>>()?;
    let status = req_str(v, "keyStatus")?.to_string();
    if status != "ENABLED" && status != "DISABLED" {
        return Err(format!("keyStatus '{status}' is not ENABLED or DISABLED"));
    }
    Ok((spec, usages, status))
}

struct Encrypted {
    ciphertext: Vec<u8>,
    iv: Vec<u8>,
    tag: Vec<u8>,
    metadata: Option<Vec<u8>>,
}

fn b64_field(v: &Value, field: &str) -> Result<Vec<u8>, String> {
    B64.decode(req_str(v, field)?)
        .map_err(|_| format!("'{field}' is not valid base64"))
}

/// Checks an Encrypt answer, including the CDIV, recomputed here.
fn validate_encrypt(v: &Value, aad: &[u8], plaintext_len: usize) -> Result<Encrypted, String> {
    let ciphertext = b64_field(v, "ciphertext")?;
    if ciphertext.len() != plaintext_len {
        return Err(format!(
            "ciphertext is {} bytes for {plaintext_len} bytes of plaintext (AES-GCM keeps the length)",
            ciphertext.len()
        ));
    }
    let iv = b64_field(v, "initializationVector")?;
    if iv.len() != 12 && iv.len() != 16 {
        return Err(format!(
            "initializationVector is {} bytes; 12 or 16 expected",
            iv.len()
        ));
    }
    let tag = b64_field(v, "authenticationTag")?;
    if tag.len() != 16 {
        return Err(format!(
            "authenticationTag is {} bytes; 16 expected",
            tag.len()
        ));
    }
    let metadata = match &v["ciphertextMetadata"] {
        Value::Null => None,
        _ => {
            let m = b64_field(v, "ciphertextMetadata")?;
            if m.len() > 20 {
                return Err(format!(
                    "ciphertextMetadata is {} bytes; at most 20 allowed",
                    m.len()
                ));
            }
            Some(m)
        }
    };
    match v["encryptionAlgorithm"].as_str() {
        None | Some("AES_GCM") => {}
        Some(other) => return Err(format!("encryptionAlgorithm '{other}' is not AES_GCM")),
    }
    let expected = crate::aead::cdiv_sha256(
        aad,
        metadata.as_deref().unwrap_or(&[]),
        &iv,
        &ciphertext,
        &tag,
    );
    let got = b64_field(v, "ciphertextDataIntegrityValue")?;
    if got.as_slice() != expected.as_slice() {
        return Err("ciphertextDataIntegrityValue does not match SHA-256(AAD || metadata || IV || ciphertext || tag)".into());
    }
    Ok(Encrypted {
        ciphertext,
        iv,
        tag,
        metadata,
    })
}

fn describe_tls(conn: &rustls::ClientConnection) -> TlsReport {
    let mut t = TlsReport {
        version: conn
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default(),
        cipher_suite: conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default(),
        alpn: conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        protocol: match conn.alpn_protocol() {
            Some(b"h2") => "HTTP/2",
            _ => "HTTP/1.1",
        }
        .into(),
        ..TlsReport::default()
    };
    if let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) {
        if let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) {
            t.certificate_subject = cert.subject().to_string();
            t.certificate_issuer = cert.issuer().to_string();
            let not_after = cert.validity().not_after;
            t.certificate_not_after = not_after
                .to_rfc2822()
                .unwrap_or_else(|_| not_after.timestamp().to_string());
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            t.certificate_days_left = (not_after.timestamp() - now).div_euclid(86_400);
        }
    }
    t
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

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("https://xks.example.com").unwrap(),
            ("xks.example.com".into(), 443)
        );
        assert_eq!(
            parse_endpoint("https://localhost:8443/").unwrap(),
            ("localhost".into(), 8443)
        );
        assert_eq!(
            parse_endpoint("https://[::1]:8443").unwrap(),
            ("::1".into(), 8443)
        );
        assert!(parse_endpoint("http://x.example.com").is_err());
        assert!(parse_endpoint("https://x.example.com/kms/xks/v1").is_err());
        assert!(parse_endpoint("https://x:port").is_err());
    }

    #[test]
    fn health_schema() {
        let good = json!({"xksProxyFleetSize": 2, "xksProxyVendor": "v", "xksProxyModel": "m",
            "ekmVendor": "e", "ekmFleetDetails": [{"id": "a", "model": "m", "healthStatus": "ACTIVE"},
            {"id": "b", "model": "m", "healthStatus": "UNAVAILABLE"}]});
        let s = validate_health(&good).unwrap();
        assert_eq!((s.fleet_size, s.total, s.usable), (2, 2, 1));
        let mut bad = good.clone();
        bad["xksProxyFleetSize"] = 0.into();
        assert!(validate_health(&bad).is_err());
        let mut bad = good.clone();
        bad["ekmFleetDetails"][0]["healthStatus"] = "OK".into();
        assert!(validate_health(&bad).is_err());
        let mut bad = good;
        bad["ekmFleetDetails"] = json!([]);
        assert!(validate_health(&bad).is_err());
    }

    #[test]
    fn encrypt_schema_and_cdiv() {
        let aad = b"aad";
        let (iv, ct, tag) = (vec![1u8; 12], vec![2u8; 32], vec![3u8; 16]);
        let cdiv = crate::aead::cdiv_sha256(aad, &[1], &iv, &ct, &tag);
        let good = json!({"ciphertext": B64.encode(&ct), "initializationVector": B64.encode(&iv),
            "authenticationTag": B64.encode(&tag), "ciphertextMetadata": B64.encode([1u8]),
            "encryptionAlgorithm": "AES_GCM", "ciphertextDataIntegrityValue": B64.encode(cdiv)});
        assert!(validate_encrypt(&good, aad, 32).is_ok());
        assert!(validate_encrypt(&good, b"other", 32).is_err());
        assert!(validate_encrypt(&good, aad, 31).is_err());
        let mut bad = good.clone();
        bad["authenticationTag"] = B64.encode([0u8; 12]).into();
        assert!(validate_encrypt(&bad, aad, 32).is_err());
        let mut bad = good;
        bad["ciphertextMetadata"] = B64.encode([0u8; 21]).into();
        assert!(validate_encrypt(&bad, aad, 32).is_err());
    }

    #[test]
    fn metadata_schema() {
        let v = json!({"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED"});
        assert!(validate_metadata(&v).is_ok());
        let v = json!({"keySpec": "AES_256", "keyUsage": ["FLY"], "keyStatus": "ENABLED"});
        assert!(validate_metadata(&v).is_err());
        let v = json!({"keySpec": "AES_256", "keyUsage": [], "keyStatus": "ON"});
        assert!(validate_metadata(&v).is_err());
    }
}
