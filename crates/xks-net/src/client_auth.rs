//! Mutual TLS: only KMS may open a connection.
//!
//! KMS presents a client certificate whose subject is
//! `cks.kms.<region>.amazonaws.com`, chained to Amazon Trust Services. The
//! operator configures the CA bundle and the allowed names; `*` stands for
//! exactly one DNS label, so `cks.kms.*.amazonaws.com` allows every region.
//! The handshake is ended for a missing certificate, a certificate that does
//! not chain to the bundle, an expired one, and one whose CN and DNS SANs match
//! none of the allowed names. The chain and validity checks are rustls's own
//! (webpki); this module adds the name rule and makes both reloadable.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use super::pem::{load_certs, provider, TlsError};

/// Mutual TLS: who may connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuthConfig {
    pub ca: PathBuf,
    /// Patterns matched against the client certificate's CN and DNS SANs.
    pub allowed_names: Vec<String>,
}

/// True when `name` matches `pattern`, label by label, ignoring ASCII case;
/// a `*` label in the pattern matches any one non-empty label.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let n: Vec<&str> = name.split('.').collect();
    p.len() == n.len()
        && p.iter()
            .zip(&n)
            .all(|(p, n)| (*p == "*" && !n.is_empty()) || p.eq_ignore_ascii_case(n))
}

/// The subject CNs and DNS subject alternative names of a certificate.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for g in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = g {
                names.push((*d).to_owned());
            }
        }
    }
    names
}

struct Inner {
    webpki: Arc<dyn ClientCertVerifier>,
    names: Vec<String>,
}

fn build(cfg: &ClientAuthConfig) -> Result<Inner, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs("tls.client_ca", &cfg.ca)? {
        roots.add(cert).map_err(|source| TlsError::Trust {
            field: "tls.client_ca",
            path: cfg.ca.clone(),
            source,
        })?;
    }
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider()))
        .build()?;
    Ok(Inner {
        webpki,
        names: cfg.allowed_names.clone(),
    })
}

/// The client certificate verifier; its CA and names are swapped on reload.
pub struct ClientVerifier {
    current: ArcSwap<Inner>,
}

impl std::fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("names", &self.current.load().names)
            .finish()
    }
}

impl ClientVerifier {
    pub fn new(cfg: &ClientAuthConfig) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(ClientVerifier {
            current: ArcSwap::from_pointee(build(cfg)?),
        }))
    }

    fn webpki(&self) -> Arc<dyn ClientCertVerifier> {
        self.current.load().webpki.clone()
    }

    /// Takes over the CA bundle and names of `other` (built and checked
    /// beforehand, so a reload either fully succeeds or changes nothing).
    pub fn swap_from(&self, other: &ClientVerifier) {
        self.current.store(other.current.load_full());
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; KMS sends its certificate without them.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let inner = self.current.load();
        // Whatever is wrong with the certificate, the client is told
        // "handshake failure": rustls sends that alert for an error that is
        // not a certificate error, and it is the one curl, OpenSSL, Go and
        // Java all report as a failed handshake (a certificate error would
        // send unknown_ca, certificate_expired, certificate_unknown…, which
        // some clients only show as a reset or a generic failure). The real
        // reason goes to the log.
        if let Err(e) = inner
            .webpki
            .verify_client_cert(end_entity, intermediates, now)
        {
            tracing::warn!(error = %e, "client certificate refused");
            return Err(Error::General(format!("client certificate refused: {e}")));
        }
        let names = certificate_names(end_entity.as_ref());
        if names
            .iter()
            .any(|n| inner.names.iter().any(|p| name_matches(p, n)))
        {
            return Ok(ClientCertVerified::assertion());
        }
        tracing::warn!(
            names = ?names,
            allowed = ?inner.names,
            "client certificate refused: no allowed name"
        );
        Err(Error::General(
            "client certificate refused: no allowed name".into(),
        ))
    }

    // Handshake signatures: webpki's checks, unchanged.
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki().verify_tls12_signature(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki().verify_tls13_signature(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki().supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_patterns() {
        let every_region = "cks.kms.*.amazonaws.com";
        assert!(name_matches(
            every_region,
            "cks.kms.us-east-1.amazonaws.com"
        ));
        assert!(name_matches(
            every_region,
            "CKS.kms.eu-west-3.amazonaws.com"
        ));
        assert!(!name_matches(every_region, "cks.kms.amazonaws.com"));
        assert!(!name_matches(every_region, "cks.kms.a.b.amazonaws.com"));
        assert!(!name_matches(
            every_region,
            "evil.kms.us-east-1.amazonaws.com"
        ));
        assert!(!name_matches(every_region, "cks.kms..amazonaws.com"));
        assert!(name_matches(
            "cks.kms.us-east-1.amazonaws.com",
            "cks.kms.us-east-1.amazonaws.com"
        ));
        assert!(!name_matches(
            "cks.kms.us-east-1.amazonaws.com",
            "cks.kms.us-east-2.amazonaws.com"
        ));
    }
}
