//! The `xks-proxy` command line: `serve`, `check-config` and `keys`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::hsm::{Token, Usages};

#[derive(Debug, Parser)]
#[command(
    name = "xks-proxy",
    version,
    about = "AWS KMS External Key Store proxy (XKS API v1) over PKCS#11"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file (including secret files and TLS material) and exit.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Manage the AES-256 keys in the configured token.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create an AES-256 key: token object, private, sensitive, non-extractable.
    Create {
        #[arg(long, short)]
        config: PathBuf,
        /// The external key id (the key's CKA_LABEL).
        #[arg(long)]
        label: String,
        /// Comma-separated usages: encrypt, decrypt, wrap, unwrap, sign, verify, derive; or "none".
        #[arg(long, default_value = "encrypt,decrypt")]
        usage: String,
        /// Succeed without change when a key with this label exists.
        #[arg(long)]
        if_missing: bool,
    },
    /// List the secret keys of the token.
    List {
        #[arg(long, short)]
        config: PathBuf,
        /// One JSON object per key.
        #[arg(long)]
        json: bool,
    },
}

/// Parses `encrypt,decrypt,...` (or `none`).
pub fn parse_usages(s: &str) -> Result<Usages, String> {
    let mut u = Usages::default();
    if s.trim() == "none" {
        return Ok(u);
    }
    for part in s.split(',').map(str::trim) {
        match part {
            "encrypt" => u.encrypt = true,
            "decrypt" => u.decrypt = true,
            "wrap" => u.wrap = true,
            "unwrap" => u.unwrap = true,
            "sign" => u.sign = true,
            "verify" => u.verify = true,
            "derive" => u.derive = true,
            other => return Err(format!("unknown usage '{other}'")),
        }
    }
    Ok(u)
}

fn load(config: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(config).map_err(|e| {
        eprintln!("xks-proxy: configuration error: {e}");
        ExitCode::from(2)
    })
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

fn run(command: Command) -> Result<(), ExitCode> {
    match command {
        Command::Serve { config } => serve(load(&config)?),
        Command::CheckConfig { config } => {
            let cfg = load(&config)?;
            crate::tls::server_config(&cfg.tls).map_err(|e| {
                eprintln!("xks-proxy: configuration error: {e}");
                ExitCode::from(2)
            })?;
            println!(
                "{}: OK ({} key store(s): {})",
                config.display(),
                cfg.key_stores.len(),
                cfg.key_stores
                    .iter()
                    .map(|k| k.uri_path.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
        Command::Keys { command } => keys(command),
    }
}

fn serve(cfg: Config) -> Result<(), ExitCode> {
    crate::logging::init(&cfg.logging);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("xks-rt")
        .build()
        .map_err(|e| {
            eprintln!("xks-proxy: cannot start the async runtime: {e}");
            ExitCode::from(1)
        })?;
    let result = runtime.block_on(crate::server::run(cfg, shutdown_signal()));
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "xks-proxy failed");
            eprintln!("xks-proxy: {e}");
            Err(ExitCode::from(1))
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn keys(command: KeysCommand) -> Result<(), ExitCode> {
    let fail = |e: crate::hsm::HsmError| {
        eprintln!("xks-proxy: {e}");
        ExitCode::from(1)
    };
    match command {
        KeysCommand::Create {
            config,
            label,
            usage,
            if_missing,
        } => {
            if !crate::config::is_valid_key_id(&label) {
                eprintln!("xks-proxy: --label must be 1 to 128 characters of A-Z a-z 0-9 . _ -");
                return Err(ExitCode::from(2));
            }
            let usages = parse_usages(&usage).map_err(|e| {
                eprintln!("xks-proxy: --usage: {e}");
                ExitCode::from(2)
            })?;
            let cfg = load(&config)?;
            let token = Token::open(&cfg.hsm).map_err(fail)?;
            if if_missing
                && token
                    .list_keys()
                    .map_err(fail)?
                    .iter()
                    .any(|k| k.label == label)
            {
                println!("{label}: exists");
                return Ok(());
            }
            let key = token.create_aes_key(&label, usages).map_err(fail)?;
            println!("{}: created ({})", key.label, key.usages.names().join(","));
            Ok(())
        }
        KeysCommand::List { config, json } => {
            let cfg = load(&config)?;
            let token = Token::open(&cfg.hsm).map_err(fail)?;
            for k in token.list_keys().map_err(fail)? {
                let status = if k.enabled { "ENABLED" } else { "DISABLED" };
                let spec = if k.aes256 { "AES_256" } else { "other" };
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "id": k.label,
                            "keySpec": spec,
                            "keyUsage": k.usages.names(),
                            "keyStatus": status,
                        })
                    );
                } else {
                    println!(
                        "{:<40} {:<8} {:<9} {}",
                        k.label,
                        spec,
                        status,
                        k.usages.names().join(",")
                    );
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usages_parse() {
        let u = parse_usages("encrypt, decrypt").unwrap();
        assert!(u.encrypt && u.decrypt && !u.wrap);
        assert_eq!(parse_usages("none").unwrap(), Usages::default());
        assert!(parse_usages("encrypt,fly").is_err());
    }
}
