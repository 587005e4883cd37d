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
fn keys_that_are_not_aes_256_are_described_but_never_used() {
    let p = Proxy::start();
    p.pkcs11_tool(&["--keygen", "--key-type", "AES:16", "--label", "aes128-key"]);
    p.pkcs11_tool(&[
        "--keygen",
        "--key-type",
        "GENERIC:32",
        "--label",
        "generic-key",
    ]);
    p.pkcs11_tool(&[
        "--keypairgen",
        "--key-type",
        "rsa:2048",
        "--label",
        "rsa-key",
    ]);
    p.pkcs11_tool(&[
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "ec-key",
    ]);
    block_on(async {
        let c = p.h1();
        for (key, spec) in [
            ("aes128-key", "AES_128"),
            ("generic-key", "GENERIC_SECRET_256"),
            ("rsa-key", "RSA_2048"),
            ("ec-key", "ECC_NIST_P256"),
        ] {
            // GetKeyMetadata tells KMS what the key is, so CreateKey fails
            // with "not a 256-bit symmetric key" rather than "not found".
            let r = c
                .call(&format!("/keys/{key}/metadata"), bodies::metadata())
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{key}: {:?}", r.body);
            assert_eq!(r.json()["keySpec"], spec, "{key}");
            assert_eq!(r.json()["keyStatus"], "ENABLED", "{key}");
            // ...and the key is never used for cryptography.
            let r = encrypt(&c, key).await;
            assert_eq!(
                r.error_name().as_deref(),
                Some("InvalidKeyUsageException"),
                "{key}: {:?}",
                r.body
            );
            assert!(
                r.json()["errorMessage"].as_str().unwrap().contains(spec),
                "{:?}",
                r.body
            );
            let r = c
                .call(
                    &format!("/keys/{key}/decrypt"),
                    bodies::decrypt_from(
                        &serde_json::json!({
                            "ciphertext": "Y3Q=",
                            "initializationVector": "MDEyMzQ1Njc4OWFi",
                            "authenticationTag": "MDEyMzQ1Njc4OWFiY2RlZg==",
                        }),
                        None,
                    )
                    .to_string(),
                )
                .await
                .unwrap();
            assert_eq!(
                r.error_name().as_deref(),
                Some("InvalidKeyUsageException"),
                "{key}: {:?}",
                r.body
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
        // GetHealthStatus tells KMS the truth with a 200; /ping drains the instance.
        wait_for(&p, (200, "UNAVAILABLE")).await;
        assert_eq!(ping(&p), "unavailable 503");
        p.cli(&["keys", "create", "--label", HEALTH_KEY]);
        wait_for(&p, (200, "ACTIVE")).await;
        assert_eq!(ping(&p), "ok 200");
    });
}

/// A proxy whose HSM generates the GCM IVs itself (`mode` of the filter
/// module: "parameter", "appended", or "none" for plain SoftHSM).
fn proxy_with_hsm_ivs(dir: &std::path::Path, iv_source: &str, mode: &'static str) -> Proxy {
    let module = vendor_module(dir);
    Proxy::start_with(Options {
        module: module.to_str().unwrap().to_string(),
        extra_hsm: format!("iv_source = \"{iv_source}\""),
        setup: Some(std::sync::Arc::new(move |_, hsm: &TestToken| {
            vec![
                ("XKS_TEST_IVGEN_MODE".to_string(), mode.to_string()),
                ("XKS_TEST_IVGEN_TARGET".to_string(), hsm.module()),
            ]
        })),
        ..Options::default()
    })
}

#[test]
fn ivs_generated_by_the_hsm_in_either_shape() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = tempfile::tempdir().unwrap();
    for (iv_source, mode) in [
        ("hsm-generated", "parameter"),
        ("hsm-generated-appended", "appended"),
    ] {
        let p = proxy_with_hsm_ivs(dir.path(), iv_source, mode);
        block_on(async {
            let c = p.h2();
            let mut ivs = std::collections::HashSet::new();
            for i in 0..20u8 {
                let plaintext = vec![i; 32];
                let r = c
                    .call(
                        "/keys/key-ed/encrypt",
                        bodies::encrypt(&plaintext, Some(b"ctx"), true),
                    )
                    .await
                    .unwrap();
                assert_eq!(r.status, 200, "{iv_source}: {:?}", r.body);
                let e = r.json();
                let iv = b64
                    .decode(e["initializationVector"].as_str().unwrap())
                    .unwrap();
                assert_eq!(iv.len(), 12, "{iv_source}");
                assert!(iv.iter().any(|b| *b != 0), "{iv_source}: zero IV");
                assert!(ivs.insert(iv), "{iv_source}: an IV came twice");
                let ct = b64.decode(e["ciphertext"].as_str().unwrap()).unwrap();
                assert_eq!(ct.len(), plaintext.len(), "{iv_source}");
                let r = c
                    .call(
                        "/keys/key-ed/decrypt",
                        bodies::decrypt_from(&e, Some(b"ctx")).to_string(),
                    )
                    .await
                    .unwrap();
                assert_eq!(r.status, 200, "{iv_source}: {:?}", r.body);
                assert_eq!(
                    b64.decode(r.json()["plaintext"].as_str().unwrap()).unwrap(),
                    plaintext
                );
            }
            let h = c
                .call("/health", bodies::health("KmsHealthCheck"))
                .await
                .unwrap();
            assert_eq!(h.json()["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");
        });
    }
}

#[test]
fn an_hsm_that_does_not_generate_ivs_never_yields_a_fixed_iv() {
    let dir = tempfile::tempdir().unwrap();
    for iv_source in ["hsm-generated", "hsm-generated-appended"] {
        // Plain SoftHSM behind the filter: it uses whatever IV it is given.
        let p = proxy_with_hsm_ivs(dir.path(), iv_source, "none");
        block_on(async {
            let c = p.h1();
            let r = encrypt(&c, "key-ed").await;
            assert_eq!(r.status, 500, "{iv_source}: {:?}", r.body);
            assert_eq!(r.error_name().as_deref(), Some("InternalException"));
            assert!(
                r.json()["errorMessage"]
                    .as_str()
                    .unwrap()
                    .contains("iv_source"),
                "{iv_source}: {:?}",
                r.body
            );
            // The deep health probe finds it too.
            let h = c
                .call("/health", bodies::health("KmsHealthCheck"))
                .await
                .unwrap();
            assert_eq!(
                h.json()["ekmFleetDetails"][0]["healthStatus"],
                "UNAVAILABLE",
                "{iv_source}: {:?}",
                h.body
            );
        });
    }
}
