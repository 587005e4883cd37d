//! The composition root: a validated [`Config`] in, a running proxy out.
//!
//! This is the one place that wires the layers together: it opens the key
//! managers, builds the live state, the TLS configuration and the three
//! listeners, hands each its router, and starts the tasks that run beside
//! them (HSM supervisors, the lockdown poller, the log-drop watcher, hot
//! reload), and the audit trail's writer. Everything it
//! calls is testable on its own; what is here is the order of startup and
//! shutdown, and the reasons for it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper_util::server::graceful::GracefulShutdown;
use tokio_rustls::TlsAcceptor;

use crate::api::{self, AppState};
use crate::audit::config::default_instance_id;
use crate::audit::{AuditError, AuditTrail, HsmSealer};
use crate::config::Config;
use crate::hsm::lanes::Placement;
use crate::hsm::{HsmError, KeyManagers};
use crate::lockdown::{LockBoard, Poller};
use crate::net::client_auth::ClientVerifier;
use crate::net::fds;
use crate::net::limits::{ConnLimits, Registry};
use crate::net::listener::{bind, serve, serve_optional, BindError, Edge, ListenerCtx};
use crate::net::pem::TlsError;
use crate::net::tls::{load_cert, server_config, CertResolver};
use crate::ops::admin::{self, AdminState};
use crate::ops::reload::Reloader;
use crate::state::StateError;
use crate::telemetry::logging::{watch_drops, LogDrops};
use crate::telemetry::metrics::Metrics;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Hsm(#[from] HsmError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(
        "the audit seal key '{0}' is in no key manager (or can leave the token: it must be \
         sensitive and non-extractable); create it with `xks-proxy audit init-key`, or set \
         audit.create_seal_key = true"
    )]
    NoSealKey(String),
    #[error("a startup task (opening the key managers or the audit trail) failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Connections the admin listener holds at once (Prometheus scrapes).
const ADMIN_MAX_CONNECTIONS: usize = 32;

/// Runs the proxy until `shutdown` resolves, then drains connections.
///
/// `config_path`, when given, enables hot reload (SIGHUP and file watching)
/// from that file.
pub async fn run(
    cfg: Config,
    placement: Placement,
    config_path: Option<PathBuf>,
    log_drops: LogDrops,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let cfg = Arc::new(cfg);
    // Everything that can be refused without touching the HSM comes first,
    // so a typo in a policy does not cost a login.
    let live = Arc::new(ArcSwap::from_pointee(cfg.live(None)?));
    // TLS here, or (said by name) at the load balancer in front.
    let certs = match &cfg.tls {
        Some(tls) => Some(CertResolver::new(load_cert(tls)?)),
        None => {
            tracing::warn!(
                "tls.termination = \"load-balancer\": the XKS listener speaks plain HTTP; only a \
                 load balancer that ends TLS (an NLB TLS listener) may reach it, never a network \
                 where anyone else can"
            );
            None
        }
    };
    let client_auth = cfg.client_auth().map(ClientVerifier::new).transpose()?;
    let edge = match &certs {
        Some(certs) => Edge::Tls(TlsAcceptor::from(server_config(
            certs.clone(),
            client_auth.clone(),
        )?)),
        None => Edge::Cleartext,
    };
    let metrics = Metrics::new();

    // Opening a token (C_Initialize, C_Login, sessions) blocks.
    let hsm = {
        let (cfg, metrics) = (cfg.clone(), metrics.clone());
        tokio::task::spawn_blocking(move || {
            KeyManagers::open(&cfg.hsm, &placement, &cfg.health, &metrics)
        })
        .await??
    };
    hsm.probe_all().await;
    for (ekm, status) in hsm.details() {
        tracing::info!(status = status.as_str(), ekm = %ekm.id, "first health probe done");
    }
    let mut tasks = hsm.spawn_supervisors();
    {
        // Keys held by several key managers are compared before they are
        // used (and here, for all of them, so that a difference is reported
        // at startup, not at the first request).
        let fleet = hsm.clone();
        tasks.push(tokio::spawn(
            async move { fleet.check_agreement(None).await },
        ));
    }

    let (listener, https_addr) = bind(cfg.net.listen).await?;
    // The audit trail, before anything is served; its default instance id
    // needs the XKS listener's port.
    let audit = match &cfg.audit {
        None => None,
        Some(a) => {
            let label = a.seal_key_label.clone();
            if !hsm
                .has_hmac_key(&label, std::time::Duration::from_secs(5))
                .await
                .unwrap_or(false)
            {
                return Err(ServeError::NoSealKey(label));
            }
            let instance = a
                .instance_id
                .clone()
                .unwrap_or_else(|| default_instance_id(https_addr.port()));
            let (a, keys, metrics) = (a.clone(), hsm.clone(), metrics.clone());
            let sealer = Box::new(HsmSealer { keys, label });
            let trail = tokio::task::spawn_blocking(move || {
                AuditTrail::start(&a, instance, Some(sealer), &metrics)
            })
            .await??;
            Some(Arc::new(trail))
        }
    };
    // The lockdowns in force, read once before serving, then twice a second.
    let locks = Arc::new(LockBoard::default());
    let mut poller = Poller::new(hsm.clone(), locks.clone(), audit.clone(), metrics.clone());
    poller
        .poll_until_read(crate::lockdown::poller::STARTUP_READ)
        .await;
    tasks.push(tokio::spawn(poller.run()));

    let (xks_conns, ping_conns, admin_conns) = connection_caps(&cfg);
    let app = Arc::new(AppState {
        live: live.clone(),
        keys: hsm.clone(),
        health_key: cfg.health.key_label.clone(),
        body_timeout: cfg.net.header_read_timeout,
        body_budget: Arc::new(tokio::sync::Semaphore::new(cfg.net.body_buffer_budget)),
        metrics: metrics.clone(),
        xks_conns: xks_conns.clone(),
        log_limiter: Default::default(),
        audit: audit.clone(),
        locks,
        seal_key: cfg.audit.as_ref().map(|a| a.seal_key_label.clone()),
    });

    let ping_listener = bind_optional(cfg.net.ping_listen).await?;
    let admin_listener = bind_optional(cfg.net.admin_listen).await?;
    let addr_of = |l: &Option<(_, SocketAddr)>| l.as_ref().map(|(_, a)| a.to_string());
    let key_stores: Vec<&str> = cfg.key_stores.iter().map(|k| k.uri_path.as_str()).collect();
    tracing::info!(
        https_addr = %https_addr,
        ping_addr = addr_of(&ping_listener).unwrap_or_default(),
        admin_addr = addr_of(&admin_listener).unwrap_or_default(),
        key_stores = ?key_stores,
        max_connections = xks_conns.limits().max,
        "listening"
    );

    tasks.push(tokio::spawn(watch_drops(
        log_drops,
        metrics.log_lines_dropped.clone(),
    )));
    if let Some(path) = config_path {
        let reloader = Reloader::new(
            path,
            cfg.clone(),
            live.clone(),
            metrics.clone(),
            certs.clone(),
            client_auth,
        );
        tasks.push(tokio::spawn(reloader.run(cfg.reload_poll)));
    }

    let graceful = GracefulShutdown::new();
    let ctx = |name| {
        Arc::new(ListenerCtx {
            name,
            net: cfg.net.clone(),
            metrics: metrics.clone(),
        })
    };
    let xks = serve(
        listener,
        edge,
        api::router(app.clone()),
        xks_conns,
        ctx("xks"),
        &graceful,
    );
    let ping = serve_optional(
        ping_listener.map(|(l, _)| l),
        || api::ping_router(app.clone()),
        ping_conns,
        ctx("ping"),
        &graceful,
    );
    let admin_state = Arc::new(AdminState {
        metrics: metrics.clone(),
        hsm: hsm.clone(),
        live,
        certs,
    });
    let admin = serve_optional(
        admin_listener.map(|(l, _)| l),
        || admin::router(admin_state),
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
    match tokio::time::timeout(cfg.net.shutdown_grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections closed"),
        Err(_) => tracing::warn!(
            grace_secs = cfg.net.shutdown_grace.as_secs(),
            "grace period over; closing remaining connections"
        ),
    }
    // The trail's stop record and last seal (through the key managers,
    // which are still open), then closing the sessions and logging out of
    // the HSM: both block, off the runtime.
    if let Some(trail) = audit {
        let _ = tokio::task::spawn_blocking(move || trail.close()).await;
    }
    // Every pool thread stops and the sessions close before this returns,
    // whoever still holds the key managers: the process then exits with
    // nothing inside the PKCS#11 library while it is torn down.
    let _ = tokio::task::spawn_blocking(move || {
        hsm.close();
        drop(app);
    })
    .await;
    Ok(())
}

async fn bind_optional(
    addr: Option<SocketAddr>,
) -> Result<Option<(tokio::net::TcpListener, SocketAddr)>, BindError> {
    match addr {
        Some(a) => bind(a).await.map(Some),
        None => Ok(None),
    }
}

/// The three listeners' connection registries, with caps that leave file
/// descriptors for the HSM module (see `net::fds`).
fn connection_caps(cfg: &Config) -> (Arc<Registry>, Arc<Registry>, Arc<Registry>) {
    let net = &cfg.net;
    // Each key manager's request sessions, and its control session.
    let sessions: usize = cfg
        .hsm
        .backends
        .iter()
        .map(|b| b.sessions.unwrap_or(cfg.hsm.sessions) + 1)
        .sum();
    let fds = fds::plan(
        fds::raise_limit(),
        fds::reserve_for(sessions),
        net.max_connections,
        net.max_ping_connections,
        ADMIN_MAX_CONNECTIONS,
    );
    if fds.xks < net.max_connections || fds.ping < net.max_ping_connections {
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
    let xks = Registry::new(
        "xks",
        ConnLimits {
            max: fds.xks,
            per_source: net.max_connections_per_source,
            evict_unauthenticated: true,
        },
    );
    // On `/ping` and admin nobody authenticates: the newest connection wins,
    // so a load balancer's health check (or a scrape) always gets in.
    let plain = |max| ConnLimits {
        max,
        per_source: net.max_connections_per_source.min(max),
        evict_unauthenticated: true,
    };
    (
        xks,
        Registry::new("ping", plain(fds.ping)),
        Registry::new("admin", plain(fds.admin)),
    )
}
