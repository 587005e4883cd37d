//! Log setup: `tracing` to stderr, as text or one JSON object per line.
//!
//! What is logged is decided at the call sites (see `api`'s access log): request
//! metadata, key ids, status, timing. Plaintext, AAD, secrets and the PIN are
//! never passed to a log macro. As a second line of defence the AWS signer's own
//! trace output (it can print canonical requests) is capped at `warn` whatever
//! level the operator chooses.
//!
//! Lines are written by a dedicated thread (`tracing-appender`'s non-blocking
//! writer): a request thread formats its access line and hands it over instead
//! of taking the stderr lock and making a `write` system call itself. The
//! channel is bounded and *not* lossy: if the log destination stalls, requests
//! wait rather than lines disappearing (an audit trail with holes is worse).

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};

/// Keeps the log writer thread alive; dropping it flushes what is queued.
pub struct LogGuard {
    _writer: Option<WorkerGuard>,
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the level.
/// Keep the returned guard until the process exits.
pub fn init(cfg: &LoggingConfig) -> LogGuard {
    let base = std::env::var("RUST_LOG").unwrap_or_else(|_| cfg.level.clone());
    let filter = EnvFilter::try_new(format!("{base},aws_sigv4=warn,aws_smithy_runtime_api=warn"))
        .unwrap_or_else(|_| EnvFilter::new("info,aws_sigv4=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(64 * 1024)
        .thread_name("xks-log")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // Colour codes only for a terminal, not for journald or a log file.
        .with_ansi(ansi)
        .with_target(true);
    let result = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // A second init (tests, CLI reuse) keeps the first subscriber.
    LogGuard {
        _writer: result.is_ok().then_some(guard),
    }
}
