//! `xks-proxy lockdown …` and `xks-proxy unlock …`: the kill switch.
//!
//! A lock is a marker object in every configured key manager's token (see
//! the `lockdown` layer); every proxy instance sharing the token reads the
//! markers every `lockdown::poller::POLL_INTERVAL`. The command exits 1 if any key manager could not
//! be written, since an instance reading that one would not see the change.

use std::process::ExitCode;
use std::time::SystemTime;

use clap::Args;

use super::exit::usage_error;
use super::target::{on_each, selected, Target};
use crate::config::Config;
use crate::hsm::Token;
use crate::lockdown::lock::{label_for, Lock, ALL, APPLICATION};
use crate::spec::time::parse_span;

#[derive(Debug, Args)]
pub struct LockdownArgs {
    #[command(flatten)]
    target: Target,
    /// The key store to lock (its `name` in the configuration).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["all", "status"])]
    key_store: Option<String>,
    /// Lock every key store.
    #[arg(long, conflicts_with = "status")]
    all: bool,
    /// Lift the lock by itself after this long (90s, 30m, 12h, 2d).
    #[arg(long = "for", value_name = "DURATION", conflicts_with = "status")]
    lasting: Option<String>,
    /// Why (kept with the lock, written to every instance's audit trail, and
    /// told to KMS in each refusal's errorMessage).
    #[arg(long, required_unless_present = "status")]
    reason: Option<String>,
    /// List the locks in force instead.
    #[arg(long)]
    status: bool,
    /// With --status: one JSON object per lock.
    #[arg(long, requires = "status")]
    json: bool,
}

#[derive(Debug, Args)]
pub struct UnlockArgs {
    #[command(flatten)]
    target: Target,
    /// The key store to unlock.
    #[arg(long, value_name = "NAME", conflicts_with = "all")]
    key_store: Option<String>,
    /// Lift every lock.
    #[arg(long)]
    all: bool,
}

/// The scope `--key-store NAME | --all` names, checked against the
/// configuration (a typo must not lock nothing).
fn scope(cfg: &Config, key_store: &Option<String>, all: bool) -> Result<String, ExitCode> {
    match (key_store, all) {
        (Some(name), false) => {
            if cfg.key_stores.iter().any(|k| &k.name == name) {
                Ok(name.clone())
            } else {
                Err(usage_error(&format!(
                    "no key store is named '{name}' in the configuration (key stores: {})",
                    cfg.key_stores
                        .iter()
                        .map(|k| k.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        }
        (None, true) => Ok(ALL.to_string()),
        _ => Err(usage_error(
            "name the key store (--key-store NAME) or --all",
        )),
    }
}

/// `user@host` of whoever runs the command.
pub(super) fn operator() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{}", crate::audit::config::hostname())
}

/// Removes locks that ran out (they no longer lock anything).
fn purge_expired(token: &Token) -> Result<(), String> {
    let now = SystemTime::now();
    for m in token.markers(APPLICATION).map_err(|e| e.to_string())? {
        if Lock::from_marker(&m).is_some_and(|l| !l.active_at(now)) {
            token
                .remove_markers(APPLICATION, Some(&m.label))
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// The longest `--for`: a lock meant to outlast a year is a lock without
/// `--for`, lifted by `unlock`; and a far end date must not overflow (a lock
/// whose end cannot be read back would never lift).
const MAX_LOCK_SPAN: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);

pub fn lockdown(args: LockdownArgs) -> Result<(), ExitCode> {
    let (hsm, chosen, cfg) = selected(&args.target)?;
    let named = chosen.len() > 1;
    if args.status {
        return status(&hsm, &chosen, args.json);
    }
    let scope = scope(&cfg, &args.key_store, args.all)?;
    let lasting = args
        .lasting
        .as_deref()
        .map(|s| parse_span(s).filter(|d| !d.is_zero() && *d <= MAX_LOCK_SPAN))
        .map(|d| {
            d.ok_or_else(|| usage_error("--for: a span like 90s, 30m, 12h or 2d, at most 366d"))
        })
        .transpose()?;
    let reason = args.reason.unwrap_or_default();
    if reason.trim().is_empty() {
        return Err(usage_error(
            "--reason: say why (it goes into every audit trail)",
        ));
    }
    let lock = Lock::new(&scope, &reason, lasting, &operator());
    let what = if scope == ALL {
        "every key store".to_string()
    } else {
        format!("key store '{scope}'")
    };
    on_each(&hsm, &chosen, named, |token| {
        purge_expired(token)?;
        // Locks only get stronger: a lock already in force on the scope is
        // kept (same id) and strengthened, never shortened or replaced.
        let label = label_for(&scope);
        let now = std::time::SystemTime::now();
        let held = token
            .markers(APPLICATION)
            .map_err(|e| e.to_string())?
            .iter()
            .filter(|m| m.label == label)
            .filter_map(Lock::from_marker)
            .find(|l| l.active_at(now));
        let stored = match &held {
            Some(h) => h.strengthened_by(&lock),
            None => lock.clone(),
        };
        token
            .put_marker(APPLICATION, &label, &stored.to_value())
            .map_err(|e| e.to_string())?;
        let lasting = stored
            .until
            .as_deref()
            .map(|u| format!(", until {u}"))
            .unwrap_or_else(|| ", until unlocked".into());
        Ok(match held {
            Some(_) => format!(
                "{what} was already locked down (lock {}); it stays locked{lasting}: a lockdown \
                 never shortens or lifts an earlier one",
                stored.id
            ),
            None => format!(
                "{what} locked down (lock {}{lasting}): every proxy instance on this token \
                 refuses Encrypt and Decrypt within a second (the markers are read every {} ms)",
                stored.id,
                crate::lockdown::POLL_INTERVAL.as_millis()
            ),
        })
    })
}

pub fn unlock(args: UnlockArgs) -> Result<(), ExitCode> {
    let (hsm, chosen, cfg) = selected(&args.target)?;
    let scope = scope(&cfg, &args.key_store, args.all)?;
    on_each(&hsm, &chosen, chosen.len() > 1, |token| {
        purge_expired(token)?;
        let label = (scope != ALL).then(|| label_for(&scope));
        let removed = token
            .remove_markers(APPLICATION, label.as_deref())
            .map_err(|e| e.to_string())?;
        let mut line = match (removed, scope == ALL) {
            (0, _) => "no lock to lift".to_string(),
            (n, true) => format!("{n} lock(s) lifted: every key store is unlocked"),
            (_, false) => format!("key store '{scope}' unlocked"),
        };
        if scope != ALL
            && token
                .markers(APPLICATION)
                .map_err(|e| e.to_string())?
                .iter()
                .any(|m| m.label == label_for(ALL))
        {
            line.push_str(
                "; it stays locked by the lock on every key store (unlock --all lifts that)",
            );
        }
        Ok(line)
    })
}

/// The locks in every selected key manager: one line (or JSON object) per
/// lock, with the key managers that hold it.
fn status(
    hsm: &crate::hsm::config::HsmConfig,
    chosen: &[crate::hsm::config::BackendConfig],
    json: bool,
) -> Result<(), ExitCode> {
    let now = SystemTime::now();
    let mut locks: Vec<(Lock, Vec<String>)> = Vec::new();
    let mut failed = false;
    for b in chosen {
        let name = super::target::name_of(b);
        match Token::open(hsm, b).and_then(|t| t.markers(APPLICATION)) {
            Ok(markers) => {
                for l in markers.iter().filter_map(Lock::from_marker) {
                    match locks.iter_mut().find(|(x, _)| *x == l) {
                        Some((_, holders)) => holders.push(name.clone()),
                        None => locks.push((l, vec![name.clone()])),
                    }
                }
            }
            Err(e) => {
                failed = true;
                eprintln!("xks-proxy: {name}: {e}");
            }
        }
    }
    if locks.is_empty() && !json {
        println!("no lockdown in force");
    }
    for (l, holders) in &locks {
        let state = if l.active_at(now) {
            "ACTIVE"
        } else {
            "EXPIRED"
        };
        if json {
            let mut v = serde_json::to_value(l).unwrap_or_default();
            v["state"] = state.into();
            v["keyManagers"] = holders.clone().into();
            println!("{v}");
        } else {
            println!(
                "{state:<8} {:<24} lock {}  since {}  until {}  by {}  in {}: {}",
                if l.scope == ALL {
                    "* (all key stores)"
                } else {
                    l.scope.as_str()
                },
                l.id,
                if l.created.is_empty() {
                    "-"
                } else {
                    l.created.as_str()
                },
                l.until.as_deref().unwrap_or("lifted by unlock"),
                if l.by.is_empty() { "-" } else { l.by.as_str() },
                holders.join(","),
                l.reason
            );
        }
    }
    if failed {
        Err(ExitCode::from(1))
    } else {
        Ok(())
    }
}
