//! TLS ended at the load balancer (`tls.termination = "load-balancer"`):
//! the layout of an NLB TLS listener forwarding to its targets over TCP,
//! which the AWS sample runs with `is_tls_enabled = false`. HAProxy ends
//! TLS in front (with ALPN h2 and http/1.1, as an NLB TLS listener does)
//! and passes PROXY protocol v2; the proxy speaks plain HTTP/1.1 and h2
//! behind it. Loopback only.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};

use common::*;
use xks_proxy::client::{bodies, tls_config, HttpVersion, XksClient};

/// HAProxy ending TLS in front of `backend`; killed when dropped.
struct TlsFront(Child, SocketAddr);

impl TlsFront {
    fn start(p: &Proxy) -> TlsFront {
        let front = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let dir = p.dir.path();
        // HAProxy takes the certificate and its key in one file.
        let pem = dir.join("haproxy.pem");
        let mut both = std::fs::read_to_string(&p.certs.cert).unwrap();
        both.push_str(&std::fs::read_to_string(&p.certs.key).unwrap());
        write_private(&pem, &both);
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 200\n\
                 defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 30s\n  \
                 timeout server 30s\n\
                 frontend xks\n  bind {front} ssl crt {} alpn h2,http/1.1\n  \
                 default_backend proxy\n\
                 backend proxy\n  server p {} send-proxy-v2\n",
                pem.display(),
                p.addr
            ),
        )
        .unwrap();
        let child = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy (Debian package haproxy) must be installed");
        assert!(
            eventually(10, || TcpStream::connect(front).is_ok()),
            "haproxy did not start"
        );
        TlsFront(child, front)
    }

    fn client(&self, p: &Proxy, version: HttpVersion) -> XksClient {
        XksClient::new(
            self.1,
            "localhost",
            URI_PATH,
            AKID_A,
            &p.secret_a,
            "us-east-1",
            tls_config(&p.certs.ca, version).unwrap(),
            version,
        )
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn behind_a_load_balancer_that_ends_tls_the_proxy_serves_plain_http() {
    let p = Proxy::start_with(Options {
        tls_at_load_balancer: true,
        extra_server: "proxy_protocol = true".into(),
        ..Options::default()
    });
    assert!(
        p.wait_for_log("the XKS listener speaks plain HTTP"),
        "no startup warning\n{}",
        p.log()
    );
    let front = TlsFront::start(&p);
    for version in [HttpVersion::Http2, HttpVersion::Http1] {
        let c = front.client(&p, version);
        block_on(async {
            let h = c
                .call("/health", bodies::health("KmsHealthCheck"))
                .await
                .unwrap();
            assert_eq!(h.status, 200, "{version:?}: {:?}", h.body);
            let e = c
                .call(
                    "/keys/key-ed/encrypt",
                    bodies::encrypt(b"through the NLB", Some(b"a"), true),
                )
                .await
                .unwrap();
            assert_eq!(e.status, 200, "{version:?}: {:?}", e.body);
            let d = c
                .call(
                    "/keys/key-ed/decrypt",
                    bodies::decrypt_from(&e.json(), Some(b"a"))
                        .to_string()
                        .into_bytes(),
                )
                .await
                .unwrap();
            assert_eq!(d.status, 200, "{version:?}: {:?}", d.body);
        });
    }
    // The client address came from the PROXY v2 header.
    assert!(
        p.wait_for_log("\"client_addr\":\"127.0.0.1:"),
        "{}",
        p.log()
    );
    // A connection without the PROXY header is refused: only the load
    // balancer may reach this listener.
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let _ = s.write_all(b"POST /test/kms/xks/v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(!String::from_utf8_lossy(&out).contains("200"), "{out:?}");
}

#[test]
fn mutual_tls_or_a_certificate_with_tls_at_the_load_balancer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_hsm, certs) = config_dir(dir.path());
    for (extra, names) in [
        (
            format!(
                "client_ca = \"{}\"\nclient_names = [\"cks.kms.*.amazonaws.com\"]",
                certs.ca.display()
            ),
            "tls.client_ca, tls.client_names",
        ),
        (format!("cert = \"{}\"", certs.cert.display()), "tls.cert"),
    ] {
        let config = write_config(
            dir.path(),
            &certs,
            &Options {
                tls_at_load_balancer: true,
                extra_tls: extra,
                ..Options::default()
            },
        );
        let out = Command::new(bin())
            .args(["check-config", "--no-hsm", "--config"])
            .arg(&config)
            .env("XKS_TEST_SECRET_B", "C".repeat(44))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("tls.termination = \"load-balancer\"") && err.contains(names),
            "{err}"
        );
    }
}
