//! `xks-proxy import-sample-config`: the AWS sample proxy's settings file,
//! converted into this proxy's configuration (see [`crate::ops::migrate`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use super::exit::usage_error;
use crate::config::Config;
use crate::ops::migrate::import_sample_settings;

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The sample's settings file (`settings.toml`, `XKS_PROXY_SETTINGS_TOML`).
    settings: PathBuf,
    /// A new or empty directory for config.toml, hsm-pin and secrets/.
    #[arg(long)]
    out: PathBuf,
}

/// Creates a file that only its owner may read (it holds a secret).
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path)?;
    f.write_all(content.as_bytes())?;
    f.write_all(b"\n")
}

pub fn run(a: ImportArgs) -> Result<(), ExitCode> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(&a.settings)
            .map_err(|e| usage_error(&format!("cannot read {}: {e}", a.settings.display())))?,
    );
    let dir = a
        .settings
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let imported = import_sample_settings(&text, &dir, |module| {
        crate::hsm::token::first_slot_token_label(module).ok()
    })
    .map_err(|e| usage_error(&format!("{}: {e}", a.settings.display())))?;

    let config = a.out.join("config.toml");
    if config.exists() {
        return Err(usage_error(&format!(
            "{} exists; give an empty --out directory",
            config.display()
        )));
    }
    let io = |e: std::io::Error| {
        eprintln!("xks-proxy: cannot write into {}: {e}", a.out.display());
        ExitCode::from(1)
    };
    std::fs::create_dir_all(a.out.join("secrets")).map_err(io)?;
    for f in &imported.secret_files {
        write_private(&a.out.join(&f.path), &f.content).map_err(io)?;
    }
    std::fs::write(&config, &imported.config).map_err(io)?;

    println!("wrote {}", config.display());
    println!("carried over:");
    for m in &imported.mapped {
        println!("  - {m}");
    }
    if !imported.unmapped.is_empty() {
        println!("not carried over (review these):");
        for u in &imported.unmapped {
            println!("  - {u}");
        }
    }
    match Config::load(&config) {
        Ok(_) => println!("check-config: OK"),
        Err(e) => println!(
            "check-config: {e}\n  fix it, then: xks-proxy check-config -c {}",
            config.display()
        ),
    }
    println!("next: docs/migrate-from-aws-sample.md");
    Ok(())
}
