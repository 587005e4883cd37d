//! The listeners' configuration: addresses, timeouts and connection caps
//! (the `[server]` and `[admin]` settings that shape the network edge).

use std::net::SocketAddr;
use std::time::Duration;

/// Listeners, their timeouts and their connection caps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The XKS (HTTPS) listener.
    pub listen: SocketAddr,
    /// The plain-HTTP `/ping` listener, if any.
    pub ping_listen: Option<SocketAddr>,
    /// The plain-HTTP admin (metrics) listener, if enabled.
    pub admin_listen: Option<SocketAddr>,
    /// Request heads must arrive within this; also the body timeout.
    pub header_read_timeout: Duration,
    /// The PROXY header and TLS handshake must be done within this.
    pub tls_handshake_timeout: Duration,
    /// An authenticated connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// A connection on which no request passed SigV4 is closed this long
    /// after it opened, busy or not: such a connection holds a slot that
    /// KMS may need.
    pub unauthenticated_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    pub max_ping_connections: usize,
    /// SIGTERM: in-flight requests get this long.
    pub shutdown_grace: Duration,
    /// Every connection to the XKS listener starts with a PROXY v2 header.
    pub proxy_protocol: bool,
    /// Request-body bytes held at once, over all requests: bodies arrive
    /// before SigV4 can be checked, so this bounds what clients that never
    /// authenticate can make the proxy hold.
    pub body_buffer_budget: usize,
}
