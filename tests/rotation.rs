//! Key rotation: `keys rotate` makes a new version of an external key; Encrypt
//! moves to it and says so in `ciphertextMetadata`; every earlier ciphertext
//! still decrypts with the version its metadata names.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::*;
use serde_json::Value;
use xks_proxy::client::{bodies, XksClient};

const AAD: &[u8] = b"encryption context";

fn encrypt(c: &XksClient, plaintext: &[u8]) -> Value {
    block_on(async {
        let r = c
            .call(
                "/keys/key-ed/encrypt",
                bodies::encrypt(plaintext, Some(AAD), true),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.json()
    })
}

fn decrypt(c: &XksClient, body: &Value) -> (u16, Value) {
    block_on(async {
        let r = c
            .call("/keys/key-ed/decrypt", body.to_string())
            .await
            .unwrap();
        (r.status.as_u16(), r.json())
    })
}

fn metadata(v: &Value) -> Vec<u8> {
    B64.decode(v["ciphertextMetadata"].as_str().unwrap())
        .unwrap()
}

#[test]
fn rotated_keys_encrypt_with_the_newest_version_and_decrypt_every_version() {
    let p = Proxy::start_with(Options {
        extra_hsm: "key_cache_ttl_ms = 100".into(),
        ..Options::default()
    });
    let c = p.h1();
    let before = encrypt(&c, b"data key 0");
    assert_eq!(metadata(&before), vec![0x01], "never rotated: layout 1");

    assert!(p
        .cli(&["keys", "rotate", "key-ed"])
        .contains("version 1 created"));
    assert!(eventually(5, || metadata(&encrypt(&c, b"x")) == vec![0x02, 0, 0, 0, 1]));
    let v1 = encrypt(&c, b"data key 1");
    p.cli(&["keys", "rotate", "key-ed"]);
    assert!(eventually(5, || metadata(&encrypt(&c, b"x")) == vec![0x02, 0, 0, 0, 2]));
    let v2 = encrypt(&c, b"data key 2");
    // Every ciphertext decrypts with the version its metadata names.
    for (enc, plaintext) in [
        (&before, &b"data key 0"[..]),
        (&v1, b"data key 1"),
        (&v2, b"data key 2"),
    ] {
        let (status, body) = decrypt(&c, &bodies::decrypt_from(enc, Some(AAD)));
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            B64.decode(body["plaintext"].as_str().unwrap()).unwrap(),
            plaintext
        );
    }

    // The version is bound into the tag: pointing v1's ciphertext at another
    // version, or at one that does not exist, is an invalid ciphertext.
    for forged in [vec![0x02, 0, 0, 0, 2], vec![0x01], vec![0x02, 0, 0, 0, 9]] {
        let mut body = bodies::decrypt_from(&v1, Some(AAD));
        body["ciphertextMetadata"] = B64.encode(&forged).into();
        let (status, r) = decrypt(&c, &body);
        assert_eq!(status, 400, "{forged:?}: {r}");
        assert_eq!(r["errorName"], "InvalidCiphertextException", "{forged:?}");
    }

    // GetKeyMetadata still answers for the external key id; version keys
    // cannot be addressed through the API; the CLI shows the version.
    let md = block_on(async {
        c.call("/keys/key-ed/metadata", bodies::metadata())
            .await
            .unwrap()
    });
    assert_eq!(md.status, 200);
    assert_eq!(md.json()["keyStatus"], "ENABLED");
    let direct = block_on(async {
        c.call("/keys/key-ed%231/metadata", bodies::metadata())
            .await
            .unwrap()
    });
    assert_eq!(direct.status, 404);
    let list = p.cli(&["keys", "list", "--json"]);
    let ed: Value = list
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|k| k["id"] == "key-ed")
        .unwrap();
    assert_eq!(ed["latestVersion"], 2);
    assert!(
        !list.contains("key-ed#"),
        "version keys are not listed as keys"
    );

    // Disabling the external key disables every version.
    p.cli(&["keys", "disable", "key-ed"]);
    assert!(eventually(5, || {
        decrypt(&c, &bodies::decrypt_from(&v1, Some(AAD))).1["errorName"] == "InvalidStateException"
    }));
    let (_, r) = decrypt(&c, &bodies::decrypt_from(&before, Some(AAD)));
    assert_eq!(r["errorName"], "InvalidStateException");
    p.cli(&["keys", "enable", "key-ed"]);
    assert!(eventually(5, || decrypt(
        &c,
        &bodies::decrypt_from(&v2, Some(AAD))
    )
    .0 == 200));
}
