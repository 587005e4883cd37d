//! The file as written: structs that mirror the TOML, with the defaults of
//! every optional setting. Unknown fields are errors (a typo in a setting
//! must not be silently ignored).

use std::path::PathBuf;

use serde::Deserialize;

use xks_hsm::config::{IvSource, SessionKind};
use xks_telemetry::logging::LogFormat;

// The file as written
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) server: RawServer,
    pub(super) tls: RawTls,
    pub(super) hsm: RawHsm,
    #[serde(default)]
    pub(super) health: RawHealth,
    #[serde(default)]
    pub(super) logging: RawLogging,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) key_stores: Vec<RawKeyStore>,
    /// The audit trail; off when absent.
    pub(super) audit: Option<RawAudit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    #[serde(default = "default_true")]
    pub(super) enabled: bool,
    pub(super) dir: PathBuf,
    pub(super) instance_id: Option<String>,
    #[serde(default)]
    pub(super) on_failure: xks_audit::OnFailure,
    #[serde(default = "default_seal_every_records")]
    pub(super) seal_every_records: u64,
    #[serde(default = "default_seal_every_secs")]
    pub(super) seal_every_secs: u64,
    #[serde(default = "default_rotate_bytes")]
    pub(super) rotate_bytes: u64,
    #[serde(default = "default_rotate_secs")]
    pub(super) rotate_secs: u64,
    #[serde(default)]
    pub(super) compress: xks_audit::Compression,
    #[serde(default = "default_queue_records")]
    pub(super) queue_records: usize,
    #[serde(default = "default_seal_key_label")]
    pub(super) seal_key_label: String,
    #[serde(default = "default_true")]
    pub(super) create_seal_key: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    #[serde(default = "default_true")]
    pub(super) enabled: bool,
    #[serde(default = "default_admin_listen")]
    pub(super) listen: String,
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
pub(super) struct RawServer {
    pub(super) listen: String,
    pub(super) ping_listen: Option<String>,
    #[serde(default = "default_max_body")]
    pub(super) max_body_bytes: usize,
    /// Request-body bytes held at once, over all requests.
    #[serde(default = "default_body_buffer_budget")]
    pub(super) body_buffer_budget_bytes: usize,
    #[serde(default = "default_fleet_size")]
    pub(super) fleet_size: u32,
    #[serde(default = "default_vendor")]
    pub(super) vendor: String,
    pub(super) model: Option<String>,
    #[serde(default = "default_header_timeout")]
    pub(super) header_read_timeout_ms: u64,
    #[serde(default = "default_handshake_timeout")]
    pub(super) tls_handshake_timeout_ms: u64,
    #[serde(default = "default_idle_timeout")]
    pub(super) idle_timeout_secs: u64,
    #[serde(default = "default_max_connections")]
    pub(super) max_connections: usize,
    /// Connections from one source address at once, per listener (0: no limit).
    #[serde(default = "default_max_per_source")]
    pub(super) max_connections_per_source: usize,
    /// Connections the plain `/ping` listener holds at once.
    #[serde(default = "default_max_ping_connections")]
    pub(super) max_ping_connections: usize,
    /// How long a connection may stay open before a request on it passes SigV4.
    #[serde(default = "default_unauthenticated_timeout")]
    pub(super) unauthenticated_timeout_ms: u64,
    #[serde(default = "default_shutdown_grace")]
    pub(super) shutdown_grace_secs: u64,
    #[serde(default = "default_reload_poll")]
    pub(super) reload_poll_ms: u64,
    /// Expect a PROXY protocol v2 header on every XKS connection (NLB).
    #[serde(default)]
    pub(super) proxy_protocol: bool,
    /// Async-runtime worker threads; 0: one per CPU lane.
    #[serde(default = "default_runtime_threads")]
    pub(super) runtime_threads: usize,
    /// Pin threads to CPU lanes (see `xks_hsm::lanes`).
    #[serde(default = "default_true")]
    pub(super) pin_threads: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    /// Where TLS ends: here (the default), or at the load balancer.
    #[serde(default)]
    pub(super) termination: xks_net::tls::Termination,
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
    /// mTLS: CA bundle that client certificates must chain to.
    pub(super) client_ca: Option<PathBuf>,
    /// mTLS: allowed client names (CN or DNS SAN); `*` matches one label.
    pub(super) client_names: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHsm {
    pub(super) module: Option<PathBuf>,
    pub(super) token_label: Option<String>,
    pub(super) slot_id: Option<u64>,
    pub(super) pin_file: Option<PathBuf>,
    pub(super) pin_env: Option<String>,
    #[serde(default = "default_sessions")]
    pub(super) sessions: usize,
    #[serde(default = "default_queue_depth")]
    pub(super) queue_depth: usize,
    #[serde(default = "default_queue_timeout")]
    pub(super) queue_timeout_ms: u64,
    #[serde(default = "default_op_timeout")]
    pub(super) operation_timeout_ms: u64,
    #[serde(default)]
    pub(super) iv_source: IvSource,
    #[serde(default)]
    pub(super) session_kind: SessionKind,
    #[serde(default = "default_key_cache_ttl")]
    pub(super) key_cache_ttl_ms: u64,
    pub(super) ekm_vendor: Option<String>,
    /// Several key managers (e.g. the HSMs of a cluster holding the same keys).
    #[serde(default)]
    pub(super) backends: Vec<RawBackend>,
}

/// One key manager; unset fields are taken from `[hsm]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) name: Option<String>,
    pub(super) module: Option<PathBuf>,
    pub(super) token_label: Option<String>,
    pub(super) slot_id: Option<u64>,
    pub(super) pin_file: Option<PathBuf>,
    pub(super) pin_env: Option<String>,
    /// This key manager's own pool size, instead of `hsm.sessions`.
    pub(super) sessions: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    #[serde(default = "default_health_key")]
    pub(super) key_label: String,
    #[serde(default = "default_health_interval")]
    pub(super) interval_secs: u64,
    #[serde(default = "default_degraded_ms")]
    pub(super) degraded_latency_ms: u64,
    /// A key manager that has not answered for this long is UNAVAILABLE.
    #[serde(default = "default_unresponsive_ms")]
    pub(super) unresponsive_after_ms: u64,
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
pub(super) struct RawLogging {
    #[serde(default)]
    pub(super) format: LogFormat,
    pub(super) level: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeyStore {
    pub(super) name: String,
    pub(super) uri_path: String,
    /// External key ids this key store may use; `["*"]` means every AES-256 key
    /// of the token except the health-check key.
    pub(super) keys: Vec<String>,
    #[serde(default)]
    pub(super) credentials: Vec<RawCredential>,
    /// Secondary authorization: a Cedar policy file.
    pub(super) authorization: Option<RawAuthorization>,
    /// Request-rate quota for this key store.
    pub(super) rate_limit: Option<RawRateLimit>,
    /// The AWS Region of the KMS key store: requests signed for another
    /// region are refused.
    pub(super) region: Option<String>,
    /// Refuse a signed request seen before (see `replay`).
    #[serde(default)]
    pub(super) replay_protection: bool,
    /// `"aws-sample"`: Decrypt also accepts what the AWS sample proxy wrote.
    pub(super) compat: Option<Compat>,
    /// The sample's `server.ciphertext_metadata_b64`, when it had one.
    pub(super) compat_metadata_b64: Option<String>,
}

/// Which other proxy's ciphertexts a key store also decrypts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum Compat {
    /// `aws-samples/aws-kms-xks-proxy`.
    AwsSample,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuthorization {
    pub(super) policy_file: PathBuf,
    #[serde(default)]
    pub(super) mode: xks_guard::authz::Mode,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub(super) requests_per_second: f64,
    pub(super) burst: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredential {
    pub(super) access_key_id: String,
    pub(super) secret_file: Option<PathBuf>,
    pub(super) secret_env: Option<String>,
    /// When the credential was made (`YYYY-MM-DDTHH:MM:SSZ`), for its age metric.
    pub(super) created: Option<String>,
}

fn default_true() -> bool {
    true
}
fn default_seal_every_records() -> u64 {
    10_000
}
fn default_seal_every_secs() -> u64 {
    10
}
fn default_rotate_bytes() -> u64 {
    128 * 1024 * 1024
}
fn default_rotate_secs() -> u64 {
    86_400
}
fn default_queue_records() -> usize {
    16_384
}
fn default_seal_key_label() -> String {
    "xks-proxy-audit-seal".to_string()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9464".to_string()
}
/// One: it serves ~15,000 requests/s on a 2-core VM, several times KMS's
/// quota for a key store, and a second worker costs CPU at the rates KMS
/// actually sends (docs/performance.md, round three).
fn default_runtime_threads() -> usize {
    1
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
