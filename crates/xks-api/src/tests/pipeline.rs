//! The order of the checks: the path before anything else, the method
//! before the signature, an oversized body before the signature, the
//! signature and replays before the quota, the key id before the body, the
//! body before authorization (Cedar, with the `authorization` feature);
//! health checks are never authorized away.
use super::*;

#[test]
fn the_path_is_checked_before_anything_else() {
    run(async {
        let h = harness(Setup::default());
        let a = h.call_forged("/../other/health", "{not json").await;
        expect(&a, 404, "InvalidUriPathException");
        let wrong_store = h.client.with_uri_path("/nobody/kms/xks/v1");
        let req = wrong_store
            .signed_request("/health", Bytes::from_static(b"{}"), SystemTime::now())
            .unwrap();
        expect(
            &h.send(req.map(Body::new)).await,
            404,
            "InvalidUriPathException",
        );
    });
}

#[test]
fn the_method_is_checked_before_the_signature() {
    run(async {
        let h = harness(Setup::default());
        let req = h
            .client
            .with_credentials(AKID, "not-the-secret")
            .signed_request_raw(
                "GET",
                &format!("{URI_PATH}/health"),
                Bytes::new(),
                SystemTime::now(),
            )
            .unwrap();
        let a = h.send(req.map(Body::new)).await;
        expect(&a, 405, "ValidationException");
    });
}

#[test]
fn an_oversized_body_is_refused_before_the_signature_is_checked() {
    run(async {
        let h = harness(Setup::default());
        let big = vec![b' '; 8192];
        let a = h.call_forged(&format!("/keys/{KEY}/encrypt"), big).await;
        expect(&a, 501, "UnsupportedOperationException");
        assert_eq!(h.key_calls(), 0);
    });
}

#[test]
fn the_signature_is_checked_before_the_quota() {
    run(async {
        let h = harness(Setup {
            rate_limit: Some(RateLimit {
                per_second: 0.001,
                burst: 1.0,
            }),
            ..Setup::default()
        });
        let path = format!("/keys/{KEY}/encrypt");
        // A forged request costs the key store nothing...
        expect(
            &h.call_forged(&path, encrypt_body()).await,
            401,
            "AuthenticationFailedException",
        );
        // ...so the one token of the bucket is still there for the holder.
        assert_eq!(h.call(&path, encrypt_body()).await.status, StatusCode::OK);
        // Now the quota is spent: 429 before the key id and the body are
        // looked at, and health checks are exempt.
        let a = h.call("/keys/not-a-key/encrypt", "{not json").await;
        expect(&a, 429, "ThrottlingException");
        let a = h
            .call("/health", bodies::health("ConnectCustomKeyStore"))
            .await;
        assert_eq!(a.status, StatusCode::OK, "{a:?}");
        assert_eq!(h.key_calls(), 1);
    });
}

#[test]
fn a_replayed_request_is_refused_before_the_quota() {
    run(async {
        let h = harness(Setup {
            replay_protection: true,
            rate_limit: Some(RateLimit {
                per_second: 0.001,
                burst: 1.0,
            }),
            ..Setup::default()
        });
        let now = SystemTime::now();
        let signed = || {
            let body = Bytes::from(encrypt_body());
            let req = h
                .client
                .signed_request(&format!("/keys/{KEY}/encrypt"), body, now);
            req.unwrap().map(Body::new)
        };
        assert_eq!(h.send(signed()).await.status, StatusCode::OK);
        // The same signature again: 401, and the quota (spent) is not what
        // answers, because a replay is not the key store holder's request.
        let a = h.send(signed()).await;
        expect(&a, 401, "AuthenticationFailedException");
        assert_eq!(h.key_calls(), 1);
    });
}

#[test]
fn the_key_id_is_checked_before_the_body() {
    run(async {
        let h = harness(Setup::default());
        for key in ["not-a-key", HEALTH_KEY, "..", "bad%20id"] {
            let a = h.call(&format!("/keys/{key}/encrypt"), "{not json").await;
            expect(&a, 404, "KeyNotFoundException");
        }
        assert_eq!(h.key_calls(), 0);
    });
}

#[cfg(feature = "authorization")]
#[test]
fn the_body_is_validated_before_authorization() {
    run(async {
        let h = decrypt_only();
        let path = format!("/keys/{KEY}/encrypt");
        expect(
            &h.call(&path, "{not json").await,
            400,
            "ValidationException",
        );
        let no_arn = bodies::encrypt(b"x", None, false);
        let no_arn = String::from_utf8(no_arn)
            .unwrap()
            .replace("\"kmsKeyArn\"", "\"someOtherField\"");
        expect(&h.call(&path, no_arn).await, 400, "ValidationException");
        // Valid, but the policies allow only Decrypt.
        expect(
            &h.call(&path, encrypt_body()).await,
            403,
            "AccessDeniedException",
        );
        assert_eq!(h.key_calls(), 0);
    });
}

#[cfg(feature = "authorization")]
#[test]
fn health_checks_are_never_authorized_away() {
    run(async {
        let h = decrypt_only();
        let a = h
            .call("/health", bodies::health("ConnectCustomKeyStore"))
            .await;
        assert_eq!(a.status, StatusCode::OK, "{a:?}");
        // ...but they still need their request metadata.
        expect(&h.call("/health", "{}").await, 400, "ValidationException");
    });
}
