//! Where log lines go: a bounded in-memory buffer that one thread writes
//! out in batches, and that drops (and counts) lines rather than wait.
//!
//! Why not a channel to a writer thread (as `tracing-appender` does): a
//! channel hands over every line separately, so each line costs a wake-up of
//! the writer thread (or its spinning: crossbeam's receiver calls
//! `sched_yield` before it sleeps), and one `write` system call. At a few
//! thousand requests per second that was more CPU than the HSM's own work
//! for the request (docs/performance.md). Here a line is one `memcpy` under
//! a mutex; the writer wakes when the buffer goes from empty to non-empty,
//! lets lines gather for [`BATCH_WINDOW`], and writes them with one call.
//! A line reaches the destination at most one window late, and an
//! idle proxy wakes no thread at all.
//!
//! When the destination stops reading (a full pipe, a hung journald), the
//! writer blocks in `write` and the buffer fills to [`BUFFER_CAP`]; from then
//! on new lines are dropped and counted ([`Drops`]), and requests never wait.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes that may wait for the writer; beyond, new lines are dropped. With
/// the batch being written, the sink holds at most twice this.
pub const BUFFER_CAP: usize = 4 * 1024 * 1024;

/// How long the writer lets lines gather after the first one arrives. Each
/// batch costs the writer two context switches (its wake-up and its timed
/// wait), so this sets how often it runs: at 5 ms it woke once per request
/// up to 200 requests/s and 0.2 times per request at 1,800
/// (docs/performance.md, round three); at 50 ms, 0.02. A line reaches the
/// destination at most this late (at shutdown, at once).
pub const BATCH_WINDOW: Duration = Duration::from_millis(50);

/// Once this many bytes wait, the writer is woken at once rather than at the
/// end of its window (a burst must not sit behind the timer).
const EAGER_BYTES: usize = 256 * 1024;

struct Buffer {
    bytes: Vec<u8>,
    closed: bool,
}

struct Shared {
    buffer: Mutex<Buffer>,
    wake: Condvar,
    dropped: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Buffer> {
        // Only appends and swaps happen under the lock; a poisoned lock
        // leaves a buffer that is still well-formed bytes.
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The writing side of the sink: cheap to clone, one per formatted line.
#[derive(Clone)]
pub struct LogSink {
    shared: Arc<Shared>,
}

/// How many lines were dropped so far because the destination stalled.
#[derive(Clone)]
pub struct Drops(Arc<Shared>);

impl Drops {
    pub fn count(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }
}

/// Keeps the writer thread; dropping it writes out what is buffered and
/// stops the thread.
pub struct SinkGuard {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for SinkGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Starts the writer thread (named `name`) writing to `out`.
pub fn start<W: Write + Send + 'static>(
    name: &str,
    out: W,
) -> std::io::Result<(LogSink, Drops, SinkGuard)> {
    let shared = Arc::new(Shared {
        buffer: Mutex::new(Buffer {
            bytes: Vec::with_capacity(64 * 1024),
            closed: false,
        }),
        wake: Condvar::new(),
        dropped: AtomicU64::new(0),
    });
    let writer = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || write_batches(&shared, out))?
    };
    Ok((
        LogSink {
            shared: shared.clone(),
        },
        Drops(shared.clone()),
        SinkGuard {
            shared,
            writer: Some(writer),
        },
    ))
}

/// The writer thread: sleeps while nothing is buffered; when woken, waits
/// out the batch window (unless the buffer is large or the sink closing),
/// then writes everything gathered with one call.
fn write_batches<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::with_capacity(64 * 1024);
    loop {
        let mut b = shared.lock();
        while b.bytes.is_empty() && !b.closed {
            b = shared.wake.wait(b).unwrap_or_else(|e| e.into_inner());
        }
        if !b.closed && b.bytes.len() < EAGER_BYTES {
            b = shared
                .wake
                .wait_timeout(b, BATCH_WINDOW)
                .map(|(b, _)| b)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        std::mem::swap(&mut b.bytes, &mut batch);
        let closed = b.closed;
        drop(b);
        // A failing destination loses this batch; there is nowhere to say
        // so but the drop counter.
        if !batch.is_empty() && (out.write_all(&batch).is_err() || out.flush().is_err()) {
            let lines = batch.iter().filter(|b| **b == b'\n').count();
            shared.dropped.fetch_add(lines as u64, Ordering::Relaxed);
        }
        batch.clear();
        // Give memory back after a burst.
        if batch.capacity() > EAGER_BYTES {
            batch.shrink_to(64 * 1024);
        }
        if closed && shared.lock().bytes.is_empty() {
            return;
        }
    }
}

impl Write for LogSink {
    /// Takes one formatted line (the formatter hands over each event with one
    /// call); never blocks on the destination.
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut b = self.shared.lock();
        if b.bytes.len() + line.len() > BUFFER_CAP {
            drop(b);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(line.len());
        }
        let was_empty = b.bytes.is_empty();
        b.bytes.extend_from_slice(line);
        let eager = b.bytes.len() >= EAGER_BYTES && b.bytes.len() - line.len() < EAGER_BYTES;
        drop(b);
        if was_empty || eager {
            self.shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogSink;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A destination that reports what it was given, and can be held stuck.
    struct Probe {
        tx: mpsc::Sender<Vec<u8>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Probe {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.tx.send(buf.to_vec()).unwrap();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_in_order_and_all_are_written_at_close() {
        let (tx, rx) = mpsc::channel();
        let gate = Arc::new(Mutex::new(()));
        let (mut sink, drops, guard) = start("t-log", Probe { tx, gate }).unwrap();
        for i in 0..1000 {
            sink.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(guard);
        let all: Vec<u8> = rx.try_iter().flatten().collect();
        let text = String::from_utf8(all).unwrap();
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
        assert_eq!(drops.count(), 0);
    }

    #[test]
    fn a_stuck_destination_drops_and_counts_instead_of_blocking() {
        let (tx, rx) = mpsc::channel();
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let (mut sink, drops, guard) = start(
            "t-log",
            Probe {
                tx,
                gate: gate.clone(),
            },
        )
        .unwrap();
        // The writer takes a first batch and blocks in `write`; then the
        // buffer fills to its cap and the rest are dropped, none waiting.
        sink.write_all(b"first\n").unwrap();
        let mut line = vec![b'x'; 1023];
        line.push(b'\n');
        for _ in 0..3 * BUFFER_CAP / line.len() {
            sink.write_all(&line).unwrap();
        }
        assert!(drops.count() > 0, "nothing was dropped");
        drop(held);
        drop(guard);
        let written: usize = rx.try_iter().map(|b| b.len()).sum();
        assert!(written <= 2 * BUFFER_CAP, "{written} bytes written");
    }
}
