//! The key managers' configuration: what `[hsm]`, `[[hsm.backends]]` and
//! `[health]` become once the configuration reader has checked them.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

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

/// Which kind of session the request threads open.
///
/// Read-only is the default because a request never writes to the token:
/// a session that cannot create or destroy token objects is one less way for
/// a bug to touch key material. Not every vendor offers it (AWS CloudHSM's
/// Client SDK 5 lists "Read Only Session is not supported" among its known
/// issues), hence `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SessionKind {
    /// Read-only; read-write from the first time the token refuses one
    /// (logged once, reported by `hsm probe`).
    #[default]
    Auto,
    ReadOnly,
    ReadWrite,
}

/// How the proxy finds its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    Label(String),
    Slot(u64),
}

#[derive(Clone, PartialEq)]
pub struct HsmConfig {
    /// The key managers, 1 to 10. Requests go to healthy ones and fail over.
    pub backends: Vec<BackendConfig>,
    /// Logged-in sessions per key manager.
    pub sessions: usize,
    pub queue_depth: usize,
    pub queue_timeout: Duration,
    pub operation_timeout: Duration,
    pub iv_source: IvSource,
    pub session_kind: SessionKind,
    pub key_cache_ttl: Duration,
    pub ekm_vendor: Option<String>,
    /// HMAC keys made in each key manager that lacks one when it opens
    /// (the audit trail's seal key, when `[audit]` asks for it).
    pub hmac_keys: Vec<String>,
}

impl std::fmt::Debug for HsmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmConfig")
            .field("backends", &self.backends)
            .field("sessions", &self.sessions)
            .field("iv_source", &self.iv_source)
            .field("session_kind", &self.session_kind)
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
            && bool::from(self.pin.as_bytes().ct_eq(other.pin.as_bytes()))
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

#[derive(Debug, Clone, PartialEq, Eq)]
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
