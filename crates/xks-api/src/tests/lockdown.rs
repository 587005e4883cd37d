//! Lockdown in the pipeline: Encrypt and Decrypt wait until the lock markers
//! have been read, and a locked key store refuses them and reports its keys
//! disabled.

use super::*;
use xks_lockdown::Lock;

/// Before the lock markers were ever read, the locks in force are unknown:
/// Encrypt and Decrypt are refused (a kill switch must not fail open),
/// GetKeyMetadata and health answer.
#[test]
fn encrypt_waits_until_the_locks_have_been_read() {
    run(async {
        let h = harness(Setup {
            locks_unread: true,
            ..Setup::default()
        });
        let calls = h.key_calls();
        let a = h
            .call(&format!("/keys/{KEY}/encrypt"), encrypt_body())
            .await;
        expect(&a, 503, "DependencyTimeoutException");
        assert!(a.json["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("lockdown markers have not been read")));
        assert_eq!(h.key_calls(), calls, "nothing reached the key managers");
        let m = h
            .call(&format!("/keys/{KEY}/metadata"), bodies::metadata())
            .await;
        assert_eq!(m.status, StatusCode::OK, "{m:?}");
        h.app.locks.set(Vec::new());
        let a = h
            .call(&format!("/keys/{KEY}/encrypt"), encrypt_body())
            .await;
        assert_eq!(a.status, StatusCode::OK, "{a:?}");
    });
}

#[test]
fn a_locked_key_store_refuses_encrypt_and_decrypt_and_reports_disabled() {
    run(async {
        let h = harness(Setup::default());
        let encrypted = h
            .call(&format!("/keys/{KEY}/encrypt"), encrypt_body())
            .await;
        assert_eq!(encrypted.status, StatusCode::OK);
        let calls = h.key_calls();
        let lock = Lock::new("unit", "credentials leaked", None, "ops@test");
        h.app.locks.set(vec![lock.clone()]);
        let a = h
            .call(&format!("/keys/{KEY}/encrypt"), encrypt_body())
            .await;
        expect(&a, 400, "InvalidStateException");
        assert!(
            a.json["errorMessage"]
                .as_str()
                .is_some_and(|m| m.contains(&lock.id) && m.contains("credentials leaked")),
            "{a:?}"
        );
        let decrypt = bodies::decrypt_from(&encrypted.json, Some(b"aad")).to_string();
        let a = h
            .call(&format!("/keys/{KEY}/decrypt"), decrypt.clone())
            .await;
        expect(&a, 400, "InvalidStateException");
        assert_eq!(h.key_calls(), calls, "nothing reached the key managers");
        // GetKeyMetadata answers, with the (enabled) key DISABLED; health
        // is unaffected.
        h.app.keys.enabled.store(true, Ordering::SeqCst);
        let m = h
            .call(&format!("/keys/{KEY}/metadata"), bodies::metadata())
            .await;
        assert_eq!(m.status, StatusCode::OK);
        assert_eq!(m.json["keyStatus"], "DISABLED");
        let health = h.call("/health", bodies::health("KmsHealthCheck")).await;
        assert_eq!(health.status, StatusCode::OK);
        // A lock on every key store, then none.
        h.app
            .locks
            .set(vec![Lock::new("*", "all", None, "ops@test")]);
        let a = h
            .call(&format!("/keys/{KEY}/encrypt"), encrypt_body())
            .await;
        expect(&a, 400, "InvalidStateException");
        h.app.locks.set(vec![]);
        let a = h.call(&format!("/keys/{KEY}/decrypt"), decrypt).await;
        assert_eq!(a.status, StatusCode::OK, "{a:?}");
        let m = h
            .call(&format!("/keys/{KEY}/metadata"), bodies::metadata())
            .await;
        assert_eq!(m.json["keyStatus"], "ENABLED");
    });
}
