//! The proxy's configuration in tests: the key stores, credentials and keys
//! every test proxy has, the [`Options`] a test may change, and the TOML
//! template [`write_config`] fills in.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Certs, TestToken};

/// The key store "test" (every key; credentials A and B).
pub const URI_PATH: &str = "/test/kms/xks/v1";
/// The key store "other" (`other-key` only; its own credential).
pub const OTHER_URI_PATH: &str = "/other-store/kms/xks/v1";
/// Credential A of "test": its secret in the file `secret-a`.
pub const AKID_A: &str = "TESTACCESSKEYAAAAAAAAAAA";
/// Credential B of "test": its secret in `$XKS_TEST_SECRET_B`.
pub const AKID_B: &str = "TESTACCESSKEYBBBBBBBBBBBB";
/// The credential of "other": its secret in the file `secret-other`.
pub const AKID_OTHER: &str = "TESTACCESSKEYOTHERSTORE2";
/// The label of the deep health probe's key (`[health] key_label`).
pub const HEALTH_KEY: &str = "xks-proxy-health-check";

/// The demo keys every test token holds: (label, usages).
pub const KEYS: &[(&str, &str)] = &[
    ("key-ed", "encrypt,decrypt"),
    ("key-e", "encrypt"),
    ("key-d", "decrypt"),
    ("key-none", "none"),
    ("other-key", "encrypt,decrypt"),
];

/// See [`Options::setup`].
pub type SetupFn = dyn Fn(&Path, &TestToken) -> Vec<(String, String)> + Send + Sync;

/// Settings a test may change; the rest of the config is fixed.
#[derive(Clone)]
pub struct Options {
    pub sessions: usize,
    pub extra_hsm: String,
    pub extra_server: String,
    /// Lines added to `[tls]` (mutual TLS).
    pub extra_tls: String,
    /// `[tls] termination = "load-balancer"`: no certificate, plain HTTP.
    pub tls_at_load_balancer: bool,
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
    /// The PKCS#11 module of `[hsm]` (default: the implementation's).
    pub module: String,
    /// Lines added to `[health]`.
    pub extra_health: String,
    /// A command the proxy runs under (e.g. `prlimit --nofile=300:300 --`).
    pub wrapper: Vec<String>,
    /// While set, the proxy's stderr is not read: its log sink stalls.
    pub log_paused: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Whole sections appended to the file (`[audit]`).
    pub extra_sections: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sessions: 2,
            extra_hsm: String::new(),
            extra_server: String::new(),
            extra_tls: String::new(),
            tls_at_load_balancer: false,
            extra_key_store: String::new(),
            files: Vec::new(),
            backends: String::new(),
            setup: None,
            create_keys: true,
            health_interval_secs: 5,
            module: super::module(),
            extra_health: String::new(),
            wrapper: Vec::new(),
            log_paused: None,
            extra_sections: String::new(),
        }
    }
}

/// Writes `dir/config.toml` from the template and `opts`; returns its path.
/// A token, certificates and the secret files a test config names, in
/// `dir` (the config itself: [`write_config`]).
pub fn config_dir(dir: &Path) -> (TestToken, Certs) {
    let hsm = super::make_token(dir, "xks-test");
    let certs = super::make_certs(dir);
    super::write_private(&dir.join("hsm-pin"), &hsm.pin);
    super::write_private(&dir.join("secret-a"), &"A".repeat(44));
    super::write_private(&dir.join("secret-other"), &"B".repeat(44));
    (hsm, certs)
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
{tls_lines}
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

{extra_sections}
"#,
            sessions = opts.sessions,
            extra_hsm = opts.extra_hsm,
            extra_server = opts.extra_server,
            extra_tls = opts.extra_tls,
            tls_lines = if opts.tls_at_load_balancer {
                "termination = \"load-balancer\"".to_string()
            } else {
                format!(
                    "cert = \"{}\"\nkey = \"{}\"",
                    certs.cert.display(),
                    certs.key.display()
                )
            },
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
            extra_sections = opts.extra_sections,
        ),
    )
    .unwrap();
    config
}
