//! A real Prometheus server (the Debian `prometheus` package) scraping one
//! proxy, with a copy of the shipped rules (deploy/prometheus/alerts.yaml)
//! in which every `for:` is shortened to [`TEST_FOR`] and every range of the
//! expressions to [`TEST_RANGE`] (so an alert clears seconds after its cause
//! stops, not minutes: the suite's time); its HTTP API (queries,
//! alerts, rules) and waits against a deadline. Used by
//! `tests/prometheus.rs` and `tests/prometheus_dashboard.rs`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

/// The `for:` of every alert in the copy of the rules the test Prometheus
/// loads (the shipped file says minutes or an hour).
pub const TEST_FOR: &str = "2s";

/// The range of every `[1m]` and `[5m]` of the expressions in that copy
/// (scrapes are every second, so fifteen of them).
pub const TEST_RANGE: &str = "15s";

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Prometheus server binary: `$PROMETHEUS`, else `prometheus` on PATH.
pub fn prometheus_bin() -> PathBuf {
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

/// The shipped rules with every `for:` set to [`TEST_FOR`] and every
/// range to [`TEST_RANGE`]; otherwise the expressions are the shipped ones.
pub fn rules_for_test() -> String {
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
    let ranges = out.matches("[1m]").count() + out.matches("[5m]").count();
    assert!(ranges > 0, "no [1m] or [5m] range found in alerts.yaml");
    out.replace("[1m]", &format!("[{TEST_RANGE}]"))
        .replace("[5m]", &format!("[{TEST_RANGE}]"))
}

/// Percent-encodes a query-string value.
pub fn url_encode(s: &str) -> String {
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
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
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
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One Prometheus server scraping one proxy's admin listener.
pub struct Prometheus {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
}

impl Prometheus {
    pub fn start(target: SocketAddr) -> Prometheus {
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

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A JSON API call; the `data` of a successful answer, else the error.
    pub fn api(&self, path: &str) -> Result<Value, String> {
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
    pub fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(expr)))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Active (pending or firing) alerts: (name, state, labels).
    pub fn alerts(&self) -> Vec<(String, String, Value)> {
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

    pub fn active(&self, name: &str) -> Vec<(String, Value)> {
        self.alerts()
            .into_iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, s, l)| (s, l))
            .collect()
    }

    /// Waits until Prometheus has scraped the proxy a few times and
    /// evaluated every rule at least once.
    pub fn wait_ready_for(&self, p: &Proxy) {
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
    pub fn rules(&self) -> Vec<Value> {
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
    pub fn wait_for_state(
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
    pub fn wait_inactive(&self, name: &str, secs: u64, p: &Proxy) {
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

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
