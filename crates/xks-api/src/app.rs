//! What every request handler shares: the live state, the key service and
//! the bounds that keep unauthenticated clients cheap.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use super::log_limit::LogLimiter;
use xks_audit::AuditTrail;
use xks_lockdown::LockBoard;
use xks_net::limits::Registry;
use xks_state::Live;
use xks_telemetry::metrics::Metrics;

/// Everything a request handler needs.
pub struct AppState<K> {
    /// Key stores and their rules, swapped as a whole by a reload (see
    /// `state`); each request reads one snapshot.
    pub live: Arc<ArcSwap<Live>>,
    pub keys: K,
    /// The health-check key the running key managers probe with. It never
    /// serves KMS, and neither does the one a reloaded configuration names
    /// ([`Live::health_key`]), which only takes effect at a restart.
    pub health_key: String,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// Bytes of request bodies held at once, across all requests: bodies are
    /// read before SigV4 can be checked, so this bounds what unauthenticated
    /// clients can make the proxy hold.
    pub body_budget: Arc<Semaphore>,
    pub metrics: Metrics,
    /// The XKS listener's connections: `/ping` fails while it cannot accept.
    pub xks_conns: Arc<Registry>,
    /// Bounds the access lines of requests that did not authenticate.
    pub log_limiter: LogLimiter,
    /// The audit trail, when `[audit]` is configured.
    pub audit: Option<Arc<AuditTrail>>,
    /// The lockdowns in force (kept current by the lockdown poller).
    pub locks: Arc<LockBoard>,
    /// The audit seal key's label: like the health-check key, never
    /// addressable through the API.
    pub seal_key: Option<String>,
}
