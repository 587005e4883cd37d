//! Who may hold a connection, and for how long.
//!
//! File descriptors and memory are finite, and anyone on the network can open
//! connections. Every listener therefore counts its connections in a
//! [`Registry`], with a total cap and a cap per source address (the client a
//! PROXY protocol header names, when there is one). On the XKS listener the
//! registry also knows which connections have authenticated (a request on it
//! passed SigV4): when a cap is reached, a new connection takes the place of
//! the oldest one that has not (the oldest of its own source, for the
//! per-source cap), instead of being refused. So a crowd of idle
//! or unauthenticated connections can delay KMS by one TLS handshake at most,
//! never lock it out; only KMS's own connections can fill the listener, and
//! then `/ping` says so (see [`Registry::saturated`]).
//!
//! Each admitted connection gets a [`ConnState`]: the request activity that
//! decides when it is idle (requests, not bytes: HTTP/2 PING frames do not
//! keep a connection open) and the signal that closes it when it is evicted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// A listener's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once.
    pub max: usize,
    /// Connections open at once from one source address; 0 for no limit.
    pub per_source: usize,
    /// At the cap, close the oldest connection that has not authenticated to
    /// make room (the XKS listener), rather than refuse the new one.
    pub evict_unauthenticated: bool,
}

/// Why a connection was not admitted (the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The listener is full (of authenticated connections, where it evicts).
    Capacity,
    /// Its source address has as many connections as it may.
    PerSource,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Capacity => "capacity",
            Refused::PerSource => "per_source",
        }
    }
}

/// One connection's shared state: its activity and its eviction signal.
pub struct ConnState {
    started: Instant,
    authenticated: AtomicBool,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` when the last request began or ended.
    last_activity_ms: AtomicU64,
    evicted: Notify,
}

impl ConnState {
    fn new() -> Self {
        ConnState {
            started: Instant::now(),
            authenticated: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_activity_ms: AtomicU64::new(0),
            evicted: Notify::new(),
        }
    }

    /// A request on this connection passed SigV4: it belongs to KMS (or to
    /// someone holding a key store's secret) and is no longer evictable.
    pub fn mark_authenticated(&self) {
        self.authenticated.store(true, Ordering::Relaxed);
    }

    pub fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Relaxed)
    }

    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    /// Marks a request as begun; the guard marks it ended when dropped.
    pub fn request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        RequestGuard(self.clone())
    }

    /// Resolves when the connection should close: evicted, idle (no request
    /// in progress for `idle`, or since the handshake), or, until it has
    /// authenticated, older than `unauthenticated`.
    pub async fn closing(&self, idle: Duration, unauthenticated: Duration) {
        loop {
            let now = Instant::now();
            let since_activity =
                self.started + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
            let idle_at = since_activity + idle;
            let busy = self.in_flight.load(Ordering::Relaxed) > 0;
            let mut next = if busy { now + idle } else { idle_at };
            if !self.is_authenticated() {
                let limit = self.started + unauthenticated;
                if now >= limit {
                    return;
                }
                next = next.min(limit);
            }
            if !busy && now >= idle_at {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = self.evicted.notified() => return,
            }
        }
    }
}

/// Ends a request's activity on its connection.
pub struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

struct Entry {
    source: IpAddr,
    state: Arc<ConnState>,
}

struct Inner {
    next_id: u64,
    /// Admission order is id order: the smallest id is the oldest.
    conns: std::collections::BTreeMap<u64, Entry>,
    by_source: HashMap<IpAddr, usize>,
    /// Refusals since the last log line, and when that was.
    refused_since_log: u64,
    last_log: Option<Instant>,
    last_accept_error: Option<Instant>,
}

/// The connections of one listener.
pub struct Registry {
    listener: &'static str,
    limits: ConnLimits,
    inner: Mutex<Inner>,
}

/// How long an `accept` error (EMFILE, ENFILE, …) counts as "cannot accept".
const ACCEPT_ERROR_WINDOW: Duration = Duration::from_secs(2);
/// At most one log line about refused connections per listener this often.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl Registry {
    pub fn new(listener: &'static str, limits: ConnLimits) -> Arc<Registry> {
        Arc::new(Registry {
            listener,
            limits,
            inner: Mutex::new(Inner {
                next_id: 0,
                conns: Default::default(),
                by_source: HashMap::new(),
                refused_since_log: 0,
                last_log: None,
                last_accept_error: None,
            }),
        })
    }

    pub fn name(&self) -> &'static str {
        self.listener
    }

    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `source`, evicting the oldest
    /// unauthenticated one if the listener is full and allowed to. The
    /// returned [`Slot`] frees its place when dropped. `count_source` is
    /// false when `source` is only the load balancer (a PROXY header will
    /// name the client: see [`Slot::set_source`]).
    pub fn admit(
        self: &Arc<Self>,
        source: IpAddr,
        count_source: bool,
    ) -> Result<Admitted, Refused> {
        let mut inner = self.lock();
        let mut evicted = false;
        if count_source && self.over_source_limit(&inner, source) {
            // Its own oldest unauthenticated connection makes room.
            if !self.evict_one(&mut inner, Some(source)) {
                return Err(self.refused(&mut inner, Refused::PerSource));
            }
            evicted = true;
        }
        if inner.conns.len() >= self.limits.max {
            if !self.evict_one(&mut inner, None) {
                return Err(self.refused(&mut inner, Refused::Capacity));
            }
            evicted = true;
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let state = Arc::new(ConnState::new());
        if count_source {
            *inner.by_source.entry(source).or_insert(0) += 1;
        }
        inner.conns.insert(
            id,
            Entry {
                source,
                state: state.clone(),
            },
        );
        Ok(Admitted {
            slot: Slot {
                registry: self.clone(),
                id,
                counted: count_source,
                state,
            },
            evicted,
        })
    }

    fn over_source_limit(&self, inner: &Inner, source: IpAddr) -> bool {
        self.limits.per_source > 0
            && inner.by_source.get(&source).copied().unwrap_or(0) >= self.limits.per_source
    }

    /// Closes the oldest connection that has not authenticated (from
    /// `source`, when given); false when there is none, or this listener
    /// does not evict.
    fn evict_one(&self, inner: &mut Inner, source: Option<IpAddr>) -> bool {
        if !self.limits.evict_unauthenticated {
            return false;
        }
        let victim = inner
            .conns
            .iter()
            .find(|(_, e)| !e.state.is_authenticated() && source.is_none_or(|s| s == e.source))
            .map(|(id, _)| *id);
        match victim {
            Some(id) => {
                if let Some(e) = inner.conns.remove(&id) {
                    Self::uncount(inner, e.source);
                    e.state.evicted.notify_one();
                }
                true
            }
            None => false,
        }
    }

    fn uncount(inner: &mut Inner, source: IpAddr) {
        if let Some(n) = inner.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                inner.by_source.remove(&source);
            }
        }
    }

    /// Counts a refusal and logs, at most once per interval, how many there were.
    fn refused(&self, inner: &mut Inner, why: Refused) -> Refused {
        inner.refused_since_log += 1;
        let now = Instant::now();
        if inner
            .last_log
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_INTERVAL)
        {
            tracing::warn!(
                listener = self.listener,
                reason = why.as_str(),
                refused = inner.refused_since_log,
                open = inner.conns.len(),
                "connections refused (counted in xks_connections_refused_total)"
            );
            inner.refused_since_log = 0;
            inner.last_log = Some(now);
        }
        why
    }

    /// Records a failed `accept` (file descriptors exhausted, …).
    pub fn accept_failed(&self) {
        self.lock().last_accept_error = Some(Instant::now());
    }

    /// True when a new connection could not be served now: the listener is
    /// full of connections it may not evict, or `accept` failed moments ago.
    /// `/ping` then answers 503, so the load balancer sends KMS elsewhere.
    pub fn saturated(&self) -> bool {
        let inner = self.lock();
        let accept_failing = inner
            .last_accept_error
            .is_some_and(|t| t.elapsed() < ACCEPT_ERROR_WINDOW);
        let full = inner.conns.len() >= self.limits.max
            && !(self.limits.evict_unauthenticated
                && inner.conns.values().any(|e| !e.state.is_authenticated()));
        accept_failing || full
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().conns.len()
    }
}

/// An admitted connection, and whether another was evicted to make room.
pub struct Admitted {
    pub slot: Slot,
    pub evicted: bool,
}

/// A connection's place in its listener; freed on drop.
pub struct Slot {
    registry: Arc<Registry>,
    id: u64,
    counted: bool,
    pub state: Arc<ConnState>,
}

impl Slot {
    /// The client's real address, from a PROXY protocol header: counted
    /// against the per-source cap from now on.
    pub fn set_source(&mut self, source: IpAddr) -> Result<(), Refused> {
        let registry = self.registry.clone();
        let mut inner = registry.lock();
        let Some(old) = inner.conns.get(&self.id).map(|e| e.source) else {
            return Ok(()); // evicted meanwhile; it is closing anyway
        };
        if self.counted {
            Registry::uncount(&mut inner, old);
        }
        self.counted = false;
        if registry.over_source_limit(&inner, source)
            && !registry.evict_one(&mut inner, Some(source))
        {
            return Err(registry.refused(&mut inner, Refused::PerSource));
        }
        *inner.by_source.entry(source).or_insert(0) += 1;
        self.counted = true;
        if let Some(e) = inner.conns.get_mut(&self.id) {
            e.source = source;
        }
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        if let Some(e) = inner.conns.remove(&self.id) {
            if self.counted {
                Registry::uncount(&mut inner, e.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[tokio::test]
    async fn a_source_at_its_cap_replaces_its_own_oldest() {
        let r = Registry::new(
            "ping",
            ConnLimits {
                max: 10,
                per_source: 2,
                evict_unauthenticated: true,
            },
        );
        let other = r.admit(ip(2), true).unwrap().slot;
        let first = r.admit(ip(1), true).unwrap().slot;
        let _second = r.admit(ip(1), true).unwrap().slot;
        let third = r.admit(ip(1), true).unwrap();
        assert!(third.evicted);
        tokio::time::timeout(
            Duration::from_secs(1),
            first
                .state
                .closing(Duration::from_secs(60), Duration::from_secs(60)),
        )
        .await
        .expect("its own oldest made room");
        assert_eq!(r.open(), 3);
        drop(other);
    }

    #[tokio::test]
    async fn caps_total_and_per_source() {
        let r = Registry::new(
            "test",
            ConnLimits {
                max: 3,
                per_source: 2,
                evict_unauthenticated: false,
            },
        );
        let a1 = r.admit(ip(1), true).unwrap().slot;
        let _a2 = r.admit(ip(1), true).unwrap().slot;
        assert_eq!(r.admit(ip(1), true).err(), Some(Refused::PerSource));
        let _b1 = r.admit(ip(2), true).unwrap().slot;
        assert_eq!(r.admit(ip(3), true).err(), Some(Refused::Capacity));
        assert!(r.saturated());
        drop(a1);
        assert!(!r.saturated());
        assert!(r.admit(ip(1), true).is_ok());
    }

    #[tokio::test]
    async fn at_the_cap_the_oldest_unauthenticated_connection_makes_room() {
        let r = Registry::new(
            "xks",
            ConnLimits {
                max: 2,
                per_source: 0,
                evict_unauthenticated: true,
            },
        );
        let kms = r.admit(ip(1), true).unwrap().slot;
        kms.state.mark_authenticated();
        let idle = r.admit(ip(2), true).unwrap().slot;
        assert!(
            !r.saturated(),
            "an unauthenticated connection can make room"
        );
        let newcomer = r.admit(ip(3), true).unwrap().slot;
        // The idle one was told to close, and the registry no longer counts it.
        tokio::time::timeout(
            Duration::from_secs(1),
            idle.state
                .closing(Duration::from_secs(60), Duration::from_secs(60)),
        )
        .await
        .expect("evicted connection closes");
        assert_eq!(r.open(), 2);
        newcomer.state.mark_authenticated();
        assert!(r.saturated());
        assert_eq!(r.admit(ip(4), true).err(), Some(Refused::Capacity));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_means_no_request_and_unauthenticated_means_short_lived() {
        let r = Registry::new(
            "xks",
            ConnLimits {
                max: 10,
                per_source: 0,
                evict_unauthenticated: true,
            },
        );
        let idle = Duration::from_secs(60);
        let unauth = Duration::from_secs(10);
        // Never authenticated: closed after 10 s even while busy.
        let s = r.admit(ip(1), true).unwrap().slot;
        let _busy = s.state.request();
        let t = Instant::now();
        s.state.closing(idle, unauth).await;
        assert_eq!(t.elapsed(), unauth);
        // Authenticated: open while a request runs, closed 60 s after the last one.
        let s = r.admit(ip(2), true).unwrap().slot;
        s.state.mark_authenticated();
        let req = s.state.request();
        let state = s.state.clone();
        let t = Instant::now();
        let closing = tokio::spawn(async move { state.closing(idle, unauth).await });
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!closing.is_finished());
        drop(req);
        closing.await.unwrap();
        assert_eq!(t.elapsed(), Duration::from_secs(160));
    }

    #[tokio::test]
    async fn a_proxy_header_moves_the_count_to_the_real_client() {
        let r = Registry::new(
            "xks",
            ConnLimits {
                max: 10,
                per_source: 1,
                evict_unauthenticated: true,
            },
        );
        let lb = ip(100);
        let mut first = r.admit(lb, false).unwrap().slot;
        let mut second = r.admit(lb, false).unwrap().slot;
        first.set_source(ip(1)).unwrap();
        first.state.mark_authenticated();
        assert_eq!(second.set_source(ip(1)).err(), Some(Refused::PerSource));
        drop(first);
        let mut third = r.admit(lb, false).unwrap().slot;
        third.set_source(ip(1)).unwrap();
    }
}
