//! What `[audit]` becomes once the configuration reader has checked it.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// What happens to a request whose audit record the trail cannot take
/// (queue full, disk failing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// The request is answered `503 DependencyTimeoutException` before any
    /// key is used: no key operation goes unrecorded. The default, since
    /// whoever turns the trail on wants it complete.
    #[default]
    Refuse,
    /// The request is served; the lost record is counted
    /// (`xks_audit_records_lost_total`), logged, and the trail gets a
    /// `loss` record saying how many are missing.
    Continue,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Refuse => "refuse",
            OnFailure::Continue => "continue",
        }
    }
}

/// The audit trail's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// Where the trail's files go (created, mode 0700, at startup).
    pub dir: PathBuf,
    /// This instance's chain: names its files and every record. `None`:
    /// `<hostname>-<port of the XKS listener>` (see [`default_instance_id`]).
    pub instance_id: Option<String>,
    pub on_failure: OnFailure,
    /// A seal after this many records...
    pub seal_every_records: u64,
    /// ...or this much time, whichever comes first (also when idle, so
    /// that the newest seal of a running instance is never older).
    pub seal_every: Duration,
    /// A new file when the current one reaches this size...
    pub rotate_bytes: u64,
    /// ...or this age.
    pub rotate_every: Duration,
    /// How rotated files are kept (see `super::files`).
    pub compress: super::files::Compression,
    /// Records queued (or reserved by requests in flight) at most.
    pub queue_records: usize,
    /// The label of the HMAC key that seals the trail, in the HSM.
    pub seal_key_label: String,
    /// Generate the seal key in a key manager that lacks it, at startup.
    pub create_seal_key: bool,
}

/// True for an instance id that can name files: 1 to 64 characters of
/// `A-Z a-z 0-9 . _ -`, not starting with a dot.
pub fn is_valid_instance_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// This machine's host name (`/proc/sys/kernel/hostname`, else
/// `$HOSTNAME`), or `localhost`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The instance id when none is configured: the host name and the XKS
/// listener's port. Stable across restarts of one instance (a VM on 443, a
/// pod keeps its name), different for instances that share a host (each
/// listens on its own port), so two processes never write one chain.
pub fn default_instance_id(port: u16) -> String {
    let host: String = hostname()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(56)
        .collect();
    let host = host.trim_start_matches('.');
    format!("{}-{port}", if host.is_empty() { "host" } else { host })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_name_files() {
        assert!(is_valid_instance_id("proxy-a.example_1"));
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(!is_valid_instance_id(bad), "{bad}");
        }
        let id = default_instance_id(443);
        assert!(id.ends_with("-443"), "{id}");
        assert!(is_valid_instance_id(&id), "{id}");
    }
}
