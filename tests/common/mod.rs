//! Test harness: a real `xks-proxy` process over real TLS against a fresh
//! SoftHSM token in a temporary directory. Each [`Proxy`] is fully isolated
//! (own token, certificates, secrets, port), so tests run in parallel.
#![allow(dead_code)]

pub mod load;
pub mod network_hsm;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use xks_proxy::client::{tls_config, HttpVersion, XksClient};

pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const URI_PATH: &str = "/test/kms/xks/v1";
pub const OTHER_URI_PATH: &str = "/other-store/kms/xks/v1";
pub const AKID_A: &str = "TESTACCESSKEYAAAAAAAAAAA";
pub const AKID_B: &str = "TESTACCESSKEYBBBBBBBBBBBB";
pub const AKID_OTHER: &str = "TESTACCESSKEYOTHERSTORE2";
pub const HEALTH_KEY: &str = "xks-proxy-health-check";

/// The demo keys every test token holds: (label, usages).
pub const KEYS: &[(&str, &str)] = &[
    ("key-ed", "encrypt,decrypt"),
    ("key-e", "encrypt"),
    ("key-d", "decrypt"),
    ("key-none", "none"),
    ("other-key", "encrypt,decrypt"),
];

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_xks-proxy")
}

fn random_b64(n: usize) -> String {
    let mut b = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    B64.encode(b)
}

pub fn write_private(path: &Path, content: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Test TLS material: a CA and a server certificate for localhost/127.0.0.1.
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn make_certs(dir: &Path) -> Certs {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "xks-proxy test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server = params.signed_by(&server_key, &ca).unwrap();
    let certs = Certs {
        ca: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    std::fs::write(&certs.ca, ca.pem()).unwrap();
    std::fs::write(&certs.cert, server.pem()).unwrap();
    write_private(&certs.key, &server_key.serialize_pem());
    certs
}

/// A SoftHSM token directory with one initialized token.
pub struct SoftHsm {
    pub conf: PathBuf,
    pub pin: String,
    pub label: String,
}

impl SoftHsm {
    /// The directory that holds the token labelled `label`.
    pub fn token_dir(&self, label: &str) -> PathBuf {
        let conf = std::fs::read_to_string(&self.conf).unwrap();
        let tokens = conf
            .lines()
            .find_map(|l| l.strip_prefix("directories.tokendir = "))
            .unwrap()
            .trim()
            .to_string();
        for entry in std::fs::read_dir(&tokens).unwrap() {
            let dir = entry.unwrap().path();
            let object = std::fs::read(dir.join("token.object")).unwrap_or_default();
            if object.windows(label.len()).any(|w| w == label.as_bytes()) {
                return dir;
            }
        }
        panic!("no token directory for {label}");
    }

    /// Another token in the same SoftHSM directory, with the same PIN.
    pub fn add_token(&self, label: &str) {
        init_token(&self.conf, label, &self.pin);
    }

    /// Imports raw AES-256 key material into a token as a sensitive private
    /// key with encrypt and decrypt (OpenSC's pkcs11-tool).
    pub fn import_aes_key(&self, token: &str, label: &str, key_file: &Path) {
        let file = key_file.to_str().unwrap();
        self.pkcs11_tool(
            token,
            &[
                "--write-object",
                file,
                "--type",
                "secrkey",
                "--key-type",
                "AES:32",
                "--label",
                label,
                "--usage-decrypt",
                "--sensitive",
                "--private",
            ],
        );
    }

    /// Runs OpenSC's `pkcs11-tool` on `token`, logged in; asserts success.
    pub fn pkcs11_tool(&self, token: &str, args: &[&str]) -> String {
        let out = Command::new("pkcs11-tool")
            .args(["--module", SOFTHSM, "--token-label", token])
            .args(["--login", "--pin", &self.pin])
            .args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .expect("pkcs11-tool (Debian package opensc) must be installed");
        assert!(
            out.status.success(),
            "pkcs11-tool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Builds the IV-generating PKCS#11 filter module (`tests/fixtures/
/// ivgen-module.c`: SoftHSM, returning generated IVs the way CloudHSM or
/// Luna do) into `dir`; returns its path.
pub fn ivgen_module(dir: &Path) -> PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = dir.join("ivgen-module.so");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(format!("{root}/tests/fixtures/ivgen-module.c"))
        // pkcs11.h from p11-kit: the one scripts/p11-kit-rpc.sh built, or Debian's.
        .arg(format!("-I{root}/target/p11-kit/include/p11-kit-1"))
        .arg("-I/usr/include/p11-kit-1")
        .args(["-ldl", "-lpthread"])
        .status()
        .expect("cc (gcc) must be installed");
    assert!(status.success(), "building the IV filter module failed");
    out
}

/// `softhsm2-util --init-token` in the first free slot.
fn init_token(conf: &Path, label: &str, pin: &str) {
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", conf)
        .args(["--init-token", "--free", "--label", label])
        .args(["--so-pin", "test-so-pin", "--pin", pin])
        .output()
        .expect("softhsm2-util (Debian package softhsm2) must be installed");
    assert!(
        out.status.success(),
        "init-token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn make_token(dir: &Path, label: &str) -> SoftHsm {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let pin = format!("pin-{}", &random_b64(9).replace(['+', '/'], "x"));
    init_token(&conf, label, &pin);
    SoftHsm {
        conf,
        pin,
        label: label.to_string(),
    }
}

/// See [`Options::setup`].
pub type SetupFn = dyn Fn(&Path, &SoftHsm) -> Vec<(String, String)> + Send + Sync;

/// Settings a test may change; the rest of the config is fixed.
#[derive(Clone)]
pub struct Options {
    pub sessions: usize,
    pub extra_hsm: String,
    pub extra_server: String,
    /// Lines added to `[tls]` (mutual TLS).
    pub extra_tls: String,
    /// Lines added to the first key store (authorization, rate limit).
    pub extra_key_store: String,
    /// Files written into the proxy's directory before it starts (name, content).
    pub files: Vec<(String, String)>,
    /// `[[hsm.backends]]` entries; when set, `[hsm]` names no token itself.
    pub backends: String,
    /// Runs after the token and before the proxy starts (more tokens, key
    /// imports, helper processes); returns extra environment for the proxy.
    pub setup: Option<Arc<SetupFn>>,
    pub create_keys: bool,
    pub health_interval_secs: u64,
    /// The PKCS#11 module of `[hsm]` (default: SoftHSM).
    pub module: String,
    /// Lines added to `[health]`.
    pub extra_health: String,
    /// A command the proxy runs under (e.g. `prlimit --nofile=300:300 --`).
    pub wrapper: Vec<String>,
    /// While set, the proxy's stderr is not read: its log sink stalls.
    pub log_paused: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sessions: 2,
            extra_hsm: String::new(),
            extra_server: String::new(),
            extra_tls: String::new(),
            extra_key_store: String::new(),
            files: Vec::new(),
            backends: String::new(),
            setup: None,
            create_keys: true,
            health_interval_secs: 5,
            module: SOFTHSM.to_string(),
            extra_health: String::new(),
            wrapper: Vec::new(),
            log_paused: None,
        }
    }
}

/// A running proxy and everything it was built from.
pub struct Proxy {
    /// Shared with sibling instances (same token, config and secrets).
    pub dir: Arc<tempfile::TempDir>,
    pub addr: SocketAddr,
    pub ping_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub certs: Certs,
    pub hsm: SoftHsm,
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

pub fn write_config(dir: &Path, certs: &Certs, opts: &Options) -> PathBuf {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
ping_listen = "127.0.0.1:0"
fleet_size = 3
vendor = "xks-proxy tests"
reload_poll_ms = 200
{extra_server}

[admin]
listen = "127.0.0.1:0"

[tls]
cert = "{cert}"
key = "{key}"
{extra_tls}

[hsm]
module = "{module}"
{token_line}
pin_file = "hsm-pin"
sessions = {sessions}
{extra_hsm}
{backends}

[health]
key_label = "{HEALTH_KEY}"
interval_secs = {health_interval}
{extra_health}

[logging]
format = "json"
level = "info"

[[key_stores]]
name = "test"
uri_path = "{URI_PATH}"
keys = ["*"]
{extra_key_store}

[[key_stores.credentials]]
access_key_id = "{AKID_A}"
secret_file = "secret-a"

[[key_stores.credentials]]
access_key_id = "{AKID_B}"
secret_env = "XKS_TEST_SECRET_B"

[[key_stores]]
name = "other"
uri_path = "{OTHER_URI_PATH}"
keys = ["other-key"]

[[key_stores.credentials]]
access_key_id = "{AKID_OTHER}"
secret_file = "secret-other"
"#,
            cert = certs.cert.display(),
            key = certs.key.display(),
            sessions = opts.sessions,
            extra_hsm = opts.extra_hsm,
            extra_server = opts.extra_server,
            extra_tls = opts.extra_tls,
            token_line = if opts.backends.is_empty() {
                "token_label = \"xks-test\""
            } else {
                ""
            },
            backends = opts.backends,
            extra_key_store = opts.extra_key_store,
            health_interval = opts.health_interval_secs,
            module = opts.module,
            extra_health = opts.extra_health,
        ),
    )
    .unwrap();
    config
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
            hsm: SoftHsm {
                conf: self.hsm.conf.clone(),
                pin: self.hsm.pin.clone(),
                label: self.hsm.label.clone(),
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
            .env("SOFTHSM2_CONF", &self.hsm.conf)
            .output()
            .unwrap()
    }

    pub fn cli_raw(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("SOFTHSM2_CONF", &self.hsm.conf)
            .env("XKS_TEST_SECRET_B", &self.secret_b)
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
            .env("SOFTHSM2_CONF", &self.hsm.conf)
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

/// Polls `f` until it returns true, for at most `secs` seconds.
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A request signed now.
pub fn signed(
    c: &XksClient,
    suffix: &str,
    body: impl Into<bytes::Bytes>,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    c.signed_request(suffix, body.into(), std::time::SystemTime::now())
        .unwrap()
}

/// `xks-proxy check` arguments for the test key store with credential A.
pub fn check_args(endpoint: &str, secret_file: &Path, ca: &Path) -> Vec<String> {
    [
        "--endpoint",
        endpoint,
        "--uri-path",
        URI_PATH,
        "--access-key-id",
        AKID_A,
        "--secret-file",
        secret_file.to_str().unwrap(),
        "--ca",
        ca.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// Runs a future on a fresh runtime (tests are sync so the proxy process can
/// be managed with std).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A blocking TLS connection to the proxy (HTTP/1.1 in ALPN), handshake not
/// yet done: tests drive raw bytes over it.
pub fn tls_stream(p: &Proxy) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let tls = tls_config(&p.certs.ca, HttpVersion::Http1).unwrap();
    let tcp = std::net::TcpStream::connect(p.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = rustls::ClientConnection::new(tls, "localhost".try_into().unwrap()).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// How long until the server closes this connection (EOF or reset).
pub fn time_to_close(
    s: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
) -> Duration {
    use std::io::Read;
    let t = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return t.elapsed(),
            Ok(_) => {}
        }
    }
}

/// `GET /ping` on the plain listener: (status, body).
pub fn ping_status(p: &Proxy) -> (u16, String) {
    ping_at(p.ping_addr)
}

/// `GET /ping` at `addr`: (status, body), status 0 when nothing answered.
pub fn ping_at(addr: SocketAddr) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = write!(
        s,
        "GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A metric's value from the admin listener (0 when absent).
pub fn metric(p: &Proxy, series: &str) -> f64 {
    let (_, text) = p.admin_get("/metrics");
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
