//! A network HSM for the tests: a SoftHSM token served by `p11-kit server`
//! and reached through `p11-kit-client.so`, which a test can kill, restart,
//! stop (SIGSTOP: a hung HSM whose packets vanish) and continue.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use xks_proxy::client::{bodies, XksClient};

use super::*;

/// The key both key managers of the fleet tests hold.
pub const SHARED_KEY: &str = "shared-key";

/// Adds the token "second-hsm" beside "xks-test" and imports the same AES
/// key material into both as [`SHARED_KEY`], as an HSM cluster would hold it.
pub fn add_second_token_with_shared_key(dir: &Path, hsm: &TestToken) {
    // Not "xks-test-…": pkcs11-tool --token-label matches a prefix.
    hsm.add_token("second-hsm");
    let key = dir.join("shared.key");
    let mut material = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut material).unwrap();
    write_private(&key, "");
    std::fs::write(&key, material).unwrap();
    hsm.import_aes_key("xks-test", SHARED_KEY, &key);
    hsm.import_aes_key("second-hsm", SHARED_KEY, &key);
    std::fs::remove_file(&key).unwrap();
}

/// Two key managers on one module: the tokens "xks-test" (`token-a`) and
/// "second-hsm" (`token-b`), holding [`SHARED_KEY`].
pub fn two_tokens() -> Options {
    two_tokens_with(Arc::new(|dir: &Path, hsm: &TestToken| {
        add_second_token_with_shared_key(dir, hsm);
        Vec::new()
    }))
}

/// The key managers of [`two_tokens`], with another `setup` (which adds
/// "second-hsm" and the keys).
pub fn two_tokens_with(setup: Arc<SetupFn>) -> Options {
    Options {
        create_keys: false,
        health_interval_secs: 1,
        backends: "[[hsm.backends]]\nname = \"token-a\"\ntoken_label = \"xks-test\"\n\n\
                   [[hsm.backends]]\nname = \"token-b\"\ntoken_label = \"second-hsm\"\n"
            .into(),
        setup: Some(setup),
        ..Options::default()
    }
}

/// Where `scripts/p11-kit-rpc.sh` built a p11-kit whose RPC protocol carries
/// AES-GCM parameters (Debian 12's 0.24.1 does not; see the script):
/// `XKS_P11_KIT_PREFIX` (scripts/test.sh sets it), else what the script
/// prints (it builds p11-kit once, into a cache outside the clone).
pub fn p11_kit_prefix() -> PathBuf {
    let prefix = std::env::var_os("XKS_P11_KIT_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let out =
                Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/p11-kit-rpc.sh"))
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .expect("scripts/p11-kit-rpc.sh");
            assert!(out.status.success(), "scripts/p11-kit-rpc.sh failed");
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        });
    assert!(
        prefix.join("libexec/p11-kit/p11-kit-server").exists(),
        "no p11-kit >= 0.25 at {}: run scripts/p11-kit-rpc.sh (scripts/test.sh does)",
        prefix.display()
    );
    prefix
}

/// Starts `p11-kit server` for one token of `hsm` on a unix socket.
pub fn p11_kit_server(hsm: &TestToken, socket: &Path, token: &str) -> Child {
    let _ = std::fs::remove_file(socket);
    let prefix = p11_kit_prefix();
    let child = Command::new(prefix.join("libexec/p11-kit/p11-kit-server"))
        .args(["-f", "-n"])
        .arg(socket)
        .args([
            "--provider",
            &hsm.module(),
            &format!("pkcs11:token={token}"),
        ])
        .env(hsm.env_var(), &hsm.conf)
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
pub fn kill_group(mut server: Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", server.id())])
        .status();
    let _ = server.wait();
}

pub fn ekm_statuses(c: &XksClient) -> Vec<(String, String)> {
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
pub fn assert_statuses(p: &Proxy, c: &XksClient, local: &str, network: &str) {
    let mut statuses = ekm_statuses(c);
    statuses.sort();
    let expected = [("hsm-local", local), ("hsm-network", network)]
        .map(|(id, s)| (id.to_string(), s.to_string()));
    assert_eq!(statuses, expected, "{}", p.log());
}

pub fn status_of(c: &XksClient, id: &str) -> String {
    ekm_statuses(c)
        .into_iter()
        .find(|(i, _)| i == id)
        .map(|(_, s)| s)
        .unwrap_or_default()
}

/// The network key manager: a token served by `p11-kit server`, which the
/// test kills and restarts.
pub struct NetworkHsm {
    server: Arc<Mutex<Option<Child>>>,
    socket: Arc<Mutex<PathBuf>>,
}

impl NetworkHsm {
    pub fn kill(&self) {
        let running = self.server.lock().unwrap().take();
        kill_group(running.expect("server running"));
    }

    /// Stops the server and its per-connection children (SIGSTOP): the HSM
    /// hangs, as a network HSM whose packets are dropped does.
    pub fn stop(&self) {
        self.signal("STOP");
    }

    /// Lets a stopped server run again.
    pub fn cont(&self) {
        self.signal("CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .server
            .lock()
            .unwrap()
            .as_ref()
            .expect("server running")
            .id();
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), "--", &format!("-{pid}")])
            .status();
    }

    pub fn restart(&self, p: &Proxy) {
        let sock = self.socket.lock().unwrap().clone();
        *self.server.lock().unwrap() = Some(p11_kit_server(&p.hsm, &sock, "second-hsm"));
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
pub fn start(with_local: bool, network_up: bool) -> (Proxy, NetworkHsm) {
    start_with(
        with_local,
        network_up,
        Options {
            health_interval_secs: 1,
            ..Options::default()
        },
    )
}

/// [`start`] with other settings in `base` (its backends and setup are
/// replaced).
pub fn start_with(with_local: bool, network_up: bool, base: Options) -> (Proxy, NetworkHsm) {
    let client_module = p11_kit_prefix().join("lib/pkcs11/p11-kit-client.so");
    let net = NetworkHsm {
        server: Arc::default(),
        socket: Arc::default(),
    };
    let setup = {
        let (server, socket) = (net.server.clone(), net.socket.clone());
        move |dir: &Path, hsm: &TestToken| {
            add_second_token_with_shared_key(dir, hsm);
            let sock = dir.join("p11.sock");
            if network_up {
                *server.lock().unwrap() = Some(p11_kit_server(hsm, &sock, "second-hsm"));
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
        backends: format!(
            "{local}[[hsm.backends]]\nname = \"hsm-network\"\nmodule = \"{}\"\n\
             token_label = \"second-hsm\"\nsessions = 4\n",
            client_module.display()
        ),
        setup: Some(Arc::new(setup)),
        ..base
    });
    (p, net)
}
