//! What the answers say: every fault of the key service gets the answer the
//! XKS spec gives it, each operation sends back what the key service said,
//! and `/ping` follows the best key manager.

use super::*;

#[test]
fn every_fault_gets_the_spec_answer() {
    let ekm = || "ekm-0".to_string();
    let cases: Vec<(Fault, u16, &str)> = vec![
        (
            Fault::KeyNotFound {
                key: KEY.into(),
                ekm: ekm(),
            },
            404,
            "KeyNotFoundException",
        ),
        (
            Fault::KeyDisabled { key: KEY.into() },
            400,
            "InvalidStateException",
        ),
        (
            Fault::WrongUsage("the key does not allow ENCRYPT".into()),
            400,
            "InvalidKeyUsageException",
        ),
        (Fault::BadCiphertext, 400, "InvalidCiphertextException"),
        (
            Fault::UnknownVersion {
                key: KEY.into(),
                version: 9,
            },
            400,
            "InvalidCiphertextException",
        ),
        (Fault::Busy { ekm: ekm() }, 429, "ThrottlingException"),
        (
            Fault::NoSession { ekm: ekm() },
            503,
            "DependencyTimeoutException",
        ),
        (
            Fault::Timeout { ekm: ekm() },
            503,
            "DependencyTimeoutException",
        ),
        (
            Fault::Unavailable {
                ekm: ekm(),
                why: "token lost".into(),
            },
            500,
            "InternalException",
        ),
        (
            Fault::Failed {
                ekm: ekm(),
                why: "CKR_GENERAL_ERROR".into(),
            },
            500,
            "InternalException",
        ),
    ];
    run(async {
        let h = harness(Setup::default());
        let encrypted = h
            .call(&format!("/keys/{KEY}/encrypt"), encrypt_body())
            .await;
        assert_eq!(encrypted.status, StatusCode::OK);
        let decrypt_body = bodies::decrypt_from(&encrypted.json, Some(b"aad")).to_string();
        for (fault, status, name) in cases {
            let message = fault.to_string();
            *h.app.keys.fault.lock().unwrap() = Some(fault);
            for (op, body) in [
                ("metadata", bodies::metadata()),
                ("encrypt", encrypt_body()),
                ("decrypt", decrypt_body.clone().into_bytes()),
            ] {
                let a = h.call(&format!("/keys/{KEY}/{op}"), body).await;
                expect(&a, status, name);
                assert_eq!(
                    a.json["errorMessage"].as_str(),
                    Some(message.as_str()),
                    "{op}"
                );
            }
        }
    });
}

#[test]
fn answers_carry_what_the_key_service_said() {
    run(async {
        let h = harness(Setup::default());
        let a = h
            .call(&format!("/keys/{KEY}/metadata"), bodies::metadata())
            .await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(
            a.json,
            serde_json::json!({"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"],
                "keyStatus": "DISABLED"})
        );

        let e = h
            .call(&format!("/keys/{KEY}/encrypt"), encrypt_body())
            .await;
        assert_eq!(e.status, StatusCode::OK);
        assert_eq!(e.json["initializationVector"], "AQEBAQEBAQEBAQEB");
        assert!(e.json.get("ciphertextMetadata").is_none(), "{:?}", e.json);
        let d = h
            .call(
                &format!("/keys/{KEY}/decrypt"),
                bodies::decrypt_from(&e.json, Some(b"aad")).to_string(),
            )
            .await;
        assert_eq!(d.json["plaintext"], e.json["ciphertext"]);

        h.app.keys.statuses.lock().unwrap()[0] = EkmStatus::Unavailable;
        h.app
            .keys
            .statuses
            .lock()
            .unwrap()
            .push(EkmStatus::Degraded);
        let health = h
            .call("/health", bodies::health("ConnectCustomKeyStore"))
            .await;
        assert_eq!(health.status, StatusCode::OK, "UNAVAILABLE is still a 200");
        assert_eq!(
            health.json,
            serde_json::json!({
                "xksProxyFleetSize": 2, "xksProxyVendor": "Unit vendor",
                "xksProxyModel": "Unit model", "ekmVendor": "Unit",
                "ekmFleetDetails": [
                    {"id": "ekm-0", "model": "Scripted", "healthStatus": "UNAVAILABLE"},
                    {"id": "ekm-1", "model": "Scripted", "healthStatus": "DEGRADED"}]})
        );
    });
}

#[test]
fn ping_follows_the_best_key_manager() {
    run(async {
        let h = harness(Setup::default());
        let ping = |h: &Harness| {
            let req = http::Request::get("/ping").body(Body::empty()).unwrap();
            let router = h.router.clone();
            async move { router.clone().call(req).await.unwrap().status() }
        };
        assert_eq!(ping(&h).await, StatusCode::OK);
        *h.app.keys.statuses.lock().unwrap() = vec![EkmStatus::Unavailable, EkmStatus::Degraded];
        assert_eq!(ping(&h).await, StatusCode::OK);
        *h.app.keys.statuses.lock().unwrap() = vec![EkmStatus::Unavailable];
        assert_eq!(ping(&h).await, StatusCode::SERVICE_UNAVAILABLE);
        h.app.keys.statuses.lock().unwrap().clear();
        assert_eq!(ping(&h).await, StatusCode::SERVICE_UNAVAILABLE);
    });
}
