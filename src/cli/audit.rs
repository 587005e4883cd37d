//! `xks-proxy audit …`: verify the trail, report who used what, reconcile
//! with CloudTrail, and create the seal key.
//!
//! Exit codes: `verify` 0 intact, 3 tampered, 4 intact but with an unsealed
//! tail; `reconcile` 0, or 3 when the proxy served requests KMS never
//! made; 1 when something could not be read or checked, 2 usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Subcommand;

use super::exit::{load, usage_error};
use super::target::{on_each, selected, Target};
use crate::audit::reconcile::{self, parse_cloudtrail, Options};
use crate::audit::report::{read_requests, Filter, Report};
use crate::audit::verify::{expand, verify, Status, TokenVerifier, TrailFile, Witnesses};
use crate::config::Config;
use crate::spec::time::{format_timestamp_micros, parse_span, parse_timestamp_any};

/// The seal key's label when the configuration names none.
const DEFAULT_SEAL_KEY: &str = "xks-proxy-audit-seal";

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the trail's hash chain and its seals (in the HSM): names the
    /// first changed, deleted, inserted or reordered record. Exit 0 intact,
    /// 3 tampered, 4 intact but ending with records no seal covers yet, 5
    /// intact but holding records a crashed run left unsealed.
    Verify {
        #[arg(long, short)]
        config: PathBuf,
        /// Also accept seals made with this key (an earlier
        /// audit.seal_key_label). Repeatable.
        #[arg(long = "seal-key", value_name = "LABEL")]
        seal_keys: Vec<String>,
        #[arg(long)]
        json: bool,
        /// The files are a range of the trail (archived files, say), not all
        /// of it: ending before the newest seal the HSM witnessed is then a
        /// note, not tampering.
        #[arg(long)]
        partial: bool,
        /// Trail files or directories; default: audit.dir.
        files: Vec<PathBuf>,
    },
    /// Per key: the principals, kmsViaService values, VPC endpoints and
    /// operations of its uses, with counts and first and last use.
    Report {
        /// Where audit.dir is, when no files are given.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only records since then: a span back from now (30d, 12h) or a
        /// UTC time (2026-01-31T00:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Only this external key id.
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        json: bool,
        /// Trail files or directories; default: audit.dir.
        files: Vec<PathBuf>,
    },
    /// Match CloudTrail's KMS events with the trail by kmsRequestId and
    /// list both one-sided sets; exit 3 when the proxy served requests KMS
    /// never made.
    Reconcile {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// CloudTrail log files ({"Records":[...]}) or `aws cloudtrail
        /// lookup-events` output; `-` reads standard input.
        #[arg(long, required = true, num_args = 1.., value_name = "FILE")]
        cloudtrail: Vec<PathBuf>,
        /// Trail files or directories (repeatable); default: audit.dir.
        #[arg(long = "audit", value_name = "FILE")]
        audit: Vec<PathBuf>,
        /// Compare only from / to these UTC times (both sides); default:
        /// each side within the other's span, less the slack.
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        /// See --from.
        #[arg(long, default_value = "5m")]
        slack: String,
        /// A key ARN of an external key store (repeatable), beyond those
        /// the trail saw.
        #[arg(long = "key-arn")]
        key_arns: Vec<String>,
        /// Only events of this custom key store, cks-… (repeatable).
        #[arg(long = "key-store-id")]
        key_store_ids: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Close an instance's chain for good and remove its witness from the
    /// HSM (one object per instance id: fleets whose ids change would pile
    /// them up). Only for a trail that verifies INTACT and ends at a clean
    /// stop, with no proxy writing it; a sealed `retire` record says so in
    /// the trail, and `verify` reads it as closed. Archive the files first.
    Retire {
        #[arg(long, short)]
        config: PathBuf,
        /// The instance id of the chain.
        #[arg(long)]
        instance: String,
    },
    /// Create the seal key in the key managers that lack it: a 256-bit
    /// HMAC key, sensitive, non-extractable, sign and verify only.
    InitKey {
        #[command(flatten)]
        target: Target,
        /// The key's label; default: audit.seal_key_label.
        #[arg(long)]
        label: Option<String>,
    },
}

/// `audit retire`: verify, append the sealed retirement, remove the witness.
fn retire(config: &std::path::Path, instance: &str) -> Result<(), ExitCode> {
    let cfg = load(config)?;
    let Some(audit) = &cfg.audit else {
        return Err(usage_error("the configuration has no [audit] section"));
    };
    let mut check = TokenVerifier::new(&cfg.hsm);
    let witnesses = Witnesses {
        newest: check.witnesses().map_err(fail)?,
        partial: false,
        expect: Some((instance.to_string(), audit.dir.display().to_string())),
    };
    let files = trail_files(&[], Some(&cfg))?;
    let trail: Vec<TrailFile> = files.iter().map(|f| TrailFile::at(f)).collect();
    let keys = vec![audit.seal_key_label.clone()];
    let verdicts = verify(&trail, &keys, &mut check, &witnesses).map_err(fail)?;
    let Some(v) = verdicts.iter().find(|v| v.instance == instance) else {
        return Err(fail(format!(
            "no trail of instance '{}' in {}",
            crate::spec::text::printable(instance),
            audit.dir.display()
        )));
    };
    if v.status != Status::Intact || !v.clean_stop {
        print!("{}", verdict_text(v));
        return Err(fail(
            "not retired: only a trail that verifies INTACT and ends at a clean stop is retired \
             (its witness is what catches a cut while it is not)",
        ));
    }
    // The seal, in the first key manager that holds the seal key.
    let label = audit.seal_key_label.clone();
    let mut seal = |input: &[u8]| -> Result<(String, Vec<u8>), String> {
        let mut last = "no key manager holds the seal key".to_string();
        for b in &cfg.hsm.backends {
            let t = match crate::hsm::Token::open(&cfg.hsm, b) {
                Ok(t) => t,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            if let Ok(Some(k)) = t.hmac_key(&label) {
                return t
                    .sign_hmac(&k, input)
                    .map(|mac| (t.ekm_info().id.clone(), mac))
                    .map_err(|e| e.to_string());
            }
        }
        Err(last)
    };
    let by = super::lockdown::operator();
    let seq =
        crate::audit::retire::retire(&audit.dir, instance, &label, &by, &mut seal).map_err(fail)?;
    println!(
        "instance '{}': retired (sealed at seq {seq})",
        crate::spec::text::printable(instance)
    );
    let marker = crate::audit::Witness::label(instance);
    on_each(
        &cfg.hsm,
        &cfg.hsm.backends,
        cfg.hsm.backends.len() > 1,
        |token| {
            let n = token
                .remove_markers(crate::audit::witness::APPLICATION, Some(&marker))
                .map_err(|e| e.to_string())?;
            Ok(format!("{n} witness object(s) removed"))
        },
    )
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("xks-proxy: {message}");
    ExitCode::from(1)
}

/// `files`, or the configured audit directory; expanded to files.
fn trail_files(files: &[PathBuf], cfg: Option<&Config>) -> Result<Vec<PathBuf>, ExitCode> {
    let given: Vec<PathBuf> = if files.is_empty() {
        match cfg.and_then(|c| c.audit.as_ref()) {
            Some(a) => vec![a.dir.clone()],
            None => {
                return Err(usage_error(
                    "give the trail files, or a --config whose [audit] section names audit.dir",
                ))
            }
        }
    } else {
        files.to_vec()
    };
    let found = expand(&given).map_err(fail)?;
    if found.is_empty() {
        return Err(usage_error("no trail files (*.jsonl, *.jsonl.gz) found"));
    }
    Ok(found)
}

fn load_optional(config: &Option<PathBuf>) -> Result<Option<Config>, ExitCode> {
    config.as_deref().map(load).transpose()
}

/// `--since`: a span back from now, or a time; as a record timestamp.
fn since_cutoff(since: &str) -> Result<String, ExitCode> {
    let t = match parse_span(since) {
        Some(span) => SystemTime::now()
            .checked_sub(span)
            .unwrap_or(SystemTime::UNIX_EPOCH),
        None => parse_timestamp_any(since).ok_or_else(|| {
            usage_error("--since: give a span (30d, 12h, 90m) or a UTC time (2026-01-31T00:00:00Z)")
        })?,
    };
    Ok(format_timestamp_micros(t))
}

/// The report over `files` for `filter`.
fn report(files: &[PathBuf], filter: Filter) -> Result<Report, ExitCode> {
    let mut r = Report::new(filter);
    read_requests(files, |line| r.add(&line)).map_err(fail)?;
    Ok(r)
}

/// What disabling `id` would stop, from the configured trail (for `keys
/// disable --dry-run`).
pub(super) fn blast_radius(cfg: &Config, id: &str, since: &str) -> Result<String, ExitCode> {
    if cfg.audit.is_none() {
        return Err(usage_error(
            "the blast radius comes from the audit trail, and this configuration has no [audit] \
             section",
        ));
    }
    let files = trail_files(&[], Some(cfg))?;
    let r = report(
        &files,
        Filter {
            since: Some(since_cutoff(since)?),
            key: Some(id.to_string()),
        },
    )?;
    Ok(r.to_text())
}

pub fn run(command: AuditCommand) -> Result<(), ExitCode> {
    match command {
        AuditCommand::Verify {
            config,
            seal_keys,
            json,
            partial,
            files,
        } => {
            let cfg = load(&config)?;
            // The witness first: a running writer stores it only once its
            // seal is on disk, so the files read next hold that seal.
            let mut check = TokenVerifier::new(&cfg.hsm);
            let newest = check.witnesses().map_err(fail)?;
            // The configured instance, in the configured directory, must
            // have files if the HSM witnessed a seal of it.
            let expect = match (&cfg.audit, files.is_empty()) {
                (Some(a), true) => a
                    .instance_id
                    .clone()
                    .map(|i| (i, a.dir.display().to_string())),
                _ => None,
            };
            let witnesses = Witnesses {
                newest,
                partial,
                expect,
            };
            let files = match trail_files(&files, Some(&cfg)) {
                Ok(f) => f,
                // None at all, where that instance's were expected: the
                // verdict says so.
                Err(_)
                    if witnesses
                        .expect
                        .as_ref()
                        .is_some_and(|(i, _)| witnesses.newest.contains_key(i)) =>
                {
                    Vec::new()
                }
                Err(code) => return Err(code),
            };
            let mut keys = seal_keys;
            keys.push(
                cfg.audit
                    .as_ref()
                    .map_or(DEFAULT_SEAL_KEY.to_string(), |a| a.seal_key_label.clone()),
            );
            let trail: Vec<TrailFile> = files.iter().map(|f| TrailFile::at(f)).collect();
            let verdicts = verify(&trail, &keys, &mut check, &witnesses).map_err(fail)?;
            if json {
                let v: Vec<serde_json::Value> = verdicts.iter().map(verdict_json).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for v in &verdicts {
                    print!("{}", verdict_text(v));
                }
            }
            let code = verdicts
                .iter()
                .map(|v| v.exit_code())
                // The worst verdict decides: tampered, then unproven, then
                // an unsealed tail.
                .max_by_key(|c| match c {
                    3 => 3,
                    5 => 2,
                    4 => 1,
                    _ => 0,
                })
                .unwrap_or(0);
            if code == 0 {
                Ok(())
            } else {
                Err(ExitCode::from(code))
            }
        }
        AuditCommand::Report {
            config,
            since,
            key,
            json,
            files,
        } => {
            let cfg = load_optional(&config)?;
            let files = trail_files(&files, cfg.as_ref())?;
            let since = since.as_deref().map(since_cutoff).transpose()?;
            let r = report(&files, Filter { since, key })?;
            if json {
                let keys: Vec<_> = r.keys().collect();
                println!("{}", serde_json::to_string_pretty(&keys).map_err(fail)?);
            } else {
                print!("{}", r.to_text());
            }
            Ok(())
        }
        AuditCommand::Reconcile {
            config,
            cloudtrail,
            audit,
            from,
            to,
            slack,
            key_arns,
            key_store_ids,
            json,
        } => {
            let cfg = load_optional(&config)?;
            let files = trail_files(&audit, cfg.as_ref())?;
            let time = |s: &Option<String>, flag: &str| {
                s.as_deref()
                    .map(|t| {
                        parse_timestamp_any(t).ok_or_else(|| {
                            usage_error(&format!("{flag}: a UTC time like 2026-01-31T00:00:00Z"))
                        })
                    })
                    .transpose()
            };
            let opts = Options {
                from: time(&from, "--from")?,
                to: time(&to, "--to")?,
                slack: parse_span(&slack).ok_or_else(|| usage_error("--slack: a span like 5m"))?,
                key_arns,
                key_store_ids,
            };
            let mut events = Vec::new();
            for f in &cloudtrail {
                let (text, name) = read_input(f)?;
                for e in parse_cloudtrail(&text, &name).map_err(fail)? {
                    events.push((e, name.clone()));
                }
            }
            let out = reconcile::reconcile(&events, &mut |each| read_requests(&files, each), &opts)
                .map_err(fail)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out).map_err(fail)?);
            } else {
                print!("{}", out.to_text());
            }
            if out.never_made.is_empty() {
                Ok(())
            } else {
                Err(ExitCode::from(3))
            }
        }
        AuditCommand::Retire { config, instance } => retire(&config, &instance),
        AuditCommand::InitKey { target, label } => {
            let (hsm, chosen, cfg) = selected(&target)?;
            let label = label.unwrap_or_else(|| {
                cfg.audit
                    .as_ref()
                    .map_or(DEFAULT_SEAL_KEY.to_string(), |a| a.seal_key_label.clone())
            });
            if !crate::spec::names::is_valid_key_id(&label) {
                return Err(usage_error(
                    "the label must be 1 to 128 characters of A-Z a-z 0-9 . _ -",
                ));
            }
            on_each(&hsm, &chosen, chosen.len() > 1, |token| {
                match token.hmac_key(&label).map_err(|e| e.to_string())? {
                    Some(k) if k.is_protected() => Ok(format!("{label}: exists")),
                    Some(_) => Err(format!(
                        "{label}: exists but can leave the token or came from outside it \
                         (extractable, not sensitive, or imported); seals made with it would prove nothing: delete it with the \
                         HSM's tools"
                    )),
                    None => {
                        token.create_hmac_key(&label).map_err(|e| e.to_string())?;
                        Ok(format!(
                            "{label}: created (HMAC-SHA256, sensitive, non-extractable)"
                        ))
                    }
                }
            })
        }
    }
}

/// A file's text, or standard input for `-`.
fn read_input(path: &Path) -> Result<(String, String), ExitCode> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(fail)?;
        return Ok((s, "<stdin>".into()));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    Ok((text, path.display().to_string()))
}

fn verdict_text(v: &crate::audit::verify::InstanceVerdict) -> String {
    let mut s = format!(
        "instance {}: {} file(s), {} record(s)",
        crate::spec::text::printable(&v.instance),
        v.files,
        v.records
    );
    if let (Some(a), Some(b)) = (v.first_seq, v.last_seq) {
        s.push_str(&format!(" (seq {a} to {b})"));
    }
    s.push_str(&format!(
        ", {} seal(s) verified in the HSM",
        v.seals_verified
    ));
    if let Some((seq, time)) = &v.last_seal {
        s.push_str(&format!(", last seal seq {seq} at {time}"));
    }
    s.push('\n');
    match &v.status {
        Status::Intact => s.push_str(&format!(
            "  INTACT: every link holds and every seal verifies; the trail ends sealed{}\n",
            if v.retired {
                " at its retirement (closed for good; its witness was removed from the HSM)"
            } else if v.clean_stop {
                " at a clean stop"
            } else {
                ""
            }
        )),
        Status::UnsealedTail { from, count } => s.push_str(&format!(
            "  UNSEALED TAIL: every link holds and every seal verifies, but {count} record(s) \
             from {from} on come after the last seal: nothing proves them yet (the proxy is \
             running, crashed, or the trail was cut and its end changed)\n"
        )),
        Status::Unproven { from, count } => s.push_str(&format!(
            "  UNPROVEN: every link holds and every seal verifies, but {count} record(s) from \
             {from} on were left after the last seal of a run that ended without its final \
             seal (a crash or kill); the next run went on from that seal, so nothing proves \
             them\n"
        )),
        Status::Tampered(p) => s.push_str(&format!("  TAMPERED: {p}\n")),
    }
    for n in &v.notes {
        s.push_str(&format!("  note: {n}\n"));
    }
    s
}

fn verdict_json(v: &crate::audit::verify::InstanceVerdict) -> serde_json::Value {
    let place = |p: &crate::audit::verify::Place| serde_json::json!({"file": p.file, "line": p.line, "seq": p.seq});
    let (status, detail) = match &v.status {
        Status::Intact => ("intact", serde_json::Value::Null),
        Status::UnsealedTail { from, count } => (
            "unsealed-tail",
            serde_json::json!({"from": place(from), "count": count}),
        ),
        Status::Unproven { from, count } => (
            "unproven",
            serde_json::json!({"from": place(from), "count": count}),
        ),
        Status::Tampered(p) => (
            "tampered",
            serde_json::json!({"kind": p.kind(), "record": place(p.record()), "message": p.to_string()}),
        ),
    };
    serde_json::json!({
        "instance": v.instance,
        "files": v.files,
        "records": v.records,
        "firstSeq": v.first_seq,
        "lastSeq": v.last_seq,
        "sealsVerified": v.seals_verified,
        "lastSeal": v.last_seal.as_ref().map(|(seq, time)| serde_json::json!({"seq": seq, "time": time})),
        "cleanStop": v.clean_stop,
        "lost": v.lost,
        "status": status,
        "detail": detail,
        "notes": v.notes,
    })
}
