//! Listeners and connection handling.
//!
//! One task per connection: TLS handshake (bounded in time), then hyper's
//! auto builder, which serves HTTP/2 or HTTP/1.1 according to ALPN. A connection
//! cap bounds memory; a graceful-shutdown watcher lets in-flight requests finish
//! on SIGTERM within the configured grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

use crate::admin::AdminState;
use crate::api::{self, AppState};
use crate::config::{Config, ServerConfig};
use crate::hsm::{HsmError, KeyManagers, Usages};
use crate::idle::{idle_deadline, Activity, ActivityIo};
use crate::metrics::Metrics;
use crate::mtls::ClientVerifier;
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
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub client: SocketAddr,
    /// The VPC endpoint id from the load balancer's PROXY header, if any.
    pub vpce_id: Option<Arc<str>>,
}

/// Opens the key managers and makes sure each has the health-check key.
/// Blocking work runs on the blocking pool.
async fn open_hsm(cfg: Arc<Config>, metrics: Metrics) -> Result<KeyManagers, ServeError> {
    tokio::task::spawn_blocking(move || -> Result<KeyManagers, HsmError> {
        let label = &cfg.health.key_label;
        let (fleet, tokens) = KeyManagers::open(&cfg.hsm, label, &metrics)?;
        for token in tokens {
            if !token.list_keys()?.iter().any(|k| &k.label == label) {
                let usages = Usages {
                    encrypt: true,
                    decrypt: true,
                    ..Usages::default()
                };
                token.create_aes_key(label, usages)?;
                tracing::info!(key = %label, ekm = %token.ekm_info().id, "created the health-check key");
            }
        }
        Ok(fleet)
    })
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

    hsm.probe_all(&cfg.health).await;
    for b in hsm.backends() {
        tracing::info!(status = ?b.health.current().0, ekm = %b.hsm.ekm_info().id, "first health probe done");
    }
    let health_tasks = hsm.spawn_health(&cfg.health);

    let app = Arc::new(AppState::new(&cfg, hsm, metrics));
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
        "listening"
    );

    let reload_task = config_path.map(|path| {
        let reloader = Reloader::new(path, cfg.clone(), app.clone(), certs.clone(), client_auth);
        tokio::spawn(reloader.run(cfg.server.reload_poll))
    });

    let graceful = GracefulShutdown::new();
    let router = api::router(app.clone());
    let xks = serve_tls(
        listener,
        TlsAcceptor::from(tls),
        router,
        &cfg.server,
        &app.metrics,
        &graceful,
    );
    let ping = serve_optional(
        ping_listener,
        || api::ping_router(app.clone()),
        &cfg.server,
        &graceful,
    );
    let admin_state = Arc::new(AdminState {
        app: app.clone(),
        certs: certs.clone(),
    });
    let admin = serve_optional(
        admin_listener,
        || crate::admin::router(admin_state),
        &cfg.server,
        &graceful,
    );
    tokio::select! {
        _ = xks => {}
        _ = ping => {}
        _ = admin => {}
        _ = shutdown => tracing::info!("shutdown requested: no new connections, draining"),
    }
    for t in health_tasks {
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
    cfg: &ServerConfig,
    graceful: &GracefulShutdown,
) {
    match listener {
        Some(l) => serve_plain(l, router(), cfg, graceful).await,
        None => std::future::pending().await,
    }
}

fn http_builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(32 * 1024);
    builder
}

/// The router as a hyper service that tags every request with its
/// connection's [`ConnInfo`] (for the access log).
#[derive(Clone)]
struct PeerService {
    router: Router,
    info: ConnInfo,
}

impl hyper::service::Service<http::Request<Incoming>> for PeerService {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = axum::routing::future::RouteFuture<std::convert::Infallible>;

    fn call(&self, mut req: http::Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(self.info.clone());
        self.router.clone().call(req.map(axum::body::Body::new))
    }
}

fn with_peer(router: Router, info: ConnInfo) -> PeerService {
    PeerService { router, info }
}

async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
    cfg: &ServerConfig,
    metrics: &Metrics,
    graceful: &GracefulShutdown,
) {
    let builder = http_builder(cfg);
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = %peer, "connection limit reached; closing new connection");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let router = router.clone();
        let proxy_protocol = cfg.proxy_protocol;
        let handshake_timeout = cfg.tls_handshake_timeout;
        let idle_timeout = cfg.idle_timeout;
        let watcher = graceful.watcher();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            metrics.connections_open.inc();
            let _open = DecOnDrop(&metrics.connections_open);
            // The PROXY header (when configured) and the TLS handshake share
            // one deadline: a client cannot stall either.
            let start = async {
                let mut tcp = tcp;
                let mut info = ConnInfo {
                    client: peer,
                    vpce_id: None,
                };
                if proxy_protocol {
                    let header = read_header(&mut tcp)
                        .await
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    if let Some(client) = header.source {
                        info.client = client;
                    }
                    info.vpce_id = header.vpce_id.map(Arc::from);
                }
                acceptor.accept(tcp).await.map(|tls| (tls, info))
            };
            let (tls, info) = match tokio::time::timeout(handshake_timeout, start).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    metrics
                        .tls_handshake_failures
                        .with_label_values(&["error"])
                        .inc();
                    tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics
                        .tls_handshake_failures
                        .with_label_values(&["timeout"])
                        .inc();
                    tracing::debug!(peer = %peer, "TLS handshake timed out");
                    return;
                }
            };
            let activity = Activity::new();
            let io = ActivityIo::new(tls, activity.clone());
            let service = with_peer(router, info);
            let conn = watcher.watch(builder.serve_connection(TokioIo::new(io), service));
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                },
                _ = idle_deadline(activity, idle_timeout) => {
                    tracing::debug!(peer = %peer, "idle connection closed");
                }
            }
        });
    }
}

/// Decrements a gauge when the connection task ends, however it ends.
struct DecOnDrop<'a>(&'a prometheus::IntGauge);

impl Drop for DecOnDrop<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn serve_plain(
    listener: TcpListener,
    router: Router,
    cfg: &ServerConfig,
    graceful: &GracefulShutdown,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout);
    loop {
        let Ok((mut tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let builder = builder.clone();
        let router = router.clone();
        let proxy_protocol = cfg.proxy_protocol;
        let header_timeout = cfg.header_read_timeout;
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // An NLB with PROXY protocol on sends the header on its health
            // checks too; accept it here when present (this listener serves
            // only /ping, so a missing header is no risk).
            if proxy_protocol {
                let mut sig = [0u8; 12];
                let peeked = tokio::time::timeout(header_timeout, tcp.peek(&mut sig)).await;
                if matches!(peeked, Ok(Ok(12))) && sig == crate::proxy_protocol::SIGNATURE {
                    let read = tokio::time::timeout(header_timeout, read_header(&mut tcp)).await;
                    if !matches!(read, Ok(Ok(_))) {
                        return;
                    }
                }
            }
            let info = ConnInfo {
                client: peer,
                vpce_id: None,
            };
            let conn = builder.serve_connection(TokioIo::new(tcp), with_peer(router, info));
            let _ = watcher.watch(conn).await;
        });
    }
}
