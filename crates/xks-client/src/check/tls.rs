//! TLS as KMS does it: who `check` trusts, what it offers, and how a
//! handshake's outcome is told to the operator.
//!
//! A TLS failure is the most common reason KMS cannot connect and the least
//! readable one (`InvalidCertificate(UnknownIssuer)`), so errors are
//! translated into what to change.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use super::report::TlsReport;
use crate::{add_roots, client_tls, ClientError};

/// The public CAs (KMS trusts those) plus `extra_ca`, ALPN as KMS offers it
/// (`h2` then `http/1.1` when `http2`), and the client identity for proxies
/// that require mTLS.
pub(super) fn check_tls(
    extra_ca: Option<&Path>,
    client_identity: Option<(&Path, &Path)>,
    http2: bool,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = extra_ca {
        add_roots(&mut roots, ca)?;
    }
    let alpn: &[&[u8]] = if http2 {
        &[b"h2", b"http/1.1"]
    } else {
        &[b"http/1.1"]
    };
    client_tls(roots, alpn, client_identity)
}

/// Explains a TLS handshake error the way an operator needs it.
pub(super) fn explain_tls(e: &std::io::Error) -> String {
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

/// The negotiated session and the server's certificate, for the report: the
/// expiry date is what an operator most needs to see before KMS does.
pub(super) fn describe_tls(conn: &rustls::ClientConnection) -> TlsReport {
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
