//! The `xks-proxy` command line: `serve`, `check-config`, `keys`,
//! `credentials`, `check`, `import-sample-config`, `kms-commands`, `audit`,
//! `lockdown`, `unlock` and `hsm probe`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage;
//! `check` adds 3 (connected, but the key cannot serve KMS); `audit verify`
//! 3 (tampered), 4 (unsealed tail) and 5 (unproven records); `audit reconcile` 3 (requests KMS
//! never made); `hsm probe` 0 ready, 1 not usable, 2 usable with changes.

mod audit;
mod check;
mod credentials;
mod exit;
mod hsm;
mod import;
mod keys;
mod kms_commands;
mod lockdown;
mod target;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::ListenOverrides;
use crate::hsm::lanes::Placement;
use exit::load;
pub use keys::parse_usages;

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
    /// Run the proxy. SIGHUP (or a change to the config, a secret file or the
    /// certificate) reloads key stores, credentials and the certificate;
    /// SIGTERM drains and exits.
    Serve {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The XKS (HTTPS) listener, instead of `server.listen`.
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// The plain-HTTP `/ping` listener, instead of `server.ping_listen`.
        #[arg(long, value_name = "ADDR")]
        ping_listen: Option<SocketAddr>,
        /// The admin (metrics) listener, instead of `admin.listen`.
        #[arg(long, value_name = "ADDR")]
        admin_listen: Option<SocketAddr>,
        /// This instance's audit chain, instead of `audit.instance_id` (or
        /// `<hostname>-<port>`).
        #[arg(long, value_name = "NAME")]
        instance_id: Option<String>,
    },
    /// Validate a configuration file (including secret files and TLS
    /// material), then open each key manager as `serve` would (token found,
    /// required mechanisms present, PIN accepted) and exit. Exit 2 for a
    /// configuration error or a key manager that can never serve (a missing
    /// mechanism), 1 when no key manager can be reached now.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
        /// Skip the key managers (a config checked away from its HSM).
        #[arg(long)]
        no_hsm: bool,
    },
    /// Manage the AES-256 keys in the configured token.
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// The PKCS#11 token itself: `hsm probe` tells whether it will serve KMS.
    Hsm {
        #[command(subcommand)]
        command: hsm::HsmCommand,
    },
    /// Manage the SigV4 credentials of the key stores.
    Credentials {
        #[command(subcommand)]
        command: credentials::CredentialsCommand,
    },
    /// Connect to an XKS proxy as KMS does and report what KMS would say.
    Check(Box<check::CheckArgs>),
    /// Convert the AWS sample proxy's settings file into this proxy's
    /// configuration (secrets into 0600 files), and list what did not map.
    ImportSampleConfig(import::ImportArgs),
    /// Print the AWS CLI commands that create and connect the KMS external
    /// key store for a key store of this config, and create its KMS keys.
    KmsCommands(kms_commands::KmsCommandsArgs),
    /// The audit trail: verify it, report who used what, reconcile it with
    /// CloudTrail, create its seal key.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// The kill switch: every proxy instance sharing the HSM refuses Encrypt
    /// and Decrypt for a key store (or all) within a second (the markers are
    /// read twice a second); a second lockdown never shortens or lifts the
    /// first; --status lists
    /// the locks in force.
    Lockdown(Box<lockdown::LockdownArgs>),
    /// Lift a lockdown.
    Unlock(lockdown::UnlockArgs),
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
        Command::Serve {
            config,
            listen,
            ping_listen,
            admin_listen,
            instance_id,
        } => {
            if let Some(id) = &instance_id {
                if !crate::audit::config::is_valid_instance_id(id) {
                    return Err(exit::usage_error(
                        "--instance-id: 1 to 64 characters of A-Z a-z 0-9 . _ - (not starting \
                         with a dot)",
                    ));
                }
            }
            serve(
                &config,
                ListenOverrides {
                    listen,
                    ping_listen,
                    admin_listen,
                    instance_id,
                },
            )
        }
        Command::CheckConfig { config, no_hsm } => {
            let cfg = load(&config)?;
            let refuse = |e: &dyn std::fmt::Display| {
                eprintln!("xks-proxy: configuration error: {e}");
                ExitCode::from(2)
            };
            // Everything startup checks before it touches the HSM: the live
            // state (policies compiled) and the certificate.
            cfg.live(None).map_err(|e| refuse(&e))?;
            if let Some(tls) = &cfg.tls {
                crate::net::tls::load_cert(tls).map_err(|e| refuse(&e))?;
            }
            if !no_hsm {
                check_key_managers(&cfg)?;
            }
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
        Command::Keys { command } => keys::run(command),
        Command::Credentials { command } => credentials::run(command),
        Command::Hsm { command } => hsm::run(command),
        Command::Check(args) => check::run(*args, runtime()?),
        Command::ImportSampleConfig(args) => import::run(args),
        Command::KmsCommands(args) => kms_commands::run(args),
        Command::Audit { command } => audit::run(command),
        Command::Lockdown(args) => lockdown::lockdown(*args),
        Command::Unlock(args) => lockdown::unlock(args),
    }
}

/// `check-config`'s look at the key managers, as `serve` would open them:
/// one that can never serve (no token by that name, a missing mechanism, a
/// wrong PIN) is a configuration error; one that cannot be reached now is
/// reported, and is an error only when none can be (then `serve` would not
/// start either).
fn check_key_managers(cfg: &crate::config::Config) -> Result<(), ExitCode> {
    use crate::hsm::HsmError;
    let mut reachable = 0;
    let mut refused = false;
    for b in &cfg.hsm.backends {
        let name = target::name_of(b);
        match crate::hsm::Token::open(&cfg.hsm, b) {
            Ok(t) => {
                reachable += 1;
                println!(
                    "key manager {name}: {} ({}): OK",
                    t.ekm_info().id,
                    t.ekm_info().model
                );
            }
            Err(e @ (HsmError::MissingMechanism { .. } | HsmError::Login(_))) => {
                refused = true;
                eprintln!("xks-proxy: configuration error: key manager {name}: {e}");
            }
            Err(e) => eprintln!("xks-proxy: key manager {name} cannot be reached now: {e}"),
        }
    }
    match (refused, reachable) {
        (true, _) => Err(ExitCode::from(2)),
        (false, 0) => Err(ExitCode::from(1)),
        _ => Ok(()),
    }
}

/// The async runtime for `serve`: as many workers as `placement` says, each
/// pinned to a CPU lane when it pins (see `xks_hsm::lanes`).
fn serve_runtime(placement: &Placement) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .enable_all()
        .thread_name("xks-rt")
        .worker_threads(placement.runtime_workers());
    if placement.pinned() {
        let (start, park) = (placement.clone(), placement.clone());
        builder
            .on_thread_start(move || start.place_runtime_thread())
            .on_thread_park(move || park.place_worker());
    }
    build_runtime(builder)
}

/// The async runtime for the other commands (tokio's defaults).
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("xks-rt");
    build_runtime(builder)
}

fn build_runtime(
    mut builder: tokio::runtime::Builder,
) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.build().map_err(|e| {
        eprintln!("xks-proxy: cannot start the async runtime: {e}");
        ExitCode::from(1)
    })
}

fn serve(path: &Path, overrides: ListenOverrides) -> Result<(), ExitCode> {
    let cfg = load(path)?.with_overrides(overrides);
    let log = crate::telemetry::logging::init(&cfg.logging);
    let placement = Placement::detect(cfg.threads.pin, cfg.threads.runtime);
    let rt = serve_runtime(&placement)?;
    tracing::info!(
        runtime_workers = placement.runtime_workers(),
        cpu_lanes = ?placement.cpus(),
        "threads placed (server.runtime_threads, server.pin_threads)"
    );
    // The handlers are installed now, before startup: a SIGTERM that comes
    // while the key managers open, or right after "listening", is a clean
    // stop, not the default action (death by signal).
    let shutdown = {
        let _inside = rt.enter();
        shutdown_signal()
    };
    let result = rt.block_on(crate::serve::run(
        cfg,
        placement,
        Some(path.to_path_buf()),
        log.drops(),
        shutdown,
    ));
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

/// Installs the SIGTERM and SIGINT handlers at once (inside the runtime);
/// the future resolves on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                    one.recv().await;
                }
                (Err(_), Err(_)) => std::future::pending::<()>().await,
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
