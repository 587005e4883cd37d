//! The shipped Grafana dashboard (deploy/grafana/xks-proxy.json) and alert
//! rules (deploy/prometheus/alerts.yaml) in a real Prometheus (the Debian
//! `prometheus` package) scraping a real proxy.
//!
//! The dashboard test runs every panel query, annotation and template query
//! of the dashboard (Grafana variables substituted) and every alert rule, and
//! fails on a query Prometheus refuses, on one that stays empty after the
//! test drove the traffic it describes, or on a metric name the proxy's own
//! `/metrics` does not export. The Prometheus harness is in
//! `tests/common/prometheus.rs`; the alerts firing and clearing are tested
//! in `tests/prometheus.rs`.
//!
//! Prometheus must be installed (`apt-get install prometheus`;
//! `scripts/lib.sh` installs it): without it these tests fail, they are not
//! skipped.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::load::Load;
use common::prometheus::*;
use common::*;
use serde_json::Value;
use xks_proxy::client::bodies;

/// The names of the alerts in the shipped rules.
fn shipped_alert_names() -> Vec<String> {
    std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yaml"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|s| s.trim().to_string())
        .collect()
}

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
