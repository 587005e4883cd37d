//! Log setup: `tracing` to stderr, as text or one JSON object per line.
//!
//! What is logged is decided at the call sites (see `api`'s access log): request
//! metadata, key ids, status, timing. Plaintext, AAD, secrets and the PIN are
//! never passed to a log macro. As a second line of defence the AWS signer's own
//! trace output (it can print canonical requests) is capped at `warn` whatever
//! level the operator chooses.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the level.
pub fn init(cfg: &LoggingConfig) {
    let base = std::env::var("RUST_LOG").unwrap_or_else(|_| cfg.level.clone());
    let filter = EnvFilter::try_new(format!("{base},aws_sigv4=warn,aws_smithy_runtime_api=warn"))
        .unwrap_or_else(|_| EnvFilter::new("info,aws_sigv4=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not for journald or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    let result = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // A second init (tests, CLI reuse) is harmless.
    let _ = result;
}
