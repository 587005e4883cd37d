//! `xks-proxy check`, the KMS connection simulator: one broken setting per
//! verdict, against our own server (and, for the two answers our server never
//! gives, a deliberately wrong TLS server).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use common::*;
use serde_json::Value;

/// Runs `xks-proxy check … --json`; returns (exit code, report).
fn check(p: &Proxy, args: &[String]) -> (i32, Value) {
    let mut all = vec!["check", "--json"];
    all.extend(args.iter().map(String::as_str));
    let out = p.run_bin(&all);
    let code = out.status.code().unwrap_or(-1);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check printed no JSON ({e}); stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, report)
}

fn endpoint(addr: SocketAddr) -> String {
    format!("https://localhost:{}", addr.port())
}

/// Arguments for a check that should succeed, plus `extra`.
fn good_args(p: &Proxy, ep: &str, secret: &str, extra: &[&str]) -> Vec<String> {
    let mut v = check_args(ep, Path::new(secret), &p.certs.ca);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn connected_with_a_usable_key_and_every_step_timed() {
    let p = Proxy::start();
    let ep = endpoint(p.addr);
    let secret = p.dir.path().join("secret-a");
    let secret = secret.to_str().unwrap();
    let (code, r) = check(&p, &good_args(&p, &ep, secret, &["--key-id", "key-ed"]));
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["verdict"], "CONNECTED");
    assert_eq!(r["key_verdict"], "OK");
    let steps: Vec<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["connect", "tls", "health", "metadata", "encrypt", "decrypt"]
    );
    for s in r["steps"].as_array().unwrap() {
        assert_eq!(s["ok"], true, "{s}");
        assert!(s["latency_ms"].as_f64().unwrap() < 250.0, "{s}");
    }
    assert_eq!(r["tls"]["version"], "TLSv1_3");
    // KMS speaks HTTP/2, and so does check unless told otherwise.
    assert_eq!(r["tls"]["protocol"], "HTTP/2");
    assert_eq!(r["tls"]["alpn"], "h2");
    assert!(r["tls"]["cipher_suite"]
        .as_str()
        .unwrap()
        .starts_with("TLS13_"));
    assert!(r["tls"]["certificate_days_left"].as_i64().unwrap() > 300);
    let warnings = r["warnings"].to_string();
    assert!(warnings.contains("port 443"), "{warnings}");
    assert!(warnings.contains("--ca"), "{warnings}");

    // The same from the KMS console JSON file that `credentials new` writes,
    // in text form, over HTTP/1.1 on request.
    let console = p.dir.path().join("console.json");
    std::fs::write(
        &console,
        serde_json::json!({"XksProxyUriPath": URI_PATH,
            "XksProxyAuthenticationCredential": {"AccessKeyId": AKID_A, "RawSecretAccessKey": p.secret_a}})
        .to_string(),
    )
    .unwrap();
    let out = p.run_bin(&[
        "check",
        "--endpoint",
        &ep,
        "--console-json",
        console.to_str().unwrap(),
        "--ca",
        p.certs.ca.to_str().unwrap(),
        "--http1",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("verdict: CONNECTED"), "{text}");
    assert!(
        text.contains("protocol: HTTP/1.1 (ALPN http/1.1)"),
        "{text}"
    );
    // The secret never appears in check's output.
    assert!(!text.contains(&p.secret_a));
}

#[test]
fn each_broken_setting_gets_the_verdict_kms_would_give() {
    let mut p = Proxy::start();
    let ep = endpoint(p.addr);
    let secret_path = p.dir.path().join("secret-a");
    let secret = secret_path.to_str().unwrap();
    let wrong_secret = p.dir.path().join("wrong-secret");
    write_private(&wrong_secret, &"A".repeat(44));

    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "wrong secret",
            vec![
                "--secret-file".into(),
                wrong_secret.to_str().unwrap().into(),
            ],
            "INVALID_CREDENTIALS",
        ),
        (
            "wrong URI path",
            vec!["--uri-path".into(), "/wrong/kms/xks/v1".into()],
            "XKS_PROXY_INVALID_CONFIGURATION",
        ),
    ];
    for (what, overrides, verdict) in cases {
        let mut args = good_args(&p, &ep, secret, &[]);
        // Later flags win: put the override's value in place of the good one.
        for pair in overrides.chunks(2) {
            let i = args.iter().position(|a| *a == pair[0]).unwrap();
            args[i + 1] = pair[1].clone();
        }
        let (code, r) = check(&p, &args);
        assert_eq!(r["verdict"], verdict, "{what}: {r:#}");
        assert_eq!(code, 1, "{what}");
        assert!(!r["explanation"].as_str().unwrap().is_empty());
        assert!(!r["fix"].as_str().unwrap().is_empty());
    }

    // TLS: a CA KMS does not trust (no --ca), and a name the certificate lacks.
    let without_ca = &good_args(&p, &ep, secret, &[])[..8];
    let (_, r) = check(&p, without_ca);
    assert_eq!(r["verdict"], "XKS_PROXY_INVALID_TLS_CONFIGURATION", "{r:#}");
    assert!(r["explanation"].as_str().unwrap().contains("trusted root"));
    let wrong_name = format!("https://xks.wrong.example:{}", p.addr.port());
    let addr = p.addr.to_string();
    let (_, r) = check(
        &p,
        &good_args(&p, &wrong_name, secret, &["--connect-to", &addr]),
    );
    assert_eq!(r["verdict"], "XKS_PROXY_INVALID_TLS_CONFIGURATION", "{r:#}");
    assert!(r["explanation"].as_str().unwrap().contains("host name"));

    // Key-level problems: KMS connects, but cannot use the key.
    p.cli(&["keys", "create", "--label", "off-key"]);
    p.cli(&["keys", "disable", "off-key"]);
    for (key, expected) in [
        ("key-e", "XKS_KEY_INVALID_CONFIGURATION"),
        ("no-such-key", "XKS_KEY_NOT_FOUND"),
        ("off-key", "XKS_KEY_DISABLED"),
    ] {
        let (code, r) = check(&p, &good_args(&p, &ep, secret, &["--key-id", key]));
        assert_eq!(r["verdict"], "CONNECTED", "{key}: {r:#}");
        assert_eq!(r["key_verdict"], expected, "{key}: {r:#}");
        assert_eq!(code, 3, "{key}");
    }

    // A stopped proxy (SIGSTOP): the kernel accepts, nobody answers.
    unsafe_kill(p.pid(), "STOP");
    let (_, r) = check(&p, &good_args(&p, &ep, secret, &[]));
    unsafe_kill(p.pid(), "CONT");
    assert_eq!(r["verdict"], "XKS_PROXY_TIMED_OUT", "{r:#}");

    // A proxy that is not running at all.
    p.terminate();
    let (code, r) = check(&p, &good_args(&p, &ep, secret, &[]));
    assert_eq!(r["verdict"], "XKS_PROXY_NOT_REACHABLE", "{r:#}");
    assert_eq!(code, 1);
}

/// A TLS server that answers every request with `response`: for the
/// verdicts our own proxy never provokes (403 without an authorization
/// policy, a schema-violating answer). With `endless`, the answer's body
/// never ends: the server keeps streaming bytes after `response`.
fn fake_server(certs: &Certs, response: String) -> SocketAddr {
    serve_fake(certs, response, false)
}

fn serve_fake(certs: &Certs, response: String, endless: bool) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cert = xks_proxy::net::tls::load_cert(&xks_proxy::net::tls::TlsConfig {
        cert: certs.cert.clone(),
        key: certs.key.clone(),
        client_auth: None,
    })
    .unwrap();
    let resolver = xks_proxy::net::tls::CertResolver::new(cert);
    // It speaks HTTP/1.1 only, and says so in ALPN (check offers h2 first).
    let mut tls = (*xks_proxy::net::tls::server_config(resolver, None).unwrap()).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = Arc::new(tls);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let response = Arc::new(response);
    std::thread::spawn(move || {
        block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, response) = (acceptor.clone(), response.clone());
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = vec![0u8; 65536];
                    let mut seen = Vec::new();
                    // One response per request head received.
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                            seen.clear();
                            if s.write_all(response.as_bytes()).await.is_err() {
                                return;
                            }
                            if endless {
                                loop {
                                    if s.write_all(&[b' '; 65536]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                });
            }
        })
    });
    addr
}

fn http(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn access_denied_and_invalid_responses_are_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let secret = dir.path().join("secret");
    write_private(&secret, &"B".repeat(44));
    let run = |addr: SocketAddr| -> Value {
        let out = std::process::Command::new(bin())
            .args(["check", "--json"])
            .args(check_args(&endpoint(addr), &secret, &certs.ca))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let cases = [
        (
            http(
                "403 Forbidden",
                r#"{"errorName":"AccessDeniedException","errorMessage":"policy says no"}"#,
            ),
            "XKS_PROXY_ACCESS_DENIED",
        ),
        (http("200 OK", "not json"), "XKS_PROXY_INVALID_RESPONSE"),
        (
            http(
                "200 OK",
                r#"{"xksProxyFleetSize":0,"xksProxyVendor":"v","xksProxyModel":"m","ekmVendor":"e","ekmFleetDetails":[]}"#,
            ),
            "XKS_PROXY_INVALID_RESPONSE",
        ),
        (
            http(
                "500 Internal Server Error",
                r#"{"errorName":"InternalException"}"#,
            ),
            "XKS_PROXY_INVALID_RESPONSE",
        ),
        (
            http(
                "200 OK",
                r#"{"xksProxyFleetSize":1,"xksProxyVendor":"v","xksProxyModel":"m","ekmVendor":"e","ekmFleetDetails":[{"id":"a","model":"m","healthStatus":"UNAVAILABLE"}]}"#,
            ),
            "XKS_PROXY_NOT_REACHABLE",
        ),
        (
            http(
                "503 Service Unavailable",
                r#"{"errorName":"DependencyTimeoutException"}"#,
            ),
            "XKS_PROXY_NOT_REACHABLE",
        ),
    ];
    for (response, verdict) in cases {
        let addr = fake_server(&certs, response.clone());
        let r = run(addr);
        assert_eq!(r["verdict"], verdict, "{response}: {r:#}");
    }
}

/// Before: a server that streamed its answer took `check` to 1.1 GB of
/// memory within `--timeout-ms 2000`, and an `errorMessage` with escape
/// sequences and newlines was printed raw, so a fake `verdict: CONNECTED`
/// line could be painted on the terminal. Now the answer is read up to
/// 1 MiB and server text is shown escaped.
#[test]
fn check_is_bounded_and_prints_server_text_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let secret = dir.path().join("secret");
    write_private(&secret, &"B".repeat(44));
    // An endless body, under a 1 GiB address-space limit.
    let endless = serve_fake(
        &certs,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000000000\r\n\r\n"
            .into(),
        true,
    );
    let started = std::time::Instant::now();
    let out = std::process::Command::new("prlimit")
        .args(["--as=1073741824", "--"])
        .arg(bin())
        .args(["check", "--json", "--timeout-ms", "2000"])
        .args(check_args(&endpoint(endless), &secret, &certs.ca))
        .output()
        .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(r["verdict"], "XKS_PROXY_INVALID_RESPONSE", "{r:#}");
    assert!(r.to_string().contains("larger than 1048576 bytes"), "{r:#}");

    // A hostile errorMessage, in text mode.
    let hostile = fake_server(
        &certs,
        http(
            "401 Unauthorized",
            r#"{"errorName":"AuthenticationFailedException","errorMessage":"bad\u001b[2K\r\nverdict: CONNECTED\u2028"}"#,
        ),
    );
    let out = std::process::Command::new(bin())
        .arg("check")
        .args(check_args(&endpoint(hostile), &secret, &certs.ca))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains('\u{1b}') && !text.contains('\r') && !text.contains('\u{2028}'),
        "{text:?}"
    );
    let verdicts: Vec<&str> = text.lines().filter(|l| l.starts_with("verdict:")).collect();
    assert_eq!(verdicts, ["verdict: INVALID_CREDENTIALS"], "{text}");
    assert!(text.contains("\\u{1b}"), "{text}");
}
