//! The pipeline in-process, against a scripted key service: the order of
//! checks, every fault's answer, and what each operation sends back. The
//! requests are signed by the project's own client exactly as KMS signs;
//! the end-to-end tests (`tests/`) run the same pipeline on a real SoftHSM
//! token over real TLS.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use axum::body::Body;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use tower_service::Service;
use zeroize::Zeroizing;

use tokio::sync::Semaphore;

use super::{router, AppState, KeyService};
use xks_audit::{AuditConfig, AuditTrail, OnFailure};
use xks_client::{bodies, client_tls, HttpVersion, XksClient};
use xks_guard::authz::Mode;
use xks_guard::sigv4::Credential;
use xks_guard::throttle::RateLimit;
use xks_hsm::{EkmInfo, EkmStatus, Fault, KeyAttributes, KeySpec, Usages};
use xks_lockdown::{Lock, LockBoard};
use xks_net::limits::{ConnLimits, Registry};
use xks_spec::aead::AadLayout;
use xks_spec::wire::{DecryptInput, DecryptOutput, EncryptInput, EncryptOutput};
use xks_state::{AllowedKeys, KeyStoreConfig, Live, PolicySource, ServiceConfig};
use xks_telemetry::metrics::Metrics;

const URI_PATH: &str = "/unit/kms/xks/v1";
const AKID: &str = "UNITTESTACCESSKEYAAAA";
const SECRET: &str = "unit-test-secret-of-some-length-0123456789";
const HEALTH_KEY: &str = "xks-proxy-health-check";
const KEY: &str = "key-1";

/// A key service that answers what it is told and counts its calls, so a
/// test can tell whether a request reached the key managers at all.
#[derive(Default)]
struct Scripted {
    /// The fault every key operation returns, if set.
    fault: Mutex<Option<Fault>>,
    /// Each key manager's status for GetHealthStatus and `/ping`.
    statuses: Mutex<Vec<EkmStatus>>,
    calls: AtomicUsize,
    /// What GetKeyMetadata reports as the key's own state.
    enabled: std::sync::atomic::AtomicBool,
}

impl Scripted {
    fn answer<T>(&self, ok: T) -> Result<T, Fault> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.fault.lock().unwrap().clone() {
            Some(f) => Err(f),
            None => Ok(ok),
        }
    }
}

impl KeyService for Scripted {
    async fn key_info(&self, _: &str) -> Result<KeyAttributes, Fault> {
        self.answer(KeyAttributes {
            spec: KeySpec::Aes(256),
            usages: Usages {
                encrypt: true,
                decrypt: true,
                ..Usages::default()
            },
            enabled: self.enabled.load(Ordering::SeqCst),
        })
    }

    async fn encrypt(&self, _: &str, input: EncryptInput) -> Result<EncryptOutput, Fault> {
        // Not encryption: the pipeline only carries bytes, and the test
        // checks that they arrive where the spec puts them.
        self.answer(EncryptOutput {
            ciphertext: input.plaintext.to_vec(),
            iv: vec![1; 12],
            tag: vec![2; 16],
            metadata: vec![],
            cdiv: None,
        })
    }

    async fn decrypt(&self, _: &str, input: DecryptInput) -> Result<DecryptOutput, Fault> {
        self.answer(DecryptOutput {
            plaintext: Zeroizing::new(input.ciphertext),
            layout: AadLayout::Spec,
        })
    }

    fn health(&self) -> Vec<(Arc<EkmInfo>, EkmStatus)> {
        self.statuses
            .lock()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let info = EkmInfo {
                    vendor: "Unit".into(),
                    id: format!("ekm-{i}"),
                    model: "Scripted".into(),
                };
                (Arc::new(info), *s)
            })
            .collect()
    }
}

/// How the test key store is set up.
#[derive(Default)]
struct Setup {
    rate_limit: Option<RateLimit>,
    /// Cedar policies; `None`: no secondary authorization.
    policies: Option<&'static str>,
    replay_protection: bool,
    /// An audit trail (unsealed: seals need the HSM) in this directory.
    audit: Option<(PathBuf, OnFailure, usize)>,
    /// The lock markers have not been read yet.
    locks_unread: bool,
}

struct Harness {
    app: Arc<AppState<Scripted>>,
    router: axum::Router,
    client: XksClient,
}

fn harness(setup: Setup) -> Harness {
    let store = KeyStoreConfig {
        name: "unit".into(),
        uri_path: URI_PATH.into(),
        keys: AllowedKeys::Only(HashSet::from([KEY.to_string(), HEALTH_KEY.to_string()])),
        credentials: vec![Credential {
            access_key_id: AKID.into(),
            secret: Zeroizing::new(SECRET.into()),
            secret_file: None,
            created: None,
        }],
        authorization: setup.policies.map(|text| PolicySource {
            file: PathBuf::from("unit.cedar"),
            text: text.into(),
            mode: Mode::Enforce,
        }),
        rate_limit: setup.rate_limit,
        compat: None,
        region: None,
        replay_protection: setup.replay_protection,
    };
    let service = ServiceConfig {
        max_body_bytes: 4096,
        fleet_size: 2,
        vendor: "Unit vendor".into(),
        model: "Unit model".into(),
    };
    let live = Live::build(&[store], &service, HEALTH_KEY, None).unwrap();
    let keys = Scripted::default();
    keys.statuses.lock().unwrap().push(EkmStatus::Active);
    let metrics = Metrics::new();
    let audit = setup.audit.map(|(dir, on_failure, queue_records)| {
        let cfg = AuditConfig {
            dir,
            instance_id: None,
            on_failure,
            seal_every_records: 1000,
            seal_every: Duration::from_secs(3600),
            rotate_bytes: 1 << 20,
            rotate_every: Duration::from_secs(3600),
            compress: Default::default(),
            queue_records,
            seal_key_label: "seal".into(),
            create_seal_key: false,
        };
        Arc::new(AuditTrail::start(&cfg, "unit".into(), None, &metrics).unwrap())
    });
    let app = Arc::new(AppState {
        live: Arc::new(ArcSwap::from_pointee(live)),
        keys,
        health_key: HEALTH_KEY.into(),
        body_timeout: Duration::from_secs(5),
        body_budget: Arc::new(Semaphore::new(1 << 20)),
        metrics,
        xks_conns: Registry::new(
            "xks",
            ConnLimits {
                max: 16,
                per_source: 16,
                evict_unauthenticated: true,
            },
        ),
        log_limiter: Default::default(),
        audit,
        locks: {
            // Read, and empty: no lock in force.
            let board = LockBoard::default();
            if !setup.locks_unread {
                board.set(Vec::new());
            }
            Arc::new(board)
        },
        seal_key: Some("seal".into()),
    });
    let tls = client_tls(rustls::RootCertStore::empty(), &[b"http/1.1"], None).unwrap();
    let client = XksClient::new(
        "127.0.0.1:443".parse().unwrap(),
        "xks.example.com",
        URI_PATH,
        AKID,
        SECRET,
        "us-east-1",
        tls,
        HttpVersion::Http1,
    );
    Harness {
        router: router(app.clone()),
        app,
        client,
    }
}

/// An answer: status, `errorName` (if any) and the JSON body.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    error_name: Option<String>,
    json: serde_json::Value,
}

impl Harness {
    async fn send(&self, req: http::Request<Body>) -> Answer {
        let response = self.router.clone().call(req).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let error_name = json["errorName"].as_str().map(str::to_string);
        Answer {
            status,
            error_name,
            json,
        }
    }

    /// A request signed as KMS signs it, to `<uri path><suffix>`.
    async fn call(&self, suffix: &str, body: impl Into<Bytes>) -> Answer {
        let req = self
            .client
            .signed_request(suffix, body.into(), SystemTime::now())
            .unwrap();
        self.send(req.map(Body::new)).await
    }

    /// The same, with the signature of another secret.
    async fn call_forged(&self, suffix: &str, body: impl Into<Bytes>) -> Answer {
        let forger = self.client.with_credentials(AKID, "not-the-secret");
        let req = forger
            .signed_request(suffix, body.into(), SystemTime::now())
            .unwrap();
        self.send(req.map(Body::new)).await
    }

    fn key_calls(&self) -> usize {
        self.app.keys.calls.load(Ordering::SeqCst)
    }
}

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn encrypt_body() -> Vec<u8> {
    bodies::encrypt(b"unit plaintext", Some(b"aad"), false)
}

fn expect(a: &Answer, status: u16, error_name: &str) {
    assert_eq!(
        (a.status.as_u16(), a.error_name.as_deref()),
        (status, Some(error_name)),
        "{a:?}"
    );
}

/// Cedar: only Decrypt is allowed.
#[cfg(feature = "authorization")]
const DECRYPT_ONLY: &str = r#"permit (principal, action == Xks::Action::"Decrypt", resource);"#;

/// A harness whose policies allow only Decrypt.
#[cfg(feature = "authorization")]
fn decrypt_only() -> Harness {
    harness(Setup {
        policies: Some(DECRYPT_ONLY),
        ..Setup::default()
    })
}

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
