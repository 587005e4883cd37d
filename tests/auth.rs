//! SigV4 authentication against the real proxy: clock skew, credential
//! rotation, tampering, and curl's `--aws-sigv4` as an independent signer (so
//! our signer and our verifier cannot share a canonicalization bug unnoticed).

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use xks_proxy::client::{bodies, XksClient, XksResponse};

async fn send_at(c: &XksClient, suffix: &str, body: Vec<u8>, at: SystemTime) -> XksResponse {
    let req = c.signed_request(suffix, body.into(), at).unwrap();
    c.connect().await.unwrap().send(req).await.unwrap()
}

fn assert_401(r: &XksResponse, what: &str) {
    assert_eq!(r.status, 401, "{what}: {:?}", r.body);
    assert_eq!(
        r.error_name().as_deref(),
        Some("AuthenticationFailedException"),
        "{what}"
    );
}

#[test]
fn clock_skew_beyond_five_minutes_is_refused() {
    let p = Proxy::start();
    block_on(async {
        let c = p.h1();
        let now = SystemTime::now();
        let min = Duration::from_secs(60);
        for (at, ok) in [
            (now - 4 * min, true),
            (now + 4 * min, true),
            (now - 6 * min, false),
            (now + 6 * min, false),
        ] {
            for suffix in ["/health", "/keys/key-ed/metadata"] {
                let body = if suffix == "/health" {
                    bodies::health("KmsHealthCheck")
                } else {
                    bodies::metadata()
                };
                let r = send_at(&c, suffix, body, at).await;
                if ok {
                    assert_eq!(r.status, 200, "{suffix} skew {at:?}: {:?}", r.body);
                } else {
                    assert_401(&r, "skewed");
                    assert!(r.json()["errorMessage"].as_str().unwrap().contains("300s"));
                }
            }
        }
    });
}

#[test]
fn both_rotation_credentials_work_and_others_fail() {
    let p = Proxy::start();
    block_on(async {
        let a = p.h1();
        let b = a.with_credentials(AKID_B, &p.secret_b);
        for c in [&a, &b] {
            let r = c
                .call("/keys/key-ed/encrypt", bodies::encrypt(b"k", None, true))
                .await
                .unwrap();
            assert_eq!(r.status, 200);
        }
        // Wrong secret for a known id; unknown id; another store's credential.
        let wrong = a.with_credentials(AKID_A, &p.secret_b);
        assert_401(
            &wrong.call("/health", bodies::health("x")).await.unwrap(),
            "wrong secret",
        );
        let unknown = a.with_credentials("UNKNOWNACCESSKEYID234567", &p.secret_a);
        assert_401(
            &unknown.call("/health", bodies::health("x")).await.unwrap(),
            "unknown id",
        );
        let foreign = a.with_credentials(AKID_OTHER, &p.secret_other);
        assert_401(
            &foreign.call("/health", bodies::health("x")).await.unwrap(),
            "other store's credential",
        );
    });
}

#[test]
fn tampered_or_malformed_requests_are_refused() {
    let p = Proxy::start();
    block_on(async {
        let c = p.h1();
        let now = SystemTime::now();
        let signed = || {
            c.signed_request(
                "/keys/key-ed/encrypt",
                bodies::encrypt(b"one", None, false).into(),
                now,
            )
            .unwrap()
        };

        // Body changed after signing.
        let (parts, _) = signed().into_parts();
        let req = http::Request::from_parts(
            parts,
            http_body_util::Full::new(bytes::Bytes::from(bodies::encrypt(b"two", None, false))),
        );
        assert_401(
            &c.connect().await.unwrap().send(req).await.unwrap(),
            "body changed",
        );

        // Path changed after signing (same store, other key).
        let (mut parts, body) = signed().into_parts();
        parts.uri = format!("{URI_PATH}/keys/key-e/encrypt").parse().unwrap();
        assert_401(
            &c.connect()
                .await
                .unwrap()
                .send(http::Request::from_parts(parts, body))
                .await
                .unwrap(),
            "path changed",
        );

        // Header manipulations.
        type Mutation = Box<dyn Fn(&mut http::HeaderMap)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "no authorization",
                Box::new(|h| {
                    h.remove("authorization");
                }),
            ),
            (
                "no x-amz-date",
                Box::new(|h| {
                    h.remove("x-amz-date");
                }),
            ),
            (
                "date changed",
                Box::new(|h| {
                    let d = h["x-amz-date"].to_str().unwrap().to_string();
                    let t =
                        xks_proxy::spec::time::parse_amz_date(&d).unwrap() + Duration::from_secs(1);
                    h.insert(
                        "x-amz-date",
                        xks_proxy::spec::time::format_amz_date(t).parse().unwrap(),
                    );
                }),
            ),
            (
                "wrong service",
                Box::new(|h| {
                    let a = h["authorization"]
                        .to_str()
                        .unwrap()
                        .replace("kms-xks-proxy", "kms");
                    h.insert("authorization", a.parse().unwrap());
                }),
            ),
            (
                "host unsigned",
                Box::new(|h| {
                    let a = h["authorization"]
                        .to_str()
                        .unwrap()
                        .replace("SignedHeaders=host;x-amz-date", "SignedHeaders=x-amz-date");
                    h.insert("authorization", a.parse().unwrap());
                }),
            ),
            (
                "signature flipped",
                Box::new(|h| {
                    let a = h["authorization"].to_str().unwrap().to_string();
                    let (head, sig) = a.split_at(a.len() - 64);
                    let flipped: String = sig.chars().rev().collect();
                    h.insert("authorization", format!("{head}{flipped}").parse().unwrap());
                }),
            ),
            (
                "host changed",
                Box::new(|h| {
                    h.insert("host", "evil.example.com".parse().unwrap());
                }),
            ),
            (
                "garbage",
                Box::new(|h| {
                    h.insert("authorization", "AWS4-HMAC-SHA256 ,,,===".parse().unwrap());
                }),
            ),
        ];
        for (name, mutate) in cases {
            let (mut parts, body) = signed().into_parts();
            mutate(&mut parts.headers);
            let r = c
                .connect()
                .await
                .unwrap()
                .send(http::Request::from_parts(parts, body))
                .await
                .unwrap();
            assert_401(&r, name);
        }
    });
    // The log never shows a secret.
    let log = p.log();
    assert!(!log.contains(&p.secret_a) && !log.contains(&p.secret_b));
}

fn curl(p: &Proxy, http2: bool, suffix: &str, body: &str) -> (u16, serde_json::Value) {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "10", "-w", "\n%{http_code}"])
        .arg(if http2 { "--http2" } else { "--http1.1" })
        .arg("--cacert")
        .arg(&p.certs.ca)
        .args(["--aws-sigv4", "aws:amz:us-east-1:kms-xks-proxy"])
        .arg("--user")
        .arg(format!("{AKID_A}:{}", p.secret_a))
        .args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ])
        .arg(format!(
            "https://localhost:{}{URI_PATH}{suffix}",
            p.addr.port()
        ))
        .output()
        .expect("curl must be installed");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (json, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn curl_aws_sigv4_is_accepted_over_http1_and_http2() {
    let p = Proxy::start();
    for http2 in [false, true] {
        let (code, health) = curl(
            &p,
            http2,
            "/health",
            &String::from_utf8(bodies::health("ConnectCustomKeyStore")).unwrap(),
        );
        assert_eq!(code, 200, "health via curl (h2={http2}): {health}");
        assert_eq!(health["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");
        let (code, enc) = curl(
            &p,
            http2,
            "/keys/key-ed/encrypt",
            &String::from_utf8(bodies::encrypt(b"curl-signed", Some(b"aad"), true)).unwrap(),
        );
        assert_eq!(code, 200, "{enc}");
        let dec_body = bodies::decrypt_from(&enc, Some(b"aad")).to_string();
        let (code, dec) = curl(&p, http2, "/keys/key-ed/decrypt", &dec_body);
        assert_eq!(code, 200, "{dec}");
        assert_eq!(dec["plaintext"], "Y3VybC1zaWduZWQ=");
    }
}
