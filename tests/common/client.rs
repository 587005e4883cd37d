//! Talking to a running proxy from a test: signed requests, a runtime for
//! async clients, raw TLS connections, `/ping`, metrics and process memory,
//! polling, and `xks-proxy check` arguments.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use xks_proxy::client::{bodies, tls_config, HttpVersion, XksClient, XksResponse};

use super::*;

/// Whether `r` is the answer of a request the proxy shed because no HSM
/// session became free within its queue deadline: 503
/// DependencyTimeoutException, which KMS retries. With several requests in
/// flight on a machine busy with other work this is the right answer, and
/// whether it comes is the scheduler's business: tests about something
/// else count it apart instead of failing on it.
pub fn shed(r: &XksResponse) -> bool {
    r.status == 503 && r.json()["errorName"] == "DependencyTimeoutException"
}

/// Polls `f` until it returns true, for at most `secs` seconds.
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A request signed now.
pub fn signed(
    c: &XksClient,
    suffix: &str,
    body: impl Into<bytes::Bytes>,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    c.signed_request(suffix, body.into(), std::time::SystemTime::now())
        .unwrap()
}

/// A signed Encrypt of a short data key (no AAD, no CDIV) under `key-ed`,
/// the test key every load and flood sends.
pub fn signed_encrypt(c: &XksClient) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    signed(
        c,
        "/keys/key-ed/encrypt",
        bodies::encrypt(b"k", None, false),
    )
}

/// `xks-proxy check` arguments for the test key store with credential A.
pub fn check_args(endpoint: &str, secret_file: &Path, ca: &Path) -> Vec<String> {
    [
        "--endpoint",
        endpoint,
        "--uri-path",
        URI_PATH,
        "--access-key-id",
        AKID_A,
        "--secret-file",
        secret_file.to_str().unwrap(),
        "--ca",
        ca.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// Runs a future on a fresh runtime (tests are sync so the proxy process can
/// be managed with std).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A blocking TLS connection to the proxy (HTTP/1.1 in ALPN), handshake not
/// yet done: tests drive raw bytes over it.
pub fn tls_stream(p: &Proxy) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let tls = tls_config(&p.certs.ca, HttpVersion::Http1).unwrap();
    let tcp = std::net::TcpStream::connect(p.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = rustls::ClientConnection::new(tls, "localhost".try_into().unwrap()).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// How long until the server closes this connection (EOF or reset).
pub fn time_to_close(
    s: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
) -> Duration {
    use std::io::Read;
    let t = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return t.elapsed(),
            Ok(_) => {}
        }
    }
}

/// `GET /ping` on the plain listener: (status, body).
pub fn ping_status(p: &Proxy) -> (u16, String) {
    ping_at(p.ping_addr)
}

/// `GET /ping` at `addr`: (status, body), status 0 when nothing answered.
pub fn ping_at(addr: SocketAddr) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = write!(
        s,
        "GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A metric's value from the admin listener (0 when absent).
pub fn metric(p: &Proxy, series: &str) -> f64 {
    let (_, text) = p.admin_get("/metrics");
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// An async TLS connection to the proxy at `addr` (trusting `ca`, `version`
/// in ALPN), handshake done: tests speak raw HTTP or drive hyper over it.
pub async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
    version: HttpVersion,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tls = tls_config(ca, version).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap()
}

/// The request line and headers of `req` as HTTP/1.1 text, each line ended
/// by CRLF; the caller adds the last headers and the blank line.
pub fn raw_head<B>(req: &http::Request<B>) -> String {
    let mut head = format!("POST {} HTTP/1.1\r\n", req.uri());
    for (name, value) in req.headers() {
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    head
}
