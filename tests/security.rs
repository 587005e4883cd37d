//! Security controls against the real server: mutual TLS, secondary
//! authorization (Cedar), throttling and overload, connection hardening.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use xks_proxy::client::{bodies, tls_config_with_identity, HttpVersion};

/// A CA for client certificates.
fn client_ca(dir: &Path, name: &str) -> (CertifiedIssuer<'static, KeyPair>, PathBuf) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let path = dir.join(format!("{name}.crt"));
    std::fs::write(&path, ca.pem()).unwrap();
    (ca, path)
}

/// A client certificate for `cn` signed by `ca`; expired when `expired`.
fn client_cert(
    dir: &Path,
    ca: &CertifiedIssuer<'static, KeyPair>,
    cn: &str,
    expired: bool,
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![cn.to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = params.signed_by(&key, ca).unwrap();
    let tag = format!(
        "{cn}-{}-by-{:p}",
        if expired { "expired" } else { "valid" },
        ca
    );
    let (c, k) = (
        dir.join(format!("{tag}.crt")),
        dir.join(format!("{tag}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    write_private(&k, &key.serialize_pem());
    (c, k)
}

fn health(p: &Proxy, identity: Option<(&Path, &Path)>) -> Result<u16, String> {
    let tls = tls_config_with_identity(&p.certs.ca, HttpVersion::Http1, identity).unwrap();
    let c = p.client_with_tls(tls, HttpVersion::Http1);
    block_on(async {
        c.call("/health", bodies::health("KmsHealthCheck"))
            .await
            .map(|r| r.status.as_u16())
            .map_err(|e| e.to_string())
    })
}

/// What a TLS 1.3 client that sends its request right after its handshake
/// flight (as curl does) reads back when the proxy refuses its certificate.
fn refusal(p: &Proxy, identity: Option<(&Path, &Path)>) -> String {
    use std::io::{Read, Write};
    let cfg = tls_config_with_identity(&p.certs.ca, HttpVersion::Http1, identity).unwrap();
    let conn = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
    let tcp = std::net::TcpStream::connect(p.addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let request = b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n";
    // The request goes out after the handshake flight, and more of it a
    // moment later (curl over HTTP/2 writes its preface, settings and
    // request apart): by then the server has refused the certificate. If
    // it had closed with data unread, the kernel's reset would fail these
    // writes (and can discard the alert) before the client reads anything.
    let mut sent = s.write_all(request);
    for _ in 0..3 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        sent = sent.and_then(|()| s.write_all(request));
    }
    let mut out = Vec::new();
    match (sent, s.read_to_end(&mut out)) {
        (Err(e), _) | (_, Err(e)) => e.to_string(),
        (Ok(()), Ok(_)) => format!("no error: {}", String::from_utf8_lossy(&out)),
    }
}

#[test]
fn mutual_tls_admits_only_the_configured_ca_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let (kms_ca, kms_ca_path) = client_ca(dir.path(), "kms-test-root");
    let (other_ca, _) = client_ca(dir.path(), "someone-else");
    let p = Proxy::start_with(Options {
        extra_tls: format!(
            "client_ca = \"{}\"\nclient_names = [\"cks.kms.*.amazonaws.com\"]",
            kms_ca_path.display()
        ),
        ..Options::default()
    });
    let (good_c, good_k) = client_cert(
        dir.path(),
        &kms_ca,
        "cks.kms.us-east-1.amazonaws.com",
        false,
    );
    let (eu_c, eu_k) = client_cert(
        dir.path(),
        &kms_ca,
        "cks.kms.eu-west-1.amazonaws.com",
        false,
    );
    assert_eq!(health(&p, Some((&good_c, &good_k))), Ok(200));
    assert_eq!(health(&p, Some((&eu_c, &eu_k))), Ok(200), "wildcard region");

    let (foreign_c, foreign_k) = client_cert(
        dir.path(),
        &other_ca,
        "cks.kms.us-east-1.amazonaws.com",
        false,
    );
    let (old_c, old_k) = client_cert(dir.path(), &kms_ca, "cks.kms.us-east-1.amazonaws.com", true);
    let (name_c, name_k) = client_cert(dir.path(), &kms_ca, "attacker.example.com", false);
    for (what, identity) in [
        ("no certificate", None),
        (
            "another CA",
            Some((foreign_c.as_path(), foreign_k.as_path())),
        ),
        ("expired", Some((old_c.as_path(), old_k.as_path()))),
        ("another name", Some((name_c.as_path(), name_k.as_path()))),
    ] {
        let r = health(&p, identity);
        assert!(r.is_err(), "{what}: the handshake must be ended, got {r:?}");
        // The client learns why from the alert, which arrives before the
        // connection closes (before: over TLS 1.3 a reset could overtake
        // it). Without a certificate TLS 1.3 says "certificate required";
        // any certificate refused is "handshake failure", the alert every
        // common client reports as such.
        let why = refusal(&p, identity);
        let expected = if identity.is_none() {
            "CertificateRequired"
        } else {
            "HandshakeFailure"
        };
        assert!(why.contains(expected), "{what}: {why}");
    }
    assert!(p.wait_for_log("client certificate refused: no allowed name"));
    // The proxy is still serving.
    assert_eq!(health(&p, Some((&good_c, &good_k))), Ok(200));

    // `check` presents a client certificate like KMS.
    let ep = format!("https://localhost:{}", p.addr.port());
    let secret = p.dir.path().join("secret-a");
    let mut args = vec!["check".to_string()];
    args.extend(check_args(&ep, &secret, &p.certs.ca));
    args.extend(
        [
            "--client-cert",
            good_c.to_str().unwrap(),
            "--client-key",
            good_k.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let out = p.run_bin(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("verdict: CONNECTED"), "{text}");
}

#[cfg(feature = "authorization")]
const POLICY: &str = r#"
@id("alice")
permit (principal, action, resource)
when { principal.arn == "arn:aws:iam::123456789012:user/Alice" };

@id("no-decrypt-of-key-ed")
forbid (principal, action == Xks::Action::"Decrypt", resource == Xks::Key::"key-ed");
"#;

#[cfg(feature = "authorization")]
fn access_line(log: &str, needle: &str) -> serde_json::Value {
    let line = log
        .lines()
        .rfind(|l| l.contains("xks_proxy::access") && l.contains(needle))
        .unwrap_or_else(|| panic!("no access line with {needle}:\n{log}"));
    serde_json::from_str(line).unwrap()
}

#[cfg(feature = "authorization")]
#[test]
fn cedar_policies_decide_name_the_policy_and_reload() {
    let p = Proxy::start_with(Options {
        files: vec![("policy.cedar".into(), POLICY.into())],
        extra_key_store: r#"authorization = { policy_file = "policy.cedar", mode = "enforce" }"#
            .into(),
        ..Options::default()
    });
    let c = p.h1();
    let aad = b"context";
    let (enc, dec, health, other) = block_on(async {
        let enc = c
            .call(
                "/keys/key-ed/encrypt",
                bodies::encrypt(b"dk", Some(aad), false),
            )
            .await
            .unwrap();
        let dec = c
            .call(
                "/keys/key-ed/decrypt",
                bodies::decrypt_from(&enc.json(), Some(aad)).to_string(),
            )
            .await
            .unwrap();
        let health = c
            .call("/health", bodies::health("KmsHealthCheck"))
            .await
            .unwrap();
        let mallory = String::from_utf8(bodies::metadata())
            .unwrap()
            .replace("user/Alice", "user/Mallory");
        let other = c.call("/keys/key-ed/metadata", mallory).await.unwrap();
        (enc, dec, health, other)
    });
    assert_eq!(enc.status, 200);
    assert_eq!(dec.status, 403, "{:?}", dec.body);
    assert_eq!(dec.error_name().as_deref(), Some("AccessDeniedException"));
    assert!(dec.json()["errorMessage"]
        .as_str()
        .unwrap()
        .contains("no-decrypt-of-key-ed"));
    assert_eq!(health.status, 200, "GetHealthStatus is exempt");
    assert_eq!(other.status, 403);
    assert!(other.json()["errorMessage"]
        .as_str()
        .unwrap()
        .contains("no policy permits"));
    assert!(p.wait_for_log("dec-req-1"));
    let log = p.log();
    let line = access_line(&log, "\"operation\":\"Decrypt\"");
    assert_eq!(line["authz_decision"], "deny");
    assert_eq!(line["authz_policies"], "no-decrypt-of-key-ed");
    assert_eq!(line["status"], 403);
    let line = access_line(&log, "\"operation\":\"Encrypt\"");
    assert_eq!(line["authz_decision"], "allow");
    assert_eq!(line["authz_policies"], "alice");

    // Policies reload without a restart; a broken file is refused.
    let policy = p.dir.path().join("policy.cedar");
    std::fs::write(
        &policy,
        "permit (principal, action, resource) when { context.typo };",
    )
    .unwrap();
    assert!(
        eventually(10, || p
            .log()
            .contains("policies do not fit the XKS schema")),
        "{}",
        p.log()
    );
    let decrypt_status = || {
        block_on(async {
            c.call(
                "/keys/key-ed/decrypt",
                bodies::decrypt_from(&enc.json(), Some(aad)).to_string(),
            )
            .await
            .unwrap()
            .status
            .as_u16()
        })
    };
    assert_eq!(decrypt_status(), 403, "the old policies stay in force");
    let permit_only = POLICY.split("@id(\"no-decrypt").next().unwrap();
    std::fs::write(&policy, permit_only).unwrap();
    assert!(eventually(10, || decrypt_status() == 200), "{}", p.log());

    // Dry run: a deny is logged as would-deny and the request proceeds.
    std::fs::write(
        &policy,
        "@id(\"nobody\") forbid (principal, action, resource);",
    )
    .unwrap();
    let config = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(
        &p.config,
        config.replace("mode = \"enforce\"", "mode = \"dry-run\""),
    )
    .unwrap();
    assert!(eventually(10, || decrypt_status() == 200
        && p.log().contains("would-deny")));
    let line = access_line(&p.log(), "would-deny");
    assert_eq!(line["authz_policies"], "nobody");
}

#[test]
fn a_key_store_over_its_quota_gets_429_and_health_is_exempt() {
    let p = Proxy::start_with(Options {
        extra_key_store: "rate_limit = { requests_per_second = 2, burst = 5 }".into(),
        ..Options::default()
    });
    let c = p.h1();
    let (statuses, names, health) = block_on(async {
        let mut conn = c.connect().await.unwrap();
        let mut statuses = Vec::new();
        let mut names = Vec::new();
        for _ in 0..12 {
            let r = conn.send(signed_encrypt(&c)).await.unwrap();
            statuses.push(r.status.as_u16());
            names.push(r.error_name());
        }
        let mut health = Vec::new();
        for _ in 0..5 {
            let req = signed(&c, "/health", bodies::health("KmsHealthCheck"));
            health.push(conn.send(req).await.unwrap().status.as_u16());
        }
        (statuses, names, health)
    });
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        (5..=6).contains(&ok),
        "burst of 5 (+1 refill): {statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 12 - ok);
    assert!(names.iter().flatten().all(|n| n == "ThrottlingException"));
    assert_eq!(health, vec![200; 5]);
    // The other key store has no quota.
    let other = p
        .h1()
        .with_uri_path(OTHER_URI_PATH)
        .with_credentials(AKID_OTHER, &p.secret_other);
    block_on(async {
        for _ in 0..10 {
            let r = other
                .call(
                    "/keys/other-key/encrypt",
                    bodies::encrypt(b"k", None, false),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200);
        }
    });
}

#[test]
fn silent_slow_and_excess_connections_are_closed() {
    use std::io::{Read, Write};
    let p = Proxy::start_with(Options {
        extra_server: "header_read_timeout_ms = 400\nidle_timeout_secs = 1\nmax_connections = 4"
            .into(),
        ..Options::default()
    });
    // 1. Handshake, then silence: closed after the idle timeout.
    let mut s = tls_stream(&p);
    s.flush().unwrap();
    let _ = s.conn.complete_io(&mut s.sock);
    let t = time_to_close(&mut s);
    assert!(
        t < std::time::Duration::from_secs(3),
        "silent connection lived {t:?}"
    );
    // 2. Headers trickling in: closed after the header-read timeout.
    let mut s = tls_stream(&p);
    s.write_all(b"POST /test/kms/xks/v1/health HTTP/1.1\r\nHost: loc")
        .unwrap();
    let t = time_to_close(&mut s);
    assert!(
        t < std::time::Duration::from_secs(2),
        "slow headers lived {t:?}"
    );
    // 3. Oversized headers: refused, not buffered.
    let mut s = tls_stream(&p);
    let big = format!(
        "POST /test/kms/xks/v1/health HTTP/1.1\r\nHost: localhost\r\nx-pad: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let _ = s.write_all(big.as_bytes());
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    assert!(
        response.is_empty() || response.starts_with("HTTP/1.1 431"),
        "{response}"
    );
    // 4. The connection cap: four silent connections open; a fifth takes
    // the place of the oldest of them instead of being refused.
    let mut held: Vec<_> = (0..4)
        .map(|_| {
            let mut s = tls_stream(&p);
            let _ = s.conn.complete_io(&mut s.sock);
            s
        })
        .collect();
    let t = std::time::Instant::now();
    assert_eq!(health(&p, None), Ok(200));
    assert!(t.elapsed() < std::time::Duration::from_secs(1));
    assert!(time_to_close(&mut held[0]) < std::time::Duration::from_millis(500));
    for s in &mut held {
        time_to_close(s);
    }
    assert!(eventually(5, || health(&p, None) == Ok(200)));
}
