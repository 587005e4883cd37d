//! The pipeline in-process, against a scripted key service: the order of
//! checks, every fault's answer, and what each operation sends back. The
//! requests are signed by the project's own client exactly as KMS signs;
//! the end-to-end tests (`tests/`) run the same pipeline on a real SoftHSM
//! token over real TLS.
//!
//! This module holds the harness (the scripted key service, the key store
//! set-up, signed calls); the tests are in [`pipeline`] (the order of the
//! checks), [`answers`] (faults and answers), [`lockdown`] and [`audit`].

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
use xks_lockdown::LockBoard;
use xks_net::limits::{ConnLimits, Registry};
use xks_spec::aead::AadLayout;
use xks_spec::wire::{DecryptInput, DecryptOutput, EncryptInput, EncryptOutput};
use xks_state::{AllowedKeys, KeyStoreConfig, Live, PolicySource, ServiceConfig};
use xks_telemetry::metrics::Metrics;

mod answers;
mod audit;
mod lockdown;
mod pipeline;

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
