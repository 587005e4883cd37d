//! The shipped alerts (deploy/prometheus/alerts.yaml) in a real Prometheus
//! (the Debian `prometheus` package) scraping a real proxy.
//!
//! Each test starts its own Prometheus on 127.0.0.1 (a free port, a temp
//! storage directory, scrape and rule evaluation every second) with a copy of
//! the shipped rules in which every `for:` is shortened to `TEST_FOR` and
//! every range to `TEST_RANGE` (`tests/common/prometheus.rs`, the harness):
//! the expressions and thresholds are the shipped ones; the time an alert
//! stays pending before it fires, and how far back a rate looks, are not. Then the proxy is broken the way production
//! breaks (its key manager's deep probe fails, its certificate nears expiry,
//! error bursts) and the test reads through Prometheus's HTTP API that the
//! right alert goes pending/firing, and that it clears once the proxy is
//! healthy again. Every wait polls against a deadline. The Grafana dashboard
//! is tested in `tests/prometheus_dashboard.rs`.
//!
//! Prometheus must be installed (`apt-get install prometheus`;
//! `scripts/lib.sh` installs it): without it these tests fail, they are not
//! skipped.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::load::Load;
use common::prometheus::*;
use common::*;
use xks_proxy::client::bodies;

/// Replaces `to` by `content` by rename (a deploy tool's way), mode 600.
fn replace_private(to: &Path, content: &[u8]) {
    let tmp = to.with_extension("new");
    write_private(&tmp, std::str::from_utf8(content).unwrap());
    std::fs::rename(&tmp, to).unwrap();
}

/// A self-signed certificate for localhost valid for `days`, from openssl.
fn short_lived_certificate(dir: &Path, days: u32) -> (Vec<u8>, Vec<u8>) {
    let (cert, key) = (dir.join("short.crt"), dir.join("short.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-subj", "/CN=localhost", "-days"])
        .arg(days.to_string())
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (scripts/lib.sh installs it)");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (std::fs::read(cert).unwrap(), std::fs::read(key).unwrap())
}

/// The deep probe of the only key manager fails (its health-check key is
/// deleted behind the proxy's back): XksKeyManagerUnavailable and
/// XksAllKeyManagersUnavailable fire for this instance, and both clear when
/// the key is back and the key manager ACTIVE again.
///
/// Then the process dies (SIGKILL): XksProxyDown fires, and clears when it
/// is back on its ports.
#[test]
fn an_unavailable_key_manager_fires_its_alerts_until_it_recovers() {
    let mut p = Proxy::start();
    let prom = Prometheus::start(p.admin_addr);
    let c = p.h1();
    let load = Load::start(&c, "key-ed");
    load.wait_for(50, &p);
    let (failures, _) = load.finish();
    assert!(failures.is_empty(), "{failures:?}");
    prom.wait_ready_for(&p);
    assert!(prom
        .query("sum(xks_requests_total{status=\"200\"}) > 0")
        .is_ok_and(|r| !r.is_empty()));
    for name in ["XksKeyManagerUnavailable", "XksAllKeyManagersUnavailable"] {
        assert!(prom.active(name).is_empty(), "{name} active while healthy");
    }

    p.delete_health_key();
    let (seen, labels) = prom.wait_for_state("XksKeyManagerUnavailable", "firing", 60, &p);
    eprintln!("XksKeyManagerUnavailable: {seen:?} {labels}");
    assert_eq!(labels["status"], "UNAVAILABLE");
    assert_eq!(labels["instance"], p.admin_addr.to_string());
    assert_eq!(labels["severity"], "warning");
    assert!(labels["ekm_id"].as_str().is_some_and(|s| !s.is_empty()));
    let (seen, labels) = prom.wait_for_state("XksAllKeyManagersUnavailable", "firing", 60, &p);
    eprintln!("XksAllKeyManagersUnavailable: {seen:?} {labels}");
    assert_eq!(labels["severity"], "critical");
    assert_eq!(labels["instance"], p.admin_addr.to_string());
    // What the proxy itself says agrees: the load balancer drains it.
    assert_eq!(ping_status(&p).0, 503);

    p.cli(&["keys", "create", "--label", HEALTH_KEY]);
    prom.wait_inactive("XksKeyManagerUnavailable", 60, &p);
    prom.wait_inactive("XksAllKeyManagersUnavailable", 60, &p);
    assert_eq!(ping_status(&p).0, 200);

    assert!(prom.active("XksProxyDown").is_empty());
    p.kill();
    let (seen, labels) = prom.wait_for_state("XksProxyDown", "firing", 60, &p);
    eprintln!("XksProxyDown: {seen:?} {labels}");
    assert_eq!(labels["instance"], p.admin_addr.to_string());
    p.start_again();
    prom.wait_inactive("XksProxyDown", 60, &p);
}

/// The proxy is given a certificate that expires in 5 days (by file, as a
/// renewal would): XksCertificateExpiringSoon fires; a renewed one clears it.
#[test]
fn a_certificate_about_to_expire_fires_its_alert_until_it_is_renewed() {
    let p = Proxy::start();
    let prom = Prometheus::start(p.admin_addr);
    prom.wait_ready_for(&p);
    for name in ["XksCertificateExpiringSoon", "XksCertificateExpired"] {
        assert!(
            prom.active(name).is_empty(),
            "{name} active with a fresh certificate"
        );
    }
    let (good_cert, good_key) = (
        std::fs::read(&p.certs.cert).unwrap(),
        std::fs::read(&p.certs.key).unwrap(),
    );

    let (cert, key) = short_lived_certificate(p.dir.path(), 5);
    replace_private(&p.certs.key, &key);
    replace_private(&p.certs.cert, &cert);
    let (seen, labels) = prom.wait_for_state("XksCertificateExpiringSoon", "firing", 60, &p);
    eprintln!("XksCertificateExpiringSoon: {seen:?} {labels}");
    assert_eq!(labels["instance"], p.admin_addr.to_string());
    let days = prom.query("xks_tls_certificate_expiry_days").unwrap();
    let days: f64 = days[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!((4.9..=5.01).contains(&days), "{days} days");
    assert!(prom.active("XksCertificateExpired").is_empty());

    replace_private(&p.certs.key, &good_key);
    replace_private(&p.certs.cert, &good_cert);
    prom.wait_inactive("XksCertificateExpiringSoon", 60, &p);
}

/// Errors KMS would retry (429 ThrottlingException from the key store's
/// quota) and errors it would not (404 KeyNotFoundException), each more than
/// 5 a minute: XksRetryableErrors and XksNonRetryableErrors fire, per key
/// store; both clear once their window holds no more errors.
#[test]
fn error_bursts_fire_the_retryable_and_non_retryable_alerts_until_they_stop() {
    let p = Proxy::start_with(Options {
        extra_key_store: "rate_limit = { requests_per_second = 1, burst = 1 }".into(),
        ..Options::default()
    });
    let prom = Prometheus::start(p.admin_addr);
    prom.wait_ready_for(&p);
    for name in ["XksRetryableErrors", "XksNonRetryableErrors"] {
        assert!(
            prom.active(name).is_empty(),
            "{name} active before any error"
        );
    }
    let throttled = p.h1();
    let other = p.other_store_h1();

    // Errors at ~10 a second until both alerts fire (a counter's first
    // sample is its baseline, so a burst inside one scrape would not count).
    let deadline = Instant::now() + Duration::from_secs(90);
    let (mut n429, mut n404) = (0, 0);
    loop {
        block_on(async {
            for _ in 0..3 {
                let r = throttled
                    .call("/keys/key-ed/metadata", bodies::metadata())
                    .await
                    .unwrap();
                if r.status == 429 {
                    assert_eq!(r.error_name().as_deref(), Some("ThrottlingException"));
                    n429 += 1;
                }
                // key-ed is not a key of the key store "other".
                let r = other
                    .call("/keys/key-ed/metadata", bodies::metadata())
                    .await
                    .unwrap();
                assert_eq!(r.status, 404);
                assert_eq!(r.error_name().as_deref(), Some("KeyNotFoundException"));
                n404 += 1;
            }
        });
        let firing = |name: &str| prom.active(name).iter().any(|(s, _)| s == "firing");
        if firing("XksRetryableErrors") && firing("XksNonRetryableErrors") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alerts not firing after {n429} throttled and {n404} not-found requests: {:#?}",
            prom.alerts()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("{n429} ThrottlingException, {n404} KeyNotFoundException before both fired");
    let retryable = prom.active("XksRetryableErrors");
    assert_eq!(retryable.len(), 1, "{retryable:?}");
    assert_eq!(retryable[0].1["key_store"], "test");
    let non_retryable = prom.active("XksNonRetryableErrors");
    assert_eq!(non_retryable.len(), 1, "{non_retryable:?}");
    assert_eq!(non_retryable[0].1["key_store"], "other");

    // No more errors: both clear when the window (a minute as shipped,
    // TEST_RANGE here) is past them.
    prom.wait_inactive("XksRetryableErrors", 60, &p);
    prom.wait_inactive("XksNonRetryableErrors", 60, &p);
}
