//! The admin listener: Prometheus metrics and a liveness check, over plain
//! HTTP on a loopback address by default. It carries no secrets and no key
//! material, but it does reveal key store names and access key ids, so keep it
//! off the network KMS reaches.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::header;

use arc_swap::ArcSwap;

use xks_hsm::{EkmStatus, KeyManagers};
use xks_net::tls::CertResolver;
use xks_state::Live;
use xks_telemetry::metrics::Metrics;

/// What the admin endpoints read: gauges are sampled at scrape time from
/// the state they describe.
pub struct AdminState {
    pub metrics: Metrics,
    pub hsm: KeyManagers,
    pub live: Arc<ArcSwap<Live>>,
    /// `None`: TLS ends at the load balancer (no certificate here).
    pub certs: Option<Arc<CertResolver>>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/ping", get(|| async { "ok\n" }))
        .with_state(state)
}

/// Days from `now` to `t` (negative when `t` is past).
fn days_between(now: SystemTime, t: SystemTime) -> f64 {
    match t.duration_since(now) {
        Ok(d) => d.as_secs_f64() / 86_400.0,
        Err(e) => -(e.duration().as_secs_f64() / 86_400.0),
    }
}

/// Samples the gauges that describe state rather than events, then renders.
async fn metrics(State(s): State<Arc<AdminState>>) -> Response {
    let m = &s.metrics;
    let now = SystemTime::now();
    m.hsm_queue_waiting.set(s.hsm.queue_len() as i64);
    if let Some(certs) = &s.certs {
        m.cert_expiry_days.set(days_between(now, certs.not_after()));
    }

    for (ekm, status) in s.hsm.details() {
        for candidate in [
            EkmStatus::Active,
            EkmStatus::Degraded,
            EkmStatus::Unavailable,
        ] {
            m.ekm_health
                .with_label_values(&[&ekm.id, candidate.as_str()])
                .set(i64::from(candidate == status));
        }
    }

    // Credentials come and go with reloads: rebuild the family each scrape.
    m.credential_age_days.reset();
    let live = s.live.load();
    for ks in live.stores.values() {
        for (id, created) in &ks.credential_ages {
            if let Some(created) = created {
                m.credential_age_days
                    .with_label_values(&[&ks.name, id])
                    .set(-days_between(now, *created));
            }
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
        .into_response()
}
