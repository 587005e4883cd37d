//! Listeners and connection handling.
//!
//! One task per connection: admission by the listener's [`Registry`] (caps
//! sized to the open-files limit, see `net`), the PROXY header and TLS
//! handshake within one deadline, then hyper's auto builder, which serves
//! HTTP/2 or HTTP/1.1 according to ALPN, until the connection ends, goes
//! idle, outstays its time without authenticating, or is evicted. A
//! graceful-shutdown watcher lets in-flight requests finish on SIGTERM within
//! the configured grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

use crate::admin::AdminState;
use crate::api::{self, AppState};
use crate::config::{Config, ServerConfig};
use crate::hsm::{HsmError, KeyManagers};
use crate::logging::LogDrops;
use crate::metrics::Metrics;
use crate::mtls::ClientVerifier;
use crate::net::fds;
use crate::net::limits::{Admitted, ConnLimits, ConnState, Refused, Registry, RequestGuard, Slot};
use crate::proxy_protocol::read_header;
use crate::reload::Reloader;
use crate::tls::CertResolver;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Hsm(#[from] HsmError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("startup task failed: {0}")]
    Join(String),
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

/// Connections the admin listener holds at once (Prometheus scrapes).
const ADMIN_MAX_CONNECTIONS: usize = 32;

/// Opens the key managers (each with its health-check key). Blocking work
/// runs on the blocking pool.
async fn open_hsm(cfg: Arc<Config>, metrics: Metrics) -> Result<KeyManagers, ServeError> {
    tokio::task::spawn_blocking(move || KeyManagers::open(&cfg.hsm, &cfg.health, &metrics))
        .await
        .map_err(|e| ServeError::Join(e.to_string()))?
        .map_err(ServeError::from)
}

/// Runs the proxy until `shutdown` resolves, then drains connections.
///
/// `config_path`, when given, enables hot reload (SIGHUP and file watching)
/// from that file.
pub async fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    log_drops: LogDrops,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let cfg = Arc::new(cfg);
    let certs = CertResolver::new(crate::tls::load_cert(&cfg.tls)?);
    let client_auth = cfg
        .tls
        .client_auth
        .as_ref()
        .map(ClientVerifier::new)
        .transpose()?;
    let tls = crate::tls::server_config(certs.clone(), client_auth.clone())?;
    let metrics = Metrics::new();
    let hsm = open_hsm(cfg.clone(), metrics.clone()).await?;

    hsm.probe_all().await;
    for (ekm, status) in hsm.details() {
        tracing::info!(status = status.as_str(), ekm = %ekm.id, "first health probe done");
    }
    let mut tasks = hsm.spawn_supervisors();

    // Connection caps that leave file descriptors for the HSM module.
    let sessions: usize = cfg
        .hsm
        .backends
        .iter()
        .map(|b| b.sessions.unwrap_or(cfg.hsm.sessions))
        .sum();
    let fds = fds::plan(
        fds::raise_limit(),
        fds::reserve_for(sessions),
        cfg.server.max_connections,
        cfg.server.max_ping_connections,
        ADMIN_MAX_CONNECTIONS,
    );
    if fds.xks < cfg.server.max_connections || fds.ping < cfg.server.max_ping_connections {
        tracing::warn!(
            open_files_limit = fds.limit,
            reserved_for_hsm = fds.reserved,
            max_connections = fds.xks,
            max_ping_connections = fds.ping,
            admin_connections = fds.admin,
            "the open-files limit is too low for the configured connection caps; they were \
             lowered so that the HSM module keeps its descriptors (raise LimitNOFILE)"
        );
    }
    let xks_conns = Registry::new(
        "xks",
        ConnLimits {
            max: fds.xks,
            per_source: cfg.server.max_connections_per_source,
            evict_unauthenticated: true,
        },
    );
    // On `/ping` and admin nobody authenticates: the newest connection wins,
    // so a load balancer's health check (or a scrape) always gets in.
    let plain_limits = |max| ConnLimits {
        max,
        per_source: cfg.server.max_connections_per_source.min(max),
        evict_unauthenticated: true,
    };
    let ping_conns = Registry::new("ping", plain_limits(fds.ping));
    let admin_conns = Registry::new("admin", plain_limits(fds.admin));

    let app = Arc::new(AppState::new(&cfg, hsm, metrics, xks_conns.clone()));
    let listener = bind(cfg.server.listen).await?;
    let https_addr = local_addr(&listener, cfg.server.listen)?;
    let ping_listener = match cfg.server.ping_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let ping_addr = ping_listener.as_ref().and_then(|l| l.local_addr().ok());
    let admin_listener = match cfg.admin_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    let key_stores: Vec<&str> = cfg.key_stores.iter().map(|k| k.uri_path.as_str()).collect();
    tracing::info!(
        https_addr = %https_addr,
        ping_addr = ping_addr.map(|a| a.to_string()).unwrap_or_default(),
        admin_addr = admin_addr.map(|a| a.to_string()).unwrap_or_default(),
        key_stores = ?key_stores,
        max_connections = fds.xks,
        "listening"
    );

    tasks.push(tokio::spawn(crate::logging::watch_drops(
        log_drops,
        app.metrics.log_lines_dropped.clone(),
    )));
    let reload_task = config_path.map(|path| {
        let reloader = Reloader::new(path, cfg.clone(), app.clone(), certs.clone(), client_auth);
        tokio::spawn(reloader.run(cfg.server.reload_poll))
    });

    let graceful = GracefulShutdown::new();
    let ctx = |name| {
        Arc::new(ListenerCtx {
            name,
            server: cfg.server.clone(),
            metrics: app.metrics.clone(),
        })
    };
    let xks = serve(
        listener,
        Edge::Tls(TlsAcceptor::from(tls)),
        api::router(app.clone()),
        xks_conns,
        ctx("xks"),
        &graceful,
    );
    let ping = serve_optional(
        ping_listener,
        || api::ping_router(app.clone()),
        ping_conns,
        ctx("ping"),
        &graceful,
    );
    let admin_state = Arc::new(AdminState {
        app: app.clone(),
        certs: certs.clone(),
    });
    let admin = serve_optional(
        admin_listener,
        || crate::admin::router(admin_state),
        admin_conns,
        ctx("admin"),
        &graceful,
    );
    tokio::select! {
        _ = xks => {}
        _ = ping => {}
        _ = admin => {}
        _ = shutdown => tracing::info!("shutdown requested: no new connections, draining"),
    }
    for t in tasks {
        t.abort();
    }
    if let Some(t) = reload_task {
        t.abort();
    }
    match tokio::time::timeout(cfg.server.shutdown_grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections closed"),
        Err(_) => tracing::warn!(
            grace_secs = cfg.server.shutdown_grace.as_secs(),
            "grace period over; closing remaining connections"
        ),
    }
    // Closing the sessions and logging out of the HSM blocks: off the runtime.
    let _ = tokio::task::spawn_blocking(move || drop(app)).await;
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

fn local_addr(l: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, ServeError> {
    l.local_addr()
        .map_err(|source| ServeError::Bind { addr, source })
}

/// Serves a plain-HTTP listener if it is configured, else never resolves.
async fn serve_optional(
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

fn http_builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
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
struct ListenerCtx {
    name: &'static str,
    server: ServerConfig,
    metrics: Metrics,
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
enum Edge {
    /// The XKS listener: TLS, after a PROXY v2 header when configured.
    Tls(TlsAcceptor),
    /// `/ping` and admin: plain HTTP/1.1; a PROXY v2 header is read when one
    /// comes (an NLB with proxy protocol on sends it on health checks too).
    Plain,
}

/// Accepts connections for as long as the listener lives. Each one is
/// admitted by `conns` (caps, eviction), gets the PROXY header (if any) and
/// the TLS handshake within one deadline, then is served until it ends, goes
/// idle, or is evicted.
async fn serve(
    listener: TcpListener,
    edge: Edge,
    router: Router,
    conns: Arc<Registry>,
    ctx: Arc<ListenerCtx>,
    graceful: &GracefulShutdown,
) {
    let builder = http_builder(&ctx.server);
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
        let proxied = ctx.server.proxy_protocol;
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
            let io = match tokio::time::timeout(ctx.server.tls_handshake_timeout, start).await {
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
            let server = &ctx.server;
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

/// The connection after its setup: TLS on the XKS listener, plain elsewhere.
enum Stream {
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Plain(TcpStream),
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("PROXY protocol: {0}")]
    Proxy(String),
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
        Edge::Tls(_) if proxied => true,
        Edge::Plain if proxied => {
            let mut sig = [0u8; 12];
            matches!(tcp.peek(&mut sig).await, Ok(12)) && sig == crate::proxy_protocol::SIGNATURE
        }
        _ => false,
    };
    if header {
        let h = read_header(&mut tcp)
            .await
            .map_err(|e| StartError::Proxy(e.to_string()))?;
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
        Edge::Tls(acceptor) => {
            let tls = acceptor.accept(tcp).await.map_err(StartError::Tls)?;
            Ok((Stream::Tls(Box::new(tls)), info))
        }
        Edge::Plain => Ok((Stream::Plain(tcp), info)),
    }
}

/// Decrements a gauge when the connection task ends, however it ends.
struct DecOnDrop(prometheus::IntGauge);

impl Drop for DecOnDrop {
    fn drop(&mut self) {
        self.0.dec();
    }
}
