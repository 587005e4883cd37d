//! TLS for the XKS listener.
//!
//! The spec requires TLS 1.2+ with at least one of four AES-256-GCM / ChaCha20
//! suites. We offer *only* those four: anything weaker is attack surface that
//! KMS never needs. ALPN offers `h2` and `http/1.1`; KMS may use either, and the
//! spec requires falling back to HTTP/1.1. Session resumption (tickets and an
//! in-memory session cache) keeps reconnect cost low for KMS's fleet.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::{ring as ring_provider, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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

/// Builds the server-side TLS configuration.
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(&cfg.cert)?;
    let key = load_key(&cfg.key)?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(format!("certificate and key do not fit together: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    config.ticketer =
        ring_provider::Ticketer::new().map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}
