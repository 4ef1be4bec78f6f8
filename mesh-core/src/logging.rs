//! Logging for every Ambit binary: tracing to stdout through a bounded in-memory
//! buffer that drops lines rather than block (a stalled reader of stdout must never
//! stall traffic), `RUST_LOG` filters (default `info`), colours only on a terminal.
//!
//! A formatted line is appended to the buffer under a short lock; a writer thread
//! empties it. The writer is woken only by the first line after the buffer ran
//! empty, then lets the burst gather for [`LINGER`] and writes it in one call: at
//! thousands of access-log lines a second, waking a thread per line (a futex wake
//! and, on an idle CPU, an inter-processor interrupt) cost ztunnel more than
//! formatting the lines (docs/benchmarks.md).

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Bytes of formatted lines held for the writer before new lines are dropped.
/// Allocated as lines arrive, not up front.
pub const BUFFER_LIMIT: usize = 1024 * 1024;

/// How long the writer lets lines gather after the first one of a burst (less
/// when the buffer is half full): the delay a line sees before it is written,
/// when stdout keeps up.
pub const LINGER: Duration = Duration::from_millis(10);

/// How long exit waits for the buffered lines to be written.
pub const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// Installs the global subscriber; keep the guard alive until exit, its drop
/// writes what is buffered (giving up after [`FLUSH_WAIT`] if stdout is stuck).
pub fn init() -> LogFlush {
    let (writer, flush) = spawn(Box::new(io::stdout()), BUFFER_LIMIT, LINGER);
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    flush
}

/// Starts the writer thread draining into `out`; lines beyond `limit` buffered
/// bytes are dropped and counted. The [`LogWriter`] is the subscriber's writer.
pub fn spawn(out: Box<dyn Write + Send>, limit: usize, linger: Duration) -> (LogWriter, LogFlush) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
        finished: Condvar::new(),
        limit,
    });
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || drain(&shared, out, linger))
    };
    if thread.is_err() {
        // No writer: lines are dropped (and counted), never waited on.
        shared.lock().finished = true;
    }
    let writer = LogWriter {
        shared: shared.clone(),
    };
    (writer, LogFlush { shared })
}

struct Shared {
    state: Mutex<State>,
    /// The writer waits here for lines, and for the end of its linger.
    wake: Condvar,
    /// Exit waits here for the writer's last write.
    finished: Condvar,
    limit: usize,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    dropped: u64,
    /// The writer waits for a line: the next one (or a dropped one) wakes it.
    idle: bool,
    closing: bool,
    finished: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends one line, or counts it dropped when it does not fit; wakes the
    /// writer when it waits for a first line or the buffer passes half full.
    fn push(&self, line: &[u8]) {
        let mut state = self.lock();
        let before = state.pending.len();
        let wake = if before + line.len() > self.limit {
            state.dropped += 1;
            std::mem::take(&mut state.idle)
        } else {
            // Grow at most to the limit: the bound is the buffer's size.
            if state.pending.capacity() < before + line.len() {
                let target = (2 * state.pending.capacity()).clamp(before + line.len(), self.limit);
                state.pending.reserve_exact(target - before);
            }
            state.pending.extend_from_slice(line);
            let half = self.limit / 2;
            std::mem::take(&mut state.idle) || (before < half && before + line.len() >= half)
        };
        drop(state);
        if wake {
            self.wake.notify_one();
        }
    }
}

/// The subscriber's writer: each `write` is one formatted line.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter").finish_non_exhaustive()
    }
}

/// One event's handle on the buffer.
#[derive(Debug)]
pub struct Line<'a>(&'a LogWriter);

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line(self)
    }
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.shared.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The writer thread: waits for a line, lets the burst gather, writes it all.
fn drain(shared: &Shared, mut out: Box<dyn Write + Send>, linger: Duration) {
    let mut batch = Vec::new();
    loop {
        let mut state = shared.lock();
        while state.pending.is_empty() && state.dropped == 0 && !state.closing {
            state.idle = true;
            state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        // The burst gathers until the linger ends, the buffer is half full or
        // the process exits.
        let half = shared.limit / 2;
        state = shared
            .wake
            .wait_timeout_while(state, linger, |s| !s.closing && s.pending.len() < half)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        std::mem::swap(&mut state.pending, &mut batch);
        let dropped = std::mem::take(&mut state.dropped);
        let closing = state.closing && state.pending.is_empty();
        drop(state);
        if dropped > 0 {
            batch.extend_from_slice(
                format!("log: {dropped} lines dropped, stdout too slow\n").as_bytes(),
            );
        }
        // Nowhere to report a failed write to: the lines are lost either way.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        // A burst's buffer is kept for the next one, unless it grew large.
        if batch.capacity() > 64 * 1024 {
            batch = Vec::new();
        }
        if closing {
            shared.lock().finished = true;
            shared.finished.notify_all();
            return;
        }
    }
}

/// Writes what is buffered when dropped (at exit), waiting at most
/// [`FLUSH_WAIT`]: a stuck stdout must not keep the process from exiting.
#[derive(Debug)]
pub struct LogFlush {
    shared: Arc<Shared>,
}

impl Drop for LogFlush {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.closing = true;
        self.shared.wake.notify_one();
        let _written = self
            .shared
            .finished
            .wait_timeout_while(state, FLUSH_WAIT, |s| !s.finished)
            .unwrap_or_else(|e| e.into_inner());
    }
}

#[cfg(test)]
mod tests;
