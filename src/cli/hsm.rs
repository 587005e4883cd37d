//! `xks-proxy hsm probe`: whether a PKCS#11 token will serve KMS, and with
//! which settings (see [`crate::hsm::probe`]).
//!
//! Its exit codes are the probe's verdict: 0 ready, 1 not usable, 2 usable
//! with the changes it prints (a bad command line also exits 2, and says
//! so on stderr).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use zeroize::Zeroizing;

use super::exit::{load, usage_error};
use super::target::name_of;
use crate::hsm::config::TokenSelector;
use crate::hsm::probe::{self, Target, Verdict};

#[derive(Debug, Subcommand)]
pub enum HsmCommand {
    /// Check a token before the first deployment: library and token info,
    /// the mechanisms the proxy needs, which GCM IV source works, session
    /// kinds and limits, data objects, the audit seal, and a timed round
    /// trip, on session objects only (nothing is left in the token). Exit
    /// 0 ready, 1 not usable, 2 usable with the changes it prints.
    Probe(ProbeArgs),
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Probe the key manager(s) of this configuration, with its settings.
    #[arg(long, short, conflicts_with_all = ["module", "token_label", "slot_id", "pin_file", "pin_env"])]
    config: Option<PathBuf>,
    /// With --config: only this key manager (name or token label).
    #[arg(long, requires = "config")]
    backend: Option<String>,
    /// The vendor's PKCS#11 library.
    #[arg(long, required_unless_present = "config")]
    module: Option<PathBuf>,
    /// The token's label (or --slot-id).
    #[arg(long, conflicts_with = "slot_id", required_unless_present_any = ["config", "slot_id"])]
    token_label: Option<String>,
    #[arg(long)]
    slot_id: Option<u64>,
    /// A file holding the user PIN (mode 600), or --pin-env.
    #[arg(long, conflicts_with = "pin_env")]
    pin_file: Option<PathBuf>,
    /// An environment variable holding the user PIN.
    #[arg(long)]
    pin_env: Option<String>,
}

pub fn run(command: HsmCommand) -> Result<(), ExitCode> {
    let HsmCommand::Probe(args) = command;
    let targets = targets(args)?;
    let mut worst = Verdict::Ready;
    for (name, target) in targets {
        if let Some(name) = name {
            println!("== key manager {name}");
        }
        let report = probe::run(&target);
        print!("{}", report.render());
        worst = match (worst, report.verdict()) {
            (Verdict::NotUsable, _) | (_, Verdict::NotUsable) => Verdict::NotUsable,
            (Verdict::Changes, _) | (_, Verdict::Changes) => Verdict::Changes,
            _ => Verdict::Ready,
        };
    }
    match worst {
        Verdict::Ready => Ok(()),
        v => Err(ExitCode::from(v.exit_code())),
    }
}

/// What to probe: the command line's token, or the configuration's key
/// managers (named when there are several).
fn targets(args: ProbeArgs) -> Result<Vec<(Option<String>, Target)>, ExitCode> {
    let Some(config) = args.config else {
        let pin = crate::config::read_secret_arg(args.pin_file, args.pin_env)
            .map_err(|e| usage_error(&e.to_string()))?;
        let token = match (args.token_label, args.slot_id) {
            (Some(l), _) => TokenSelector::Label(l),
            (None, Some(n)) => TokenSelector::Slot(n),
            (None, None) => return Err(usage_error("--token-label or --slot-id")),
        };
        return Ok(vec![(
            None,
            Target {
                module: args.module.ok_or_else(|| usage_error("--module"))?,
                token,
                pin,
                iv_source: None,
                session_kind: None,
                sessions: None,
            },
        )]);
    };
    let cfg = load(&config)?;
    let hsm = &cfg.hsm;
    let chosen: Vec<_> = hsm
        .backends
        .iter()
        .filter(|b| args.backend.as_ref().is_none_or(|n| &name_of(b) == n))
        .collect();
    if chosen.is_empty() {
        return Err(usage_error(
            "--backend: no such key manager in the configuration",
        ));
    }
    let named = chosen.len() > 1;
    Ok(chosen
        .into_iter()
        .map(|b| {
            (
                named.then(|| name_of(b)),
                Target {
                    module: b.module.clone(),
                    token: b.token.clone(),
                    pin: Zeroizing::new(b.pin.as_str().to_owned()),
                    iv_source: Some(hsm.iv_source),
                    session_kind: Some(hsm.session_kind),
                    sessions: Some(b.sessions.unwrap_or(hsm.sessions)),
                },
            )
        })
        .collect())
}
