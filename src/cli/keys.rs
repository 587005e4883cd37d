//! `xks-proxy keys …`: the keys of the token, without a raw PKCS#11 tool.

use std::process::ExitCode;

use clap::Subcommand;

use super::exit::{load, usage_error};
use super::target::{name_of, on_each, selected, Target};
use crate::hsm::{HsmError, KeyInfo, Token, Usages};

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an AES-256 key: token object, private, sensitive, non-extractable.
    Create {
        #[command(flatten)]
        target: Target,
        /// The external key id (the key's CKA_LABEL).
        #[arg(long, alias = "id")]
        label: String,
        /// Comma-separated usages: encrypt, decrypt, wrap, unwrap, sign, verify, derive; or "none".
        #[arg(long, default_value = "encrypt,decrypt")]
        usage: String,
        /// Succeed without change when a key with this label exists.
        #[arg(long)]
        if_missing: bool,
    },
    /// List the secret keys of the token: id, key spec, status, usages.
    List {
        #[command(flatten)]
        target: Target,
        /// One JSON object per key.
        #[arg(long)]
        json: bool,
    },
    /// Show one key's attributes.
    Show {
        #[command(flatten)]
        target: Target,
        /// The external key id (CKA_LABEL).
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Disable a key in every key manager (or --backend): GetKeyMetadata
    /// answers DISABLED, Encrypt and Decrypt answer InvalidStateException.
    /// Recorded in each token (a marker object), so it holds for every proxy
    /// instance and survives restarts. Exits 1 if any key manager failed.
    Disable {
        #[command(flatten)]
        target: Target,
        id: String,
        /// Change nothing: print the blast radius (who used the key, through
        /// which services and VPC endpoints, for what) from the audit trail.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: how far back to look (a span such as 30d, or a
        /// UTC time); default 30d.
        #[arg(long, requires = "dry_run")]
        since: Option<String>,
    },
    /// Create a new version of a key: Encrypt switches to it (within the key
    /// cache TTL) and records the version in the ciphertext metadata; earlier
    /// ciphertexts keep decrypting with the version they name. Created in the
    /// first key manager (or --backend); every other one is checked to hold
    /// it (replication), and the command exits 1 if one does not.
    Rotate {
        #[command(flatten)]
        target: Target,
        id: String,
    },
    /// Enable a key again in every key manager (or --backend): removes the
    /// marker objects. Exits 1 if any key manager failed.
    Enable {
        #[command(flatten)]
        target: Target,
        id: String,
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

fn status(k: &KeyInfo) -> &'static str {
    if k.enabled {
        "ENABLED"
    } else {
        "DISABLED"
    }
}

fn key_json(k: &KeyInfo) -> serde_json::Value {
    serde_json::json!({
        "id": k.label,
        "keySpec": k.spec.to_string(),
        "keyUsage": k.usages.names(),
        "keyStatus": status(k),
    })
}

/// The one key manager a read or a create works on: `--backend`, else the
/// first.
fn open(target: &Target) -> Result<Token, ExitCode> {
    let (hsm, chosen, _) = selected(target)?;
    Token::open(&hsm, &chosen[0]).map_err(fail)
}

fn fail(e: HsmError) -> ExitCode {
    eprintln!("xks-proxy: {e}");
    ExitCode::from(1)
}

fn check_id(id: &str) -> Result<(), ExitCode> {
    if crate::spec::names::is_valid_key_id(id) {
        Ok(())
    } else {
        Err(usage_error(
            "the key id must be 1 to 128 characters of A-Z a-z 0-9 . _ -",
        ))
    }
}

pub fn run(command: KeysCommand) -> Result<(), ExitCode> {
    match command {
        KeysCommand::Create {
            target,
            label,
            usage,
            if_missing,
        } => {
            check_id(&label)?;
            let usages = parse_usages(&usage).map_err(|e| usage_error(&format!("--usage: {e}")))?;
            let token = open(&target)?;
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
        KeysCommand::List { target, json } => {
            let token = open(&target)?;
            let all = token.list_keys().map_err(fail)?;
            // Version keys (`id#N`) are shown as their external key's version count.
            let latest = |id: &str| {
                all.iter()
                    .filter_map(|k| {
                        k.label
                            .strip_prefix(id)?
                            .strip_prefix('#')?
                            .parse::<u32>()
                            .ok()
                    })
                    .max()
                    .unwrap_or(0)
            };
            for k in all.iter().filter(|k| !k.label.contains('#')) {
                if json {
                    let mut v = key_json(k);
                    v["latestVersion"] = latest(&k.label).into();
                    println!("{v}");
                } else {
                    println!(
                        "{:<40} {:<8} {:<9} v{:<4} {}",
                        k.label,
                        k.spec.to_string(),
                        status(k),
                        latest(&k.label),
                        k.usages.names().join(",")
                    );
                }
            }
            Ok(())
        }
        KeysCommand::Rotate { target, id } => {
            check_id(&id)?;
            // Rotated once: a new version is new key material, which only
            // replication can give the other key managers (rotating each would
            // give each different material, or a replicated cluster two keys
            // with one label). The others are checked to hold it.
            let (hsm, chosen, _) = selected(&target)?;
            let named = chosen.len() > 1;
            let (first, others) = chosen.split_first().ok_or(ExitCode::from(2))?;
            let mut version = 0;
            on_each(&hsm, std::slice::from_ref(first), named, |token| {
                let (v, key) = token.rotate(&id).map_err(|e| e.to_string())?;
                version = v;
                Ok(format!(
                    "{id}: version {v} created ({}); Encrypt uses it within hsm.key_cache_ttl_ms",
                    key.label
                ))
            })?;
            let label = crate::spec::aead::version_label(&id, version);
            let probe = crate::hsm::Token::open(&hsm, first)
                .and_then(|t| t.agreement_probe(&label, hsm.iv_source))
                .map_err(|e| {
                    eprintln!("xks-proxy: cannot read back version {version}: {e}");
                    ExitCode::from(1)
                })?;
            on_each(&hsm, others, named, |token| {
                let present = wait_for_version(token, &id, version)?;
                // Present is not enough: it must be the same key.
                match token.decrypts(&label, &probe) {
                    Ok(true) => Ok(format!("{present}, same key")),
                    Ok(false) => Err(format!(
                        "{id}: version {version} here is DIFFERENT key material than the one \
                         just created: the proxy will not use this key manager for it"
                    )),
                    Err(e) => Err(e.to_string()),
                }
            })
        }
        KeysCommand::Show { target, id, json } => {
            check_id(&id)?;
            let token = open(&target)?;
            let d = token.key_details(&id).map_err(fail)?;
            let mut v = key_json(&d.info);
            v["latestVersion"] = token.latest_version(&id).map_err(fail)?.into();
            v["startDate"] = d.start_date.clone().into();
            v["endDate"] = d.end_date.clone().into();
            v["sensitive"] = d.protection.sensitive.into();
            v["extractable"] = d.protection.extractable.into();
            v["alwaysSensitive"] = d.protection.always_sensitive.into();
            v["neverExtractable"] = d.protection.never_extractable.into();
            v["generatedInToken"] = d.protection.local.into();
            let standings = standings(&target, &id)?;
            if !standings.is_empty() {
                v["keyManagers"] = standings
                    .iter()
                    .map(|(name, s)| (name.clone(), serde_json::Value::from(s.as_str())))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
            }
            if json {
                println!("{v}");
            } else if let Some(obj) = v.as_object() {
                for (k, val) in obj {
                    let shown = match val {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Null => "-".into(),
                        other => other.to_string(),
                    };
                    if k != "keyManagers" {
                        println!("{k:<18} {shown}");
                    }
                }
                if !standings.is_empty() {
                    println!("key managers:");
                    for (name, standing) in &standings {
                        println!("  {name:<16} {standing}");
                    }
                }
            }
            Ok(())
        }
        KeysCommand::Disable {
            target,
            id,
            dry_run: true,
            since,
        } => {
            check_id(&id)?;
            let cfg = load(&target.config)?;
            let since = since.unwrap_or_else(|| "30d".into());
            let radius = super::audit::blast_radius(&cfg, &id, &since)?;
            println!(
                "dry run: nothing was changed. Disabling '{id}' makes Encrypt and Decrypt answer \
                 InvalidStateException for every use below (audit trail, since {since}):"
            );
            print!("{radius}");
            Ok(())
        }
        KeysCommand::Disable { target, id, .. } => set_enabled(&target, &id, false),
        KeysCommand::Enable { target, id } => set_enabled(&target, &id, true),
    }
}

/// With several key managers configured (and no --backend): whether each
/// holds key `label`, and the same key as the reference (the first that
/// holds it): the reference encrypts a random probe, each other decrypts
/// it. The proxy does not use a key manager that differs for that key.
fn standings(target: &Target, label: &str) -> Result<Vec<(String, String)>, ExitCode> {
    let (hsm, chosen, _) = selected(target)?;
    if chosen.len() < 2 {
        return Ok(Vec::new());
    }
    let mut reference: Option<(String, crate::hsm::token::Probe)> = None;
    let mut out = Vec::new();
    for b in &chosen {
        let name = name_of(b);
        let standing = match Token::open(&hsm, b) {
            Err(e) => format!("unreachable: {e}"),
            Ok(token) => match &reference {
                None => match token.agreement_probe(label, hsm.iv_source) {
                    Ok(probe) => {
                        reference = Some((name.clone(), probe));
                        "reference (the first key manager that holds the key)".to_string()
                    }
                    Err(HsmError::NoKey(_)) => "does not hold the key".to_string(),
                    Err(e) => format!("cannot compare: {e}"),
                },
                Some((first, probe)) => match token.decrypts(label, probe) {
                    Ok(true) => format!("same key as {first}"),
                    Ok(false) => format!(
                        "DIFFERENT key material than {first}: the proxy does not use it for this \
                         key"
                    ),
                    Err(HsmError::NoKey(_)) => "does not hold the key".to_string(),
                    Err(e) => format!("cannot compare: {e}"),
                },
            },
        };
        out.push((name, standing));
    }
    Ok(out)
}

/// Waits (a few seconds, for replication) until `token` holds `version` of
/// `id`.
fn wait_for_version(token: &Token, id: &str, version: u32) -> Result<String, String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let have = token.latest_version(id).map_err(|e| e.to_string())?;
        if have >= version {
            return Ok(format!("{id}: version {version} present (replicated)"));
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "{id}: version {version} is missing here (newest: {have}); this key manager does \
                 not receive the other's keys, so ciphertexts of the new version cannot be \
                 decrypted here. Rotation needs key managers that replicate keys (an HSM \
                 cluster); see the README"
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Disables or enables a key in every selected key manager. Running proxies
/// see the change at their next key lookup: at once for GetKeyMetadata,
/// within `hsm.key_cache_ttl_ms` for Encrypt and Decrypt.
fn set_enabled(target: &Target, id: &str, enabled: bool) -> Result<(), ExitCode> {
    check_id(id)?;
    let (hsm, chosen, _) = selected(target)?;
    on_each(&hsm, &chosen, chosen.len() > 1, |token| {
        let key = token.set_enabled(id, enabled).map_err(|e| e.to_string())?;
        if enabled && !key.enabled {
            return Err(format!(
                "{}: DISABLED: the key's own CKA_START_DATE/CKA_END_DATE window excludes today; \
                 change it with the HSM's tools",
                key.label
            ));
        }
        Ok(format!("{}: {}", key.label, status(&key)))
    })
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
