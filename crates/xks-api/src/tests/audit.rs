//! The audit trail in the pipeline: a record for every request, with what
//! decided it, and a full trail refusing or counting its losses according to
//! `on_failure`.

use super::*;

/// The records the harness's trail wrote, after closing it.
fn records(h: &Harness, dir: &std::path::Path) -> Vec<serde_json::Value> {
    h.app.audit.as_ref().unwrap().close();
    let mut out = Vec::new();
    for f in xks_audit::verify::expand(&[dir.to_path_buf()]).unwrap() {
        let text = std::fs::read_to_string(f).unwrap();
        out.extend(text.lines().map(|l| serde_json::from_str(l).unwrap()));
    }
    out
}

#[test]
fn every_request_gets_an_audit_record_with_what_decided_it() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let h = harness(Setup {
            audit: Some((dir.path().to_path_buf(), OnFailure::Refuse, 100)),
            rate_limit: Some(RateLimit {
                per_second: 0.001,
                burst: 3.0,
            }),
            ..Setup::default()
        });
        let path = format!("/keys/{KEY}/encrypt");
        assert_eq!(h.call(&path, encrypt_body()).await.status, StatusCode::OK);
        expect(
            &h.call_forged(&path, encrypt_body()).await,
            401,
            "AuthenticationFailedException",
        );
        expect(
            &h.call("/keys/not-a-key/encrypt", encrypt_body()).await,
            404,
            "KeyNotFoundException",
        );
        *h.app.keys.fault.lock().unwrap() = Some(Fault::BadCiphertext);
        expect(
            &h.call(&format!("/keys/{KEY}/decrypt"), "{\"requestMetadata\":{}}")
                .await,
            400,
            "ValidationException",
        );
        // The bucket's burst of 3 is spent: 429 by the quota.
        expect(
            &h.call(&path, encrypt_body()).await,
            429,
            "ThrottlingException",
        );
        let records = records(&h, dir.path());
        let requests: Vec<&serde_json::Value> =
            records.iter().filter(|r| r["type"] == "request").collect();
        assert_eq!(requests.len(), 5, "{records:?}");
        let pick = |status: u64| {
            requests
                .iter()
                .find(|r| r["status"] == status)
                .copied()
                .unwrap_or_else(|| panic!("no record with status {status}: {requests:?}"))
        };
        let ok = pick(200);
        assert_eq!(ok["decision"], "allowed");
        assert_eq!(ok["keyVersion"], 0);
        assert_eq!(ok["kmsRequestId"], "enc-req-1");
        assert_eq!(ok["kmsViaService"], "ebs");
        assert_eq!(ok["accessKeyId"], AKID);
        assert_eq!(ok["operation"], "Encrypt");
        assert!(ok["latencyUs"].as_u64().is_some());
        assert_eq!(pick(401)["deniedBy"], "authentication");
        assert!(pick(401).get("accessKeyId").is_none());
        assert_eq!(pick(404)["deniedBy"], "key-store");
        assert_eq!(pick(400)["deniedBy"], "validation");
        assert_eq!(pick(429)["deniedBy"], "quota");
        assert_eq!(pick(429)["errorName"], "ThrottlingException");
        // Linked from the first record on, and never a secret or the data.
        let text: String = records.iter().map(|r| r.to_string()).collect();
        for secret in [SECRET, "dW5pdCBwbGFpbnRleHQ=", "YWFk"] {
            assert!(!text.contains(secret), "{secret} in the trail");
        }
        assert_eq!(records[0]["prev"], "0".repeat(64));
    });
}

#[test]
fn a_full_trail_refuses_or_counts_according_to_on_failure() {
    for on_failure in [OnFailure::Refuse, OnFailure::Continue] {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let h = harness(Setup {
                audit: Some((dir.path().to_path_buf(), on_failure, 1)),
                ..Setup::default()
            });
            // The one slot is taken and held: the trail cannot take more.
            let held = h.app.audit.as_ref().unwrap().reserve().unwrap();
            let a = h
                .call(&format!("/keys/{KEY}/encrypt"), encrypt_body())
                .await;
            let health = h.call("/health", bodies::health("KmsHealthCheck")).await;
            assert_eq!(health.status, StatusCode::OK, "health is never refused");
            let ping = {
                let req = http::Request::get("/ping").body(Body::empty()).unwrap();
                h.router.clone().call(req).await.unwrap().status()
            };
            match on_failure {
                OnFailure::Refuse => {
                    expect(&a, 503, "DependencyTimeoutException");
                    assert_eq!(h.key_calls(), 0, "no key was used unrecorded");
                    assert_eq!(h.app.metrics.audit_refused.get(), 1);
                    assert_eq!(ping, StatusCode::SERVICE_UNAVAILABLE);
                }
                OnFailure::Continue => {
                    assert_eq!(a.status, StatusCode::OK);
                    assert!(h.app.metrics.audit_lost.get() >= 1);
                    assert_eq!(ping, StatusCode::OK);
                }
            }
            drop(held);
            let records = records(&h, dir.path());
            if on_failure == OnFailure::Continue {
                assert!(
                    records.iter().any(|r| r["type"] == "loss"),
                    "the trail says records are missing: {records:?}"
                );
            }
        });
    }
}
