//! Configuration: one TOML file, read and validated completely at startup
//! (and at every reload).
//!
//! This module only reads, resolves paths and validates: the file is parsed
//! into `raw` structs that mirror the TOML, each section is checked
//! (`validate`) and becomes the typed section of the subsystem that owns it
//! (`net::config::NetConfig`, `hsm::config::HsmConfig`, `state::KeyStoreConfig`,
//! …). Every check names the field and the rule it broke, because the person
//! reading the message is an operator at 3 a.m. and the alternative is a KMS
//! `ConnectionErrorCode` hours later. Runtime objects are built from it by
//! `state`.
//!
//! Secrets (SigV4 secret access keys, the HSM PIN) are never inline in the file:
//! they are read from a file (which must not be readable by group or others) or
//! from an environment variable, and kept in [`Zeroizing`] buffers (`secrets`).
//! Relative paths are resolved against the directory of the config file, so a
//! config works the same whatever directory the proxy is started from.
//!
//! **Crate `xks-config`**, one layer of the workspace (the table of layers is
//! in the `xks-proxy` crate's `src/lib.rs`). It uses `xks-net`, `xks-spec`, `xks-audit`, `xks-hsm`, `xks-guard`, `xks-telemetry`, `xks-state`;
//! its `Cargo.toml` lists exactly those, so the compiler holds it to them.

#![forbid(unsafe_code)]

mod error;
mod key_stores;
mod paths;
mod raw;
mod secrets;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use error::invalid;
pub use error::ConfigError;
use key_stores::validate_key_stores;
use raw::RawConfig;
use validate::*;
use xks_audit::AuditConfig;
use xks_hsm::config::{HealthConfig, HsmConfig};
use xks_net::config::NetConfig;
use xks_net::tls::TlsConfig;
use xks_state::{KeyStoreConfig, Live, ServiceConfig, StateError};
use xks_telemetry::logging::LoggingConfig;

/// The whole validated configuration.
#[derive(Debug)]
pub struct Config {
    /// Listeners, timeouts, connection caps.
    pub net: NetConfig,
    /// What GetHealthStatus says about the proxy; request size limits.
    pub service: ServiceConfig,
    /// `None`: TLS ends at the load balancer (`tls.termination`).
    pub tls: Option<TlsConfig>,
    pub hsm: HsmConfig,
    pub health: HealthConfig,
    pub logging: LoggingConfig,
    pub key_stores: Vec<KeyStoreConfig>,
    /// The audit trail, when `[audit]` turns it on.
    pub audit: Option<AuditConfig>,
    /// How often the config, secret, policy and certificate files are checked
    /// for changes; `None` when file watching is off (SIGHUP still reloads).
    pub reload_poll: Option<Duration>,
    /// The async runtime's workers and where threads run; read at start.
    pub threads: Threads,
    /// SHA-256 of the file text this configuration was parsed from, so hot
    /// reload can tell whether the file changed since (even before the
    /// reloader started).
    pub source_digest: Option<[u8; 32]>,
    /// Listener addresses from the command line, already applied above;
    /// kept so that a reload applies them again.
    pub overrides: ListenOverrides,
}

/// The async runtime's worker threads, and whether the proxy's threads are
/// pinned to CPU lanes (`[server] runtime_threads`, `pin_threads`; see
/// `xks_hsm::lanes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threads {
    /// Runtime workers; 0: one per CPU lane.
    pub runtime: usize,
    pub pin: bool,
}

/// Listener addresses (and the audit instance id) given on the command line
/// (`serve --listen …`). They win over the file, so several instances (a
/// fleet on one host, a systemd template unit) can share one configuration
/// file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenOverrides {
    pub listen: Option<SocketAddr>,
    pub ping_listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    /// `serve --instance-id`: this instance's audit chain.
    pub instance_id: Option<String>,
}

impl Config {
    /// Applies command-line listener addresses over the file's.
    pub fn with_overrides(mut self, o: ListenOverrides) -> Config {
        if let Some(a) = o.listen {
            self.net.listen = a;
        }
        if let Some(a) = o.ping_listen {
            self.net.ping_listen = Some(a);
        }
        if let Some(a) = o.admin_listen {
            self.net.admin_listen = Some(a);
        }
        if let (Some(audit), Some(id)) = (&mut self.audit, &o.instance_id) {
            audit.instance_id = Some(id.clone());
        }
        self.overrides = o;
        self
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
        let mut files = Vec::new();
        if let Some(tls) = &self.tls {
            files.extend([tls.cert.clone(), tls.key.clone()]);
            files.extend(tls.client_auth.as_ref().map(|c| c.ca.clone()));
        }
        for ks in &self.key_stores {
            files.extend(ks.credentials.iter().filter_map(|c| c.secret_file.clone()));
            files.extend(ks.authorization.as_ref().map(|a| a.file.clone()));
        }
        files
    }

    /// Mutual TLS, when the proxy serves TLS and checks client certificates.
    pub fn client_auth(&self) -> Option<&xks_net::client_auth::ClientAuthConfig> {
        self.tls.as_ref().and_then(|t| t.client_auth.as_ref())
    }

    /// Settings that differ from `other` but only take effect at a restart
    /// (listeners, the HSM connection, logging, connection limits). A reload
    /// keeps the running values and names these in its log line.
    pub fn restart_only_changes(&self, other: &Config) -> Vec<&'static str> {
        let (a, b) = (&self.net, &other.net);
        [
            ("server.listen", a.listen != b.listen),
            ("server.ping_listen", a.ping_listen != b.ping_listen),
            ("admin.listen", a.admin_listen != b.admin_listen),
            ("tls.termination", self.tls.is_some() != other.tls.is_some()),
            (
                "tls mutual authentication on/off",
                self.client_auth().is_some() != other.client_auth().is_some(),
            ),
            (
                "server timeouts and limits",
                // Everything of the listeners but their addresses (above).
                NetConfig {
                    listen: b.listen,
                    ping_listen: b.ping_listen,
                    admin_listen: b.admin_listen,
                    ..a.clone()
                } != *b
                    || self.reload_poll != other.reload_poll,
            ),
            (
                "server.runtime_threads / server.pin_threads",
                self.threads != other.threads,
            ),
            ("hsm", self.hsm != other.hsm),
            ("health", self.health != other.health),
            ("audit", self.audit != other.audit),
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

    /// The live state this configuration describes (see [`Live::build`]),
    /// carrying over what `previous` keeps across reloads. This is where the
    /// key stores' policies are compiled, so a configuration is only known
    /// good once this succeeded too (`check-config`, startup and reload all
    /// call it).
    pub fn live(&self, previous: Option<&Live>) -> Result<Live, StateError> {
        Live::build(
            &self.key_stores,
            &self.service,
            &self.health.key_label,
            previous,
        )
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

/// Refuses two listeners on one address (or one port of a wildcard address
/// and a specific one): the second bind would fail at startup, after the
/// configuration was called valid. Port 0 (the system picks) never clashes.
fn distinct_listeners(
    listeners: &[(&str, Option<std::net::SocketAddr>)],
) -> Result<(), ConfigError> {
    let set: Vec<(&str, std::net::SocketAddr)> = listeners
        .iter()
        .filter_map(|(name, a)| a.map(|a| (*name, a)))
        .filter(|(_, a)| a.port() != 0)
        .collect();
    for (i, (first, a)) in set.iter().enumerate() {
        for (second, b) in &set[i + 1..] {
            let overlap = a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
            if a.port() == b.port() && overlap {
                return Err(invalid(
                    *second,
                    format!(
                        "{b} is also {first} ({a}): two listeners cannot share an address. /ping \
                         is always served on the XKS listener too (over TLS); drop {second} to \
                         serve it there only, or give it its own port"
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn validate(raw: RawConfig, base: &Path) -> Result<Config, ConfigError> {
    let admin_listen = if raw.admin.enabled {
        Some(parse_addr("admin.listen", &raw.admin.listen)?)
    } else {
        None
    };
    let (net, service, reload_poll, threads) = validate_server(raw.server, admin_listen)?;
    distinct_listeners(&[
        ("server.listen", Some(net.listen)),
        ("server.ping_listen", net.ping_listen),
        ("admin.listen", admin_listen),
    ])?;
    let tls = validate_tls(raw.tls, base)?;
    let mut hsm = validate_hsm(raw.hsm, base)?;
    let health = validate_health(raw.health)?;
    let audit = validate_audit(raw.audit, base, &health.key_label)?;
    if let Some(a) = audit.as_ref().filter(|a| a.create_seal_key) {
        hsm.hmac_keys.push(a.seal_key_label.clone());
    }
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
    if let Some(a) = &audit {
        if let Some(ks) = key_stores.iter().find(|k| k.keys.names(&a.seal_key_label)) {
            return Err(invalid(
                format!("key_stores ({}).keys", ks.name),
                format!(
                    "'{}' is the audit seal key (audit.seal_key_label); it must never serve KMS",
                    a.seal_key_label
                ),
            ));
        }
    }
    let cfg = Config {
        net,
        service,
        tls,
        hsm,
        health,
        logging,
        key_stores,
        audit,
        reload_poll,
        threads,
        source_digest: None,
        overrides: ListenOverrides::default(),
    };
    Ok(cfg)
}

/// A secret named on the command line (`--pin-file` or `--pin-env`), read
/// under the same rules as one named in the config: exactly one source, a
/// file private to its owner, trailing newlines trimmed.
pub fn read_secret_arg(
    file: Option<std::path::PathBuf>,
    env: Option<String>,
) -> Result<zeroize::Zeroizing<String>, ConfigError> {
    secrets::read_secret(
        "--pin-file",
        "--pin-env",
        file,
        env,
        std::path::Path::new("."),
    )
}

#[cfg(test)]
mod listener_tests {
    use super::distinct_listeners;

    #[test]
    fn two_listeners_on_one_address_are_refused_with_both_names() {
        let a = |s: &str| Some(s.parse().unwrap());
        let e = distinct_listeners(&[
            ("server.listen", a("127.0.0.1:8443")),
            ("server.ping_listen", a("127.0.0.1:8443")),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("server.ping_listen") && e.contains("server.listen"),
            "{e}"
        );
        // A wildcard address overlaps every other on its port.
        assert!(distinct_listeners(&[
            ("server.listen", a("0.0.0.0:443")),
            ("admin.listen", a("127.0.0.1:443")),
        ])
        .is_err());
        assert!(distinct_listeners(&[
            ("server.listen", a("0.0.0.0:443")),
            ("server.ping_listen", a("0.0.0.0:80")),
            ("admin.listen", None),
        ])
        .is_ok());
        // Port 0: the system picks a free port for each.
        assert!(distinct_listeners(&[
            ("server.listen", a("127.0.0.1:0")),
            ("server.ping_listen", a("127.0.0.1:0")),
        ])
        .is_ok());
    }
}

#[cfg(test)]
mod example_tests {
    /// Each `Raw*` struct of the reader and the section of the example that
    /// documents it.
    const SECTIONS: &[(&str, &str)] = &[
        ("RawServer", "[server]"),
        ("RawTls", "[tls]"),
        ("RawHsm", "[hsm]"),
        ("RawBackend", "[[hsm.backends]]"),
        ("RawHealth", "[health]"),
        ("RawLogging", "[logging]"),
        ("RawAdmin", "[admin]"),
        ("RawKeyStore", "[[key_stores]]"),
        ("RawCredential", "[[key_stores.credentials]]"),
        ("RawAudit", "[audit]"),
        ("RawAuthorization", "authorization = {"),
        ("RawRateLimit", "rate_limit = {"),
    ];

    /// The field names of `struct name` in the reader's source.
    fn fields(source: &str, name: &str) -> Vec<String> {
        let start = source
            .find(&format!("struct {name} {{"))
            .unwrap_or_else(|| panic!("no struct {name} in raw.rs"));
        let body = &source[start..];
        let body = &body[..body.find("\n}").unwrap()];
        body.lines()
            .filter_map(|l| l.trim().strip_prefix("pub(super) "))
            .filter_map(|l| l.split(':').next())
            .map(str::to_string)
            .collect()
    }

    /// The lines of every occurrence of the example's section `header`
    /// (commented out or not) up to the next section, or, for an inline
    /// table (`name = {`), the table's text.
    fn section(example: &str, header: &str) -> String {
        if header.ends_with('{') {
            let start = example
                .find(header)
                .unwrap_or_else(|| panic!("config/production.example.toml has no {header}"));
            let rest = &example[start + header.len()..];
            return rest[..rest.find('}').unwrap_or(rest.len())].to_string();
        }
        let bare = |l: &str| l.trim_start_matches(['#', ' ']).trim_end().to_string();
        let mut out = String::new();
        let mut inside = false;
        for line in example.lines() {
            let b = bare(line);
            if b.starts_with('[') {
                inside = b == header;
                continue;
            }
            if inside {
                out.push_str(line);
                out.push('\n');
            }
        }
        assert!(
            !out.is_empty(),
            "config/production.example.toml has no {header}"
        );
        out
    }

    /// Every setting the reader accepts is documented in the example (as a
    /// setting or a commented one): the README says it documents them all.
    #[test]
    fn the_production_example_documents_every_setting() {
        let raw = include_str!("raw.rs");
        let example = include_str!("../../../config/production.example.toml");
        let mut missing = Vec::new();
        for (strukt, header) in SECTIONS {
            let text = section(example, header);
            let text = text.as_str();
            for f in fields(raw, strukt) {
                let documented = text.lines().any(|l| {
                    let l = l.trim_start_matches(['#', ' ', '{', ',']);
                    l.starts_with(&format!("{f} =")) || l.contains(&format!(" {f} ="))
                });
                let nested = SECTIONS.iter().any(|(s, h)| {
                    raw.contains(&format!("{f}: Vec<{s}>"))
                        || raw.contains(&format!("{f}: Option<{s}>"))
                        || raw.contains(&format!("{f}: {s},"))
                        || h.contains(&format!(".{f}]"))
                });
                if !documented && !nested {
                    missing.push(format!("{header} {f}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "not in config/production.example.toml: {missing:?}"
        );
    }
}
