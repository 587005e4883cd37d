//! The `keys` CLI of a running proxy: on the token (`list`, `create`,
//! `show`), on running proxies (`disable` and `enable` persist in the token,
//! seen by every instance and across a restart), and on every key manager
//! (`disable`, `enable` and `rotate` reach each one and report each, a
//! failing one making the command fail).

mod common;

use common::*;
use xks_proxy::client::{bodies, XksClient};

fn metadata_status(c: &XksClient, key: &str) -> serde_json::Value {
    block_on(async {
        let r = c
            .call(&format!("/keys/{key}/metadata"), bodies::metadata())
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.json()["keyStatus"].clone()
    })
}

fn encrypt_error(c: &XksClient, key: &str) -> Option<String> {
    block_on(async {
        c.call(
            &format!("/keys/{key}/encrypt"),
            bodies::encrypt(b"0123456789abcdef0123456789abcdef", None, false),
        )
        .await
        .unwrap()
        .error_name()
    })
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
fn keys_disable_and_enable_persist_in_the_token_for_every_instance() {
    let mut p = Proxy::start();
    let c = p.h1();
    // A ciphertext made while the key is enabled.
    let enc = block_on(async {
        c.call(
            "/keys/key-ed/encrypt",
            bodies::encrypt(b"data key", None, false),
        )
        .await
        .unwrap()
        .json()
    });

    let show: serde_json::Value =
        serde_json::from_str(&p.cli(&["keys", "show", "key-ed", "--json"])).unwrap();
    assert_eq!(show["keyStatus"], "ENABLED");
    assert_eq!(show["sensitive"], true);
    assert_eq!(show["extractable"], false);
    assert_eq!(show["endDate"], serde_json::Value::Null);

    assert!(p.cli(&["keys", "disable", "key-ed"]).contains("DISABLED"));
    let show: serde_json::Value =
        serde_json::from_str(&p.cli(&["keys", "show", "key-ed", "--json"])).unwrap();
    assert_eq!(show["keyStatus"], "DISABLED");
    // Disabling is idempotent.
    assert!(p.cli(&["keys", "disable", "key-ed"]).contains("DISABLED"));

    // The running proxy: metadata reads fresh attributes.
    assert_eq!(metadata_status(&c, "key-ed"), "DISABLED");
    assert_eq!(
        encrypt_error(&c, "key-ed").as_deref(),
        Some("InvalidStateException")
    );
    let dec = block_on(async {
        c.call(
            "/keys/key-ed/decrypt",
            bodies::decrypt_from(&enc, None).to_string(),
        )
        .await
        .unwrap()
    });
    assert_eq!(dec.status, 400);
    assert_eq!(dec.error_name().as_deref(), Some("InvalidStateException"));

    // Another instance on the same token sees the same state...
    let sibling = p.sibling();
    assert_eq!(metadata_status(&sibling.h1(), "key-ed"), "DISABLED");
    drop(sibling);
    // ...and so does this one after a restart.
    p.restart();
    let c = p.h1();
    assert_eq!(metadata_status(&c, "key-ed"), "DISABLED");

    assert!(p.cli(&["keys", "enable", "key-ed"]).contains("ENABLED"));
    assert_eq!(metadata_status(&c, "key-ed"), "ENABLED");
    assert_eq!(encrypt_error(&c, "key-ed"), None);
    let list = p.cli(&["keys", "list"]);
    assert!(list
        .lines()
        .any(|l| l.starts_with("key-ed ") && l.contains("ENABLED")));

    let out = p.cli_raw(&["keys", "disable", "no-such-key"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no secret key labelled"));
    let out = p.cli_raw(&["keys", "show", "bad/id"]);
    assert_eq!(out.status.code(), Some(2));
}

/// `keys disable` / `enable` reach every key manager by default and report
/// each; `rotate` creates the version once and checks that the others hold
/// it (replication); any key manager that fails makes the command exit 1.
#[test]
fn keys_commands_reach_every_key_manager_and_report_each() {
    use common::network_hsm::{two_tokens, SHARED_KEY};
    let p = Proxy::start_with(two_tokens());
    let out = p.cli(&["keys", "disable", SHARED_KEY]);
    assert!(
        out.contains(&format!("token-a: {SHARED_KEY}: DISABLED")),
        "{out}"
    );
    assert!(
        out.contains(&format!("token-b: {SHARED_KEY}: DISABLED")),
        "{out}"
    );
    for backend in ["token-a", "token-b"] {
        let shown = p.cli(&["keys", "show", SHARED_KEY, "--backend", backend, "--json"]);
        assert!(
            shown.contains("\"keyStatus\":\"DISABLED\""),
            "{backend}: {shown}"
        );
    }
    assert_eq!(metadata_status(&p.h1(), SHARED_KEY), "DISABLED");
    let out = p.cli(&["keys", "enable", SHARED_KEY]);
    assert_eq!(out.matches(": ENABLED").count(), 2, "{out}");
    // Limited to one key manager with --backend.
    let out = p.cli(&["keys", "disable", SHARED_KEY, "--backend", "token-b"]);
    assert!(
        !out.contains("token-a") && out.contains("DISABLED"),
        "{out}"
    );
    p.cli(&["keys", "enable", SHARED_KEY, "--backend", "token-b"]);

    // Two separate tokens do not replicate: rotate says so and fails.
    let out = p.cli_raw(&["keys", "rotate", SHARED_KEY]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("token-a: shared-key: version 1 created"),
        "{text}"
    );
    assert!(
        text.contains("token-b: FAILED") && text.contains("missing here"),
        "{text}"
    );

    // A key manager that cannot be reached fails the command, after the
    // others were done.
    let dir = p.hsm.token_dir("second-hsm");
    std::fs::rename(&dir, p.dir.path().join("away")).unwrap();
    let out = p.cli_raw(&["keys", "disable", SHARED_KEY]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("token-a: {SHARED_KEY}: DISABLED")),
        "{text}"
    );
    assert!(text.contains("token-b: FAILED"), "{text}");
    std::fs::rename(p.dir.path().join("away"), &dir).unwrap();
}
