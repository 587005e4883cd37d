//! Checking each section of the file and turning it into the typed section
//! of the subsystem that owns it. Every error names the field and the rule.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{invalid, ConfigError};
use super::paths::resolve;
use super::raw::*;
use super::secrets::{check_private_file, read_secret};
use super::Threads;
use xks_audit::config::{is_valid_instance_id, AuditConfig};
use xks_hsm::config::{BackendConfig, HealthConfig, HsmConfig, TokenSelector};
use xks_net::client_auth::ClientAuthConfig;
use xks_net::config::NetConfig;
use xks_net::tls::{Termination, TlsConfig};
use xks_spec::names::is_valid_key_id;
use xks_state::ServiceConfig;

pub(super) fn parse_addr(field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            field,
            format!("'{value}' is not an IP:port socket address (e.g. 0.0.0.0:443)"),
        )
    })
}

/// `[server]` (and the admin listener): the listeners' settings, what
/// GetHealthStatus says about the proxy, and the reload poll interval.
/// More runtime workers than this is a typo, not a tuning.
const MAX_RUNTIME_THREADS: usize = 256;

pub(super) fn validate_server(
    raw: RawServer,
    admin_listen: Option<SocketAddr>,
) -> Result<(NetConfig, ServiceConfig, Option<Duration>, Threads), ConfigError> {
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
    let net = NetConfig {
        listen,
        ping_listen,
        admin_listen,
        header_read_timeout: Duration::from_millis(raw.header_read_timeout_ms),
        tls_handshake_timeout: Duration::from_millis(raw.tls_handshake_timeout_ms),
        idle_timeout: Duration::from_secs(raw.idle_timeout_secs.max(1)),
        unauthenticated_timeout: Duration::from_millis(raw.unauthenticated_timeout_ms),
        max_connections: raw.max_connections,
        max_connections_per_source: raw.max_connections_per_source,
        max_ping_connections: raw.max_ping_connections,
        shutdown_grace: Duration::from_secs(raw.shutdown_grace_secs),
        proxy_protocol: raw.proxy_protocol,
        body_buffer_budget: raw.body_buffer_budget_bytes,
    };
    let service = ServiceConfig {
        max_body_bytes: raw.max_body_bytes,
        fleet_size: raw.fleet_size,
        vendor: raw.vendor,
        model: raw
            .model
            .unwrap_or_else(|| format!("xks-proxy {}", env!("CARGO_PKG_VERSION"))),
    };
    let reload_poll =
        (raw.reload_poll_ms > 0).then(|| Duration::from_millis(raw.reload_poll_ms.max(100)));
    if raw.runtime_threads > MAX_RUNTIME_THREADS {
        return Err(invalid(
            "server.runtime_threads",
            format!("must be at most {MAX_RUNTIME_THREADS} (0: one per CPU)"),
        ));
    }
    let threads = Threads {
        runtime: raw.runtime_threads,
        pin: raw.pin_threads,
    };
    Ok((net, service, reload_poll, threads))
}

/// `[tls]`: `None` when TLS ends at the load balancer (said by name).
pub(super) fn validate_tls(raw: RawTls, base: &Path) -> Result<Option<TlsConfig>, ConfigError> {
    if raw.termination == Termination::LoadBalancer {
        let set: Vec<&str> = [
            ("tls.cert", raw.cert.is_some()),
            ("tls.key", raw.key.is_some()),
            ("tls.client_ca", raw.client_ca.is_some()),
            ("tls.client_names", raw.client_names.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        if let Some(first) = set.first() {
            return Err(invalid(
                *first,
                format!(
                    "tls.termination = \"load-balancer\": the load balancer ends TLS, so this \
                     proxy has no certificate to serve and no client certificate to check (mutual \
                     TLS cannot work here); remove {}",
                    set.join(", ")
                ),
            ));
        }
        return Ok(None);
    }
    let required = |field: &str, v: Option<PathBuf>| {
        v.ok_or_else(|| {
            invalid(
                field,
                "is required (the proxy serves TLS; if a load balancer in front ends TLS, set \
                 tls.termination = \"load-balancer\" instead)",
            )
        })
    };
    let cert = resolve(base, &required("tls.cert", raw.cert)?);
    let key = resolve(base, &required("tls.key", raw.key)?);
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
    Ok(Some(TlsConfig {
        cert,
        key,
        client_auth,
    }))
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

pub(super) fn validate_hsm(raw: RawHsm, base: &Path) -> Result<HsmConfig, ConfigError> {
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
        session_kind: raw.session_kind,
        key_cache_ttl: Duration::from_millis(raw.key_cache_ttl_ms),
        ekm_vendor: raw.ekm_vendor,
        // Set from `[audit]` once that section is read.
        hmac_keys: Vec::new(),
    })
}

pub(super) fn validate_health(raw: RawHealth) -> Result<HealthConfig, ConfigError> {
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

/// `[audit]`: where the trail goes, how often it is sealed and rotated, and
/// what happens when it cannot take a record. `None` when absent or
/// `enabled = false`: the trail is off, as it always was.
pub(super) fn validate_audit(
    raw: Option<RawAudit>,
    base: &Path,
    health_key: &str,
) -> Result<Option<AuditConfig>, ConfigError> {
    let Some(raw) = raw.filter(|a| a.enabled) else {
        return Ok(None);
    };
    let dir = resolve(base, &raw.dir);
    if dir.exists() && !dir.is_dir() {
        return Err(invalid(
            "audit.dir",
            format!("{} exists and is not a directory", dir.display()),
        ));
    }
    if let Some(id) = &raw.instance_id {
        if !is_valid_instance_id(id) {
            return Err(invalid(
                "audit.instance_id",
                "must be 1 to 64 characters of A-Z a-z 0-9 . _ - (not starting with a dot): it \
                 names the instance's files",
            ));
        }
    }
    if raw.seal_every_records == 0 || raw.seal_every_records > 1_000_000 {
        return Err(invalid(
            "audit.seal_every_records",
            "must be between 1 and 1000000: records after the last seal are proven by nothing",
        ));
    }
    if raw.seal_every_secs == 0 || raw.seal_every_secs > 3_600 {
        return Err(invalid(
            "audit.seal_every_secs",
            "must be between 1 and 3600: records after the last seal are proven by nothing",
        ));
    }
    if raw.rotate_bytes < 64 * 1024 || raw.rotate_bytes > 1 << 30 {
        return Err(invalid(
            "audit.rotate_bytes",
            "must be between 65536 and 1073741824",
        ));
    }
    if raw.rotate_secs < 60 {
        return Err(invalid("audit.rotate_secs", "must be at least 60"));
    }
    if raw.queue_records == 0 || raw.queue_records > 1 << 20 {
        return Err(invalid(
            "audit.queue_records",
            "must be between 1 and 1048576 (each queued record holds about a kilobyte)",
        ));
    }
    if !is_valid_key_id(&raw.seal_key_label) {
        return Err(invalid(
            "audit.seal_key_label",
            "must be 1 to 128 characters of A-Z a-z 0-9 . _ -",
        ));
    }
    if raw.seal_key_label == health_key {
        return Err(invalid(
            "audit.seal_key_label",
            "must not be the health-check key's label",
        ));
    }
    Ok(Some(AuditConfig {
        dir,
        instance_id: raw.instance_id,
        on_failure: raw.on_failure,
        seal_every_records: raw.seal_every_records,
        seal_every: Duration::from_secs(raw.seal_every_secs),
        rotate_bytes: raw.rotate_bytes,
        rotate_every: Duration::from_secs(raw.rotate_secs),
        compress: raw.compress,
        queue_records: raw.queue_records,
        seal_key_label: raw.seal_key_label,
        create_seal_key: raw.create_seal_key,
    }))
}
