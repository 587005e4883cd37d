//! TLS for the XKS listener.
//!
//! The spec requires TLS 1.2+ with at least one of four AES-256-GCM / ChaCha20
//! suites. We offer *only* those four: anything weaker is attack surface that
//! KMS never needs. ALPN offers `h2` and `http/1.1`; KMS may use either, and the
//! spec requires falling back to HTTP/1.1. Session resumption (tickets and an
//! in-memory session cache) keeps reconnect cost low for KMS's fleet. The
//! certificate is served through [`CertResolver`] so it can be replaced at run
//! time (hot reload) without touching open connections.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use rustls::crypto::{ring as ring_provider, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedCipherSuite};

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert: cannot read certificates from {path}: {message}")]
    Cert { path: String, message: String },
    #[error("tls.key: cannot read a private key from {path}: {message}")]
    Key { path: String, message: String },
    #[error("tls: {0}")]
    Config(String),
}

/// The cipher suites the spec lists, and no others.
pub fn allowed_suites() -> Vec<SupportedCipherSuite> {
    use ring_provider::cipher_suite::*;
    vec![
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ]
}

/// The ring provider restricted to [`allowed_suites`].
pub fn provider() -> CryptoProvider {
    CryptoProvider {
        cipher_suites: allowed_suites(),
        ..ring_provider::default_provider()
    }
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |message: String| TlsError::Cert {
        path: path.display().to_string(),
        message,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate found".into()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The error type names the PEM problem, never the key bytes.
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// The server certificate currently in use, with its expiry.
#[derive(Debug)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// `notAfter` of the leaf certificate.
    pub not_after: SystemTime,
}

/// Loads and checks a certificate chain and its private key.
pub fn load_cert(cfg: &TlsConfig) -> Result<LoadedCert, TlsError> {
    let certs = load_certs(&cfg.cert)?;
    let not_after = leaf_not_after(&certs[0]).map_err(|message| TlsError::Cert {
        path: cfg.cert.display().to_string(),
        message,
    })?;
    let key = load_key(&cfg.key)?;
    let key = CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| TlsError::Config(format!("certificate and key do not fit together: {e}")))?;
    Ok(LoadedCert {
        key: Arc::new(key),
        not_after,
    })
}

/// The `notAfter` time of a DER certificate.
pub fn leaf_not_after(der: &CertificateDer<'_>) -> Result<SystemTime, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("not a parsable X.509 certificate: {e}"))?;
    let secs = cert.validity().not_after.timestamp();
    Ok(if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    })
}

/// Hands rustls the current certificate; swapped atomically on reload, so new
/// handshakes get the new certificate while established connections (and the
/// session cache and ticket keys) are untouched.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<LoadedCert>,
}

impl CertResolver {
    pub fn new(cert: LoadedCert) -> Arc<Self> {
        Arc::new(CertResolver {
            current: ArcSwap::from_pointee(cert),
        })
    }

    pub fn replace(&self, cert: LoadedCert) {
        self.current.store(Arc::new(cert));
    }

    /// Expiry of the certificate in use.
    pub fn not_after(&self) -> SystemTime {
        self.current.load().not_after
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}

/// Builds the server-side TLS configuration around a certificate resolver
/// and, for mutual TLS, a client certificate verifier.
pub fn server_config(
    resolver: Arc<CertResolver>,
    client_auth: Option<Arc<crate::mtls::ClientVerifier>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_auth {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    config.ticketer =
        ring_provider::Ticketer::new().map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}
