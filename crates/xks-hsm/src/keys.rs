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
//! Both maps are keyed by what requests name, and a request may name any
//! key id (with `keys = ["*"]`, ids that do not exist too): each is bounded
//! to [`MAX_ENTRIES`], dropping expired entries and then the oldest quarter
//! when full, so a flood of distinct ids costs a bounded amount of memory.
//!
//! Handles belong to one instance of the module: after a re-initialization
//! (see `super::module`) the same number may name *another* object, so the
//! cache is emptied when the module's generation changes, before any lookup.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use super::objects::KeyInfo;

/// Entries each map holds at most.
pub(crate) const MAX_ENTRIES: usize = 10_000;

/// Inserts into a map of timestamped entries, keeping it within
/// [`MAX_ENTRIES`]: when full, expired entries go first, then the oldest
/// quarter (amortized: one pass per quarter of the capacity).
fn bounded_insert<V>(
    map: &mut HashMap<String, (V, Instant)>,
    key: String,
    value: V,
    ttl: Duration,
) {
    if map.len() >= MAX_ENTRIES && !map.contains_key(&key) {
        map.retain(|_, (_, at)| at.elapsed() < ttl);
        if map.len() >= MAX_ENTRIES {
            let mut ages: Vec<Instant> = map.values().map(|(_, at)| *at).collect();
            let quarter = ages.len() / 4;
            let (_, cut, _) = ages.select_nth_unstable(quarter);
            let cut = *cut;
            map.retain(|_, (_, at)| *at > cut);
        }
    }
    map.insert(key, (value, Instant::now()));
}

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
        bounded_insert(&mut entries, key.label.clone(), key, self.ttl);
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
        bounded_insert(&mut versions, id.to_string(), version, self.ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_distinct_key_ids_leaves_the_cache_bounded() {
        let cache = KeyCache::new(Duration::from_secs(3600));
        for n in 0..100_000 {
            cache.set_version(&format!("no-such-key-{n}"), 0);
        }
        let held = cache.versions.read().unwrap().len();
        assert!(held <= MAX_ENTRIES, "{held}");
        // The newest survive; the oldest went first.
        assert_eq!(cache.fresh_version("no-such-key-99999"), Some(0));
        assert_eq!(cache.fresh_version("no-such-key-0"), None);
    }
}
