//! Hot reload of the configuration, credentials and certificate.
//!
//! Triggers: SIGHUP, and a change in the content of the config file, a
//! credential's secret file, or the certificate or its key (checked every
//! `server.reload_poll_ms`). Polling content hashes rather than using inotify
//! keeps working with Kubernetes secret volumes (which swap a symlink), editors
//! that write a new file and rename it, and network file systems.
//!
//! A reload is all-or-nothing. The new file is validated exactly as at startup
//! and the certificate loaded; only then are the key stores (paths, credentials,
//! allowed keys, fleet size, vendor) and the certificate swapped in, each with
//! one atomic pointer store. Requests in flight keep the snapshot they started
//! with, and open connections are untouched, so a reload fails nothing. An
//! invalid new configuration is refused with its reason in the log and the
//! running one stays in force. Settings that only take effect at startup
//! (listeners, the HSM connection, logging) are reported, not applied.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use xks_config::{sha256, Config, ConfigError};
use xks_net::client_auth::ClientVerifier;
use xks_net::pem::TlsError;
use xks_net::tls::{load_cert, CertResolver};
use xks_state::{Live, StateError};
use xks_telemetry::metrics::Metrics;

/// Why a new configuration was refused (the running one stays in force).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "key store '{key_store}' lists '{label}', the running health-check key; it must never \
         serve KMS"
    )]
    HealthKeyListed { key_store: String, label: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// What started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    File,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "signal",
            Trigger::File => "file",
        }
    }
}

/// SHA-256 of each watched file's content (`None`: unreadable or missing).
type Fingerprint = Vec<(PathBuf, Option<[u8; 32]>)>;

/// The config file as `cfg` was parsed from it (its recorded digest), and
/// the other watched files as they are now.
fn fingerprint(config_path: &Path, cfg: &Config) -> Fingerprint {
    let config_digest = cfg.source_digest.or_else(|| hash_file(config_path));
    std::iter::once((config_path.to_path_buf(), config_digest))
        .chain(cfg.watched_files().into_iter().map(|p| {
            let digest = hash_file(&p);
            (p, digest)
        }))
        .collect()
}

/// The same files hashed again.
fn rehash(last: &Fingerprint) -> Fingerprint {
    last.iter()
        .map(|(p, _)| (p.clone(), hash_file(p)))
        .collect()
}

/// Owns the reload logic; runs as one task for the life of the server.
pub struct Reloader {
    path: PathBuf,
    /// The configuration the process started with: listeners and the HSM
    /// connection keep these values until a restart.
    boot: Arc<Config>,
    /// The configuration most recently applied (or refused).
    last: Fingerprint,
    /// The state requests read, swapped as a whole.
    live: Arc<ArcSwap<Live>>,
    metrics: Metrics,
    /// `None`: TLS ends at the load balancer (a restart-only setting).
    certs: Option<Arc<CertResolver>>,
    /// The mTLS verifier, when mutual TLS was on at startup.
    client_auth: Option<Arc<ClientVerifier>>,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        boot: Arc<Config>,
        live: Arc<ArcSwap<Live>>,
        metrics: Metrics,
        certs: Option<Arc<CertResolver>>,
        client_auth: Option<Arc<ClientVerifier>>,
    ) -> Self {
        let last = fingerprint(&path, &boot);
        Reloader {
            path,
            boot,
            last,
            live,
            metrics,
            certs,
            client_auth,
        }
    }

    /// Checks for changes and reloads when asked by signal or when a watched
    /// file changed. Blocking (reads files): call it off the runtime.
    pub fn check(&mut self, trigger: Trigger) {
        // A new secret file only becomes watched once the config naming it is
        // applied; the config file itself changes in that case, so watching the
        // files of the last applied configuration is enough.
        if trigger == Trigger::File && rehash(&self.last) == self.last {
            return;
        }
        let result = self.reload(trigger);
        let outcome = match &result {
            Ok(()) => "ok",
            Err(_) => "rejected",
        };
        self.metrics
            .reloads
            .with_label_values(&[trigger.as_str(), outcome])
            .inc();
        if let Err(reason) = result {
            tracing::error!(
                trigger = trigger.as_str(),
                config = %self.path.display(),
                reason = %reason,
                "configuration reload rejected; the running configuration stays in force"
            );
            // Remember what was refused so an unchanged bad file is not
            // re-reported every poll; any further edit triggers a new attempt.
            self.last = rehash(&self.last);
        }
    }

    fn reload(&mut self, trigger: Trigger) -> Result<(), ReloadError> {
        let new = Config::load(&self.path)?.with_overrides(self.boot.overrides.clone());
        // The health-check key of the running process (restart-only) must not
        // become addressable either: KMS would see it answer.
        let running_health = &self.boot.health.key_label;
        if let Some(ks) = new
            .key_stores
            .iter()
            .find(|ks| ks.keys.names(running_health))
        {
            return Err(ReloadError::HealthKeyListed {
                key_store: ks.name.clone(),
                label: running_health.clone(),
            });
        }
        // A certificate is loaded only when the running proxy serves TLS
        // (where TLS ends is restart-only, reported below).
        let cert = match (&self.certs, &new.tls) {
            (Some(_), Some(tls)) => Some(load_cert(tls)?),
            _ => None,
        };
        // Build the new client verifier before swapping anything in.
        let client_auth = match (&self.client_auth, new.client_auth()) {
            (Some(_), Some(c)) => Some(ClientVerifier::new(c)?),
            _ => None,
        };
        let restart_only = self.boot.restart_only_changes(&new);
        let old = self.live.load_full();
        let live = new.live(Some(&old))?;
        let ids = |l: &Live| -> BTreeSet<String> {
            l.stores
                .values()
                .flat_map(|ks| ks.credential_ages.iter().map(|(id, _)| id.clone()))
                .collect()
        };
        let (old_ids, new_ids) = (ids(&old), ids(&live));
        let added: Vec<&String> = new_ids.difference(&old_ids).collect();
        let removed: Vec<&String> = old_ids.difference(&new_ids).collect();
        let key_stores: Vec<&str> = new.key_stores.iter().map(|k| k.uri_path.as_str()).collect();

        if let (Some(certs), Some(cert)) = (&self.certs, cert) {
            certs.replace(cert);
        }
        if let (Some(running), Some(new_verifier)) = (&self.client_auth, client_auth) {
            running.swap_from(&new_verifier);
        }
        self.live.store(Arc::new(live));
        self.last = fingerprint(&self.path, &new);
        tracing::info!(
            trigger = trigger.as_str(),
            config = %self.path.display(),
            key_stores = ?key_stores,
            credentials_added = ?added,
            credentials_removed = ?removed,
            "configuration reloaded"
        );
        if !restart_only.is_empty() {
            tracing::warn!(
                settings = ?restart_only,
                "these settings changed but take effect only at a restart; the running values are kept"
            );
        }
        Ok(())
    }

    /// Reloads on SIGHUP, and on file changes every `poll` (if set), forever.
    pub async fn run(mut self, poll: Option<Duration>) {
        #[cfg(unix)]
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGHUP; reload by file change only");
                None
            }
        };
        loop {
            #[cfg(unix)]
            let hup_recv = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hup_recv = std::future::pending::<()>();
            let tick = async {
                match poll {
                    Some(p) => tokio::time::sleep(p).await,
                    None => std::future::pending().await,
                }
            };
            let trigger = tokio::select! {
                _ = hup_recv => Trigger::Signal,
                _ = tick => Trigger::File,
            };
            // File reads and hashing are blocking work.
            self = match tokio::task::spawn_blocking(move || {
                self.check(trigger);
                self
            })
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "reload task failed; hot reload is off");
                    return;
                }
            };
        }
    }
}

fn hash_file(p: &Path) -> Option<[u8; 32]> {
    std::fs::read(p).ok().map(|bytes| sha256(&bytes))
}
