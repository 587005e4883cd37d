//! TLS for the XKS listener.
//!
//! The spec requires TLS 1.2+ with at least one of four AES-256-GCM / ChaCha20
//! suites. We offer *only* those four: anything weaker is attack surface that
//! KMS never needs. ALPN offers `h2` and `http/1.1`; KMS may use either, and the
//! spec requires falling back to HTTP/1.1. Session resumption (tickets and an
//! in-memory session cache) keeps reconnect cost low for KMS's fleet. The
//! certificate is served through [`CertResolver`] so it can be replaced at run
//! time (hot reload) without touching open connections.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::crypto::ring as ring_provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use super::client_auth::{ClientAuthConfig, ClientVerifier};
use super::pem::{leaf_not_after, load_certs, load_key, provider, TlsError};

/// Where TLS ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Termination {
    /// The proxy serves TLS itself (and can check KMS's client certificate).
    #[default]
    Proxy,
    /// A load balancer in front ends TLS (an NLB TLS listener forwarding
    /// over TCP, as the AWS sample's `is_tls_enabled = false` layout): the
    /// XKS listener speaks plain HTTP. Only by name, with a warning at start.
    LoadBalancer,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Mutual TLS, when configured.
    pub client_auth: Option<ClientAuthConfig>,
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
    let certs = load_certs("tls.cert", &cfg.cert)?;
    let not_after = leaf_not_after(&cfg.cert, &certs[0])?;
    let key = load_key("tls.key", &cfg.key)?;
    let key = CertifiedKey::from_der(certs, key, &provider()).map_err(TlsError::Mismatch)?;
    Ok(LoadedCert {
        key: Arc::new(key),
        not_after,
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
    client_auth: Option<Arc<ClientVerifier>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match client_auth {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    config.ticketer = ring_provider::Ticketer::new()?;
    Ok(Arc::new(config))
}
