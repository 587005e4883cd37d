//! Configuration: one TOML file, validated completely at startup.
//!
//! The file is parsed into `Raw*` structs that mirror the TOML, then checked and
//! turned into the typed [`Config`] the rest of the proxy uses. Every check names
//! the field and the rule it broke, because the person reading the message is an
//! operator at 3 a.m. and the alternative is a KMS `ConnectionErrorCode` hours later.
//!
//! Secrets (SigV4 secret access keys, the HSM PIN) are never inline in the file:
//! they are read from a file (which must not be readable by group or others) or
//! from an environment variable, and kept in [`Zeroizing`] buffers. Relative paths
//! are resolved against the directory of the config file, so a config works the
//! same whatever directory the proxy is started from.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use zeroize::Zeroizing;

/// A configuration problem, reported with the field it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for xks-proxy: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {rule}")]
    Invalid { field: String, rule: String },
}

fn invalid(field: impl Into<String>, rule: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        rule: rule.into(),
    }
}

// ---------------------------------------------------------------------------
// The file as written
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    tls: RawTls,
    hsm: RawHsm,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    logging: RawLogging,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    key_stores: Vec<RawKeyStore>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default = "default_admin_listen")]
    listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            enabled: true,
            listen: default_admin_listen(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    ping_listen: Option<String>,
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    /// Request-body bytes held at once, over all requests.
    #[serde(default = "default_body_buffer_budget")]
    body_buffer_budget_bytes: usize,
    #[serde(default = "default_fleet_size")]
    fleet_size: u32,
    #[serde(default = "default_vendor")]
    vendor: String,
    model: Option<String>,
    #[serde(default = "default_header_timeout")]
    header_read_timeout_ms: u64,
    #[serde(default = "default_handshake_timeout")]
    tls_handshake_timeout_ms: u64,
    #[serde(default = "default_idle_timeout")]
    idle_timeout_secs: u64,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    /// Connections from one source address at once, per listener (0: no limit).
    #[serde(default = "default_max_per_source")]
    max_connections_per_source: usize,
    /// Connections the plain `/ping` listener holds at once.
    #[serde(default = "default_max_ping_connections")]
    max_ping_connections: usize,
    /// How long a connection may stay open before a request on it passes SigV4.
    #[serde(default = "default_unauthenticated_timeout")]
    unauthenticated_timeout_ms: u64,
    #[serde(default = "default_shutdown_grace")]
    shutdown_grace_secs: u64,
    #[serde(default = "default_reload_poll")]
    reload_poll_ms: u64,
    /// Expect a PROXY protocol v2 header on every XKS connection (NLB).
    #[serde(default)]
    proxy_protocol: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    /// mTLS: CA bundle that client certificates must chain to.
    client_ca: Option<PathBuf>,
    /// mTLS: allowed client names (CN or DNS SAN); `*` matches one label.
    client_names: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsm {
    module: Option<PathBuf>,
    token_label: Option<String>,
    slot_id: Option<u64>,
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
    #[serde(default = "default_sessions")]
    sessions: usize,
    #[serde(default = "default_queue_depth")]
    queue_depth: usize,
    #[serde(default = "default_queue_timeout")]
    queue_timeout_ms: u64,
    #[serde(default = "default_op_timeout")]
    operation_timeout_ms: u64,
    #[serde(default)]
    iv_source: IvSource,
    #[serde(default = "default_key_cache_ttl")]
    key_cache_ttl_ms: u64,
    ekm_vendor: Option<String>,
    /// Several key managers (e.g. the HSMs of a cluster holding the same keys).
    #[serde(default)]
    backends: Vec<RawBackend>,
}

/// One key manager; unset fields are taken from `[hsm]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Option<String>,
    module: Option<PathBuf>,
    token_label: Option<String>,
    slot_id: Option<u64>,
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
    /// This key manager's own pool size, instead of `hsm.sessions`.
    sessions: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default = "default_health_key")]
    key_label: String,
    #[serde(default = "default_health_interval")]
    interval_secs: u64,
    #[serde(default = "default_degraded_ms")]
    degraded_latency_ms: u64,
    /// A key manager that has not answered for this long is UNAVAILABLE.
    #[serde(default = "default_unresponsive_ms")]
    unresponsive_after_ms: u64,
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            key_label: default_health_key(),
            interval_secs: default_health_interval(),
            degraded_latency_ms: default_degraded_ms(),
            unresponsive_after_ms: default_unresponsive_ms(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    #[serde(default)]
    format: LogFormat,
    level: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyStore {
    name: String,
    uri_path: String,
    /// External key ids this key store may use; `["*"]` means every AES-256 key
    /// of the token except the health-check key.
    keys: Vec<String>,
    #[serde(default)]
    credentials: Vec<RawCredential>,
    /// Secondary authorization: a Cedar policy file.
    authorization: Option<RawAuthorization>,
    /// Request-rate quota for this key store.
    rate_limit: Option<RawRateLimit>,
    /// The AWS Region of the KMS key store: requests signed for another
    /// region are refused.
    region: Option<String>,
    /// Refuse a signed request seen before (see `replay`).
    #[serde(default)]
    replay_protection: bool,
    /// `"aws-sample"`: Decrypt also accepts what the AWS sample proxy wrote.
    compat: Option<Compat>,
    /// The sample's `server.ciphertext_metadata_b64`, when it had one.
    compat_metadata_b64: Option<String>,
}

/// Which other proxy's ciphertexts a key store also decrypts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Compat {
    /// `aws-samples/aws-kms-xks-proxy`.
    AwsSample,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthorization {
    policy_file: PathBuf,
    #[serde(default)]
    mode: crate::authz::Mode,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    requests_per_second: f64,
    burst: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    access_key_id: String,
    secret_file: Option<PathBuf>,
    secret_env: Option<String>,
    /// When the credential was made (`YYYY-MM-DDTHH:MM:SSZ`), for its age metric.
    created: Option<String>,
}

fn default_true() -> bool {
    true
}
fn default_admin_listen() -> String {
    "127.0.0.1:9464".to_string()
}
fn default_reload_poll() -> u64 {
    2_000
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_fleet_size() -> u32 {
    1
}
fn default_vendor() -> String {
    "xks-proxy project".to_string()
}
fn default_header_timeout() -> u64 {
    5_000
}
fn default_handshake_timeout() -> u64 {
    5_000
}
fn default_idle_timeout() -> u64 {
    60
}
fn default_max_connections() -> usize {
    4_096
}
fn default_body_buffer_budget() -> usize {
    32 * 1024 * 1024
}
fn default_max_per_source() -> usize {
    256
}
fn default_max_ping_connections() -> usize {
    256
}
fn default_unauthenticated_timeout() -> u64 {
    10_000
}
fn default_shutdown_grace() -> u64 {
    10
}
fn default_sessions() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 16)
}
fn default_queue_depth() -> usize {
    1_024
}
fn default_queue_timeout() -> u64 {
    150
}
fn default_op_timeout() -> u64 {
    200
}
fn default_key_cache_ttl() -> u64 {
    5_000
}
fn default_health_key() -> String {
    "xks-proxy-health-check".to_string()
}
fn default_health_interval() -> u64 {
    20
}
fn default_degraded_ms() -> u64 {
    100
}
fn default_unresponsive_ms() -> u64 {
    2_000
}

// ---------------------------------------------------------------------------
// The validated configuration
// ---------------------------------------------------------------------------

/// Where GCM initialization vectors come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum IvSource {
    /// The proxy asks the HSM's random generator (`C_GenerateRandom`) for 12 bytes
    /// and passes them in the GCM parameters. Works with SoftHSM and most HSMs.
    #[default]
    HsmRng,
    /// The HSM generates the IV itself inside `C_EncryptInit`/`C_Encrypt` and
    /// writes it back into the GCM parameters' 12-byte IV buffer, which the
    /// proxy passes zeroed (AWS CloudHSM, the AWS sample's
    /// `is_zero_iv_required = true`). An IV left at zero is refused.
    HsmGenerated,
    /// The HSM generates the IV for an empty IV parameter and appends it to
    /// the output after the tag (Thales Luna; the AWS sample's
    /// `can_generate_iv = true, is_zero_iv_required = false`).
    HsmGeneratedAppended,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// How the proxy finds its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    Label(String),
    Slot(u64),
}

/// The whole validated configuration.
#[derive(Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub hsm: HsmConfig,
    pub health: HealthConfig,
    pub logging: LoggingConfig,
    /// The admin listener (metrics), if enabled.
    pub admin_listen: Option<SocketAddr>,
    pub key_stores: Vec<KeyStoreConfig>,
    /// SHA-256 of the file text this configuration was parsed from, so hot
    /// reload can tell whether the file changed since (even before the
    /// reloader started).
    pub source_digest: Option<[u8; 32]>,
    /// Listener addresses from the command line, already applied above;
    /// kept so that a reload applies them again.
    pub overrides: ListenOverrides,
}

/// Listener addresses given on the command line (`serve --listen …`). They
/// win over the file, so several instances (a fleet on one host, a systemd
/// template unit) can share one configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenOverrides {
    pub listen: Option<SocketAddr>,
    pub ping_listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
}

impl Config {
    /// Applies command-line listener addresses over the file's.
    pub fn with_overrides(mut self, o: ListenOverrides) -> Config {
        if let Some(a) = o.listen {
            self.server.listen = a;
        }
        if let Some(a) = o.ping_listen {
            self.server.ping_listen = Some(a);
        }
        if let Some(a) = o.admin_listen {
            self.admin_listen = Some(a);
        }
        self.overrides = o;
        self
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub ping_listen: Option<SocketAddr>,
    pub max_body_bytes: usize,
    /// Request-body bytes held at once, over all requests (they are read
    /// before their signature can be checked); beyond it, 429.
    pub body_buffer_budget: usize,
    pub fleet_size: u32,
    pub vendor: String,
    pub model: String,
    pub header_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// An authenticated connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// A connection on which no request passed SigV4 is closed this long
    /// after it opened, busy or not: such a connection holds a slot that
    /// KMS may need.
    pub unauthenticated_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    pub max_ping_connections: usize,
    pub shutdown_grace: Duration,
    /// How often the config, secret and certificate files are checked for
    /// changes; `None` when file watching is off (SIGHUP still reloads).
    pub reload_poll: Option<Duration>,
    /// Every connection to the XKS listener starts with a PROXY v2 header.
    pub proxy_protocol: bool,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Mutual TLS, when configured.
    pub client_auth: Option<ClientAuthConfig>,
}

/// Mutual TLS: who may connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuthConfig {
    pub ca: PathBuf,
    /// Patterns matched against the client certificate's CN and DNS SANs.
    pub allowed_names: Vec<String>,
}

#[derive(Clone)]
pub struct HsmConfig {
    /// The key managers, 1 to 10. Requests go to healthy ones and fail over.
    pub backends: Vec<BackendConfig>,
    /// Logged-in sessions per key manager.
    pub sessions: usize,
    pub queue_depth: usize,
    pub queue_timeout: Duration,
    pub operation_timeout: Duration,
    pub iv_source: IvSource,
    pub key_cache_ttl: Duration,
    pub ekm_vendor: Option<String>,
}

impl std::fmt::Debug for HsmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmConfig")
            .field("backends", &self.backends)
            .field("sessions", &self.sessions)
            .field("iv_source", &self.iv_source)
            .finish_non_exhaustive()
    }
}

/// One key manager: a PKCS#11 module and a token in it.
#[derive(Clone)]
pub struct BackendConfig {
    /// Its id in `ekmFleetDetails`, logs and metrics; default: the token's
    /// label and serial number.
    pub name: Option<String>,
    pub module: PathBuf,
    pub token: TokenSelector,
    pub pin: Zeroizing<String>,
    /// Its own session-pool size, when `[hsm] sessions` does not fit it: a
    /// module that is not safe for concurrent calls gets `sessions = 1`.
    pub sessions: Option<usize>,
}

impl PartialEq for BackendConfig {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.module == other.module
            && self.token == other.token
            && *self.pin == *other.pin
            && self.sessions == other.sessions
    }
}

impl std::fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConfig")
            .field("name", &self.name)
            .field("module", &self.module)
            .field("token", &self.token)
            .field("pin", &"<redacted>")
            .field("sessions", &self.sessions)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub key_label: String,
    /// Between probes of an ACTIVE key manager (others: every second).
    pub interval: Duration,
    /// Probes slower than this make a key manager DEGRADED.
    pub degraded_latency: Duration,
    /// A probe or a session with no answer for this long makes a key manager
    /// UNAVAILABLE: a hung HSM is not merely slow.
    pub unresponsive_after: Duration,
}

#[derive(Debug, Clone)]
pub struct LoggingConfig {
    pub format: LogFormat,
    pub level: String,
}

/// One logical key store: an XKS URI path with its own credentials and keys.
#[derive(Debug, Clone)]
pub struct KeyStoreConfig {
    pub name: String,
    /// The full `XksProxyUriPath`, e.g. `/tenant-a/kms/xks/v1`.
    pub uri_path: String,
    pub keys: AllowedKeys,
    pub credentials: Vec<Credential>,
    /// Cedar policies, loaded and validated with the config.
    pub authorization: Option<Arc<crate::authz::Policies>>,
    /// The policy file, watched for changes.
    pub policy_file: Option<PathBuf>,
    pub rate_limit: Option<RateLimit>,
    /// Decrypt also accepts the AWS sample proxy's ciphertexts (migration).
    pub compat: Option<crate::aead::SampleCompat>,
    /// The AWS Region KMS signs this key store's requests for, when pinned.
    pub region: Option<String>,
    /// Refuse a signed request that was already received.
    pub replay_protection: bool,
}

/// A token bucket: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

/// Which external key ids a key store may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedKeys {
    /// Every AES-256 secret key of the token (but never the health-check key).
    All,
    /// Only these labels.
    Only(HashSet<String>),
}

impl AllowedKeys {
    /// True when the list names `id` explicitly (`All` names nothing).
    pub fn names(&self, id: &str) -> bool {
        matches!(self, AllowedKeys::Only(set) if set.contains(id))
    }
}

/// A SigV4 credential: access key id and secret.
#[derive(Clone)]
pub struct Credential {
    pub access_key_id: String,
    pub secret: Zeroizing<String>,
    /// Where the secret was read from, when it is a file.
    pub secret_file: Option<PathBuf>,
    /// When the credential was made, if the config says.
    pub created: Option<SystemTime>,
}

impl Credential {
    /// Creation time from the config, else the secret file's modification time.
    pub fn created_or_modified(&self) -> Option<SystemTime> {
        self.created.or_else(|| {
            self.secret_file
                .as_ref()
                .and_then(|p| std::fs::metadata(p).ok())
                .and_then(|m| m.modified().ok())
        })
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("access_key_id", &self.access_key_id)
            .field("secret", &"<redacted>")
            .field("secret_file", &self.secret_file)
            .finish()
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut cfg = Self::from_toml(&text, &base).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        cfg.source_digest = Some(sha256(text.as_bytes()));
        Ok(cfg)
    }

    /// The files whose change should trigger a reload: the certificate, its
    /// key and every credential's secret file (the config file itself is
    /// watched by the caller, who knows its path).
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.tls.cert.clone(), self.tls.key.clone()];
        files.extend(self.tls.client_auth.as_ref().map(|c| c.ca.clone()));
        for ks in &self.key_stores {
            files.extend(ks.credentials.iter().filter_map(|c| c.secret_file.clone()));
            files.extend(ks.policy_file.clone());
        }
        files
    }

    /// Settings that differ from `other` but only take effect at a restart
    /// (listeners, the HSM connection, logging, connection limits). A reload
    /// keeps the running values and names these in its log line.
    pub fn restart_only_changes(&self, other: &Config) -> Vec<&'static str> {
        let (a, b) = (&self.server, &other.server);
        let (h, g) = (&self.hsm, &other.hsm);
        [
            ("server.listen", a.listen != b.listen),
            ("server.ping_listen", a.ping_listen != b.ping_listen),
            ("admin.listen", self.admin_listen != other.admin_listen),
            (
                "tls mutual authentication on/off",
                self.tls.client_auth.is_some() != other.tls.client_auth.is_some(),
            ),
            (
                "server timeouts and limits",
                a.header_read_timeout != b.header_read_timeout
                    || a.tls_handshake_timeout != b.tls_handshake_timeout
                    || a.idle_timeout != b.idle_timeout
                    || a.unauthenticated_timeout != b.unauthenticated_timeout
                    || a.max_connections != b.max_connections
                    || a.body_buffer_budget != b.body_buffer_budget
                    || a.max_connections_per_source != b.max_connections_per_source
                    || a.max_ping_connections != b.max_ping_connections
                    || a.shutdown_grace != b.shutdown_grace
                    || a.reload_poll != b.reload_poll
                    || a.proxy_protocol != b.proxy_protocol,
            ),
            (
                "hsm",
                h.backends != g.backends
                    || h.sessions != g.sessions
                    || h.queue_depth != g.queue_depth
                    || h.queue_timeout != g.queue_timeout
                    || h.operation_timeout != g.operation_timeout
                    || h.iv_source != g.iv_source
                    || h.key_cache_ttl != g.key_cache_ttl
                    || h.ekm_vendor != g.ekm_vendor,
            ),
            (
                "health",
                self.health.key_label != other.health.key_label
                    || self.health.interval != other.health.interval
                    || self.health.degraded_latency != other.health.degraded_latency
                    || self.health.unresponsive_after != other.health.unresponsive_after,
            ),
            (
                "logging",
                self.logging.format != other.logging.format
                    || self.logging.level != other.logging.level,
            ),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// Parses and validates config text; relative paths resolve against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        validate(raw, base)
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Resolves `p` against the config file's directory when it is relative.
fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn validate(raw: RawConfig, base: &Path) -> Result<Config, ConfigError> {
    let server = validate_server(raw.server)?;
    let tls = validate_tls(raw.tls, base)?;
    let hsm = validate_hsm(raw.hsm, base)?;
    let health = validate_health(raw.health)?;
    let level = raw.logging.level.unwrap_or_else(|| "info".to_string());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        return Err(invalid(
            "logging.level",
            format!("'{level}' is not a valid tracing filter (try info, debug or warn)"),
        ));
    }
    let logging = LoggingConfig {
        format: raw.logging.format,
        level,
    };
    let key_stores = validate_key_stores(raw.key_stores, base, &health.key_label)?;
    let admin_listen = if raw.admin.enabled {
        Some(parse_addr("admin.listen", &raw.admin.listen)?)
    } else {
        None
    };
    Ok(Config {
        server,
        tls,
        hsm,
        health,
        logging,
        admin_listen,
        key_stores,
        source_digest: None,
        overrides: ListenOverrides::default(),
    })
}

fn parse_addr(field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            field,
            format!("'{value}' is not an IP:port socket address (e.g. 0.0.0.0:443)"),
        )
    })
}

fn validate_server(raw: RawServer) -> Result<ServerConfig, ConfigError> {
    let listen = parse_addr("server.listen", &raw.listen)?;
    let ping_listen = raw
        .ping_listen
        .as_deref()
        .map(|v| parse_addr("server.ping_listen", v))
        .transpose()?;
    if raw.max_body_bytes < 24 * 1024 {
        return Err(invalid(
            "server.max_body_bytes",
            "must be at least 24576: the spec's largest legitimate request (4300 bytes of data, \
             8192 bytes of AAD, 20 bytes of metadata, ARNs of 2048 characters) is about 20 KiB",
        ));
    }
    if raw.max_body_bytes > 1024 * 1024 {
        return Err(invalid("server.max_body_bytes", "must be at most 1048576"));
    }
    if raw.body_buffer_budget_bytes < raw.max_body_bytes {
        return Err(invalid(
            "server.body_buffer_budget_bytes",
            "must be at least server.max_body_bytes (one largest request)",
        ));
    }
    if raw.fleet_size == 0 {
        return Err(invalid(
            "server.fleet_size",
            "must be greater than zero (the spec's xksProxyFleetSize)",
        ));
    }
    if raw.vendor.trim().is_empty() {
        return Err(invalid("server.vendor", "must not be empty"));
    }
    if raw.max_connections == 0 || raw.max_ping_connections == 0 {
        return Err(invalid(
            "server.max_connections / server.max_ping_connections",
            "must be greater than zero",
        ));
    }
    if raw.unauthenticated_timeout_ms < raw.tls_handshake_timeout_ms {
        return Err(invalid(
            "server.unauthenticated_timeout_ms",
            "must be at least server.tls_handshake_timeout_ms: a connection needs its \
             handshake and one request to authenticate",
        ));
    }
    if raw.header_read_timeout_ms == 0 || raw.tls_handshake_timeout_ms == 0 {
        return Err(invalid(
            "server.header_read_timeout_ms / server.tls_handshake_timeout_ms",
            "must be greater than zero",
        ));
    }
    Ok(ServerConfig {
        listen,
        ping_listen,
        max_body_bytes: raw.max_body_bytes,
        body_buffer_budget: raw.body_buffer_budget_bytes,
        fleet_size: raw.fleet_size,
        vendor: raw.vendor,
        model: raw
            .model
            .unwrap_or_else(|| format!("xks-proxy {}", env!("CARGO_PKG_VERSION"))),
        header_read_timeout: Duration::from_millis(raw.header_read_timeout_ms),
        tls_handshake_timeout: Duration::from_millis(raw.tls_handshake_timeout_ms),
        idle_timeout: Duration::from_secs(raw.idle_timeout_secs.max(1)),
        unauthenticated_timeout: Duration::from_millis(raw.unauthenticated_timeout_ms),
        max_connections: raw.max_connections,
        max_connections_per_source: raw.max_connections_per_source,
        max_ping_connections: raw.max_ping_connections,
        shutdown_grace: Duration::from_secs(raw.shutdown_grace_secs),
        reload_poll: (raw.reload_poll_ms > 0)
            .then(|| Duration::from_millis(raw.reload_poll_ms.max(100))),
        proxy_protocol: raw.proxy_protocol,
    })
}

fn validate_tls(raw: RawTls, base: &Path) -> Result<TlsConfig, ConfigError> {
    let cert = resolve(base, &raw.cert);
    let key = resolve(base, &raw.key);
    for (field, path) in [("tls.cert", &cert), ("tls.key", &key)] {
        std::fs::File::open(path)
            .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))?;
    }
    check_private_file("tls.key", &key)?;
    let client_auth = match (raw.client_ca, raw.client_names) {
        (None, None) => None,
        (Some(ca), Some(names)) => {
            let ca = resolve(base, &ca);
            std::fs::File::open(&ca).map_err(|e| {
                invalid(
                    "tls.client_ca",
                    format!("cannot read {}: {e}", ca.display()),
                )
            })?;
            if names.is_empty() {
                return Err(invalid(
                    "tls.client_names",
                    "list at least one allowed client name, e.g. \"cks.kms.us-east-1.amazonaws.com\"",
                ));
            }
            for n in &names {
                let ok = !n.is_empty()
                    && n.split('.').all(|label| {
                        label == "*"
                            || (!label.is_empty()
                                && label
                                    .bytes()
                                    .all(|b| b.is_ascii_alphanumeric() || b == b'-'))
                    });
                if !ok {
                    return Err(invalid(
                        "tls.client_names",
                        format!("'{n}' is not a DNS name pattern (labels of A-Z a-z 0-9 -, or * for one label)"),
                    ));
                }
            }
            Some(ClientAuthConfig {
                ca,
                allowed_names: names,
            })
        }
        _ => {
            return Err(invalid(
                "tls.client_ca / tls.client_names",
                "mutual TLS needs both: the CA bundle and the allowed client names",
            ))
        }
    };
    Ok(TlsConfig {
        cert,
        key,
        client_auth,
    })
}

/// Validates one key manager's module, token selector and PIN; `field` names
/// it in errors (`hsm` or `hsm.backends[i]`).
fn validate_backend(
    field: &str,
    name: Option<String>,
    module: Option<PathBuf>,
    token: (Option<String>, Option<u64>),
    pin: (Option<PathBuf>, Option<String>),
    base: &Path,
) -> Result<BackendConfig, ConfigError> {
    let module = resolve(
        base,
        &module
            .ok_or_else(|| invalid(format!("{field}.module"), "the PKCS#11 library is required"))?,
    );
    if !module.is_file() {
        return Err(invalid(
            format!("{field}.module"),
            format!(
                "{} is not a file (the PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so)",
                module.display()
            ),
        ));
    }
    let token = match token {
        (Some(label), None) if !label.is_empty() && label.len() <= 32 => {
            TokenSelector::Label(label)
        }
        (Some(_), None) => {
            return Err(invalid(
                format!("{field}.token_label"),
                "must be 1 to 32 characters",
            ));
        }
        (None, Some(slot)) => TokenSelector::Slot(slot),
        _ => {
            return Err(invalid(
                format!("{field}.token_label / {field}.slot_id"),
                "set exactly one of them",
            ))
        }
    };
    let pin = read_secret(
        &format!("{field}.pin_file"),
        &format!("{field}.pin_env"),
        pin.0,
        pin.1,
        base,
    )?;
    if pin.is_empty() {
        return Err(invalid(
            format!("{field}.pin_file / {field}.pin_env"),
            "the PIN is empty",
        ));
    }
    if let Some(n) = &name {
        if n.is_empty() || n.len() > 64 {
            return Err(invalid(
                format!("{field}.name"),
                "must be 1 to 64 characters",
            ));
        }
    }
    Ok(BackendConfig {
        name,
        module,
        token,
        pin,
        sessions: None,
    })
}

fn check_sessions(field: &str, n: usize) -> Result<(), ConfigError> {
    if n == 0 || n > 256 {
        return Err(invalid(field, "must be between 1 and 256"));
    }
    Ok(())
}

fn validate_hsm(raw: RawHsm, base: &Path) -> Result<HsmConfig, ConfigError> {
    let backends = if raw.backends.is_empty() {
        vec![validate_backend(
            "hsm",
            None,
            raw.module,
            (raw.token_label, raw.slot_id),
            (raw.pin_file, raw.pin_env),
            base,
        )?]
    } else {
        if raw.token_label.is_some() || raw.slot_id.is_some() {
            return Err(invalid(
                "hsm.token_label / hsm.slot_id",
                "with [[hsm.backends]], name the token in each backend, not in [hsm]",
            ));
        }
        if raw.backends.len() > 10 {
            return Err(invalid(
                "hsm.backends",
                "at most 10 key managers (the spec's ekmFleetDetails limit)",
            ));
        }
        let mut out = Vec::with_capacity(raw.backends.len());
        for (i, b) in raw.backends.into_iter().enumerate() {
            // A backend inherits the module and PIN of [hsm] unless it sets its own.
            let pin = if b.pin_file.is_some() || b.pin_env.is_some() {
                (b.pin_file, b.pin_env)
            } else {
                (raw.pin_file.clone(), raw.pin_env.clone())
            };
            let field = format!("hsm.backends[{i}]");
            let mut backend = validate_backend(
                &field,
                b.name,
                b.module.or_else(|| raw.module.clone()),
                (b.token_label, b.slot_id),
                pin,
                base,
            )?;
            if let Some(n) = b.sessions {
                check_sessions(&format!("{field}.sessions"), n)?;
                backend.sessions = Some(n);
            }
            out.push(backend);
        }
        let mut names = HashSet::new();
        for name in out.iter().filter_map(|b| b.name.as_ref()) {
            if !names.insert(name.clone()) {
                return Err(invalid(
                    "hsm.backends",
                    format!("two key managers are named '{name}'"),
                ));
            }
        }
        out
    };
    check_sessions("hsm.sessions", raw.sessions)?;
    if raw.queue_depth == 0 {
        return Err(invalid("hsm.queue_depth", "must be greater than zero"));
    }
    if raw.queue_timeout_ms == 0 || raw.queue_timeout_ms >= 250 {
        return Err(invalid(
            "hsm.queue_timeout_ms",
            "must be between 1 and 249: KMS gives every call 250 ms, so waiting longer for a \
             session only turns a fast 503 into a KMS timeout",
        ));
    }
    if raw.operation_timeout_ms < raw.queue_timeout_ms || raw.operation_timeout_ms >= 250 {
        return Err(invalid(
            "hsm.operation_timeout_ms",
            "must be at least hsm.queue_timeout_ms and below 250 (KMS's per-call budget)",
        ));
    }
    Ok(HsmConfig {
        backends,
        sessions: raw.sessions,
        queue_depth: raw.queue_depth,
        queue_timeout: Duration::from_millis(raw.queue_timeout_ms),
        operation_timeout: Duration::from_millis(raw.operation_timeout_ms),
        iv_source: raw.iv_source,
        key_cache_ttl: Duration::from_millis(raw.key_cache_ttl_ms),
        ekm_vendor: raw.ekm_vendor,
    })
}

fn validate_health(raw: RawHealth) -> Result<HealthConfig, ConfigError> {
    if !is_valid_key_id(&raw.key_label) {
        return Err(invalid(
            "health.key_label",
            "must be 1 to 128 characters of A-Z a-z 0-9 . _ -",
        ));
    }
    if raw.interval_secs == 0 || raw.interval_secs > 30 {
        return Err(invalid(
            "health.interval_secs",
            "must be between 1 and 30: the spec allows a health result of at most one minute, \
             and a result must be renewed well before it gets that old",
        ));
    }
    if !(250..=10_000).contains(&raw.unresponsive_after_ms) {
        return Err(invalid(
            "health.unresponsive_after_ms",
            "must be between 250 (KMS's own budget) and 10000",
        ));
    }
    Ok(HealthConfig {
        key_label: raw.key_label,
        interval: Duration::from_secs(raw.interval_secs),
        degraded_latency: Duration::from_millis(raw.degraded_latency_ms.max(1)),
        unresponsive_after: Duration::from_millis(raw.unresponsive_after_ms),
    })
}

fn validate_key_stores(
    raws: Vec<RawKeyStore>,
    base: &Path,
    health_key: &str,
) -> Result<Vec<KeyStoreConfig>, ConfigError> {
    if raws.is_empty() {
        return Err(invalid(
            "key_stores",
            "at least one [[key_stores]] entry is required",
        ));
    }
    let mut paths = HashSet::new();
    let mut key_ids: HashMap<String, String> = HashMap::new();
    let mut out = Vec::with_capacity(raws.len());
    for (i, raw) in raws.into_iter().enumerate() {
        let field = format!("key_stores[{i}] ({})", raw.name);
        if raw.name.trim().is_empty() {
            return Err(invalid(
                format!("key_stores[{i}].name"),
                "must not be empty",
            ));
        }
        if !is_valid_uri_path(&raw.uri_path) {
            return Err(invalid(
                format!("{field}.uri_path"),
                format!(
                    "'{}' is not a valid XksProxyUriPath: 10 to 128 characters matching \
                     ^(/[a-zA-Z0-9/_-]+/kms/xks/v1)$ or ^/kms/xks/v1$",
                    raw.uri_path
                ),
            ));
        }
        if !paths.insert(raw.uri_path.clone()) {
            return Err(invalid(
                format!("{field}.uri_path"),
                format!("'{}' is used by two key stores", raw.uri_path),
            ));
        }
        let keys = if raw.keys.len() == 1 && raw.keys[0] == "*" {
            AllowedKeys::All
        } else {
            if raw.keys.is_empty() {
                return Err(invalid(
                    format!("{field}.keys"),
                    "list the external key ids (PKCS#11 labels) or [\"*\"] for every AES-256 key",
                ));
            }
            let mut set = HashSet::new();
            for k in raw.keys {
                if !is_valid_key_id(&k) {
                    return Err(invalid(
                        format!("{field}.keys"),
                        format!(
                            "'{k}' is not a valid external key id (1-128 of A-Z a-z 0-9 . _ -)"
                        ),
                    ));
                }
                if k == health_key {
                    return Err(invalid(
                        format!("{field}.keys"),
                        format!("'{k}' is the health-check key; it must never serve KMS"),
                    ));
                }
                set.insert(k);
            }
            AllowedKeys::Only(set)
        };
        if raw.credentials.is_empty() {
            return Err(invalid(
                format!("{field}.credentials"),
                "at least one SigV4 credential is required",
            ));
        }
        let mut credentials = Vec::with_capacity(raw.credentials.len());
        for (j, c) in raw.credentials.into_iter().enumerate() {
            let cf = format!("{field}.credentials[{j}]");
            if !is_valid_access_key_id(&c.access_key_id) {
                return Err(invalid(
                    format!("{cf}.access_key_id"),
                    "must be 20 to 30 characters of A-Z and 2-7",
                ));
            }
            if let Some(other) = key_ids.insert(c.access_key_id.clone(), raw.name.clone()) {
                return Err(invalid(
                    format!("{cf}.access_key_id"),
                    format!("{} is already used by key store '{other}'; an access key id must identify one secret", c.access_key_id),
                ));
            }
            let secret_file = c.secret_file.as_ref().map(|p| resolve(base, p));
            let created = match &c.created {
                None => None,
                Some(s) => Some(parse_timestamp(s).ok_or_else(|| {
                    invalid(
                        format!("{cf}.created"),
                        format!("'{s}' is not a UTC timestamp like 2026-01-31T12:00:00Z"),
                    )
                })?),
            };
            let secret = read_secret(
                &format!("{cf}.secret_file"),
                &format!("{cf}.secret_env"),
                c.secret_file,
                c.secret_env,
                base,
            )?;
            if !is_valid_secret(&secret) {
                return Err(invalid(
                    format!("{cf}.secret"),
                    "the secret access key must be 43 to 64 characters of A-Z a-z 0-9 + / =",
                ));
            }
            credentials.push(Credential {
                access_key_id: c.access_key_id,
                secret,
                secret_file,
                created,
            });
        }
        let (authorization, policy_file) = match raw.authorization {
            None => (None, None),
            Some(a) => {
                let file = resolve(base, &a.policy_file);
                let policies = crate::authz::Policies::load(&file, a.mode)
                    .map_err(|e| invalid(format!("{field}.authorization.policy_file"), e))?;
                (Some(Arc::new(policies)), Some(file))
            }
        };
        let rate_limit = match raw.rate_limit {
            None => None,
            Some(r) => {
                let burst = r.burst.unwrap_or(r.requests_per_second);
                let valid = r.requests_per_second > 0.0
                    && r.requests_per_second.is_finite()
                    && burst >= 1.0
                    && burst.is_finite();
                if !valid {
                    return Err(invalid(
                        format!("{field}.rate_limit"),
                        "requests_per_second must be > 0 and burst >= 1",
                    ));
                }
                Some(RateLimit {
                    per_second: r.requests_per_second,
                    burst,
                })
            }
        };
        let compat = validate_compat(&field, raw.compat, raw.compat_metadata_b64)?;
        if let Some(r) = &raw.region {
            if !is_valid_region(r) {
                return Err(invalid(
                    format!("{field}.region"),
                    format!("'{r}' is not an AWS Region name like us-east-1"),
                ));
            }
        }
        out.push(KeyStoreConfig {
            name: raw.name,
            uri_path: raw.uri_path,
            keys,
            credentials,
            authorization,
            policy_file,
            rate_limit,
            compat,
            region: raw.region,
            replay_protection: raw.replay_protection,
        });
    }
    Ok(out)
}

/// `compat` and the sample's static ciphertext metadata.
fn validate_compat(
    field: &str,
    compat: Option<Compat>,
    metadata_b64: Option<String>,
) -> Result<Option<crate::aead::SampleCompat>, ConfigError> {
    use base64::Engine;
    let Some(Compat::AwsSample) = compat else {
        return match metadata_b64 {
            Some(_) => Err(invalid(
                format!("{field}.compat_metadata_b64"),
                "only with compat = \"aws-sample\"",
            )),
            None => Ok(None),
        };
    };
    let metadata = match metadata_b64 {
        None => None,
        Some(b64) => {
            let md = base64::engine::general_purpose::STANDARD
                .decode(&b64)
                .ok()
                .filter(|m| !m.is_empty() && m.len() <= crate::aead::MAX_METADATA_LEN)
                .ok_or_else(|| {
                    invalid(
                        format!("{field}.compat_metadata_b64"),
                        "must be the Base64 of 1 to 20 bytes (the sample's \
                         server.ciphertext_metadata_b64)",
                    )
                })?;
            if crate::aead::is_own_metadata(&md) {
                return Err(invalid(
                    format!("{field}.compat_metadata_b64"),
                    "these bytes are also a metadata layout of this proxy, so the sample's \
                     ciphertexts could not be told from ours; see docs/migrate-from-aws-sample.md",
                ));
            }
            Some(md)
        }
    };
    Ok(Some(crate::aead::SampleCompat { metadata }))
}

/// Reads a secret from exactly one of a file or an environment variable.
/// Trailing newlines are trimmed (editors and `echo` add them).
fn read_secret(
    file_field: &str,
    env_field: &str,
    file: Option<PathBuf>,
    env: Option<String>,
    base: &Path,
) -> Result<Zeroizing<String>, ConfigError> {
    match (file, env) {
        (Some(file), None) => {
            let path = resolve(base, &file);
            check_private_file(file_field, &path)?;
            let mut text = Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
                invalid(file_field, format!("cannot read {}: {e}", path.display()))
            })?);
            let trimmed_len = text.trim_end_matches(['\n', '\r']).len();
            text.truncate(trimmed_len);
            Ok(text)
        }
        (None, Some(var)) => match std::env::var(&var) {
            Ok(v) => Ok(Zeroizing::new(v)),
            Err(_) => Err(invalid(
                env_field,
                format!("environment variable {var} is not set (or not UTF-8)"),
            )),
        },
        _ => Err(invalid(
            format!("{file_field} / {env_field}"),
            "set exactly one of them",
        )),
    }
}

/// Refuses a secret file that group or others can read or write: a secret that
/// every local user can read is not a secret.
fn check_private_file(field: &str, path: &Path) -> Result<(), ConfigError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))?;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(invalid(
                field,
                format!(
                    "{} has mode {:o}; it holds a secret and must not be accessible by group \
                     or others (chmod 600 {})",
                    path.display(),
                    mode & 0o777,
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (UTC, RFC 3339 without fractions).
pub fn parse_timestamp(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let compact: String = s.chars().filter(|c| *c != '-' && *c != ':').collect();
    crate::time::parse_amz_date(&compact)
}

/// Formats a time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_timestamp(t: SystemTime) -> String {
    let a = crate::time::format_amz_date(t);
    format!(
        "{}-{}-{}T{}:{}:{}Z",
        &a[0..4],
        &a[4..6],
        &a[6..8],
        &a[9..11],
        &a[11..13],
        &a[13..15]
    )
}

/// `externalKeyId`: at most 128 characters of `[A-Za-z0-9._-]`, and not
/// `.` or `..` (path segments that a proxy or client may rewrite).
pub fn is_valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `XksProxyUriPath` for API version 1, as KMS validates it.
pub fn is_valid_uri_path(p: &str) -> bool {
    const SUFFIX: &str = "/kms/xks/v1";
    if p.len() < 10 || p.len() > 128 || !p.ends_with(SUFFIX) {
        return false;
    }
    if p == SUFFIX {
        return true;
    }
    let prefix = &p[..p.len() - SUFFIX.len()];
    prefix.starts_with('/')
        && prefix.len() > 1
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-'))
}

/// An AWS Region name: lowercase letters, digits and dashes, like `us-east-1`.
pub fn is_valid_region(r: &str) -> bool {
    (4..=32).contains(&r.len())
        && r.split('-').count() >= 3
        && r.split('-').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

/// Access key id: 20 to 30 characters of `A-Z` and `2-7` (base32 alphabet).
pub fn is_valid_access_key_id(id: &str) -> bool {
    (20..=30).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
}

/// Secret access key: 43 to 64 characters of `A-Za-z0-9+/=`.
pub fn is_valid_secret(s: &str) -> bool {
    (43..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_paths_follow_kms_rules() {
        assert!(is_valid_uri_path("/kms/xks/v1"));
        assert!(is_valid_uri_path("/example/kms/xks/v1"));
        assert!(is_valid_uri_path("/a/b-c_d/kms/xks/v1"));
        assert!(!is_valid_uri_path("/kms/xks/v2"));
        assert!(!is_valid_uri_path("example/kms/xks/v1"));
        assert!(!is_valid_uri_path("/ex.ample/kms/xks/v1"));
        assert!(!is_valid_uri_path(&format!(
            "/{}/kms/xks/v1",
            "a".repeat(120)
        )));
    }

    #[test]
    fn credential_formats() {
        assert!(is_valid_access_key_id("AKIAI2SFODNN7EXAMPLE"));
        assert!(!is_valid_access_key_id("AKIAI2SFODNN7EXAMPL1")); // '1' not in base32
        assert!(!is_valid_access_key_id("SHORT"));
        assert!(is_valid_secret(
            "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE"
        ));
        assert!(!is_valid_secret("too-short"));
        assert!(!is_valid_secret(&"a".repeat(65)));
    }

    #[test]
    fn timestamps() {
        let t = parse_timestamp("2026-11-23T08:09:16Z").unwrap();
        assert_eq!(format_timestamp(t), "2026-11-23T08:09:16Z");
        assert!(parse_timestamp("2026-11-23 08:09:16Z").is_none());
        assert!(parse_timestamp("20261123T080916Z").is_none());
    }

    #[test]
    fn regions() {
        for r in [
            "us-east-1",
            "eu-central-2",
            "us-gov-west-1",
            "ap-southeast-4",
        ] {
            assert!(is_valid_region(r), "{r}");
        }
        for r in ["", "us", "US-EAST-1", "us_east_1", "us-east-", "-us-east-1"] {
            assert!(!is_valid_region(r), "{r}");
        }
    }

    #[test]
    fn key_ids() {
        assert!(is_valid_key_id("b42c7fbf-de61-441c-ae24-123456789012"));
        assert!(is_valid_key_id("a.b_c-D"));
        assert!(!is_valid_key_id(""));
        assert!(!is_valid_key_id("."));
        assert!(!is_valid_key_id(".."));
        assert!(is_valid_key_id("..."));
        assert!(!is_valid_key_id("a/b"));
        assert!(!is_valid_key_id(&"a".repeat(129)));
    }
}
