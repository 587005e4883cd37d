//! Running the proxy: config validation, the access log and what it must never
//! contain, the `keys` CLI, and clean shutdown.

mod common;

use std::process::Command;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::*;
use xks_proxy::client::bodies;

/// A config directory whose files are all valid, for one-setting-wrong tests.
fn valid_setup() -> (tempfile::TempDir, std::path::PathBuf, SoftHsm) {
    let dir = tempfile::tempdir().unwrap();
    let hsm = make_token(dir.path(), "xks-test");
    let certs = make_certs(dir.path());
    write_private(&dir.path().join("hsm-pin"), &hsm.pin);
    write_private(&dir.path().join("secret-a"), &"A".repeat(44));
    write_private(&dir.path().join("secret-other"), &"B".repeat(44));
    let config = write_config(dir.path(), &certs, &Options::default());
    (dir, config, hsm)
}

fn check_config(config: &std::path::Path) -> (bool, String) {
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(config)
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
    let (dir, config, _hsm) = valid_setup();
    let (ok, out) = check_config(&config);
    assert!(ok, "valid config refused: {out}");
    let text = std::fs::read_to_string(&config).unwrap();

    type Edit = Box<dyn Fn(&str) -> String>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "bad uri path",
            Box::new(|t| t.replace(URI_PATH, "/test/kms/xks/v2")),
            "uri_path",
        ),
        (
            "bad access key id",
            Box::new(|t| t.replace(AKID_A, "lowercase-id-000000000")),
            "access_key_id",
        ),
        (
            "duplicate access key id",
            Box::new(|t| t.replace(AKID_OTHER, AKID_A)),
            "already used",
        ),
        (
            "fleet size zero",
            Box::new(|t| t.replace("fleet_size = 3", "fleet_size = 0")),
            "server.fleet_size",
        ),
        (
            "unknown field",
            Box::new(|t| t.replace("[server]", "[server]\nlisten_port = 1")),
            "listen_port",
        ),
        (
            "health interval",
            Box::new(|t| t.replace("interval_secs = 5", "interval_secs = 90")),
            "health.interval_secs",
        ),
        (
            "missing cert",
            Box::new(|t| t.replace("server.crt", "nope.crt")),
            "tls.cert",
        ),
        (
            "health key served",
            Box::new(|t| {
                t.replace(
                    "keys = [\"other-key\"]",
                    &format!("keys = [\"{HEALTH_KEY}\"]"),
                )
            }),
            "health-check key",
        ),
        (
            "queue timeout",
            Box::new(|t| t.replace("sessions = 2", "sessions = 2\nqueue_timeout_ms = 400")),
            "hsm.queue_timeout_ms",
        ),
        (
            "no pin source",
            Box::new(|t| t.replace("pin_file = \"hsm-pin\"", "")),
            "hsm.pin_file / hsm.pin_env",
        ),
    ];
    for (name, edit, expect) in cases {
        std::fs::write(&config, edit(&text)).unwrap();
        let (ok, out) = check_config(&config);
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
    let (ok, out) = check_config(&config);
    assert!(!ok);
    assert!(
        out.contains("secret_file") && out.contains("chmod 600"),
        "{out}"
    );
    assert!(!out.contains(&"A".repeat(44)));
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A secret of the wrong format is refused without echoing it.
    write_private(&secret, "short-secret");
    let (ok, out) = check_config(&config);
    assert!(
        !ok && out.contains("43 to 64") && !out.contains("short-secret"),
        "{out}"
    );
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

#[test]
fn keys_cli_lists_the_token() {
    let p = Proxy::start_with(Options {
        create_keys: true,
        ..Options::default()
    });
    let out = p.cli(&["keys", "list", "--json"]);
    let keys: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |id: &str| {
        keys.iter()
            .find(|k| k["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} missing: {out}"))
    };
    assert_eq!(
        find("key-ed")["keyUsage"],
        serde_json::json!(["ENCRYPT", "DECRYPT"])
    );
    assert_eq!(find("key-none")["keyUsage"], serde_json::json!([]));
    assert_eq!(find(HEALTH_KEY)["keySpec"], "AES_256");
    // Creating an existing label fails, unless --if-missing.
    let out = p.cli_raw(&["keys", "create", "--label", "key-ed"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert!(p
        .cli(&["keys", "create", "--label", "key-ed", "--if-missing"])
        .contains("exists"));
}

#[test]
fn sigterm_stops_cleanly() {
    let mut p = Proxy::start();
    block_on(async {
        let r = p
            .h1()
            .call("/health", bodies::health("KmsHealthCheck"))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    });
    let status = p.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(p.wait_for_log("stopped"));
}
