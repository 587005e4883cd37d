//! `xks-proxy credentials …`: SigV4 credentials of the key stores.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use crate::ops::credentials::{self, CredentialError};

#[derive(Debug, Subcommand)]
pub enum CredentialsCommand {
    /// Generate a credential for a key store, store its secret in a new 0600
    /// file, add it to the config, and print the KMS console JSON. A running
    /// proxy picks it up by itself (file watch) or on SIGHUP.
    New {
        #[arg(long, short)]
        config: PathBuf,
        /// The key store: its URI path (e.g. /example/kms/xks/v1) or its name.
        #[arg(long, alias = "key-store")]
        prefix: String,
        /// Directory for the secret file (default: beside the key store's
        /// other secret files, else `secrets/` next to the config).
        #[arg(long)]
        secret_dir: Option<PathBuf>,
        /// Write the console JSON to this new file (mode 0600) instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// List the credentials of every key store, with their age.
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove a credential from its key store (never the last one) and delete
    /// its secret file.
    Revoke {
        #[arg(long, short)]
        config: PathBuf,
        /// The access key id to revoke.
        access_key_id: String,
        /// Leave the secret file in place.
        #[arg(long)]
        keep_secret_file: bool,
    },
}

fn fail(e: CredentialError) -> ExitCode {
    eprintln!("xks-proxy: {e}");
    match e {
        // The files could not be read or written: a runtime failure.
        CredentialError::Read { .. }
        | CredentialError::Write { .. }
        | CredentialError::Toml { .. }
        | CredentialError::Rng => ExitCode::from(1),
        // The configuration or the request is wrong.
        _ => ExitCode::from(2),
    }
}

pub fn run(command: CredentialsCommand) -> Result<(), ExitCode> {
    match command {
        CredentialsCommand::New {
            config,
            prefix,
            secret_dir,
            output,
        } => {
            let added = credentials::add(&config, &prefix, secret_dir.as_deref()).map_err(fail)?;
            let json = credentials::console_json(&added.uri_path, &added.credential);
            eprintln!(
                "xks-proxy: added {} to key store '{}' ({}); secret in {}",
                added.credential.access_key_id,
                added.key_store,
                added.uri_path,
                added.secret_file.display()
            );
            match output {
                Some(path) => {
                    let mut content = zeroize::Zeroizing::new(json.as_bytes().to_vec());
                    content.push(b'\n');
                    credentials::write_private_new(&path, &content).map_err(fail)?;
                    eprintln!(
                        "xks-proxy: KMS console file written to {} (give it to KMS, then delete it)",
                        path.display()
                    );
                }
                None => println!("{}", json.as_str()),
            }
            Ok(())
        }
        CredentialsCommand::List { config, json } => {
            for c in credentials::list(&config).map_err(fail)? {
                if json {
                    println!("{}", serde_json::to_string(&c).unwrap_or_default());
                } else {
                    println!(
                        "{:<16} {:<32} {:<30} {:>7} {}",
                        c.key_store,
                        c.uri_path,
                        c.access_key_id,
                        c.age_days
                            .map(|d| format!("{d:.1}d"))
                            .unwrap_or_else(|| "-".into()),
                        c.source
                    );
                }
            }
            Ok(())
        }
        CredentialsCommand::Revoke {
            config,
            access_key_id,
            keep_secret_file,
        } => {
            let r = credentials::revoke(&config, &access_key_id, keep_secret_file).map_err(fail)?;
            println!(
                "{access_key_id}: revoked from key store '{}'{}",
                r.key_store,
                r.deleted_secret_file
                    .map(|p| format!("; deleted {}", p.display()))
                    .unwrap_or_default()
            );
            Ok(())
        }
    }
}
