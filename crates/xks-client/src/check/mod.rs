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
//!
//! This file holds the options and the sequence of steps; `report` what was
//! found and how it is shown, `tls` the TLS side, `wire` the signed calls and
//! what their answers mean to KMS, `schema` the answers' schemas, and `key`
//! the key checks. Those files import only each other, never this one, so
//! there is no cycle between them.

mod key;
mod report;
mod schema;
mod tls;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

use super::{ClientError, HttpVersion, XksClient};
use report::{failure, mark_last, push, step_failed, transport_failure, Failure};
pub use report::{Report, Step, TlsReport, Verdict};
use schema::validate_health;
use tls::{check_tls, describe_tls, explain_tls};
use wire::{call, request_id, KeyErrors, Wire};
pub use xks_spec::text::printable;

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

/// Why the check could not even start (what it finds about the proxy is in
/// the [`Report`] instead).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("the endpoint must start with https:// (KMS only speaks HTTPS)")]
    NotHttps,
    #[error("give the endpoint without a path (the URI path is --uri-path)")]
    HasPath,
    #[error("'{0}' is not a port number")]
    BadPort(String),
    #[error("the endpoint has no host")]
    NoHost,
    #[error("--ca / --client-cert / --client-key: {0}")]
    Tls(#[from] ClientError),
}

/// Host and port of an `https://host[:port][/]` endpoint.
pub fn parse_endpoint(endpoint: &str) -> Result<(String, u16), CheckError> {
    let rest = endpoint
        .strip_prefix("https://")
        .ok_or(CheckError::NotHttps)?;
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') {
        return Err(CheckError::HasPath);
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            let port = p
                .parse::<u16>()
                .map_err(|_| CheckError::BadPort(p.to_string()))?;
            (h, port)
        }
        _ => (rest, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(CheckError::NoHost);
    }
    Ok((host.to_string(), port))
}

/// Runs the check. Never panics on what the server sends.
pub async fn run(opts: &CheckOptions) -> Result<Report, CheckError> {
    let (host, port) = parse_endpoint(&opts.endpoint)?;
    let identity = opts
        .client_identity
        .as_ref()
        .map(|(c, k)| (c.as_path(), k.as_path()));
    let tls = check_tls(opts.extra_ca.as_deref(), identity, opts.http2)?;
    let mut report = Report {
        verdict: Verdict::Connected,
        explanation: "KMS can connect to this key store".into(),
        fix: Verdict::Connected.fix(),
        key_verdict: None,
        endpoint: opts.endpoint.trim_end_matches('/').to_string(),
        uri_path: opts.uri_path.clone(),
        tls: None,
        steps: Vec::new(),
        warnings: warnings(opts, &host, port),
    };
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

/// What KMS would refuse before it ever connects: its console rejects these
/// settings, but the check goes on, so that a proxy can be tried on a test
/// host, a high port or a private CA.
fn warnings(opts: &CheckOptions, host: &str, port: u16) -> Vec<String> {
    let mut warnings = Vec::new();
    if host.parse::<std::net::IpAddr>().is_ok() {
        warnings.push(format!(
            "the endpoint is an IP address ({host}); KMS requires a fully qualified domain name"
        ));
    }
    if port != 443 {
        warnings.push(format!(
            "the endpoint uses port {port}; KMS only connects to port 443"
        ));
    }
    if opts.extra_ca.is_some() {
        warnings.push(
            "an extra CA (--ca) is trusted for this check; KMS trusts public CAs only".into(),
        );
    }
    if !xks_spec::names::is_valid_uri_path(&opts.uri_path) {
        warnings.push(format!(
            "'{}' is not a URI path KMS accepts (10-128 characters, ^(/[a-zA-Z0-9/_-]+/kms/xks/v1)$)",
            opts.uri_path
        ));
    }
    warnings
}

/// The steps in KMS's order. The first one that fails gives the connection
/// verdict, and each records itself in the report as it goes, so a failed
/// check still shows how far the connection got.
async fn steps(
    opts: &CheckOptions,
    host: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    report: &mut Report,
) -> Result<(), Failure> {
    let addr = resolve(opts.connect_to, host, port).await?;
    let tcp = connect(addr, opts.timeout, report).await?;
    let (stream, version) = handshake(tcp, host, tls.clone(), opts.timeout, report).await?;
    let client = XksClient::new(
        addr,
        host,
        &opts.uri_path,
        &opts.access_key_id,
        &opts.secret,
        &opts.region,
        tls,
        version,
    );
    let conn = client
        .http_handshake(stream)
        .await
        .map_err(|e| failure(Verdict::XksProxyInvalidResponse, format!("HTTP: {e}")))?;
    let mut wire = Wire {
        client,
        conn,
        budget: opts.timeout,
    };
    health(&mut wire, report).await?;
    let Some(key_id) = &opts.key_id else {
        return Ok(());
    };
    match key::check_key(&mut wire, key_id, report).await? {
        Ok(()) => report.key_verdict = Some("OK".into()),
        Err((code, why)) => {
            report.key_verdict = Some(code.into());
            report.explanation = why;
        }
    }
    Ok(())
}

/// Where to connect: `--connect-to`, or the endpoint's first address. Not a
/// step of its own: the steps are what the proxy does, and a name that does
/// not resolve fails before any of them.
async fn resolve(
    connect_to: Option<SocketAddr>,
    host: &str,
    port: u16,
) -> Result<SocketAddr, Failure> {
    if let Some(a) = connect_to {
        return Ok(a);
    }
    match tokio::net::lookup_host((host, port)).await {
        Ok(mut addrs) => addrs.next().ok_or_else(|| {
            failure(
                Verdict::XksProxyNotReachable,
                format!("{host} resolves to no address"),
            )
        }),
        Err(e) => Err(failure(
            Verdict::XksProxyNotReachable,
            format!("cannot resolve {host}: {e}"),
        )),
    }
}

/// The TCP connection, within the budget: a refusal means nothing listens
/// (not reachable), silence usually a firewall that drops (timed out).
async fn connect(
    addr: SocketAddr,
    budget: Duration,
    report: &mut Report,
) -> Result<TcpStream, Failure> {
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
    Ok(tcp)
}

/// The TLS handshake as KMS does it, done here rather than by the client so
/// that the session (version, suite, ALPN, certificate) can be reported. The
/// HTTP version the calls then use is the one ALPN chose.
async fn handshake(
    tcp: TcpStream,
    host: &str,
    tls: Arc<rustls::ClientConfig>,
    budget: Duration,
    report: &mut Report,
) -> Result<(TlsStream<TcpStream>, HttpVersion), Failure> {
    let started = Instant::now();
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| failure(Verdict::XksProxyInvalidTlsConfiguration, e.to_string()))?;
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
    Ok((stream, version))
}

/// GetHealthStatus, as ConnectCustomKeyStore sends it. KMS connects only if
/// the answer is valid and at least one key manager is usable; an all
/// UNAVAILABLE fleet is reported as not reachable, as KMS does.
async fn health(wire: &mut Wire, report: &mut Report) -> Result<(), Failure> {
    let body = json!({"requestMetadata": {
        "kmsRequestId": request_id(), "kmsOperation": "ConnectCustomKeyStore"}});
    let r = call(wire, "/health", &body, report, "health", KeyErrors::Fail).await?;
    let health = validate_health(&r.json()).map_err(|why| {
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
