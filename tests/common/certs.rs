//! TLS material and private files: a throwaway CA with a server certificate
//! for localhost, files written with mode 600 (as the proxy demands of keys
//! and secrets), and random base64 secrets.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// `n` random bytes, base64-encoded (secrets, PINs).
pub(super) fn random_b64(n: usize) -> String {
    let mut b = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    B64.encode(b)
}

/// Writes `content` to `path`, readable by its owner only (mode 600).
pub fn write_private(path: &Path, content: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Test TLS material: a CA and a server certificate for localhost/127.0.0.1.
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes a fresh CA (`ca.crt`) and a server certificate and key for
/// localhost (`server.crt`, `server.key`, mode 600) into `dir`.
pub fn make_certs(dir: &Path) -> Certs {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "xks-proxy test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server = params.signed_by(&server_key, &ca).unwrap();
    let certs = Certs {
        ca: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    std::fs::write(&certs.ca, ca.pem()).unwrap();
    std::fs::write(&certs.cert, server.pem()).unwrap();
    write_private(&certs.key, &server_key.serialize_pem());
    certs
}
