//! Two key managers holding the same key, one of them a network HSM: a token
//! served by `p11-kit server` and reached through `p11-kit-client.so`. The
//! test kills that server under load and starts it again: requests keep
//! succeeding through the other key manager, each inside KMS's budget, and
//! the proxy recovers the lost one by itself (re-initializing the module).

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use xks_proxy::client::{bodies, ClientError, Connection, XksClient, XksResponse};

const SHARED_KEY: &str = "shared-key";

/// Where `scripts/p11-kit-rpc.sh` built a p11-kit whose RPC protocol carries
/// AES-GCM parameters (Debian 12's 0.24.1 does not; see the script).
fn p11_kit_prefix() -> PathBuf {
    let prefix = std::env::var_os("XKS_P11_KIT_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/p11-kit"));
    assert!(
        prefix.join("libexec/p11-kit/p11-kit-server").exists(),
        "no p11-kit >= 0.25 at {}: run scripts/p11-kit-rpc.sh (scripts/test.sh does)",
        prefix.display()
    );
    prefix
}

/// Starts `p11-kit server` for one SoftHSM token on a unix socket.
fn p11_kit_server(conf: &Path, socket: &Path, token: &str) -> Child {
    let _ = std::fs::remove_file(socket);
    let prefix = p11_kit_prefix();
    let child = Command::new(prefix.join("libexec/p11-kit/p11-kit-server"))
        .args(["-f", "-n"])
        .arg(socket)
        .args(["--provider", SOFTHSM, &format!("pkcs11:token={token}")])
        .env("SOFTHSM2_CONF", conf)
        .env("LD_LIBRARY_PATH", prefix.join("lib"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        // Its own process group: the server forks a child per client
        // connection, and a lost HSM means those connections die too.
        .process_group(0)
        .spawn()
        .expect("p11-kit-server");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "p11-kit server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Kills the server and the per-connection children it forked.
fn kill_group(mut server: Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", server.id())])
        .status();
    let _ = server.wait();
}

fn ekm_statuses(c: &XksClient) -> Vec<(String, String)> {
    block_on(async {
        match c.call("/health", bodies::health("KmsHealthCheck")).await {
            Ok(r) if r.status == 200 => r.json()["ekmFleetDetails"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["id"].as_str().unwrap().to_string(),
                        e["healthStatus"].as_str().unwrap().to_string(),
                    )
                })
                .collect(),
            _ => Vec::new(),
        }
    })
}

/// Asserts the health of both key managers, with the proxy log when wrong.
fn assert_statuses(p: &Proxy, c: &XksClient, local: &str, network: &str) {
    let mut statuses = ekm_statuses(c);
    statuses.sort();
    let expected = [("hsm-local", local), ("hsm-network", network)]
        .map(|(id, s)| (id.to_string(), s.to_string()));
    assert_eq!(statuses, expected, "{}", p.log());
}

fn status_of(c: &XksClient, id: &str) -> String {
    ekm_statuses(c)
        .into_iter()
        .find(|(i, _)| i == id)
        .map(|(_, s)| s)
        .unwrap_or_default()
}

/// The network key manager: a token served by `p11-kit server`, which the
/// test kills and restarts.
struct NetworkHsm {
    server: Arc<Mutex<Option<Child>>>,
    socket: Arc<Mutex<PathBuf>>,
}

impl NetworkHsm {
    fn kill(&self) {
        let running = self.server.lock().unwrap().take();
        kill_group(running.expect("server running"));
    }

    fn restart(&self, p: &Proxy) {
        let sock = self.socket.lock().unwrap().clone();
        *self.server.lock().unwrap() = Some(p11_kit_server(&p.hsm.conf, &sock, "second-hsm"));
    }
}

impl Drop for NetworkHsm {
    fn drop(&mut self) {
        if let Some(c) = self.server.lock().map(|mut c| c.take()).unwrap_or(None) {
            kill_group(c);
        }
    }
}

/// Starts a proxy whose key managers hold the same key: the network one
/// always (its server running when `network_up`), the local SoftHSM token
/// too when `with_local`.
fn start(with_local: bool, network_up: bool) -> (Proxy, NetworkHsm) {
    let client_module = p11_kit_prefix().join("lib/pkcs11/p11-kit-client.so");
    let net = NetworkHsm {
        server: Arc::default(),
        socket: Arc::default(),
    };
    let setup = {
        let (server, socket) = (net.server.clone(), net.socket.clone());
        move |dir: &Path, hsm: &SoftHsm| {
            // Not "xks-test-…": pkcs11-tool --token-label matches a prefix.
            hsm.add_token("second-hsm");
            // The same key material in both tokens, as in an HSM cluster.
            let key = dir.join("shared.key");
            let mut material = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut material)
                .unwrap();
            write_private(&key, "");
            std::fs::write(&key, material).unwrap();
            hsm.import_aes_key("xks-test", SHARED_KEY, &key);
            hsm.import_aes_key("second-hsm", SHARED_KEY, &key);
            std::fs::remove_file(&key).unwrap();
            let sock = dir.join("p11.sock");
            if network_up {
                *server.lock().unwrap() = Some(p11_kit_server(&hsm.conf, &sock, "second-hsm"));
            }
            *socket.lock().unwrap() = sock.clone();
            vec![(
                "P11_KIT_SERVER_ADDRESS".to_string(),
                format!("unix:path={}", sock.display()),
            )]
        }
    };
    let local = if with_local {
        "[[hsm.backends]]\nname = \"hsm-local\"\ntoken_label = \"xks-test\"\n\n"
    } else {
        ""
    };
    let p = Proxy::start_with(Options {
        create_keys: false,
        health_interval_secs: 1,
        backends: format!(
            "{local}[[hsm.backends]]\nname = \"hsm-network\"\nmodule = \"{}\"\n\
             token_label = \"second-hsm\"\nsessions = 4\n",
            client_module.display()
        ),
        setup: Some(Arc::new(setup)),
        ..Options::default()
    });
    (p, net)
}

/// Sends one request; records its time in `slowest_us` when it is the slowest.
async fn timed(
    conn: &mut Connection,
    req: http::Request<http_body_util::Full<bytes::Bytes>>,
    slowest_us: Arc<AtomicU64>,
) -> (Result<XksResponse, ClientError>, Duration) {
    let t = Instant::now();
    let r = conn.send(req).await;
    let took = t.elapsed();
    slowest_us.fetch_max(took.as_micros() as u64, Ordering::Relaxed);
    (r, took)
}

/// One failed request as the client saw it.
#[derive(Debug)]
struct Failure {
    status: u16,
    error_name: String,
    took: Duration,
}

/// Continuous encrypt → decrypt round trips on the shared key, on one
/// keep-alive connection, from a thread of its own.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    slowest_us: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<Failure>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(c: &XksClient) -> Load {
        let mut load = Load {
            stop: Arc::default(),
            ok: Arc::default(),
            slowest_us: Arc::default(),
            failures: Arc::default(),
            thread: None,
        };
        let (c, stop, ok, slowest_us, failures) = (
            c.clone(),
            load.stop.clone(),
            load.ok.clone(),
            load.slowest_us.clone(),
            load.failures.clone(),
        );
        load.thread = Some(std::thread::spawn(move || {
            block_on(async move {
                let mut conn = c.connect().await.unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let req = signed(
                        &c,
                        &format!("/keys/{SHARED_KEY}/encrypt"),
                        bodies::encrypt(b"data key", None, true),
                    );
                    let (enc, took) = timed(&mut conn, req, slowest_us.clone()).await;
                    let (dec, took) = match enc {
                        Ok(r) if r.status == 200 => {
                            let body = bodies::decrypt_from(&r.json(), None).to_string();
                            let req = signed(&c, &format!("/keys/{SHARED_KEY}/decrypt"), body);
                            timed(&mut conn, req, slowest_us.clone()).await
                        }
                        other => (other, took),
                    };
                    match dec {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            let error_name = serde_json::from_slice::<Value>(&r.body)
                                .ok()
                                .and_then(|v| v["errorName"].as_str().map(str::to_string))
                                .unwrap_or_else(|| String::from_utf8_lossy(&r.body).into_owned());
                            failures.lock().unwrap().push(Failure {
                                status: r.status.as_u16(),
                                error_name,
                                took,
                            });
                        }
                        Err(e) => panic!("the connection failed: {e}"),
                    }
                }
            })
        }));
        load
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits for `n` more successful round trips.
    fn wait_for(&self, n: u64, p: &Proxy) {
        let target = self.ok() + n;
        assert!(
            eventually(20, || self.ok() >= target),
            "stalled; failures {:?}\nlog:\n{}",
            &self.failures.lock().unwrap()[..],
            p.log()
        );
    }

    /// Stops the load; returns the failures and the slowest request.
    fn finish(mut self) -> (Vec<Failure>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        (
            failures,
            Duration::from_micros(self.slowest_us.load(Ordering::Relaxed)),
        )
    }
}

#[test]
fn a_lost_network_hsm_fails_over_and_recovers_without_restart() {
    let (p, net) = start(true, true);
    let c = p.h1();
    assert_statuses(&p, &c, "ACTIVE", "ACTIVE");
    let load = Load::start(&c);
    load.wait_for(200, &p);

    // The network HSM goes away.
    let killed_at = Instant::now();
    net.kill();
    assert!(
        eventually(10, || status_of(&c, "hsm-network") == "UNAVAILABLE"),
        "{}",
        p.log()
    );
    let noticed = killed_at.elapsed();
    assert_eq!(status_of(&c, "hsm-local"), "ACTIVE");
    load.wait_for(300, &p);
    let during = load.ok();

    // It comes back; the proxy finds it again by itself.
    let restarted_at = Instant::now();
    net.restart(&p);
    assert!(
        eventually(15, || status_of(&c, "hsm-network") == "ACTIVE"),
        "not recovered; log:\n{}",
        p.log()
    );
    let recovered = restarted_at.elapsed();
    load.wait_for(200, &p);
    let (failures, slowest) = load.finish();
    eprintln!(
        "two key managers, network one killed: noticed UNAVAILABLE after {noticed:?}; {during} \
         round trips by then; restarted: ACTIVE again after {recovered:?}; {} failed requests; \
         slowest request {slowest:?}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "requests failed during the outage: {:?}",
        &failures[..failures.len().min(5)]
    );
    assert!(
        slowest < Duration::from_millis(250),
        "slowest request {slowest:?}"
    );
    assert!(p.log().contains("re-initialized the PKCS#11 module"));

    // The recovered network HSM really serves: take the local one out of the
    // rotation (its health-check key deleted → UNAVAILABLE), then decrypt.
    let enc = block_on(async {
        c.call(
            &format!("/keys/{SHARED_KEY}/encrypt"),
            bodies::encrypt(b"before", None, false),
        )
        .await
        .unwrap()
        .json()
    });
    p.delete_health_key();
    assert!(eventually(10, || status_of(&c, "hsm-local") == "UNAVAILABLE"));
    let dec = block_on(async {
        c.call(
            &format!("/keys/{SHARED_KEY}/decrypt"),
            bodies::decrypt_from(&enc, None).to_string(),
        )
        .await
        .unwrap()
    });
    assert_eq!(dec.status, 200, "{:?}", dec.body);
    let health: Value = block_on(async {
        c.call("/health", bodies::health("KmsHealthCheck"))
            .await
            .unwrap()
            .json()
    });
    assert_eq!(health["ekmFleetDetails"].as_array().unwrap().len(), 2);
}

/// With no other key manager to fail over to, the outage shows: requests get
/// fast, spec-shaped errors (never a hang past KMS's 250 ms), and service
/// comes back by itself once the HSM does.
#[test]
fn the_only_key_manager_lost_gives_fast_errors_then_recovers() {
    let (p, net) = start(false, true);
    let c = p.h1();
    let load = Load::start(&c);
    load.wait_for(100, &p);

    net.kill();
    let outage_start = Instant::now();
    assert!(
        eventually(10, || load.failures.lock().unwrap().len() >= 20),
        "no failures seen after the HSM went away; log:\n{}",
        p.log()
    );
    // Keep the HSM away for a while: every request meanwhile must fail fast.
    std::thread::sleep(Duration::from_secs(2).saturating_sub(outage_start.elapsed()));
    let before_restart = load.ok();
    let restarted_at = Instant::now();
    net.restart(&p);
    assert!(
        eventually(15, || load.ok() > before_restart),
        "no recovery; log:\n{}",
        p.log()
    );
    let recovered = restarted_at.elapsed();
    let outage = outage_start.elapsed();
    load.wait_for(100, &p);
    let (failures, slowest) = load.finish();

    let mut by_error = std::collections::BTreeMap::<String, usize>::new();
    for f in &failures {
        *by_error
            .entry(format!("{} {}", f.status, f.error_name))
            .or_default() += 1;
    }
    let slowest_failure = failures.iter().map(|f| f.took).max().unwrap_or_default();
    eprintln!(
        "one key manager, killed for {outage:?}: {} failed requests {by_error:?}, slowest failure \
         {slowest_failure:?}; first success {recovered:?} after the restart; slowest request \
         {slowest:?}",
        failures.len()
    );
    // What the proxy said meanwhile (for the operator; printed, not asserted).
    let mut said = std::collections::BTreeMap::<String, usize>::new();
    for line in p.log().lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["level"] == "WARN" || v["level"] == "ERROR" {
            let what = format!("{} {} {}", v["level"], v["message"], v["error"]);
            *said.entry(what.chars().take(200).collect()).or_default() += 1;
        }
    }
    eprintln!("proxy warnings during the outage: {said:#?}");
    for f in &failures {
        assert!(f.status >= 500, "{f:?}");
        assert!(
            ["InternalException", "DependencyTimeoutException"].contains(&f.error_name.as_str()),
            "{f:?}"
        );
    }
    assert!(
        slowest < Duration::from_millis(250),
        "slowest request {slowest:?}"
    );
}

/// A key manager that is down when the proxy starts does not keep the proxy
/// from serving with the others (a restart during a partial HSM outage must
/// not become a full outage); it is listed as UNAVAILABLE.
#[test]
fn a_key_manager_down_at_startup_leaves_the_others_serving() {
    let (p, _net) = start(true, false);
    let c = p.h1();
    assert_statuses(&p, &c, "ACTIVE", "UNAVAILABLE");
    let dec = block_on(async {
        let enc = c
            .call(
                &format!("/keys/{SHARED_KEY}/encrypt"),
                bodies::encrypt(b"data key", None, true),
            )
            .await
            .unwrap();
        assert_eq!(enc.status, 200, "{:?}", enc.body);
        c.call(
            &format!("/keys/{SHARED_KEY}/decrypt"),
            bodies::decrypt_from(&enc.json(), None).to_string(),
        )
        .await
        .unwrap()
    });
    assert_eq!(dec.status, 200, "{:?}", dec.body);
    assert!(p.log().contains("key manager not available at startup"));
}
