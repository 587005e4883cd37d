//! How the proxy reacts when the token changes under it: keys that are not
//! AES-256, keys deleted and recreated (stale cached handles), and the health
//! check key disappearing (a real UNAVAILABLE and recovery).

mod common;

use std::time::{Duration, Instant};

use common::*;
use xks_proxy::client::{bodies, XksClient, XksResponse};

async fn encrypt(c: &XksClient, key: &str) -> XksResponse {
    c.call(
        &format!("/keys/{key}/encrypt"),
        bodies::encrypt(b"data key", None, true),
    )
    .await
    .unwrap()
}

#[test]
fn keys_that_are_not_aes_256_are_never_used() {
    let p = Proxy::start();
    p.pkcs11_tool(&["--keygen", "--key-type", "AES:16", "--label", "aes128-key"]);
    p.pkcs11_tool(&[
        "--keygen",
        "--key-type",
        "GENERIC:32",
        "--label",
        "generic-key",
    ]);
    block_on(async {
        let c = p.h1();
        for key in ["aes128-key", "generic-key"] {
            let r = c
                .call(&format!("/keys/{key}/metadata"), bodies::metadata())
                .await
                .unwrap();
            assert_eq!(r.status, 404, "{key}: {:?}", r.body);
            assert_eq!(r.error_name().as_deref(), Some("KeyNotFoundException"));
            assert!(r.json()["errorMessage"]
                .as_str()
                .unwrap()
                .contains("not an AES-256"));
            let r = encrypt(&c, key).await;
            assert_eq!(
                r.error_name().as_deref(),
                Some("KeyNotFoundException"),
                "{key}"
            );
        }
    });
}

#[test]
fn a_key_replaced_in_the_hsm_is_found_again() {
    let p = Proxy::start();
    block_on(async {
        let c = p.h1();
        let old = encrypt(&c, "key-ed").await;
        assert_eq!(old.status, 200);
        // Replace the key behind the proxy's back; its cached handle is now stale.
        p.pkcs11_tool(&["--delete-object", "--type", "secrkey", "--label", "key-ed"]);
        let r = encrypt(&c, "key-ed").await;
        assert_eq!(
            r.error_name().as_deref(),
            Some("KeyNotFoundException"),
            "{:?}",
            r.body
        );
        p.cli(&["keys", "create", "--label", "key-ed"]);
        let r = encrypt(&c, "key-ed").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        // New key material: the old ciphertext no longer authenticates.
        let r = c
            .call(
                "/keys/key-ed/decrypt",
                bodies::decrypt_from(&old.json(), None).to_string(),
            )
            .await
            .unwrap();
        assert_eq!(
            r.error_name().as_deref(),
            Some("InvalidCiphertextException")
        );
    });
}

async fn health_status(p: &Proxy) -> (u16, Option<String>) {
    let r = p
        .h1()
        .call("/health", bodies::health("KmsHealthCheck"))
        .await
        .unwrap();
    let status = r.json()["ekmFleetDetails"][0]["healthStatus"]
        .as_str()
        .map(str::to_owned);
    (r.status.as_u16(), status.or_else(|| r.error_name()))
}

fn ping(p: &Proxy) -> String {
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-w",
            " %{http_code}",
            &format!("http://{}/ping", p.ping_addr),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).replace('\n', "")
}

async fn wait_for(p: &Proxy, want: (u16, &str)) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = health_status(p).await;
        if got.0 == want.0 && got.1.as_deref() == Some(want.1) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health stayed {got:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn health_goes_unavailable_and_recovers_without_restart() {
    let p = Proxy::start_with(Options {
        health_interval_secs: 1,
        ..Options::default()
    });
    block_on(async {
        wait_for(&p, (200, "ACTIVE")).await;
        assert_eq!(ping(&p), "ok 200");
        // The deep probe fails once its key is gone: the HSM cannot do crypto for us.
        p.delete_health_key();
        wait_for(&p, (503, "DependencyTimeoutException")).await;
        assert_eq!(ping(&p), "unavailable 503");
        p.cli(&["keys", "create", "--label", HEALTH_KEY]);
        wait_for(&p, (200, "ACTIVE")).await;
        assert_eq!(ping(&p), "ok 200");
    });
}
