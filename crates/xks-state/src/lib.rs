//! The proxy's live state: the key stores as requests see them, built from
//! the configuration — the one place where configuration becomes runtime
//! objects (SigV4 credential sets, compiled Cedar policies, rate-limit
//! buckets, replay caches).
//!
//! A configuration reload builds a new [`Live`] and swaps it in as a whole;
//! each request takes one snapshot at its start, so a reload never changes
//! the rules under a request in flight. What must survive a reload (a key
//! store's rate-limit bucket and replay cache, while unchanged) is carried
//! over from the previous state.
//!
//! **Crate `xks-state`**, one layer of the workspace (the table of layers is
//! in the `xks-proxy` crate's `src/lib.rs`). It uses `xks-guard`, `xks-spec`;
//! its `Cargo.toml` lists exactly those, so the compiler holds it to them.

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use xks_guard::authz::{Mode, Policies, PolicyError};
use xks_guard::replay::ReplayCache;
use xks_guard::sigv4::{self, Credential, CredentialSet};
use xks_guard::throttle::{RateLimit, TokenBucket};
use xks_spec::aead::SampleCompat;

/// What GetHealthStatus says about the proxy, and how large a request may
/// be (the reloadable part of `[server]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// The largest request body that is read and processed.
    pub max_body_bytes: usize,
    /// `xksProxyFleetSize`, `xksProxyVendor`, `xksProxyModel`.
    pub fleet_size: u32,
    pub vendor: String,
    pub model: String,
}

/// A key store's Cedar policies as the configuration read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySource {
    /// Where they came from (watched for changes, named in errors).
    pub file: PathBuf,
    pub text: String,
    pub mode: Mode,
}

/// One logical key store: an XKS URI path with its own credentials and keys.
#[derive(Debug, Clone)]
pub struct KeyStoreConfig {
    pub name: String,
    /// The full `XksProxyUriPath`, e.g. `/tenant-a/kms/xks/v1`.
    pub uri_path: String,
    pub keys: AllowedKeys,
    pub credentials: Vec<Credential>,
    /// Cedar policies (secondary authorization), as read from their file;
    /// compiled into [`KeyStore::policies`].
    pub authorization: Option<PolicySource>,
    pub rate_limit: Option<RateLimit>,
    /// Decrypt also accepts the AWS sample proxy's ciphertexts (migration).
    pub compat: Option<SampleCompat>,
    /// The AWS Region KMS signs this key store's requests for, when pinned.
    pub region: Option<String>,
    /// Refuse a signed request that was already received.
    pub replay_protection: bool,
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

/// When a credential was made: its `created` time from the config, else its
/// secret file's modification time (read now: the credential-age metric and
/// `credentials list` report it).
pub fn created_or_modified(c: &Credential) -> Option<SystemTime> {
    c.created.or_else(|| {
        c.secret_file
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .and_then(|m| m.modified().ok())
    })
}

/// Why the configuration cannot become a live state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("key_stores[{index}] ({key_store}).authorization.policy_file: {source}")]
    Policies {
        index: usize,
        key_store: String,
        source: PolicyError,
    },
}

/// One key store at run time.
#[derive(Debug)]
pub struct KeyStore {
    pub name: String,
    pub keys: AllowedKeys,
    pub credentials: CredentialSet,
    /// Access key id and creation (or secret file modification) time of each
    /// credential, for the credential-age metric.
    pub credential_ages: Vec<(String, Option<SystemTime>)>,
    /// Cedar policies (secondary authorization), if configured.
    pub policies: Option<Arc<Policies>>,
    /// Request-rate quota, if configured.
    pub bucket: Option<Arc<TokenBucket>>,
    /// Decrypt also accepts the AWS sample proxy's ciphertexts.
    pub compat: Option<SampleCompat>,
    /// The AWS Region requests must be signed for, when pinned.
    pub region: Option<String>,
    /// Signatures already used, when replay protection is on.
    pub replay: Option<Arc<ReplayCache>>,
}

impl KeyStore {
    /// Whether this key store may use `key_id`. The health-check keys (the
    /// running one and the configured one, which differ after a reload until
    /// the next restart) never serve KMS, whatever a list says.
    pub fn allows(&self, key_id: &str, health_keys: [&str; 2]) -> bool {
        if health_keys.contains(&key_id) {
            return false;
        }
        match &self.keys {
            AllowedKeys::All => true,
            AllowedKeys::Only(set) => set.contains(key_id),
        }
    }
}

/// The part of the state that a configuration reload replaces as a whole.
pub struct Live {
    /// Key stores by their `XksProxyUriPath`.
    pub stores: HashMap<String, KeyStore>,
    pub service: ServiceConfig,
    /// The configured health-check key label (the running one stays what it
    /// was at startup, until a restart).
    pub health_key: String,
}

impl Live {
    /// Builds the live state from validated configuration sections. Rate-limit
    /// buckets and replay caches of key stores that keep them are carried over
    /// from `previous`, so a reload does not hand every key store a fresh
    /// burst, or forget the signatures it saw.
    pub fn build(
        key_stores: &[KeyStoreConfig],
        service: &ServiceConfig,
        health_key: &str,
        previous: Option<&Live>,
    ) -> Result<Live, StateError> {
        let mut stores = HashMap::with_capacity(key_stores.len());
        for (index, ks) in key_stores.iter().enumerate() {
            let old = previous.and_then(|p| p.stores.get(&ks.uri_path));
            let policies = match &ks.authorization {
                None => None,
                Some(src) => Some(Arc::new(
                    Policies::parse(&src.text, &src.file, src.mode).map_err(|source| {
                        StateError::Policies {
                            index,
                            key_store: ks.name.clone(),
                            source,
                        }
                    })?,
                )),
            };
            let bucket = ks.rate_limit.map(|limit| {
                old.and_then(|o| o.bucket.clone())
                    .filter(|b| b.limit() == limit)
                    .unwrap_or_else(|| Arc::new(TokenBucket::new(limit)))
            });
            let replay = ks.replay_protection.then(|| {
                old.and_then(|o| o.replay.clone())
                    .unwrap_or_else(|| Arc::new(ReplayCache::new(sigv4::MAX_CLOCK_SKEW)))
            });
            stores.insert(
                ks.uri_path.clone(),
                KeyStore {
                    name: ks.name.clone(),
                    keys: ks.keys.clone(),
                    credentials: CredentialSet::new(&ks.credentials),
                    credential_ages: ks
                        .credentials
                        .iter()
                        .map(|c| (c.access_key_id.clone(), created_or_modified(c)))
                        .collect(),
                    policies,
                    bucket,
                    compat: ks.compat.clone(),
                    region: ks.region.clone(),
                    replay,
                },
            );
        }
        Ok(Live {
            stores,
            service: service.clone(),
            health_key: health_key.to_string(),
        })
    }
}
