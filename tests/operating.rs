//! Operating a running proxy: configuration errors (at `check-config` and at
//! a hot reload), the `credentials` CLI, credential and certificate rotation
//! without a restart, metrics, the access log and what it must never
//! contain, and shutdown. The `keys` CLI is tested in
//! `tests/operating_keys.rs`.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::*;
use xks_proxy::client::{bodies, HttpVersion, XksClient};

/// The status of a `/health` request with `c`; 0 when none came back.
fn health_status(c: &XksClient) -> u16 {
    block_on(async {
        c.call("/health", bodies::health("KmsHealthCheck"))
            .await
            .map(|r| r.status.as_u16())
            .unwrap_or(0)
    })
}

// Configuration errors: the field and the rule named; a reload keeps the old
// configuration
// ---------------------------------------------------------------------------

/// A config directory whose files are all valid, for one-setting-wrong tests.
fn valid_setup() -> (tempfile::TempDir, std::path::PathBuf, TestToken) {
    let dir = tempfile::tempdir().unwrap();
    let (hsm, certs) = config_dir(dir.path());
    let config = write_config(dir.path(), &certs, &Options::default());
    (dir, config, hsm)
}

fn check_config(config: &std::path::Path, hsm: &TestToken) -> (bool, String) {
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(config)
        .env(hsm.env_var(), &hsm.conf)
        .env("XKS_TEST_SECRET_B", "C".repeat(44))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn config_errors_name_the_field_and_the_rule() {
    let (dir, config, hsm) = valid_setup();
    let (ok, out) = check_config(&config, &hsm);
    assert!(ok, "valid config refused: {out}");
    let text = std::fs::read_to_string(&config).unwrap();

    // (what is wrong, the text replaced, its replacement, what the message
    // must name)
    let served_health_key = format!("keys = [\"{HEALTH_KEY}\"]");
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str, &str)] = &[
        ("bad uri path", URI_PATH, "/test/kms/xks/v2", "uri_path"),
        ("bad access key id", AKID_A, "lowercase-id-000000000", "access_key_id"),
        ("duplicate access key id", AKID_OTHER, AKID_A, "already used"),
        ("fleet size zero", "fleet_size = 3", "fleet_size = 0", "server.fleet_size"),
        ("unknown field", "[server]", "[server]\nlisten_port = 1", "listen_port"),
        ("health interval", "interval_secs = 5", "interval_secs = 90", "health.interval_secs"),
        ("missing cert", "server.crt", "nope.crt", "tls.cert"),
        ("health key served", "keys = [\"other-key\"]", &served_health_key, "health-check key"),
        ("queue timeout", "sessions = 2", "sessions = 2\nqueue_timeout_ms = 400", "hsm.queue_timeout_ms"),
        ("no pin source", "pin_file = \"hsm-pin\"", "", "hsm.pin_file / hsm.pin_env"),
        // The key manager is opened as `serve` would: every slot named.
        ("no such token", "token_label = \"xks-test\"", "token_label = \"no-such-token\"",
         "no initialized token labelled 'no-such-token' (slots seen: slot"),
        ("wrong PIN", "pin_file = \"hsm-pin\"", "pin_file = \"wrong-pin\"", "login to the token failed"),
    ];
    write_private(&dir.path().join("wrong-pin"), "not-the-pin");
    for (name, from, to, expect) in cases {
        assert!(text.contains(from), "{name}: the config has no '{from}'");
        std::fs::write(&config, text.replace(from, to)).unwrap();
        let (ok, out) = check_config(&config, &hsm);
        assert!(!ok, "{name}: accepted");
        assert!(
            out.contains(expect),
            "{name}: message does not name '{expect}': {out}"
        );
    }
    std::fs::write(&config, &text).unwrap();

    // A secret file readable by others is refused, and its content never printed.
    use std::os::unix::fs::PermissionsExt;
    let secret = dir.path().join("secret-a");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, out) = check_config(&config, &hsm);
    assert!(!ok);
    assert!(
        out.contains("secret_file") && out.contains("chmod 600"),
        "{out}"
    );
    assert!(!out.contains(&"A".repeat(44)));
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A secret of the wrong format is refused without echoing it.
    write_private(&secret, "short-secret");
    let (ok, out) = check_config(&config, &hsm);
    assert!(
        !ok && out.contains("43 to 64") && !out.contains("short-secret"),
        "{out}"
    );
}

#[test]
fn an_invalid_new_config_is_refused_and_the_old_one_stays() {
    let p = Proxy::start();
    let good = std::fs::read_to_string(&p.config).unwrap();

    // A syntax error.
    std::fs::write(&p.config, format!("{good}\n[[key_stores]\nbroken")).unwrap();
    assert!(
        eventually(10, || p.log().contains("configuration reload rejected")),
        "log:\n{}",
        p.log()
    );
    assert_eq!(health_status(&p.h1()), 200);

    // A rule violation, named with its field.
    std::fs::write(&p.config, good.replace(URI_PATH, "/test/kms/xks/v9")).unwrap();
    assert!(eventually(10, || p
        .log()
        .contains("is not a valid XksProxyUriPath")));
    assert_eq!(health_status(&p.h1()), 200);

    // A secret file others can read.
    std::fs::write(&p.config, &good).unwrap();
    assert!(eventually(10, || p
        .log()
        .contains("configuration reloaded")));
    use std::os::unix::fs::PermissionsExt;
    let secret = p.dir.path().join("secret-a");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    unsafe_kill(p.pid(), "HUP");
    assert!(eventually(10, || p.log().contains("chmod 600")));
    assert_eq!(health_status(&p.h1()), 200, "old credentials must stay");

    // A restart-only setting is reported, the rest applied.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        &p.config,
        good.replace("sessions = 2", "sessions = 3")
            .replace("fleet_size = 3", "fleet_size = 7"),
    )
    .unwrap();
    assert!(eventually(10, || p
        .log()
        .contains("take effect only at a restart")));
    let fleet = block_on(async {
        p.h1()
            .call("/health", bodies::health("KmsHealthCheck"))
            .await
            .unwrap()
            .json()["xksProxyFleetSize"]
            .clone()
    });
    assert_eq!(fleet, 7);
    let (_, metrics) = p.admin_get("/metrics");
    assert!(metrics.contains(r#"xks_config_reloads_total{result="rejected""#));
}

// Credentials and certificates, rotated without a restart
// ---------------------------------------------------------------------------

/// Access key id and secret from a KMS console JSON document.
fn console_credential(json: &serde_json::Value) -> (String, String) {
    let c = &json["XksProxyAuthenticationCredential"];
    let field = |name: &str| c[name].as_str().unwrap().to_string();
    (field("AccessKeyId"), field("RawSecretAccessKey"))
}

#[test]
fn credentials_new_list_revoke_take_effect_without_restart() {
    let p = Proxy::start();
    let console = p.dir.path().join("console.json");
    let out = p.cli_raw(&[
        "credentials",
        "new",
        "--prefix",
        URI_PATH,
        "--output",
        console.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&console).unwrap()).unwrap();
    assert_eq!(json["XksProxyUriPath"], URI_PATH);
    let (akid, secret) = console_credential(&json);
    assert!(xks_proxy::spec::names::is_valid_access_key_id(&akid));
    assert!(xks_proxy::spec::names::is_valid_secret(&secret));
    // The console file and the secret file are private.
    use std::os::unix::fs::PermissionsExt;
    for f in [console.clone(), p.dir.path().join(format!("{akid}.secret"))] {
        let mode = std::fs::metadata(&f).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", f.display());
    }
    // The config kept its other content.
    let text = std::fs::read_to_string(&p.config).unwrap();
    assert!(text.contains(AKID_A) && text.contains(&akid) && text.contains("created = "));

    // The running proxy picks the new credential up by itself.
    let new_client = p.h1().with_credentials(&akid, &secret);
    assert!(
        eventually(10, || health_status(&new_client) == 200),
        "new credential never accepted; log:\n{}",
        p.log()
    );

    let list = p.cli(&["credentials", "list", "--json"]);
    let rows: Vec<serde_json::Value> = list
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let test_ids: Vec<&str> = rows
        .iter()
        .filter(|r| r["uri_path"] == URI_PATH)
        .map(|r| r["access_key_id"].as_str().unwrap())
        .collect();
    assert_eq!(test_ids, vec![AKID_A, AKID_B, akid.as_str()]);
    let new_row = rows.iter().find(|r| r["access_key_id"] == akid).unwrap();
    assert!(new_row["created"].as_str().unwrap().ends_with('Z'));
    assert!(new_row["source"].as_str().unwrap().starts_with("file:"));
    assert!(rows
        .iter()
        .any(|r| r["access_key_id"] == AKID_B && r["source"] == "env:XKS_TEST_SECRET_B"));

    // Revoke the old one: it stops working, the others keep working.
    let out = p.cli(&["credentials", "revoke", AKID_A]);
    assert!(out.contains("revoked"), "{out}");
    assert!(!p.dir.path().join("secret-a").exists());
    assert!(
        eventually(10, || health_status(&p.h1()) == 401),
        "revoked credential still accepted"
    );
    assert_eq!(health_status(&new_client), 200);

    // Never the last credential of a key store; unknown ids are refused.
    let out = p.cli_raw(&["credentials", "revoke", AKID_OTHER]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only credential"));
    let out = p.cli_raw(&["credentials", "revoke", "NOSUCHKEYAAAAAAAAAAAAA"]);
    assert_eq!(out.status.code(), Some(2));
    let out = p.cli_raw(&["credentials", "new", "--prefix", "/nope/kms/xks/v1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no key store"));
    // By name, to stdout.
    let out = p.cli(&["credentials", "new", "--prefix", "other"]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["XksProxyUriPath"], OTHER_URI_PATH);
}

/// What the load of [`rotation_under_continuous_load_fails_no_request`] saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    /// Shed as overload (see `shed`).
    shed: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

/// KMS-style rotation while traffic flows: add a credential, move the load to
/// it, revoke the old one, reload by signal and by file, swap the certificate.
/// Not one request may fail and no connection may drop (a request shed as
/// overload on a busy machine, see `shed`, is counted apart: not a failure
/// of the rotation).
#[test]
fn rotation_under_continuous_load_fails_no_request() {
    let p = Proxy::start();
    let current: Arc<std::sync::RwLock<XksClient>> = Arc::new(std::sync::RwLock::new(p.h1()));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let base_h1 = p.h1();
    let base_h2 = p.h2();
    let loader = {
        let (current, stop, tally) = (current.clone(), stop.clone(), tally.clone());
        std::thread::spawn(move || {
            block_on(async move {
                let mut tasks = Vec::new();
                for i in 0..4 {
                    let base = if i % 2 == 0 {
                        base_h1.clone()
                    } else {
                        base_h2.clone()
                    };
                    let (current, stop, tally) = (current.clone(), stop.clone(), tally.clone());
                    tasks.push(tokio::spawn(async move {
                        // One connection for the whole test: a reload must not drop it.
                        let mut conn = base.connect().await.unwrap();
                        while !stop.load(Ordering::Relaxed) {
                            let signer = current.read().unwrap().clone();
                            let req = signed(
                                &signer,
                                "/keys/key-ed/encrypt",
                                bodies::encrypt(b"k", None, true),
                            );
                            match conn.send(req).await {
                                Ok(r) if r.status == 200 => {
                                    tally.ok.fetch_add(1, Ordering::Relaxed);
                                }
                                // Overload on a busy machine, not the
                                // rotation's doing (see `shed`).
                                Ok(r) if shed(&r) => {
                                    tally.shed.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(r) => tally
                                    .failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("{} {:?}", r.status, r.body)),
                                Err(e) => {
                                    let e = format!("connection: {e}");
                                    tally.failures.lock().unwrap().push(e);
                                    return;
                                }
                            }
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
            })
        })
    };
    let wait_for_requests = |n: u64| {
        let target = tally.ok.load(Ordering::Relaxed) + n;
        assert!(eventually(20, || tally.ok.load(Ordering::Relaxed) >= target));
    };
    wait_for_requests(200);

    // 1. New credential; wait until this proxy accepts it (KMS: UpdateCustomKeyStore).
    let out = p.cli(&["credentials", "new", "--prefix", URI_PATH]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (akid, secret) = console_credential(&json);
    let rotated = p.h1().with_credentials(&akid, &secret);
    assert!(eventually(10, || health_status(&rotated) == 200));
    wait_for_requests(200);
    // 2. Traffic moves to the new credential.
    *current.write().unwrap() = rotated;
    wait_for_requests(200);
    // 3. The old one is revoked.
    p.cli(&["credentials", "revoke", AKID_A]);
    assert!(eventually(10, || health_status(&p.h1()) == 401));
    wait_for_requests(200);
    // 4. Reload by signal, twice.
    unsafe_kill(p.pid(), "HUP");
    unsafe_kill(p.pid(), "HUP");
    wait_for_requests(200);
    // 5. A new certificate from the same CA... here a fresh CA: existing
    //    connections keep theirs, only new handshakes see the new one.
    let new_dir = p.dir.path().join("new-certs");
    std::fs::create_dir_all(&new_dir).unwrap();
    let fresh = make_certs(&new_dir);
    replace_file(&fresh.key, &p.certs.key);
    replace_file(&fresh.cert, &p.certs.cert);
    let fresh_client = p
        .client_with_tls(
            xks_proxy::client::tls_config(&fresh.ca, HttpVersion::Http2).unwrap(),
            HttpVersion::Http2,
        )
        .with_credentials(&akid, &secret);
    assert!(eventually(10, || health_status(&fresh_client) == 200));
    wait_for_requests(200);

    stop.store(true, Ordering::Relaxed);
    loader.join().unwrap();
    let failures = tally.failures.lock().unwrap();
    eprintln!(
        "rotation under load: {} served, {} shed as overload",
        tally.ok.load(Ordering::Relaxed),
        tally.shed.load(Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}; log:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        p.log()
    );
    assert!(tally.ok.load(Ordering::Relaxed) >= 1400);
    let (_, metrics) = p.admin_get("/metrics");
    assert!(metrics.contains(r#"xks_config_reloads_total{result="ok",trigger="signal"}"#));
    assert!(metrics.contains(r#"xks_config_reloads_total{result="ok",trigger="file"}"#));
}

/// Replaces `to` with the content of `from` by rename, as deploy tools do.
fn replace_file(from: &std::path::Path, to: &std::path::Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[test]
fn certificate_reload_serves_new_handshakes_with_the_new_certificate() {
    let p = Proxy::start();
    let new_dir = p.dir.path().join("rotated");
    std::fs::create_dir_all(&new_dir).unwrap();
    let fresh = make_certs(&new_dir);
    let new_client = p.client_with_tls(
        xks_proxy::client::tls_config(&fresh.ca, HttpVersion::Http1).unwrap(),
        HttpVersion::Http1,
    );
    let old_client = p.h1();
    block_on(async {
        let health = |c: &XksClient| {
            c.signed_request(
                "/health",
                bodies::health("KmsHealthCheck").into(),
                std::time::SystemTime::now(),
            )
            .unwrap()
        };
        let mut kept = old_client.connect().await.unwrap();
        replace_file(&fresh.key, &p.certs.key);
        replace_file(&fresh.cert, &p.certs.cert);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = new_client.call("/health", bodies::health("x")).await {
                assert_eq!(r.status, 200);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "new certificate never served; log:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // New full handshakes no longer chain to the old CA (a client without
        // a cached session; resumed sessions skip the certificate by design)...
        assert!(p.h1().connect().await.is_err());
        // ...but a connection made before the swap still works.
        assert_eq!(kept.send(health(&old_client)).await.unwrap().status, 200);
    });
}

// What operators see: metrics and the access log
// ---------------------------------------------------------------------------

#[test]
fn metrics_describe_traffic_hsm_health_certificate_and_credentials() {
    let p = Proxy::start();
    let c = p.h1();
    block_on(async {
        for _ in 0..3 {
            let r = c
                .call("/keys/key-ed/encrypt", bodies::encrypt(b"k", None, false))
                .await
                .unwrap();
            assert_eq!(r.status, 200);
        }
        let r = c.call("/keys/key-e/decrypt", "{}").await.unwrap();
        assert_eq!(r.status, 400);
    });
    let (status, text) = p.admin_get("/metrics");
    assert!(status.contains("200"), "{status}");
    for needle in [
        r#"xks_requests_total{error_name="",key_store="test",operation="Encrypt",status="200"} 3"#,
        r#"xks_requests_total{error_name="ValidationException",key_store="test",operation="Decrypt",status="400"} 1"#,
        r#"xks_request_duration_seconds_bucket{operation="Encrypt",le="0.25"} 3"#,
        "xks_hsm_sessions 2",
        "xks_hsm_sessions_in_use 0",
        "xks_hsm_queue_waiting 0",
        r#",status="ACTIVE"} 1"#,
        r#",status="UNAVAILABLE"} 0"#,
        r#"xks_credential_age_days{access_key_id="TESTACCESSKEYAAAAAAAAAAA",key_store="test"}"#,
        "xks_connections_open",
        "xks_build_info",
    ] {
        assert!(text.contains(needle), "missing {needle}:\n{text}");
    }
    let days: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("xks_tls_certificate_expiry_days "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(days > 300.0, "{days}");
    // HSM time per key manager (the token's label and serial) and kind of job.
    let hsm_count = |call: &str| -> Option<String> {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(&format!(
                "xks_hsm_call_duration_seconds_count{{call=\"{call}\",ekm_id=\"xks-test-"
            ))?;
            Some(rest.split_once("\"} ")?.1.to_string())
        })
    };
    assert_eq!(hsm_count("encrypt").as_deref(), Some("3"), "{text}");
    assert!(hsm_count("health_probe").is_some(), "{text}");
    assert!(p.admin_get("/ping").0.contains("200"));
    assert!(p.admin_get("/nope").0.contains("404"));
}

#[test]
fn access_log_has_request_fields_and_no_secrets() {
    let p = Proxy::start();
    let plaintext = b"TOP-SECRET-PLAINTEXT-MARKER-0123";
    let aad = b"AAD-MARKER-should-not-be-logged";
    block_on(async {
        let c = p.h1();
        let e = c
            .call(
                "/keys/key-ed/encrypt",
                bodies::encrypt(plaintext, Some(aad), true),
            )
            .await
            .unwrap();
        assert_eq!(e.status, 200);
        let d = c
            .call(
                "/keys/key-ed/decrypt",
                bodies::decrypt_from(&e.json(), Some(aad)).to_string(),
            )
            .await
            .unwrap();
        assert_eq!(d.status, 200);
        let bad = c.with_credentials(AKID_A, &p.secret_b);
        assert_eq!(
            bad.call("/health", bodies::health("x"))
                .await
                .unwrap()
                .status,
            401
        );
    });
    assert!(p.wait_for_log("dec-req-1"));
    assert!(p.wait_for_log("AuthenticationFailedException"));
    let log = p.log();
    // One structured line per request, with the fields KMS customers correlate on.
    let enc_line = log
        .lines()
        .find(|l| l.contains("\"kms_request_id\":\"enc-req-1\""))
        .expect("encrypt access line");
    let v: serde_json::Value = serde_json::from_str(enc_line).unwrap();
    assert_eq!(v["kms_operation"], "GenerateDataKey");
    assert_eq!(v["aws_principal_arn"], bodies::PRINCIPAL);
    assert_eq!(v["key_store"], "test");
    assert_eq!(v["operation"], "Encrypt");
    assert_eq!(v["key_id"], "key-ed");
    assert_eq!(v["status"], 200);
    assert!(v["micros"].as_u64().is_some());
    let fail_line = log
        .lines()
        .find(|l| l.contains("AuthenticationFailedException"))
        .unwrap();
    assert!(fail_line.contains("\"status\":401"));

    // Nothing secret, in any encoding the proxy handled it in.
    let forbidden = [
        String::from_utf8_lossy(plaintext).to_string(),
        B64.encode(plaintext),
        String::from_utf8_lossy(aad).to_string(),
        B64.encode(aad),
        p.secret_a.clone(),
        p.secret_b.clone(),
        p.hsm.pin.clone(),
    ];
    for f in &forbidden {
        assert!(!log.contains(f.as_str()), "log contains a secret: {f}");
    }
}

// Shutdown
// ---------------------------------------------------------------------------

/// A request whose body is still arriving when SIGTERM comes is answered;
/// then the proxy logs out of the HSM and exits 0.
#[test]
fn sigterm_finishes_in_flight_requests_and_logs_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut p = Proxy::start();
    let client = p.h1();
    let pid = p.pid();
    let addr = p.addr;
    let ca = p.certs.ca.clone();
    let response = block_on(async move {
        let body = bodies::encrypt(b"in flight", None, true);
        let req = client
            .signed_request(
                "/keys/key-ed/encrypt",
                body.clone().into(),
                std::time::SystemTime::now(),
            )
            .unwrap();
        let mut head = raw_head(&req);
        head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let mut s = tls_connect(addr, &ca, HttpVersion::Http1).await;
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&body[..10]).await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        unsafe_kill(pid, "TERM");
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(&body[10..]).await.unwrap();
        s.flush().await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    });
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "{response}\nlog:\n{}",
        p.log()
    );
    let status = p.terminate();
    assert!(status.success(), "{status:?}");
    assert!(p.wait_for_log("logged out of the HSM"), "{}", p.log());
    assert!(p.wait_for_log("stopped"));
}
