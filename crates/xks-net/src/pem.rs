//! TLS material: the spec's cipher suites, and certificates and keys from
//! PEM files. Shared by the server side (`tls`, `client_auth`) and by the
//! clients (`xks_client`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls::crypto::{ring as ring_provider, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::SupportedCipherSuite;

/// Why TLS material could not be loaded or a TLS configuration built. The
/// messages name the setting (`tls.cert`, `--ca`, …) and the file; they never
/// quote key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{field}: cannot read certificates from {}: {source}", .path.display())]
    Certs {
        field: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{field}: no PEM certificate found in {}", .path.display())]
    NoCert { field: &'static str, path: PathBuf },
    #[error("{field}: {} is not a parsable X.509 certificate: {reason}", .path.display())]
    NotX509 {
        field: &'static str,
        path: PathBuf,
        reason: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    #[error("{field}: cannot read a private key from {}: {source}", .path.display())]
    Key {
        field: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{field}: {}: {source}", .path.display())]
    Trust {
        field: &'static str,
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("the certificate and key do not fit together: {0}")]
    Mismatch(rustls::Error),
    #[error("tls.client_ca: the mutual TLS verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
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

/// The certificates of a PEM file; `field` names the setting in errors.
pub fn load_certs(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |source| TlsError::Certs {
        field,
        path: path.to_path_buf(),
        source,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(err)?
        .collect::<Result<_, _>>()
        .map_err(err)?;
    if certs.is_empty() {
        return Err(TlsError::NoCert {
            field,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The private key of a PEM file; `field` names the setting in errors.
pub fn load_key(field: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The error type names the PEM problem, never the key bytes.
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Key {
        field,
        path: path.to_path_buf(),
        source,
    })
}

/// The `notAfter` time of a DER certificate.
/// `path` names the file in the error.
pub fn leaf_not_after(path: &Path, der: &CertificateDer<'_>) -> Result<SystemTime, TlsError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|reason| TlsError::NotX509 {
            field: "tls.cert",
            path: path.to_path_buf(),
            reason,
        })?;
    let secs = cert.validity().not_after.timestamp();
    Ok(if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    })
}
