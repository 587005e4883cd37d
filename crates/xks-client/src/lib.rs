//! A small XKS API client that signs like KMS does.
//!
//! Used by the integration tests, by `xks-bench` and by operator tooling. It
//! signs `host;x-amz-date` with the AWS SDK's signer, exactly as KMS's XKS
//! management fleet does, over its own TLS connection (HTTP/1.1 keep-alive or
//! HTTP/2 per ALPN), so a caller controls connection reuse precisely — which a
//! benchmark needs and a pooled HTTP client would hide.
//!
//! **Crate `xks-client`**, one layer of the workspace (the table of layers is
//! in the `xks-proxy` crate's `src/lib.rs`). It uses `xks-net`, `xks-guard`, `xks-spec`;
//! its `Cargo.toml` lists exactly those, so the compiler holds it to them.

#![forbid(unsafe_code)]

pub mod bodies;
pub mod check;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4::SigningParams;
use aws_smithy_runtime_api::client::identity::Identity;
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use xks_guard::sigv4::SERVICE;
use xks_net::pem::{load_certs, load_key, provider, TlsError};

/// What went wrong on the client side of a call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("TLS setup: {0}")]
    TlsSetup(#[from] TlsError),
    #[error("'{0}' is not a valid TLS server name")]
    ServerName(String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("signing parameters: {0}")]
    SigningParams(#[from] aws_sigv4::sign::v4::signing_params::BuildError),
    #[error("signing: {0}")]
    Signing(#[from] aws_sigv4::http_request::SigningError),
    #[error("building the request: {0}")]
    Build(#[from] http::Error),
    #[error("a signed header is not a valid header value: {0}")]
    Header(#[from] http::header::InvalidHeaderValue),
    #[error("HTTP/1.1 cannot multiplex; use send()")]
    NoMultiplex,
    #[error("the response body is larger than {MAX_RESPONSE_BYTES} bytes; no XKS answer is")]
    ResponseTooLarge,
}

/// The largest response body the client reads. XKS answers are a few hundred
/// bytes; a server that streams more is not an XKS proxy, and must not be
/// able to make the client (or `xks-proxy check`) hold it.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Reads a response body, at most [`MAX_RESPONSE_BYTES`] of it.
async fn read_body(body: hyper::body::Incoming) -> Result<Bytes, ClientError> {
    http_body_util::Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(e) => ClientError::Http(*e),
            Err(_) => ClientError::ResponseTooLarge,
        })
}

/// Which HTTP version to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// Where and how to call the proxy.
#[derive(Clone)]
pub struct XksClient {
    addr: SocketAddr,
    /// Server name for SNI, certificate check and the Host header.
    server_name: String,
    uri_path: String,
    region: String,
    identity: Identity,
    tls: Arc<rustls::ClientConfig>,
    version: HttpVersion,
}

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct XksResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

impl XksResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn error_name(&self) -> Option<String> {
        self.json()["errorName"].as_str().map(str::to_owned)
    }
}

/// Builds a rustls client config trusting `ca_pem` (a PEM file), offering ALPN
/// for the requested HTTP version.
pub fn tls_config(
    ca_pem: &Path,
    version: HttpVersion,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    tls_config_with_identity(ca_pem, version, None)
}

/// Like [`tls_config`], presenting a client certificate (chain PEM, key PEM)
/// for mutual TLS when given, as KMS does.
pub fn tls_config_with_identity(
    ca_pem: &Path,
    version: HttpVersion,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    add_roots(&mut roots, ca_pem)?;
    let alpn: &[&[u8]] = match version {
        HttpVersion::Http1 => &[b"http/1.1"],
        HttpVersion::Http2 => &[b"h2"],
    };
    client_tls(roots, alpn, identity)
}

/// Adds the certificates of a PEM file to `roots`.
pub fn add_roots(roots: &mut rustls::RootCertStore, pem: &Path) -> Result<(), ClientError> {
    for cert in load_certs("CA certificates", pem)? {
        roots.add(cert).map_err(|source| TlsError::Trust {
            field: "CA certificates",
            path: pem.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// A client TLS configuration as KMS's: TLS 1.3 or 1.2 with the spec's
/// cipher suites only, these trust anchors and ALPN protocols, and a client
/// certificate (chain PEM, key PEM) when given.
pub fn client_tls(
    roots: rustls::RootCertStore,
    alpn: &[&[u8]],
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::from)?
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                load_certs("client certificate", cert)?,
                load_key("client key", key)?,
            )
            .map_err(TlsError::Mismatch)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

impl XksClient {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        addr: SocketAddr,
        server_name: &str,
        uri_path: &str,
        access_key_id: &str,
        secret: &str,
        region: &str,
        tls: Arc<rustls::ClientConfig>,
        version: HttpVersion,
    ) -> Self {
        let creds = Credentials::new(access_key_id, secret, None, None, "xks-client");
        XksClient {
            addr,
            server_name: server_name.to_string(),
            uri_path: uri_path.to_string(),
            region: region.to_string(),
            identity: creds.into(),
            tls,
            version,
        }
    }

    /// The same client with other credentials.
    pub fn with_credentials(&self, access_key_id: &str, secret: &str) -> Self {
        let mut c = self.clone();
        c.identity = Credentials::new(access_key_id, secret, None, None, "xks-client").into();
        c
    }

    /// The same client for another `XksProxyUriPath`.
    pub fn with_uri_path(&self, uri_path: &str) -> Self {
        let mut c = self.clone();
        c.uri_path = uri_path.to_string();
        c
    }

    pub fn version(&self) -> HttpVersion {
        self.version
    }

    fn authority(&self) -> String {
        format!("{}:{}", self.server_name, self.addr.port())
    }

    /// Opens a TLS connection and does the HTTP handshake.
    pub async fn connect(&self) -> Result<Connection, ClientError> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(ClientError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.server_name.clone())
            .map_err(|_| ClientError::ServerName(self.server_name.clone()))?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(ClientError::Tls)?;
        self.http_handshake(tls).await
    }

    /// Does the HTTP handshake over an established (TLS) stream. Lets a caller
    /// that needs to inspect the TLS session (`xks-proxy check`) connect itself.
    pub async fn http_handshake<S>(&self, io: S) -> Result<Connection, ClientError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        let sender = match self.version {
            HttpVersion::Http1 => {
                let (s, conn) = http1::handshake(io).await?;
                tokio::spawn(conn);
                Sender::H1(s)
            }
            HttpVersion::Http2 => {
                let (s, conn) = http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(conn);
                Sender::H2(s)
            }
        };
        Ok(Connection { sender })
    }

    /// A signed POST to `<uri_path><suffix>` (e.g. `/health`), signed at `time`.
    pub fn signed_request(
        &self,
        suffix: &str,
        body: Bytes,
        time: SystemTime,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let path = format!("{}{}", self.uri_path, suffix);
        self.signed_request_raw("POST", &path, body, time)
    }

    /// A signed request with any method and path.
    pub fn signed_request_raw(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
        time: SystemTime,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let authority = self.authority();
        let params = SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name(SERVICE)
            .time(time)
            .settings(SigningSettings::default())
            .build()?
            .into();
        let signable = SignableRequest::new(
            method,
            path,
            [("host", authority.as_str())].into_iter(),
            SignableBody::Bytes(&body),
        )?;
        let (instructions, _) = sign(signable, &params)?.into_parts();
        let uri = match self.version {
            HttpVersion::Http1 => path.to_string(),
            HttpVersion::Http2 => format!("https://{authority}{path}"),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json");
        if self.version == HttpVersion::Http1 {
            req = req.header("host", &authority);
        }
        for (name, value) in instructions.headers() {
            req = req.header(name, HeaderValue::from_str(value)?);
        }
        Ok(req.body(Full::new(body))?)
    }

    /// One call on a fresh connection (convenient in tests, slow in loops).
    pub async fn call(
        &self,
        suffix: &str,
        body: impl Into<Bytes>,
    ) -> Result<XksResponse, ClientError> {
        let req = self.signed_request(suffix, body.into(), SystemTime::now())?;
        self.connect().await?.send(req).await
    }
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// One open connection.
pub struct Connection {
    sender: Sender,
}

impl Connection {
    /// Sends on an HTTP/2 connection without borrowing it, so that many
    /// requests can be in flight on one connection (as KMS multiplexes).
    /// HTTP/1.1 cannot do that: use [`Connection::send`].
    pub fn send_owned(
        &self,
        req: Request<Full<Bytes>>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<XksResponse, ClientError>> + Send>>
    {
        match &self.sender {
            Sender::H2(s) => {
                let mut s = s.clone();
                Box::pin(async move {
                    s.ready().await?;
                    let resp = s.send_request(req).await?;
                    let status = resp.status();
                    let body = read_body(resp.into_body()).await?;
                    Ok(XksResponse { status, body })
                })
            }
            Sender::H1(_) => Box::pin(async { Err(ClientError::NoMultiplex) }),
        }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<XksResponse, ClientError> {
        let resp = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let status = resp.status();
        let body = read_body(resp.into_body()).await?;
        Ok(XksResponse { status, body })
    }
}
