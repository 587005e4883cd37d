//! Which key managers a command works on, and running an action on each
//! with one line of outcome per key manager (`keys`, `audit init-key`,
//! `lockdown`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::exit::{load, usage_error};
use crate::hsm::config::{BackendConfig, HsmConfig, TokenSelector};
use crate::hsm::Token;

/// The config and which key manager(s) of it to work on.
#[derive(Debug, Args)]
pub struct Target {
    #[arg(long, short)]
    pub(super) config: PathBuf,
    /// The key manager (`[[hsm.backends]]` name or token label). Without it,
    /// disable, enable and rotate act on every configured key manager, and
    /// the other commands on the first.
    #[arg(long)]
    backend: Option<String>,
}

/// The key managers `target` names (the one given by `--backend`, else
/// all), and the configuration they come from.
pub(super) fn selected(
    target: &Target,
) -> Result<(HsmConfig, Vec<BackendConfig>, crate::config::Config), ExitCode> {
    let cfg = load(&target.config)?;
    let chosen: Vec<BackendConfig> = match &target.backend {
        None => cfg.hsm.backends.clone(),
        Some(name) => cfg
            .hsm
            .backends
            .iter()
            .filter(|b| {
                b.name.as_deref() == Some(name.as_str())
                    || matches!(&b.token, TokenSelector::Label(l) if l == name)
            })
            .cloned()
            .collect(),
    };
    if chosen.is_empty() {
        return Err(usage_error(
            "no such key manager in [hsm] / [[hsm.backends]]",
        ));
    }
    Ok((cfg.hsm.clone(), chosen, cfg))
}

/// The name a key manager goes by in reports.
pub(super) fn name_of(b: &BackendConfig) -> String {
    b.name.clone().unwrap_or_else(|| match &b.token {
        TokenSelector::Label(l) => l.clone(),
        TokenSelector::Slot(n) => format!("slot {n}"),
    })
}

/// Runs `act` on each of `backends`, prints one line each (named when there
/// are several), and fails (exit 1) if any failed.
pub(super) fn on_each(
    hsm: &HsmConfig,
    backends: &[BackendConfig],
    named: bool,
    mut act: impl FnMut(&Token) -> Result<String, String>,
) -> Result<(), ExitCode> {
    let mut failed = false;
    for b in backends {
        let outcome = Token::open(hsm, b)
            .map_err(|e| e.to_string())
            .and_then(|token| act(&token));
        let prefix = if named {
            format!("{}: ", name_of(b))
        } else {
            String::new()
        };
        match outcome {
            Ok(line) => println!("{prefix}{line}"),
            Err(why) if named => {
                failed = true;
                println!("{prefix}FAILED: {why}");
            }
            Err(why) => {
                failed = true;
                eprintln!("xks-proxy: {why}");
            }
        }
    }
    if failed {
        Err(ExitCode::from(1))
    } else {
        Ok(())
    }
}
