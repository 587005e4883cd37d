//! The TLS surface: only TLS 1.2/1.3, only the spec's AES-256-GCM / ChaCha20
//! suites, ALPN h2 and http/1.1.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::crypto::ring as provider;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, SupportedCipherSuite};

fn client_config(
    p: &Proxy,
    suites: Vec<SupportedCipherSuite>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in xks_proxy::net::pem::load_certs("ca", &p.certs.ca).unwrap() {
        roots.add(c).unwrap();
    }
    let prov = rustls::crypto::CryptoProvider {
        cipher_suites: suites,
        ..provider::default_provider()
    };
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(prov))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

/// Handshakes; returns (negotiated suite, ALPN) or the error.
fn handshake(
    p: &Proxy,
    cfg: Arc<ClientConfig>,
) -> Result<(rustls::CipherSuite, Option<Vec<u8>>), String> {
    let mut tcp = TcpStream::connect(p.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut conn = ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap()).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    Ok((
        conn.negotiated_cipher_suite().unwrap().suite(),
        conn.alpn_protocol().map(|a| a.to_vec()),
    ))
}

#[test]
fn accepted_versions_suites_and_alpn() {
    use provider::cipher_suite::*;
    let p = Proxy::start_with(Options {
        create_keys: false,
        ..Options::default()
    });
    let v13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    let v12: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    for suite in [TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256] {
        let (got, alpn) = handshake(
            &p,
            client_config(&p, vec![suite], v13, &[b"h2", b"http/1.1"]),
        )
        .unwrap();
        assert_eq!(got, suite.suite());
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    }
    // The test certificate is ECDSA, so the TLS 1.2 suite is the ECDSA one.
    let (got, alpn) = handshake(
        &p,
        client_config(
            &p,
            vec![TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384],
            v12,
            &[b"http/1.1"],
        ),
    )
    .unwrap();
    assert_eq!(got, TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384.suite());
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
}

#[test]
fn weaker_suites_are_refused() {
    use provider::cipher_suite::*;
    let p = Proxy::start_with(Options {
        create_keys: false,
        ..Options::default()
    });
    let cases: Vec<(
        SupportedCipherSuite,
        &'static rustls::SupportedProtocolVersion,
    )> = vec![
        (TLS13_AES_128_GCM_SHA256, &rustls::version::TLS13),
        (
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            &rustls::version::TLS12,
        ),
        (
            TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            &rustls::version::TLS12,
        ),
    ];
    for (suite, version) in cases {
        let r = handshake(
            &p,
            client_config(&p, vec![suite], &[version], &[b"http/1.1"]),
        );
        assert!(r.is_err(), "{:?} was accepted", suite.suite());
    }
}

/// A minimal TLS 1.1 ClientHello (no extensions). It offers suites the server
/// does accept under TLS 1.2 (ECDHE-ECDSA/RSA-AES256-GCM-SHA384), so the only
/// reason to refuse it is the protocol version.
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x2c, 0xc0, 0x30]); // cipher suites
    body.extend_from_slice(&[0x01, 0x00]); // compression: null
    let mut hs = vec![0x01, 0x00, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x02, (hs.len() >> 8) as u8, hs.len() as u8];
    rec.extend_from_slice(&hs);
    rec
}

#[test]
fn tls_1_1_handshake_is_refused() {
    let p = Proxy::start_with(Options {
        create_keys: false,
        ..Options::default()
    });
    let mut tcp = TcpStream::connect(p.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(&tls11_client_hello()).unwrap();
    let mut buf = [0u8; 64];
    let n = tcp.read(&mut buf).unwrap_or(0);
    // Either an alert record (0x15) or a closed connection; never a ServerHello (0x16).
    assert!(
        n == 0 || buf[0] == 0x15,
        "server answered a TLS 1.1 hello with {:02x?}",
        &buf[..n]
    );
    if n >= 7 {
        assert_eq!(buf[5], 2, "fatal alert");
        // rustls answers handshake_failure (40); protocol_version (70) is the
        // other legitimate answer. Either way no TLS 1.1 session exists.
        assert!(matches!(buf[6], 40 | 70), "alert {}", buf[6]);
    }
    // The server is still fine afterwards.
    let out = std::process::Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(&p.certs.ca)
        .arg(format!("https://localhost:{}/ping", p.addr.port()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
}
