//! How subcommands end: what they print to stderr and the exit code that
//! says what kind of failure it was (see the module map in `cli`).

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;

/// Loads a config, reporting a failure as exit code 2.
pub(super) fn load(config: &Path) -> Result<Config, ExitCode> {
    Config::load(config).map_err(|e| {
        eprintln!("xks-proxy: configuration error: {e}");
        ExitCode::from(2)
    })
}

/// Reports a usage error (exit code 2).
pub(super) fn usage_error(message: &str) -> ExitCode {
    eprintln!("xks-proxy: {message}");
    ExitCode::from(2)
}
