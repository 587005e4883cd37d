//! `xks-proxy check`: the KMS connection simulator's command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use zeroize::Zeroizing;

use super::exit::usage_error;
use crate::client::check::{self, CheckOptions};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The proxy's endpoint as given to KMS: https://host[:port].
    #[arg(long)]
    endpoint: String,
    /// The XksProxyUriPath (or take it from --console-json).
    #[arg(long)]
    uri_path: Option<String>,
    /// The access key id (or take it from --console-json).
    #[arg(long)]
    access_key_id: Option<String>,
    /// A file holding the secret access key.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// An environment variable holding the secret access key.
    #[arg(long)]
    secret_env: Option<String>,
    /// The KMS console JSON file (`credentials new` prints one).
    #[arg(long)]
    console_json: Option<PathBuf>,
    /// Also check this key: GetKeyMetadata, Encrypt with CDIV, Decrypt.
    #[arg(long)]
    key_id: Option<String>,
    /// Trust this CA too (PEM); KMS itself trusts public CAs only.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Present this client certificate (PEM chain), as KMS does for mTLS.
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Connect to this address instead of resolving the endpoint's host.
    #[arg(long)]
    connect_to: Option<SocketAddr>,
    /// SigV4 region.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Per-step budget (KMS: 250 ms).
    #[arg(long, default_value_t = 250)]
    timeout_ms: u64,
    /// Offer only HTTP/1.1. By default check offers HTTP/2 first and
    /// HTTP/1.1 second, as KMS does.
    #[arg(long)]
    http1: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// uri path, access key id and secret, from flags or the console JSON.
fn credentials(a: &CheckArgs) -> Result<(String, String, Zeroizing<String>), ExitCode> {
    let console: Option<serde_json::Value> = match &a.console_json {
        Some(p) => {
            let text = Zeroizing::new(
                std::fs::read_to_string(p)
                    .map_err(|e| usage_error(&format!("--console-json {}: {e}", p.display())))?,
            );
            Some(serde_json::from_str(&text).map_err(|e| {
                usage_error(&format!("--console-json {}: not JSON: {e}", p.display()))
            })?)
        }
        None => None,
    };
    let from_console = |ptr: &str| {
        console
            .as_ref()
            .and_then(|v| v.pointer(ptr))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let uri_path = a
        .uri_path
        .clone()
        .or_else(|| from_console("/XksProxyUriPath"))
        .ok_or_else(|| usage_error("give --uri-path or --console-json"))?;
    let akid = a
        .access_key_id
        .clone()
        .or_else(|| from_console("/XksProxyAuthenticationCredential/AccessKeyId"))
        .ok_or_else(|| usage_error("give --access-key-id or --console-json"))?;
    let secret = match (&a.secret_file, &a.secret_env) {
        (Some(p), None) => {
            let mut s = Zeroizing::new(
                std::fs::read_to_string(p)
                    .map_err(|e| usage_error(&format!("--secret-file {}: {e}", p.display())))?,
            );
            let len = s.trim_end_matches(['\n', '\r']).len();
            s.truncate(len);
            s
        }
        (None, Some(var)) => Zeroizing::new(
            std::env::var(var)
                .map_err(|_| usage_error(&format!("--secret-env: {var} is not set")))?,
        ),
        (None, None) => Zeroizing::new(
            from_console("/XksProxyAuthenticationCredential/RawSecretAccessKey")
                .ok_or_else(|| usage_error("give --secret-file, --secret-env or --console-json"))?,
        ),
        _ => {
            return Err(usage_error(
                "give only one of --secret-file and --secret-env",
            ))
        }
    };
    Ok((uri_path, akid, secret))
}

pub fn run(a: CheckArgs, runtime: tokio::runtime::Runtime) -> Result<(), ExitCode> {
    let (uri_path, access_key_id, secret) = credentials(&a)?;
    let opts = CheckOptions {
        endpoint: a.endpoint.clone(),
        connect_to: a.connect_to,
        uri_path,
        access_key_id,
        secret,
        region: a.region.clone(),
        key_id: a.key_id.clone(),
        extra_ca: a.ca.clone(),
        client_identity: a.client_cert.clone().zip(a.client_key.clone()),
        timeout: Duration::from_millis(a.timeout_ms.max(1)),
        http2: !a.http1,
    };
    // Each step has its own budget; this bounds the whole run as well (at
    // most eight steps, plus DNS), whatever the server does.
    let total = opts.timeout * 8 + Duration::from_secs(2);
    let report = runtime
        .block_on(async { tokio::time::timeout(total, check::run(&opts)).await })
        .map_err(|_| {
            eprintln!(
                "xks-proxy: check did not finish within {} ms",
                total.as_millis()
            );
            ExitCode::from(1)
        })?
        .map_err(|e| usage_error(&e.to_string()))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", report.text());
    }
    match report.exit_code() {
        0 => Ok(()),
        code => Err(ExitCode::from(code)),
    }
}
