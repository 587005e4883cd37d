//! Log setup: `tracing` to stderr, as text or one JSON object per line, and
//! the rules that keep logging from being turned against the proxy.
//!
//! What is logged is decided at the call sites (see `api`'s access log): request
//! metadata, key ids, status, timing. Plaintext, AAD, secrets and the PIN are
//! never passed to a log macro. As a second line of defence the AWS signer's own
//! trace output (it can print canonical requests) is capped at `warn` whatever
//! level the operator chooses.
//!
//! Anyone who can reach the proxy can make it log, so:
//!
//! - **lines are bounded**: fields a client controls are cut with [`clip`]
//!   (and the access log is rate-limited per source for requests that did not
//!   authenticate, see `api`);
//! - **a line is one line** for every pipeline: U+2028, U+2029 and U+0085,
//!   which JSON allows raw but some log shippers split on, are written as
//!   `\u2028`-style escapes ([`Escaping`]);
//! - **a stalled log sink never stalls the proxy**: lines are written by a
//!   dedicated thread from a bounded buffer (see [`super::log_sink`]), and when the
//!   destination stops reading (a full pipe, a hung journald) new lines are
//!   *dropped*, counted in `xks_log_lines_dropped_total`, and one warning says
//!   how many once lines flow again ([`watch_drops`]). Requests and `/ping`
//!   never wait for the log. The audit trail, which must not lose records, is
//!   not this log.

use std::borrow::Cow;
use std::io::Write;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use serde::Deserialize;

use super::log_sink::{self, Drops, SinkGuard};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LoggingConfig {
    pub format: LogFormat,
    pub level: String,
}

/// Keeps the log writer thread alive; dropping it writes out what is
/// buffered.
pub struct LogGuard {
    _writer: Option<SinkGuard>,
    drops: LogDrops,
}

impl LogGuard {
    /// The count of lines dropped because the destination stalled.
    pub fn drops(&self) -> LogDrops {
        self.drops.clone()
    }
}

/// How many log lines were dropped so far (none when logging was set up by
/// someone else, e.g. in tests).
#[derive(Clone, Default)]
pub struct LogDrops(Option<Drops>);

impl LogDrops {
    pub fn count(&self) -> u64 {
        self.0.as_ref().map_or(0, Drops::count)
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the level.
/// Keep the returned guard until the process exits.
pub fn init(cfg: &LoggingConfig) -> LogGuard {
    let base = std::env::var("RUST_LOG").unwrap_or_else(|_| cfg.level.clone());
    let filter = EnvFilter::try_new(format!("{base},aws_sigv4=warn,aws_smithy_runtime_api=warn"))
        .unwrap_or_else(|_| EnvFilter::new("info,aws_sigv4=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, drops, guard) = match log_sink::start("xks-log", std::io::stderr()) {
        Ok(started) => started,
        Err(e) => {
            eprintln!("xks-proxy: cannot start the log writer thread: {e}");
            std::process::exit(1);
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Escaping(writer))
        // Colour codes only for a terminal, not for journald or a log file.
        .with_ansi(ansi)
        .with_target(true);
    let result = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // A second init (tests, CLI reuse) keeps the first subscriber.
    match result {
        Ok(()) => LogGuard {
            _writer: Some(guard),
            drops: LogDrops(Some(drops)),
        },
        Err(_) => LogGuard {
            _writer: None,
            drops: LogDrops::default(),
        },
    }
}

/// Counts dropped lines into `metric`, and once lines flow again after some
/// were dropped, logs how many. Runs until the runtime stops.
pub async fn watch_drops(drops: LogDrops, metric: prometheus::IntCounter) {
    let mut reported = drops.count();
    let mut last = reported;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = drops.count();
        metric.inc_by(now.saturating_sub(last));
        // Still dropping: wait until a whole second passes without a drop.
        if now == last && now > reported {
            tracing::warn!(
                dropped = now - reported,
                "log lines were dropped while the log destination was not reading"
            );
            reported = now;
        }
        last = now;
    }
}

/// Cuts a client-supplied value to at most `max` bytes (on a character
/// boundary) and says how much was cut, so no field can make a line long.
pub fn clip(value: &str, max: usize) -> Cow<'_, str> {
    if value.len() <= max {
        return Cow::Borrowed(value);
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!(
        "{}...[{} more bytes]",
        &value[..end],
        value.len() - end
    ))
}

/// A writer that escapes the Unicode line separators before the bytes reach
/// the destination (see the module docs). Each formatted event arrives as
/// one `write`, so a separator is never split between two.
#[derive(Clone)]
pub struct Escaping<W>(pub W);

impl<'a, W: MakeWriter<'a>> MakeWriter<'a> for Escaping<W> {
    type Writer = Escaping<W::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        Escaping(self.0.make_writer())
    }
}

/// The raw UTF-8 of U+2028, U+2029 and U+0085, and their escapes.
const SEPARATORS: [(&[u8], &[u8]); 3] = [
    (b"\xE2\x80\xA8", b"\\u2028"),
    (b"\xE2\x80\xA9", b"\\u2029"),
    (b"\xC2\x85", b"\\u0085"),
];

fn escape_separators(buf: &[u8]) -> Cow<'_, [u8]> {
    if !buf.iter().any(|b| *b == 0xE2 || *b == 0xC2) {
        return Cow::Borrowed(buf);
    }
    let mut out = Vec::with_capacity(buf.len() + 16);
    let mut i = 0;
    'bytes: while i < buf.len() {
        for (raw, escaped) in SEPARATORS {
            if buf[i..].starts_with(raw) {
                out.extend_from_slice(escaped);
                i += raw.len();
                continue 'bytes;
            }
        }
        out.push(buf[i]);
        i += 1;
    }
    Cow::Owned(out)
}

impl<W: Write> Write for Escaping<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(&escape_separators(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_values_and_marks_cut_ones() {
        assert_eq!(clip("abc", 10), "abc");
        let long = "é".repeat(100);
        let c = clip(&long, 11);
        assert!(c.starts_with("ééééé...["), "{c}");
        assert!(c.ends_with("190 more bytes]"), "{c}");
    }

    #[test]
    fn line_separators_are_escaped_and_everything_else_kept() {
        let line = "{\"kms_request_id\":\"a\u{2028}b\u{0085}c\u{2029}d é ü\"}\n";
        let out = escape_separators(line.as_bytes());
        let out = std::str::from_utf8(&out).unwrap();
        assert_eq!(
            out,
            "{\"kms_request_id\":\"a\\u2028b\\u0085c\\u2029d é ü\"}\n"
        );
        // Still valid JSON, with the same value.
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["kms_request_id"], "a\u{2028}b\u{0085}c\u{2029}d é ü");
        assert!(matches!(escape_separators(b"plain"), Cow::Borrowed(_)));
    }
}
