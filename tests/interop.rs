//! Every request gets its answer, whatever the client: the error answers that
//! are decided before the body is needed (unknown URI path, bad signature,
//! over-limit body) reach curl over HTTP/2 and HTTP/1.1, Python's
//! `http.client`, and an HTTP/2 client that sends its HEADERS first and its
//! DATA later. Each client sends hundreds of such requests, on fresh and on
//! reused connections; not one answer may be lost.
//!
//! Before the proxy read every body to its end, curl over HTTP/2 lost most
//! of these answers (exit 92: the `RST_STREAM` arrived while it was still
//! uploading) and Python got a broken connection for the large body.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::process::Command;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use xks_proxy::client::{bodies, HttpVersion};

/// One kind of early answer: where to send, what, with which secret, and
/// the status that must come back.
struct Case {
    name: &'static str,
    path: String,
    body: Vec<u8>,
    secret_ok: bool,
    status: u16,
}

fn cases() -> Vec<Case> {
    // 65,536 bytes of AAD: an 87 KB body, over the 64 KiB limit.
    let big = bodies::encrypt(b"x", Some(&vec![7u8; 65_536]), false);
    assert!(big.len() > 80_000);
    vec![
        Case {
            name: "unknown URI path",
            path: "/unknown/kms/xks/v1/health".into(),
            body: bodies::health("KmsHealthCheck"),
            secret_ok: true,
            status: 404,
        },
        Case {
            name: "bad signature",
            path: format!("{URI_PATH}/health"),
            body: bodies::health("KmsHealthCheck"),
            secret_ok: false,
            status: 401,
        },
        Case {
            name: "over-limit body",
            path: format!("{URI_PATH}/keys/key-ed/encrypt"),
            body: big,
            secret_ok: true,
            status: 501,
        },
    ]
}

/// Status codes curl printed (`000` for a lost answer), counted.
fn tally(out: &[u8]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for code in String::from_utf8_lossy(out).split_whitespace() {
        *counts.entry(code.to_string()).or_insert(0) += 1;
    }
    counts
}

/// curl's options for one transfer of `case` (the `--next` block of a config).
fn curl_transfer(p: &Proxy, case: &Case, body_file: &Path, http: &str) -> String {
    let secret = if case.secret_ok {
        p.secret_a.clone()
    } else {
        "W".repeat(44)
    };
    format!(
        "url = \"https://localhost:{port}{path}\"\n{http}\ncacert = \"{ca}\"\n\
         aws-sigv4 = \"aws:amz:us-east-1:kms-xks-proxy\"\nuser = \"{AKID_A}:{secret}\"\n\
         header = \"Content-Type: application/json\"\ndata-binary = \"@{body}\"\n\
         output = \"/dev/null\"\nwrite-out = \"%{{http_code}}\\n\"\nsilent\n",
        port = p.addr.port(),
        path = case.path,
        ca = p.certs.ca.display(),
        body = body_file.display(),
    )
}

#[test]
fn curl_gets_every_early_answer_over_http2_and_http1() {
    let p = Proxy::start();
    let dir = tempfile::tempdir().unwrap();
    for (i, case) in cases().iter().enumerate() {
        let body_file = dir.path().join(format!("body-{i}"));
        std::fs::write(&body_file, &case.body).unwrap();
        for http in ["http2", "http1.1"] {
            let transfer = curl_transfer(&p, case, &body_file, http);
            let config = dir.path().join(format!("curl-{i}-{http}"));
            // A fresh connection per request: one curl process each.
            std::fs::write(&config, &transfer).unwrap();
            let mut fresh = BTreeMap::new();
            for _ in 0..40 {
                let out = Command::new("curl")
                    .arg("-K")
                    .arg(&config)
                    .output()
                    .unwrap();
                for (code, n) in tally(&out.stdout) {
                    *fresh.entry(code).or_insert(0) += n;
                }
            }
            // Many requests on shared connections, several at once (HTTP/2
            // streams multiplexed on one connection).
            let many = vec![transfer; 200].join("next\n");
            std::fs::write(&config, many).unwrap();
            let out = Command::new("curl")
                .args(["--parallel", "--parallel-max", "8", "-K"])
                .arg(&config)
                .output()
                .unwrap();
            let shared = tally(&out.stdout);
            let want = case.status.to_string();
            assert_eq!(
                fresh,
                BTreeMap::from([(want.clone(), 40)]),
                "{} over {http}, fresh connections",
                case.name
            );
            assert_eq!(
                shared,
                BTreeMap::from([(want, 200)]),
                "{} over {http}, shared connections",
                case.name
            );
        }
    }
}

/// Python's `http.client` writes the whole body before it reads anything.
const PYTHON: &str = r#"
import http.client, json, ssl, sys
port, ca, path, body_file, auth, reuse, n = sys.argv[1:8]
body = open(body_file, "rb").read()
ctx = ssl.create_default_context(cafile=ca)
codes = {}
conn = None
for _ in range(int(n)):
    if conn is None or reuse != "reuse":
        conn = http.client.HTTPSConnection("localhost", int(port), context=ctx, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={
            "Content-Type": "application/json", "Authorization": auth,
            "X-Amz-Date": "20260101T000000Z"})
        r = conn.getresponse()
        r.read()
        code = str(r.status)
        if r.getheader("connection", "").lower() == "close":
            conn.close(); conn = None
    except Exception as e:
        code = type(e).__name__
        conn.close(); conn = None
    codes[code] = codes.get(code, 0) + 1
print(json.dumps(codes, sort_keys=True))
"#;

#[test]
fn python_http_client_gets_every_early_answer() {
    let p = Proxy::start();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("client.py");
    std::fs::write(&script, PYTHON).unwrap();
    // A well-formed signature that does not match: 401 (and the unknown path
    // and the body limit are decided before the signature anyway).
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential={AKID_A}/20260101/us-east-1/kms-xks-proxy/aws4_request, \
         SignedHeaders=host;x-amz-date, Signature={}",
        "0".repeat(64)
    );
    for (i, case) in cases().iter().enumerate() {
        let body_file = dir.path().join(format!("body-{i}"));
        std::fs::write(&body_file, &case.body).unwrap();
        for reuse in ["fresh", "reuse"] {
            let out = Command::new("python3")
                .arg(&script)
                .arg(p.addr.port().to_string())
                .arg(&p.certs.ca)
                .arg(&case.path)
                .arg(&body_file)
                .arg(&auth)
                .arg(reuse)
                .arg("150")
                .output()
                .expect("python3 must be installed");
            let got: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|_| panic!("python: {}", String::from_utf8_lossy(&out.stderr)));
            assert_eq!(
                got,
                serde_json::json!({ case.status.to_string(): 150 }),
                "{} ({reuse} connections)",
                case.name
            );
        }
    }
}

/// A request body whose DATA frames are sent only after a pause.
struct Late {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for Late {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

#[test]
fn an_http2_client_that_sends_headers_first_and_data_later_gets_every_answer() {
    let p = Proxy::start();
    block_on(async {
        let stream = tls_connect(p.addr, &p.certs.ca, HttpVersion::Http2).await;
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={AKID_A}/20260101/us-east-1/kms-xks-proxy/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature={}",
            "0".repeat(64)
        );
        for case in cases() {
            let mut tasks = Vec::new();
            for _ in 0..100 {
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                let req = http::Request::post(format!("https://localhost{}", case.path))
                    .header("content-type", "application/json")
                    .header("authorization", &auth)
                    .header("x-amz-date", "20260101T000000Z")
                    .body(Late { rx })
                    .unwrap();
                let mut sender = sender.clone();
                let body = Bytes::from(case.body.clone());
                tasks.push(tokio::spawn(async move {
                    let response = tokio::spawn(async move { sender.send_request(req).await });
                    // HEADERS are out; the DATA follows later, in pieces.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    for piece in body.chunks(16 * 1024) {
                        if tx.send(Bytes::copy_from_slice(piece)).await.is_err() {
                            break;
                        }
                    }
                    drop(tx);
                    response
                        .await
                        .unwrap()
                        .map(|r| r.status().as_u16())
                        .map_err(|e| e.to_string())
                }));
            }
            let mut got = BTreeMap::new();
            for t in tasks {
                let code = match t.await.unwrap() {
                    Ok(c) => c.to_string(),
                    Err(e) => e,
                };
                *got.entry(code).or_insert(0) += 1;
            }
            assert_eq!(
                got,
                BTreeMap::from([(case.status.to_string(), 100)]),
                "{}",
                case.name
            );
        }
    });
}
