//! The key cache: label → (handle, attributes), shared by all pool workers.
//!
//! Looking a key up by label costs a `C_FindObjects` round trip and, in SoftHSM,
//! takes a token-wide lock that serializes concurrent lookups; doing it per
//! request would cap throughput well below the HSM's AES speed. Object handles
//! are valid across all sessions of the application, so one shared cache serves
//! every worker. Entries expire after a configured TTL so that a change made in
//! the HSM (a key disabled, a usage removed) is seen within that time by every
//! proxy instance; GetKeyMetadata always reads fresh attributes.
//!
//! Handles belong to one instance of the module: after a re-initialization
//! (see `super::module`) the same number may name *another* object, so the
//! cache is emptied when the module's generation changes, before any lookup.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use super::objects::KeyInfo;

pub(crate) struct KeyCache {
    ttl: Duration,
    entries: RwLock<HashMap<String, (KeyInfo, Instant)>>,
    /// Latest version of each external key (see `keys rotate`), same TTL: a
    /// rotation is picked up by every instance within it.
    versions: RwLock<HashMap<String, (u32, Instant)>>,
    /// The module generation the cached handles belong to.
    generation: AtomicU64,
}

impl KeyCache {
    pub fn new(ttl: Duration) -> Self {
        KeyCache {
            ttl,
            entries: RwLock::new(HashMap::new()),
            versions: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
        }
    }

    /// Forgets every handle if they come from an older module generation.
    /// Call it with the current generation before reading the cache.
    pub fn sync_generation(&self, generation: u64) {
        if self.generation.load(Ordering::Acquire) == generation {
            return;
        }
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        // Re-checked under the lock: only one thread clears per generation.
        if self.generation.swap(generation, Ordering::AcqRel) != generation {
            entries.clear();
        }
    }

    /// The cached entry if it is younger than the TTL.
    pub fn get_fresh(&self, label: &str) -> Option<KeyInfo> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries
            .get(label)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(k, _)| k.clone())
    }

    pub fn insert(&self, key: KeyInfo) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.insert(key.label.clone(), (key, Instant::now()));
    }

    pub fn remove(&self, label: &str) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.remove(label);
    }

    /// The cached latest version of `id`, if younger than the TTL.
    pub fn fresh_version(&self, id: &str) -> Option<u32> {
        let versions = self.versions.read().unwrap_or_else(|p| p.into_inner());
        versions
            .get(id)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(v, _)| *v)
    }

    pub fn set_version(&self, id: &str, version: u32) {
        let mut versions = self.versions.write().unwrap_or_else(|p| p.into_inner());
        versions.insert(id.to_string(), (version, Instant::now()));
    }
}
