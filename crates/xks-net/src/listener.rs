//! The accept loop of each listener, and what a connection goes through.
//!
//! One task per connection: admission by the listener's [`Registry`] (caps
//! sized to the open-files limit, see `net::fds`), the PROXY header and TLS
//! handshake within one deadline, then hyper's auto builder, which serves
//! HTTP/2 or HTTP/1.1 according to ALPN, until the connection ends, goes
//! idle, outstays its time without authenticating, or is evicted. A
//! graceful-shutdown watcher lets in-flight requests finish on SIGTERM within
//! the configured grace period.
//!
//! A listener serves whatever [`Router`] it is given; it knows nothing of the
//! XKS API beyond tagging each request with its [`ConnInfo`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

use super::config::NetConfig;
use super::limits::{Admitted, ConnState, Refused, Registry, RequestGuard, Slot};
use super::proxy_protocol::{read_header, ProxyError, SIGNATURE};
use xks_telemetry::metrics::Metrics;

/// A listener that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Who is on the other end of a connection, attached to each request for the
/// access log: the TCP peer, or the client a PROXY protocol header names.
#[derive(Clone)]
pub struct ConnInfo {
    pub client: SocketAddr,
    /// The VPC endpoint id from the load balancer's PROXY header, if any.
    pub vpce_id: Option<Arc<str>>,
    /// The connection's state in its listener: a request that authenticates
    /// marks it, so that it is no longer evicted to make room.
    pub conn: Arc<ConnState>,
}

/// Opens a listening socket, and says which address it got (port 0 picks
/// one).
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), BindError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| BindError { addr, source })?;
    Ok((listener, local))
}

/// Serves a plain-HTTP listener if it is configured, else never resolves.
pub async fn serve_optional(
    listener: Option<TcpListener>,
    router: impl FnOnce() -> Router,
    conns: Arc<Registry>,
    ctx: Arc<ListenerCtx>,
    graceful: &GracefulShutdown,
) {
    match listener {
        Some(l) => serve(l, Edge::Plain, router(), conns, ctx, graceful).await,
        None => std::future::pending().await,
    }
}

fn http_builder(cfg: &NetConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        // Headers must fit (KMS's are well under 4 KiB); bodies stream
        // through in pieces of this size. hyper grows its read buffer up to
        // it on every connection, so it bounds what an idle one holds.
        .max_buf_size(8 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(32 * 1024)
        // What a client may send before the proxy reads it: request bodies
        // are small (the largest legitimate one is about 20 KiB), and these
        // bound what h2 buffers per stream and per connection.
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(256 * 1024);
    builder
}

/// The router as a hyper service that tags every request with its
/// connection's [`ConnInfo`] (for the access log and authentication) and
/// counts it as the connection's activity while it runs.
#[derive(Clone)]
struct PeerService {
    router: Router,
    info: ConnInfo,
}

pin_project_lite::pin_project! {
    /// A request's future, with the guard that ends its activity.
    struct Tracked<F> {
        #[pin]
        inner: F,
        _guard: RequestGuard,
    }
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

impl hyper::service::Service<http::Request<Incoming>> for PeerService {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = Tracked<axum::routing::future::RouteFuture<std::convert::Infallible>>;

    fn call(&self, mut req: http::Request<Incoming>) -> Self::Future {
        let guard = self.info.conn.request();
        req.extensions_mut().insert(self.info.clone());
        Tracked {
            inner: self.router.clone().call(req.map(axum::body::Body::new)),
            _guard: guard,
        }
    }
}

/// What every connection of a listener shares.
pub struct ListenerCtx {
    /// `xks`, `ping` or `admin`: the listener's label in metrics.
    pub name: &'static str,
    pub net: NetConfig,
    pub metrics: Metrics,
}

impl ListenerCtx {
    fn refused(&self, reason: &str) {
        self.metrics
            .connections_refused
            .with_label_values(&[self.name, reason])
            .inc();
    }
}

/// What sits between TCP and HTTP on a listener.
#[derive(Clone)]
pub enum Edge {
    /// The XKS listener: TLS, after a PROXY v2 header when configured.
    Tls(TlsAcceptor),
    /// `/ping` and admin: plain HTTP/1.1; a PROXY v2 header is read when one
    /// comes (an NLB with proxy protocol on sends it on health checks too).
    Plain,
    /// The XKS listener when a load balancer in front ends TLS
    /// (`tls.termination = "load-balancer"`): cleartext HTTP/1.1 or HTTP/2
    /// (prior knowledge: what an NLB TLS listener that negotiated h2 with
    /// the client forwards), after a PROXY v2 header when configured
    /// (required then, as on the TLS edge).
    Cleartext,
}

/// Accepts connections for as long as the listener lives. Each one is
/// admitted by `conns` (caps, eviction), gets the PROXY header (if any) and
/// the TLS handshake within one deadline, then is served until it ends, goes
/// idle, or is evicted.
pub async fn serve(
    listener: TcpListener,
    edge: Edge,
    router: Router,
    conns: Arc<Registry>,
    ctx: Arc<ListenerCtx>,
    graceful: &GracefulShutdown,
) {
    let builder = http_builder(&ctx.net);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: say so to /ping, back off, try again.
                conns.accept_failed();
                ctx.refused("accept_error");
                tracing::warn!(listener = ctx.name, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // Behind a PROXY-protocol load balancer the TCP peer is the balancer;
        // the client's own address is counted once the header names it.
        let proxied = ctx.net.proxy_protocol;
        let slot = match conns.admit(peer.ip(), !proxied) {
            Ok(Admitted { slot, evicted }) => {
                if evicted {
                    ctx.refused("evicted");
                }
                slot
            }
            Err(why) => {
                ctx.refused(why.as_str());
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (edge, builder, router, ctx) =
            (edge.clone(), builder.clone(), router.clone(), ctx.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let mut slot = slot;
            ctx.metrics
                .connections_open
                .with_label_values(&[ctx.name])
                .inc();
            let _open = DecOnDrop(ctx.metrics.connections_open.with_label_values(&[ctx.name]));
            let start = start(tcp, peer, &edge, &mut slot, proxied);
            let io = match tokio::time::timeout(ctx.net.tls_handshake_timeout, start).await {
                Ok(Ok(io)) => io,
                Ok(Err(e)) => {
                    if matches!(edge, Edge::Tls(_)) {
                        ctx.metrics
                            .tls_handshake_failures
                            .with_label_values(&["error"])
                            .inc();
                    }
                    if let StartError::Refused(why) = &e {
                        ctx.refused(why.as_str());
                    }
                    tracing::debug!(peer = %peer, error = %e, "connection setup failed");
                    return;
                }
                Err(_) => {
                    if matches!(edge, Edge::Tls(_)) {
                        ctx.metrics
                            .tls_handshake_failures
                            .with_label_values(&["timeout"])
                            .inc();
                    }
                    tracing::debug!(peer = %peer, "connection setup timed out");
                    return;
                }
            };
            let (io, info) = io;
            let state = slot.state.clone();
            let service = PeerService { router, info };
            let server = &ctx.net;
            let closing = state.closing(server.idle_timeout, server.unauthenticated_timeout);
            match io {
                Stream::Tls(tls) => {
                    let conn = watcher.watch(builder.serve_connection(TokioIo::new(tls), service));
                    tokio::select! {
                        r = conn => if let Err(e) = r {
                            tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                        },
                        _ = closing => tracing::debug!(peer = %peer, "connection closed (idle, unauthenticated or evicted)"),
                    }
                }
                Stream::Cleartext(tcp) => {
                    let conn = watcher.watch(builder.serve_connection(TokioIo::new(tcp), service));
                    tokio::select! {
                        r = conn => if let Err(e) = r {
                            tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                        },
                        _ = closing => tracing::debug!(peer = %peer, "connection closed (idle, unauthenticated or evicted)"),
                    }
                }
                Stream::Plain(tcp) => {
                    let mut http1 = hyper::server::conn::http1::Builder::new();
                    http1
                        .timer(TokioTimer::new())
                        .header_read_timeout(server.header_read_timeout);
                    let conn = watcher.watch(http1.serve_connection(TokioIo::new(tcp), service));
                    tokio::select! {
                        _ = conn => {}
                        _ = closing => {}
                    }
                }
            }
            drop(slot);
        });
    }
}

/// The connection after its setup: TLS on the XKS listener, plain elsewhere
/// (and on the XKS listener when the load balancer ends TLS).
enum Stream {
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Plain(TcpStream),
    Cleartext(TcpStream),
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("PROXY protocol: {0}")]
    Proxy(#[from] ProxyError),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("refused: {}", .0.as_str())]
    Refused(Refused),
}

/// The PROXY header (when configured, or when one comes on a plain
/// listener) and the TLS handshake: everything before HTTP.
async fn start(
    mut tcp: TcpStream,
    peer: SocketAddr,
    edge: &Edge,
    slot: &mut Slot,
    proxied: bool,
) -> Result<(Stream, ConnInfo), StartError> {
    let mut info = ConnInfo {
        client: peer,
        vpce_id: None,
        conn: slot.state.clone(),
    };
    let header = match edge {
        Edge::Tls(_) | Edge::Cleartext if proxied => true,
        Edge::Plain if proxied => {
            let mut sig = [0u8; 12];
            matches!(tcp.peek(&mut sig).await, Ok(12)) && sig == SIGNATURE
        }
        _ => false,
    };
    if header {
        let h = read_header(&mut tcp).await?;
        if let Some(client) = h.source {
            info.client = client;
        }
        info.vpce_id = h.vpce_id.map(Arc::from);
    }
    if proxied {
        slot.set_source(info.client.ip())
            .map_err(StartError::Refused)?;
    }
    match edge {
        Edge::Tls(acceptor) => match acceptor.accept(tcp).into_fallible().await {
            Ok(tls) => Ok((Stream::Tls(Box::new(tls)), info)),
            Err((e, tcp)) => {
                linger_after_refusal(tcp).await;
                Err(StartError::Tls(e))
            }
        },
        Edge::Plain => Ok((Stream::Plain(tcp), info)),
        Edge::Cleartext => Ok((Stream::Cleartext(tcp), info)),
    }
}

/// How long, and how much, a refused handshake's client is still read.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024;

/// After a refused handshake (a client certificate refused, say), rustls has
/// written its alert. Closing now, with the client's next flight unread (a
/// TLS 1.3 client sends its certificate, Finished and often its request at
/// once), makes the kernel answer with a reset, which can reach the client
/// before the alert and discard it: the client sees "connection reset"
/// instead of why. So: shut down the write side (the alert, then FIN), read
/// and discard what the client still sends, bounded in time and bytes (the
/// caller's handshake deadline bounds it too), then close.
async fn linger_after_refusal(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut buf = [0u8; 4096];
    let mut read = 0;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while read < LINGER_BYTES {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

/// Decrements a gauge when the connection task ends, however it ends.
struct DecOnDrop(prometheus::IntGauge);

impl Drop for DecOnDrop {
    fn drop(&mut self) {
        self.0.dec();
    }
}
