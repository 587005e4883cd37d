//! The shipped alerts (deploy/prometheus/alerts.yaml) and Grafana dashboard
//! (deploy/grafana/xks-proxy.json) in a real Prometheus (the Debian
//! `prometheus` package) scraping a real proxy.
//!
//! Each test starts its own Prometheus on 127.0.0.1 (a free port, a temp
//! storage directory, scrape and rule evaluation every second) with a copy of
//! the shipped rules in which every `for:` is shortened to [`TEST_FOR`]: the
//! expressions, thresholds and windows are the shipped ones, only the time an
//! alert stays pending before it fires is not. Then the proxy is broken the
//! way production breaks (its key manager's deep probe fails, its
//! certificate nears expiry, error bursts) and the test reads through
//! Prometheus's HTTP API that the right alert goes pending/firing, and that it
//! clears once the proxy is healthy again. Every wait polls against a deadline.
//!
//! The dashboard test runs every panel query, annotation and template query
//! of the dashboard (Grafana variables substituted) and every alert rule, and
//! fails on a query Prometheus refuses, on one that stays empty after the
//! test drove the traffic it describes, or on a metric name the proxy's own
//! `/metrics` does not export.
//!
//! Prometheus must be installed (`apt-get install prometheus`;
//! `scripts/lib.sh` installs it): without it these tests fail, they are not
//! skipped.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::load::Load;
use common::*;
use serde_json::Value;
use xks_proxy::client::bodies;

/// The `for:` of every alert in the copy of the rules the test Prometheus
/// loads (the shipped file says minutes or an hour).
const TEST_FOR: &str = "2s";

/// The repository root.
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Prometheus server binary: `$PROMETHEUS`, else `prometheus` on PATH.
fn prometheus_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PROMETHEUS") {
        return p.into();
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the Prometheus server is not installed: `apt-get install prometheus` \
                 (scripts/lib.sh ensure_packages does it), or set PROMETHEUS to its binary. \
                 These tests run the shipped alerts and dashboard in a real Prometheus."
            )
        })
}

/// The shipped rules with every `for:` set to [`TEST_FOR`].
fn rules_for_test() -> String {
    let text = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yaml")).unwrap();
    let mut out = String::with_capacity(text.len());
    let mut replaced = 0;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("for: ") {
            let indent = &line[..line.len() - trimmed.len()];
            out.push_str(&format!("{indent}for: {TEST_FOR}\n"));
            replaced += 1;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(replaced > 0, "no `for:` found in alerts.yaml");
    out
}

/// The names of the alerts in the shipped rules.
fn shipped_alert_names() -> Vec<String> {
    std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yaml"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|s| s.trim().to_string())
        .collect()
}

/// Percent-encodes a query-string value.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `GET path` over HTTP/1.0 (so the answer is never chunked): (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// A free port on 127.0.0.1 (free when asked; Prometheus is restarted on
/// another if it was taken in between).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One Prometheus server scraping one proxy's admin listener.
struct Prometheus {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("alerts.yaml"), rules_for_test()).unwrap();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [alerts.yaml]\n\
                 scrape_configs:\n  - job_name: xks-proxy\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let mut p = Prometheus {
            addr: "127.0.0.1:0".parse().unwrap(),
            child: None,
            log: dir.path().join("prometheus.log"),
            dir,
        };
        for _attempt in 0..3 {
            p.addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log = std::fs::File::create(&p.log).unwrap();
            let child = Command::new(prometheus_bin())
                .arg(format!(
                    "--config.file={}",
                    p.dir.path().join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    p.dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={}", p.addr))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", prometheus_bin().display()));
            p.child = Some(child);
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Some(status) = p.child.as_mut().unwrap().try_wait().unwrap() {
                    eprintln!("prometheus exited ({status}); log:\n{}", p.log_text());
                    p.child = None;
                    break;
                }
                if http_get(p.addr, "/-/ready").is_some_and(|(s, _)| s == 200) {
                    return p;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        panic!("prometheus did not become ready; log:\n{}", p.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A JSON API call; the `data` of a successful answer, else the error.
    fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = http_get(self.addr, path)
            .ok_or_else(|| format!("no answer from prometheus for {path}"))?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| format!("{path}: HTTP {status}, not JSON ({e}): {body}"))?;
        if v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(format!(
                "{}: {}",
                v["errorType"].as_str().unwrap_or("?"),
                v["error"].as_str().unwrap_or(&body)
            ))
        }
    }

    /// Evaluates an instant query: its result vector, or Prometheus's error.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(expr)))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Active (pending or firing) alerts: (name, state, labels).
    fn alerts(&self) -> Vec<(String, String, Value)> {
        self.api("/api/v1/alerts").unwrap_or_else(|e| panic!("{e}"))["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap_or("").to_string(),
                    a["state"].as_str().unwrap_or("").to_string(),
                    a["labels"].clone(),
                )
            })
            .collect()
    }

    fn active(&self, name: &str) -> Vec<(String, Value)> {
        self.alerts()
            .into_iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, s, l)| (s, l))
            .collect()
    }

    /// Waits until Prometheus has scraped the proxy a few times and
    /// evaluated every rule at least once.
    fn wait_ready_for(&self, p: &Proxy) {
        let scraped = eventually(60, || {
            self.query("count_over_time(up{job=\"xks-proxy\"}[1m]) >= 3")
                .is_ok_and(|r| !r.is_empty())
                && self
                    .query("up{job=\"xks-proxy\"} == 1")
                    .is_ok_and(|r| !r.is_empty())
        });
        assert!(
            scraped,
            "prometheus did not scrape the proxy at {}\nprometheus log:\n{}\nproxy log:\n{}",
            p.admin_addr,
            self.log_text(),
            p.log()
        );
        let evaluated = eventually(60, || {
            self.rules()
                .iter()
                .all(|r| r["health"] == "ok" && r["evaluationTime"].as_f64().is_some())
        });
        assert!(evaluated, "rules not evaluated: {:#?}", self.rules());
    }

    /// Every loaded rule.
    fn rules(&self) -> Vec<Value> {
        self.api("/api/v1/rules")
            .map(|d| {
                d["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until the alert `name` is in state `state`; returns the states
    /// it was seen in on the way (polled every 100 ms), and its labels.
    fn wait_for_state(
        &self,
        name: &str,
        state: &str,
        secs: u64,
        p: &Proxy,
    ) -> (Vec<String>, Value) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut seen: Vec<String> = Vec::new();
        while Instant::now() < deadline {
            for (s, labels) in self.active(name) {
                if seen.last() != Some(&s) {
                    seen.push(s.clone());
                }
                if s == state {
                    return (seen, labels);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{name} not {state} within {secs} s (seen: {seen:?}); active alerts: {:#?}\n\
             prometheus log:\n{}\nproxy log (tail):\n{}",
            self.alerts(),
            self.log_text(),
            tail(&p.log(), 40)
        );
    }

    /// Waits until no alert `name` is pending or firing.
    fn wait_inactive(&self, name: &str, secs: u64, p: &Proxy) {
        let cleared = eventually(secs, || self.active(name).is_empty());
        assert!(
            cleared,
            "{name} still active after {secs} s: {:#?}\nproxy log (tail):\n{}",
            self.active(name),
            tail(&p.log(), 40)
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

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

// ---------------------------------------------------------------------------
// Alerts
// ---------------------------------------------------------------------------

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
/// store; both clear once the last minute holds no more errors.
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

    // No more errors: both clear when the 1-minute window is past them.
    prom.wait_inactive("XksRetryableErrors", 150, &p);
    prom.wait_inactive("XksNonRetryableErrors", 150, &p);
}

// ---------------------------------------------------------------------------
// Dashboard and rule queries
// ---------------------------------------------------------------------------

/// The metric names in `/metrics` (histograms with their series names).
fn exported_names(metrics_text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics_text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                names.insert(name.to_string());
                if kind == "histogram" || kind == "summary" {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// The metric names a PromQL expression refers to: every `xks_*`
/// identifier, and any identifier followed by a label selector (string
/// literals, which hold label values, are skipped).
fn referenced_names(expr: &str) -> BTreeSet<String> {
    let mut code = String::with_capacity(expr.len());
    let mut in_string = false;
    let mut escaped = false;
    for ch in expr.chars() {
        if in_string {
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_string = false;
                code.push('"');
            }
        } else {
            if ch == '"' {
                in_string = true;
            }
            code.push(ch);
        }
    }
    let bytes = code.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b':')
            {
                i += 1;
            }
            let word = &code[start..i];
            let next = code[i..].trim_start().chars().next();
            // An identifier right after a digit is a duration unit ("5m").
            let after_digit = start > 0 && bytes[start - 1].is_ascii_digit();
            if !after_digit && (word.starts_with("xks_") || next == Some('{')) {
                names.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every PromQL expression of the dashboard: panel targets, annotations and
/// the series selectors of `label_values(...)` template queries, with
/// Grafana's variables substituted as Grafana would for "All".
fn dashboard_queries() -> Vec<(String, String)> {
    let d: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/xks-proxy.json")).unwrap(),
    )
    .unwrap();
    let substitute = |expr: &str| {
        let mut e = expr.to_string();
        for (var, value) in [
            ("$__rate_interval", "30s"),
            ("${__rate_interval}", "30s"),
            ("$__interval", "5s"),
            ("${job}", "xks-proxy"),
            ("$job", "xks-proxy"),
            ("${instance}", ".*"),
            ("$instance", ".*"),
            ("${key_store}", ".*"),
            ("$key_store", ".*"),
        ] {
            e = e.replace(var, value);
        }
        assert!(
            !e.contains('$'),
            "a Grafana variable the test does not know in: {expr}"
        );
        e
    };
    let mut out = Vec::new();
    for panel in d["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap_or("?");
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.is_empty(),
                "panel '{title}' has a target without expr"
            );
            out.push((format!("panel '{title}'"), substitute(expr)));
        }
    }
    for a in d["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(expr) = a["expr"].as_str() {
            out.push((format!("annotation '{}'", a["name"]), substitute(expr)));
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or_default();
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .and_then(|s| s.rsplit_once(','))
            .map(|(selector, _label)| selector.trim())
            .unwrap_or_else(|| {
                panic!("template variable {} is not label_values(): {q}", v["name"])
            });
        out.push((format!("variable {}", v["name"]), substitute(inner)));
    }
    out
}

/// Every dashboard query and every alert rule runs in Prometheus against a
/// proxy that has seen the traffic the panels describe (requests, both
/// kinds of errors, throttling, a reload, a failed TLS handshake, a refused
/// connection), returns data, and names only metrics the proxy exports.
#[test]
fn every_dashboard_query_and_alert_rule_runs_on_metrics_the_proxy_exports() {
    let p = Proxy::start_with(Options {
        extra_key_store: "rate_limit = { requests_per_second = 1, burst = 1 }".into(),
        extra_server: "max_connections_per_source = 8".into(),
        ..Options::default()
    });
    let prom = Prometheus::start(p.admin_addr);

    // Traffic: round trips on "other", throttling on "test", a missing key.
    let other = p.other_store_h1();
    let load = Load::start(&other, "other-key");
    load.wait_for(30, &p);
    let throttled = p.h1();
    block_on(async {
        let mut saw_429 = false;
        for _ in 0..5 {
            let r = throttled
                .call("/keys/key-ed/metadata", bodies::metadata())
                .await
                .unwrap();
            saw_429 |= r.status == 429;
            let r = other
                .call("/keys/key-ed/metadata", bodies::metadata())
                .await
                .unwrap();
            assert_eq!(r.status, 404);
        }
        assert!(saw_429, "the key store's quota never answered 429");
    });
    // A reload by signal.
    unsafe_kill(p.pid(), "HUP");
    // A client that does not speak TLS.
    {
        let mut s = TcpStream::connect(p.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let _ = s.read_to_end(&mut Vec::new());
    }
    // More connections from one address than it may hold.
    let held: Vec<TcpStream> = (0..10)
        .filter_map(|_| TcpStream::connect(p.addr).ok())
        .collect();
    for family in [
        "xks_config_reloads_total",
        "xks_tls_handshake_failures_total",
        "xks_connections_refused_total",
    ] {
        assert!(
            eventually(20, || p.admin_get("/metrics").1.contains(family)),
            "{family} never appeared; log:\n{}",
            tail(&p.log(), 40)
        );
    }
    drop(held);
    // A second reload once Prometheus holds the counter, so the reload
    // annotation (changes() of the counter) has a change to show.
    assert!(eventually(60, || prom
        .query("xks_config_reloads_total{result=\"ok\"}")
        .is_ok_and(|r| !r.is_empty())));
    unsafe_kill(p.pid(), "HUP");
    assert!(
        eventually(20, || metric(
            &p,
            "xks_config_reloads_total{result=\"ok\",trigger=\"signal\"}"
        ) >= 2.0),
        "second reload not counted; log:\n{}",
        tail(&p.log(), 40)
    );
    let (failures, _) = load.finish();
    assert!(failures.is_empty(), "{failures:?}");

    let exported = exported_names(&p.admin_get("/metrics").1);
    prom.wait_ready_for(&p);

    // The rules: all loaded, all healthy, all on exported metrics.
    let rules = prom.rules();
    let mut loaded: Vec<String> = rules
        .iter()
        .map(|r| r["name"].as_str().unwrap_or("").to_string())
        .collect();
    let mut shipped = shipped_alert_names();
    loaded.sort();
    shipped.sort();
    assert_eq!(loaded, shipped, "rules loaded by prometheus");
    let mut problems = Vec::new();
    for r in &rules {
        let (name, query) = (r["name"].as_str().unwrap(), r["query"].as_str().unwrap());
        if r["health"] != "ok" {
            problems.push(format!(
                "rule {name}: health {} {}",
                r["health"], r["lastError"]
            ));
        }
        if let Err(e) = prom.query(query) {
            problems.push(format!("rule {name}: {e}"));
        }
        for m in referenced_names(query) {
            // `up` is Prometheus's own, for XksProxyDown.
            if !exported.contains(&m) && m != "up" {
                problems.push(format!("rule {name}: {m} is not exported by the proxy"));
            }
        }
    }

    // The dashboard: every query valid, non-empty, on exported metrics.
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{} queries", queries.len());
    for (what, expr) in &queries {
        for m in referenced_names(expr) {
            if !exported.contains(&m) {
                problems.push(format!("{what}: {m} is not exported by the proxy: {expr}"));
            }
        }
        if let Err(e) = prom.query(expr) {
            problems.push(format!("{what}: prometheus refuses the query: {e}: {expr}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Data: scrapes keep coming, so a query that is still empty after a
    // while describes something the proxy does not report.
    let mut empty: Vec<&(String, String)> = Vec::new();
    let has_data = eventually(60, || {
        empty = queries
            .iter()
            .filter(|(_, e)| prom.query(e).map(|r| r.is_empty()).unwrap_or(true))
            .collect();
        empty.is_empty()
    });
    assert!(
        has_data,
        "queries without data:\n{}\nexported: {exported:?}",
        empty
            .iter()
            .map(|(w, e)| format!("{w}: {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "{} dashboard queries and {} alert rules checked",
        queries.len(),
        rules.len()
    );
}

/// The name extraction the dashboard test relies on.
#[test]
fn referenced_names_finds_metrics_and_skips_labels_strings_and_units() {
    let names = referenced_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(xks_request_duration_seconds_bucket{job=~"xks_.*", le!="0.5"}[5m]))) > 0.2 or up{job="x"} == 0 or xks_hsm_sessions"#,
    );
    let expected: BTreeSet<String> = [
        "xks_request_duration_seconds_bucket",
        "up",
        "xks_hsm_sessions",
    ]
    .map(String::from)
    .into();
    assert_eq!(names, expected);
    let exported = exported_names(
        "# TYPE xks_request_duration_seconds histogram\nxks_request_duration_seconds_bucket{le=\"1\"} 0\n# TYPE xks_hsm_sessions gauge\nxks_hsm_sessions 2\n",
    );
    assert!(exported.contains("xks_request_duration_seconds_count"));
    assert!(exported.contains("xks_hsm_sessions"));
    assert!(!exported.contains("up"));
}
