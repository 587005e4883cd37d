//! PROXY protocol v2 on the XKS listener (as an NLB sends it): the access log
//! shows the real client and the VPC endpoint id; a connection without the
//! header is refused.

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xks_proxy::client::{bodies, tls_config, HttpVersion};

/// Opens TCP, optionally sends `preamble`, then TLS and one signed health
/// request over HTTP/1.1; returns the raw response (empty if refused).
fn health_through(p: &Proxy, preamble: Option<Vec<u8>>) -> String {
    let client = p.h1();
    let (addr, ca) = (p.addr, p.certs.ca.clone());
    block_on(async move {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        if let Some(pre) = preamble {
            tcp.write_all(&pre).await.unwrap();
        }
        let tls = tls_config(&ca, HttpVersion::Http1).unwrap();
        let Ok(mut s) = tokio_rustls::TlsConnector::from(tls)
            .connect("localhost".try_into().unwrap(), tcp)
            .await
        else {
            return String::new();
        };
        let body = bodies::health("KmsHealthCheck");
        let req = signed(&client, "/health", body.clone());
        let mut head = raw_head(&req);
        head.push_str(&format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        ));
        if s.write_all(head.as_bytes()).await.is_err() || s.write_all(&body).await.is_err() {
            return String::new();
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    })
}

#[test]
fn proxy_v2_headers_name_the_client_and_vpc_endpoint() {
    let p = Proxy::start_with(Options {
        extra_server: "proxy_protocol = true".into(),
        ..Options::default()
    });
    let client: SocketAddr = "10.1.2.3:45678".parse().unwrap();
    let header = xks_proxy::net::proxy_protocol::encode(
        client,
        "10.0.0.9:443".parse().unwrap(),
        Some("vpce-0a1b2c3d4e5f67890"),
    );
    let r = health_through(&p, Some(header));
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        p.wait_for_log("\"client_addr\":\"10.1.2.3:45678\""),
        "{}",
        p.log()
    );
    assert!(p
        .log()
        .contains("\"proxy_vpce_id\":\"vpce-0a1b2c3d4e5f67890\""));

    // Without the header (or with garbage), the connection goes nowhere.
    assert_eq!(health_through(&p, None), "");
    assert_eq!(
        health_through(&p, Some(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec())),
        ""
    );
    // The plain-HTTP /ping listener takes health checks with or without a header.
    for pre in [
        Some(xks_proxy::net::proxy_protocol::encode(
            client,
            p.ping_addr,
            None,
        )),
        None,
    ] {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(p.ping_addr).unwrap();
        if let Some(pre) = pre {
            s.write_all(&pre).unwrap();
        }
        s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }
    // The proxy still serves well-formed connections.
    let header =
        xks_proxy::net::proxy_protocol::encode(client, "10.0.0.9:443".parse().unwrap(), None);
    assert!(health_through(&p, Some(header)).starts_with("HTTP/1.1 200"));
}
