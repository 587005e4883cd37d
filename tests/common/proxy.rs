//! The proxy process: [`Proxy`] starts `xks-proxy serve` on a fresh token,
//! certificates and secrets, reads its log, runs its CLI, restarts, kills and
//! signals it, and on drop checks that its log never held a secret.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use xks_proxy::client::{tls_config, HttpVersion, XksClient};

use super::*;

/// The `xks-proxy` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_xks-proxy")
}

/// A running proxy and everything it was built from.
pub struct Proxy {
    /// Shared with sibling instances (same token, config and secrets).
    pub dir: Arc<tempfile::TempDir>,
    pub addr: SocketAddr,
    pub ping_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub certs: Certs,
    pub hsm: TestToken,
    pub config: PathBuf,
    pub secret_a: String,
    pub secret_b: String,
    pub secret_other: String,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    /// Extra environment for the proxy process (from [`Options::setup`]).
    env: Vec<(String, String)>,
    wrapper: Vec<String>,
    log_paused: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Proxy {
    pub fn start() -> Proxy {
        Self::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let hsm = make_token(dir.path(), "xks-test");
        let certs = make_certs(dir.path());
        let secret_a = random_b64(32);
        let secret_b = random_b64(32);
        let secret_other = random_b64(32);
        write_private(&dir.path().join("hsm-pin"), &format!("{}\n", hsm.pin));
        write_private(&dir.path().join("secret-a"), &format!("{secret_a}\n"));
        write_private(&dir.path().join("secret-other"), &secret_other);
        for (name, content) in &opts.files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let config = write_config(dir.path(), &certs, &opts);
        let mut proxy = Proxy {
            dir: Arc::new(dir),
            addr: "127.0.0.1:0".parse().unwrap(),
            ping_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            certs,
            hsm,
            config,
            secret_a,
            secret_b,
            secret_other,
            child: None,
            log: Arc::new(Mutex::new(String::new())),
            env: Vec::new(),
            wrapper: opts.wrapper.clone(),
            log_paused: opts.log_paused.clone(),
        };
        if let Some(setup) = &opts.setup {
            proxy.env = setup(proxy.dir.path(), &proxy.hsm);
        }
        if opts.create_keys {
            for (label, usage) in KEYS {
                proxy.cli(&["keys", "create", "--label", label, "--usage", usage]);
            }
        }
        proxy.spawn();
        proxy
    }

    /// Runs `xks-proxy <args> --config <config>` to completion; asserts success.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_raw(args);
        assert!(
            out.status.success(),
            "xks-proxy {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs OpenSC's `pkcs11-tool` on the test token, logged in; asserts success.
    /// Tests use it to change the token behind the proxy's back.
    pub fn pkcs11_tool(&self, args: &[&str]) -> String {
        self.hsm.pkcs11_tool("xks-test", args)
    }

    /// Deletes the deep health probe's key behind the proxy's back: the
    /// probe then fails, as it would if the HSM could not do crypto.
    pub fn delete_health_key(&self) {
        self.pkcs11_tool(&[
            "--delete-object",
            "--type",
            "secrkey",
            "--label",
            HEALTH_KEY,
        ]);
    }

    /// A second proxy process on the same token, config and secrets (as in a
    /// fleet), on its own ports.
    pub fn sibling(&self) -> Proxy {
        let mut p = Proxy {
            dir: self.dir.clone(),
            addr: "127.0.0.1:0".parse().unwrap(),
            ping_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            certs: Certs {
                ca: self.certs.ca.clone(),
                cert: self.certs.cert.clone(),
                key: self.certs.key.clone(),
            },
            hsm: TestToken {
                conf: self.hsm.conf.clone(),
                pin: self.hsm.pin.clone(),
                label: self.hsm.label.clone(),
                implementation: self.hsm.implementation,
            },
            config: self.config.clone(),
            secret_a: self.secret_a.clone(),
            secret_b: self.secret_b.clone(),
            secret_other: self.secret_other.clone(),
            child: None,
            log: Arc::new(Mutex::new(String::new())),
            env: self.env.clone(),
            wrapper: self.wrapper.clone(),
            log_paused: None,
        };
        p.spawn();
        p
    }

    /// Stops the process (SIGTERM) and starts it again on new ports.
    pub fn restart(&mut self) {
        let status = self.terminate();
        assert!(status.success(), "exit status {status:?}");
        self.start_on_new_ports();
    }

    /// Starts the stopped process again on new ports (the ports it had may
    /// have gone to another test's listener meanwhile).
    pub fn start_on_new_ports(&mut self) {
        self.log.lock().unwrap().clear();
        self.spawn();
    }

    /// The server process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `GET path` on the plain-HTTP admin listener; returns (status line, body).
    pub fn admin_get(&self, path: &str) -> (String, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.admin_addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    }

    /// Runs the `xks-proxy` binary with exactly these arguments (no --config).
    pub fn run_bin(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .args(args)
            .env(self.hsm.env_var(), &self.hsm.conf)
            .output()
            .unwrap()
    }

    pub fn cli_raw(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env(self.hsm.env_var(), &self.hsm.conf)
            .env("XKS_TEST_SECRET_B", &self.secret_b)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap()
    }

    fn spawn(&mut self) {
        self.spawn_with(&[]);
    }

    fn spawn_with(&mut self, extra: &[String]) {
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let mut child = command
            .args(["serve", "--config"])
            .arg(&self.config)
            .args(extra)
            .env(self.hsm.env_var(), &self.hsm.conf)
            .env("XKS_TEST_SECRET_B", &self.secret_b)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        let paused = self.log_paused.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
            loop {
                while paused
                    .as_ref()
                    .is_some_and(|p| p.load(std::sync::atomic::Ordering::Relaxed))
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let Some(line) = lines.next() else { break };
                if line.contains("\"message\":\"listening\"") {
                    let _ = tx.send(line.clone());
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        self.child = Some(child);
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => panic!("proxy did not start; log:\n{}", self.log()),
        };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        self.addr = v["https_addr"].as_str().unwrap().parse().unwrap();
        self.ping_addr = v["ping_addr"].as_str().unwrap().parse().unwrap();
        self.admin_addr = v["admin_addr"].as_str().unwrap().parse().unwrap();
    }

    /// Everything the proxy logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle` (the logger thread runs behind).
    pub fn wait_for_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn client(&self, version: HttpVersion) -> XksClient {
        self.client_with_tls(tls_config(&self.certs.ca, version).unwrap(), version)
    }

    /// A client of the test key store (credential A) with its own TLS setup
    /// (another CA, a client certificate).
    pub fn client_with_tls(
        &self,
        tls: Arc<rustls::ClientConfig>,
        version: HttpVersion,
    ) -> XksClient {
        XksClient::new(
            self.addr,
            "localhost",
            URI_PATH,
            AKID_A,
            &self.secret_a,
            "us-east-1",
            tls,
            version,
        )
    }

    pub fn h1(&self) -> XksClient {
        self.client(HttpVersion::Http1)
    }

    /// An HTTP/1.1 client of the second key store ("other", `OTHER_URI_PATH`,
    /// credential `AKID_OTHER`).
    pub fn other_store_h1(&self) -> XksClient {
        XksClient::new(
            self.addr,
            "localhost",
            OTHER_URI_PATH,
            AKID_OTHER,
            &self.secret_other,
            "us-east-1",
            tls_config(&self.certs.ca, HttpVersion::Http1).unwrap(),
            HttpVersion::Http1,
        )
    }

    /// An HTTP/1.1 client of the test key store that connects to `addr` (a
    /// load balancer in front of the proxy) instead of the proxy itself.
    pub fn h1_via(&self, addr: SocketAddr) -> XksClient {
        XksClient::new(
            addr,
            "localhost",
            URI_PATH,
            AKID_A,
            &self.secret_a,
            "us-east-1",
            tls_config(&self.certs.ca, HttpVersion::Http1).unwrap(),
            HttpVersion::Http1,
        )
    }

    /// Kills the process (SIGKILL: a crash, no draining).
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the process again on the ports it had (after [`Proxy::kill`]),
    /// as a restarted fleet member behind a load balancer would.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        let args = [
            "--listen".to_string(),
            self.addr.to_string(),
            "--ping-listen".to_string(),
            self.ping_addr.to_string(),
            "--admin-listen".to_string(),
            self.admin_addr.to_string(),
        ];
        self.spawn_with(&args);
    }

    pub fn h2(&self) -> XksClient {
        self.client(HttpVersion::Http2)
    }

    /// Sends SIGTERM and waits for exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        unsafe_kill(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("proxy did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Sends a signal with the `kill` command (no libc dependency in tests).
pub fn unsafe_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status();
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Every test's proxy log, whatever the test did: no secret, no PIN.
        if !std::thread::panicking() {
            let log = self.log();
            for (what, secret) in [
                ("secret A", &self.secret_a),
                ("secret B", &self.secret_b),
                ("secret of the other key store", &self.secret_other),
                ("HSM PIN", &self.hsm.pin),
            ] {
                assert!(
                    !log.contains(secret.as_str()),
                    "the proxy logged the {what}"
                );
            }
        }
    }
}
