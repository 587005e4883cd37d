//! Prometheus metrics, served in the text format on the admin listener.
//!
//! One [`Registry`] per proxy, owned by the application state and passed to
//! whoever records (no process-global recorder). Labels are bounded sets only:
//! key store names come from the config, operations and error names from the
//! spec. Key ids, principals and request ids never become labels; they belong
//! in the access log.
//!
//! Latency buckets are dense below 250 ms, the budget KMS gives every call, so
//! the histogram shows how close the proxy runs to that budget rather than
//! lumping everything under one "fast" bucket.

use std::time::Duration;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Request latency buckets, in seconds.
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.25, 0.5, 1.0,
];

/// PKCS#11 call latency buckets, in seconds (a SoftHSM AES-GCM call is ~15 µs,
/// a network HSM a few ms).
const HSM_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25,
];

/// Every metric the proxy exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests by key store, operation, HTTP status and errorName.
    pub requests: IntCounterVec,
    /// Time from request arrival to response, by operation.
    pub request_seconds: HistogramVec,
    /// Time a pool thread spent on one job (its PKCS#11 calls), by key
    /// manager and kind: with several HSMs, the slow one stands out.
    pub hsm_seconds: HistogramVec,
    /// Time a job waited for a free session.
    pub hsm_queue_wait_seconds: Histogram,
    /// Pool sessions busy with a job right now.
    pub hsm_sessions_busy: IntGauge,
    /// Pool sessions configured.
    pub hsm_sessions: IntGauge,
    /// Sessions opened (and logged in) by pool threads, by key manager: it
    /// grows when sessions are lost and reopened (session churn).
    pub hsm_sessions_opened: IntCounterVec,
    /// Jobs waiting for a session (sampled at scrape time).
    pub hsm_queue_waiting: IntGauge,
    /// 1 for the current health status of each key manager, 0 for the others.
    pub ekm_health: IntGaugeVec,
    /// Keys a key manager holds other material for than the reference key
    /// manager (see `hsm::agreement`): not used for them.
    pub hsm_keys_diverging: IntGaugeVec,
    /// Days until the serving certificate expires (negative once expired).
    pub cert_expiry_days: Gauge,
    /// Age of each SigV4 credential, from its `created` time or its secret file.
    pub credential_age_days: GaugeVec,
    /// Configuration reloads by trigger and result.
    pub reloads: IntCounterVec,
    /// Open client connections, by listener (xks, ping, admin).
    pub connections_open: IntGaugeVec,
    /// Connections closed at once or evicted, by listener and reason
    /// (capacity, per_source, evicted, accept_error).
    pub connections_refused: IntCounterVec,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: IntCounterVec,
    /// Decrypts that authenticated only with the AWS sample proxy's AAD
    /// construction, by key store: when it stops growing, the sample's
    /// ciphertexts have stopped coming and compat can be switched off.
    pub compat_decrypts: IntCounterVec,
    /// Access-log lines of unauthenticated requests held back by the limiter.
    pub log_lines_suppressed: prometheus::IntCounter,
    /// Log lines dropped because the log destination did not keep up.
    pub log_lines_dropped: prometheus::IntCounter,
    /// Audit records written (every type: requests, seals, events).
    pub audit_records: prometheus::IntCounter,
    /// Audit records that could not be queued (`audit.on_failure =
    /// "continue"`, or a request that never authenticated): a gap the
    /// trail itself reports with a `loss` record.
    pub audit_lost: prometheus::IntCounter,
    /// Requests answered 503 because the trail could not take their record
    /// (`audit.on_failure = "refuse"`).
    pub audit_refused: prometheus::IntCounter,
    /// Seals computed in the HSM, by result (ok, failed).
    pub audit_seals: IntCounterVec,
    /// Failed writes of the audit trail (each retried).
    pub audit_write_errors: prometheus::IntCounter,
    /// Audit records queued or reserved and not yet written.
    pub audit_queue: IntGauge,
    /// Lockdowns in force on this instance.
    pub lockdown_active: IntGauge,
    /// Reads of the lockdown markers that failed (the last known locks stay).
    pub lockdown_poll_failures: prometheus::IntCounter,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Names, labels and buckets are constants of this file; a failure is a
    // programming error that the unit test below catches.
    r.expect("metric definition") // ok: constant definitions, unit-tested
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let m = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(m.clone())));
            m
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let m = must(HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            ));
            must(registry.register(Box::new(m.clone())));
            m
        };
        let int_gauge = |name: &str, help: &str| {
            let m = must(IntGauge::new(name, help));
            must(registry.register(Box::new(m.clone())));
            m
        };
        let requests = counter_vec(
            "xks_requests_total",
            "XKS API requests by key store, operation, HTTP status and errorName.",
            &["key_store", "operation", "status", "error_name"],
        );
        let request_seconds = histogram_vec(
            "xks_request_duration_seconds",
            "Time from request arrival to response, by XKS operation.",
            &["operation"],
            REQUEST_BUCKETS,
        );
        let hsm_seconds = histogram_vec(
            "xks_hsm_call_duration_seconds",
            "Time a pool session spent on one job's PKCS#11 calls, by key manager and kind (encrypt, decrypt, metadata, health_probe, heartbeat, markers, marker_put, hmac, hmac_key).",
            &["ekm_id", "call"],
            HSM_BUCKETS,
        );
        let hsm_queue_wait_seconds = must(Histogram::with_opts(
            HistogramOpts::new(
                "xks_hsm_queue_wait_seconds",
                "Time a job waited for a free HSM session.",
            )
            .buckets(HSM_BUCKETS.to_vec()),
        ));
        must(registry.register(Box::new(hsm_queue_wait_seconds.clone())));
        let hsm_sessions_busy = int_gauge(
            "xks_hsm_sessions_in_use",
            "HSM pool sessions busy with a job.",
        );
        let hsm_sessions = int_gauge("xks_hsm_sessions", "HSM pool sessions configured.");
        let hsm_sessions_opened = counter_vec(
            "xks_hsm_sessions_opened_total",
            "Sessions opened and logged in by the pool threads, by key manager.",
            &["ekm_id"],
        );
        let hsm_queue_waiting = int_gauge(
            "xks_hsm_queue_waiting",
            "Jobs waiting for a free HSM session.",
        );
        let ekm_health = must(IntGaugeVec::new(
            Opts::new(
                "xks_ekm_health_status",
                "1 for the key manager's current health status (ACTIVE, DEGRADED, UNAVAILABLE), 0 for the others.",
            ),
            &["ekm_id", "status"],
        ));
        must(registry.register(Box::new(ekm_health.clone())));
        let hsm_keys_diverging = must(IntGaugeVec::new(
            Opts::new(
                "xks_hsm_keys_diverging",
                "Keys for which the key manager holds different key material than the reference key manager (it is not used for them).",
            ),
            &["ekm_id"],
        ));
        must(registry.register(Box::new(hsm_keys_diverging.clone())));
        let cert_expiry_days = must(Gauge::new(
            "xks_tls_certificate_expiry_days",
            "Days until the XKS listener's certificate expires.",
        ));
        must(registry.register(Box::new(cert_expiry_days.clone())));
        let credential_age_days = must(GaugeVec::new(
            Opts::new(
                "xks_credential_age_days",
                "Age of each SigV4 credential (rotate before it gets old).",
            ),
            &["key_store", "access_key_id"],
        ));
        must(registry.register(Box::new(credential_age_days.clone())));
        let reloads = counter_vec(
            "xks_config_reloads_total",
            "Configuration reloads by trigger (signal, file) and result (ok, rejected).",
            &["trigger", "result"],
        );
        let connections_open = must(IntGaugeVec::new(
            Opts::new(
                "xks_connections_open",
                "Open client connections, by listener (xks, ping, admin).",
            ),
            &["listener"],
        ));
        must(registry.register(Box::new(connections_open.clone())));
        let connections_refused = counter_vec(
            "xks_connections_refused_total",
            "Connections refused or evicted, by listener and reason (capacity, per_source, evicted, accept_error).",
            &["listener", "reason"],
        );
        let tls_handshake_failures = counter_vec(
            "xks_tls_handshake_failures_total",
            "TLS handshakes on the XKS listener that failed, by reason (error, timeout).",
            &["reason"],
        );
        let compat_decrypts = counter_vec(
            "xks_compat_decrypts_total",
            "Decrypts of ciphertexts written by the AWS sample proxy (compat = \"aws-sample\"), by key store.",
            &["key_store"],
        );
        let log_lines_suppressed = must(prometheus::IntCounter::new(
            "xks_log_lines_suppressed_total",
            "Access-log lines of unauthenticated requests held back by the per-source limit.",
        ));
        must(registry.register(Box::new(log_lines_suppressed.clone())));
        let log_lines_dropped = must(prometheus::IntCounter::new(
            "xks_log_lines_dropped_total",
            "Log lines dropped because the log destination did not keep up.",
        ));
        must(registry.register(Box::new(log_lines_dropped.clone())));
        let int_counter = |name: &str, help: &str| {
            let m = must(prometheus::IntCounter::new(name, help));
            must(registry.register(Box::new(m.clone())));
            m
        };
        let audit_records = int_counter(
            "xks_audit_records_total",
            "Audit records written (requests, seals, events).",
        );
        let audit_lost = int_counter(
            "xks_audit_records_lost_total",
            "Audit records that could not be queued (on_failure = continue, or unauthenticated requests).",
        );
        let audit_refused = int_counter(
            "xks_audit_requests_refused_total",
            "Requests answered 503 because the audit trail could not take their record (on_failure = refuse).",
        );
        let audit_seals = counter_vec(
            "xks_audit_seals_total",
            "Audit seals computed in the HSM, by result (ok, failed).",
            &["result"],
        );
        let audit_write_errors = int_counter(
            "xks_audit_write_errors_total",
            "Failed writes of the audit trail (retried).",
        );
        let audit_queue = int_gauge(
            "xks_audit_queue_records",
            "Audit records queued or reserved and not yet written.",
        );
        let lockdown_active = int_gauge(
            "xks_lockdown_active_locks",
            "Lockdowns in force on this instance.",
        );
        let lockdown_poll_failures = int_counter(
            "xks_lockdown_poll_failures_total",
            "Reads of the lockdown markers in a key manager that failed.",
        );
        let build = must(IntGaugeVec::new(
            Opts::new("xks_build_info", "Build information; always 1."),
            &["version"],
        ));
        must(registry.register(Box::new(build.clone())));
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Metrics {
            registry,
            requests,
            request_seconds,
            hsm_seconds,
            hsm_queue_wait_seconds,
            hsm_sessions_busy,
            hsm_sessions,
            hsm_sessions_opened,
            hsm_queue_waiting,
            ekm_health,
            hsm_keys_diverging,
            cert_expiry_days,
            credential_age_days,
            reloads,
            connections_open,
            connections_refused,
            tls_handshake_failures,
            compat_decrypts,
            log_lines_suppressed,
            log_lines_dropped,
            audit_records,
            audit_lost,
            audit_refused,
            audit_seals,
            audit_write_errors,
            audit_queue,
            lockdown_active,
            lockdown_poll_failures,
        }
    }

    /// Records one answered XKS request.
    pub fn observe_request(
        &self,
        key_store: &str,
        operation: &str,
        status: u16,
        error_name: &str,
        elapsed: Duration,
    ) {
        self.requests
            .with_label_values(&[key_store, operation, &itoa_status(status), error_name])
            .inc();
        self.request_seconds
            .with_label_values(&[operation])
            .observe(elapsed.as_secs_f64());
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// A status code as a label value without going through `format!`.
fn itoa_status(status: u16) -> String {
    let mut s = String::with_capacity(3);
    for d in [status / 100, (status / 10) % 10, status % 10] {
        s.push(char::from(b'0' + d as u8));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let m = Metrics::new();
        m.observe_request(
            "store",
            "Encrypt",
            400,
            "ValidationException",
            Duration::from_millis(3),
        );
        m.hsm_seconds
            .with_label_values(&["tok-1", "encrypt"])
            .observe(0.0001);
        m.ekm_health.with_label_values(&["tok-1", "ACTIVE"]).set(1);
        m.credential_age_days
            .with_label_values(&["store", "AKID"])
            .set(1.5);
        m.reloads.with_label_values(&["signal", "ok"]).inc();
        m.tls_handshake_failures
            .with_label_values(&["timeout"])
            .inc();
        let text = String::from_utf8(m.render()).unwrap();
        for needle in [
            r#"xks_requests_total{error_name="ValidationException",key_store="store",operation="Encrypt",status="400"} 1"#,
            r#"xks_request_duration_seconds_bucket{operation="Encrypt",le="0.005"} 1"#,
            r#"xks_request_duration_seconds_bucket{operation="Encrypt",le="0.002"} 0"#,
            "xks_hsm_call_duration_seconds_count",
            "xks_hsm_sessions_in_use 0",
            r#"xks_ekm_health_status{ekm_id="tok-1",status="ACTIVE"} 1"#,
            "xks_tls_certificate_expiry_days",
            r#"xks_credential_age_days{access_key_id="AKID",key_store="store"} 1.5"#,
            r#"xks_config_reloads_total{result="ok",trigger="signal"} 1"#,
            "xks_build_info",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert_eq!(itoa_status(200), "200");
        assert_eq!(itoa_status(503), "503");
    }
}
