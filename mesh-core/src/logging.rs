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
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Bytes of formatted lines held for the writer before new lines are dropped.
/// Allocated as lines arrive, not up front.
pub const BUFFER_LIMIT: usize = 1024 * 1024;

/// How long the writer lets lines gather after the first one of a burst: the
/// delay a line may see before it is written.
pub const LINGER: Duration = Duration::from_millis(10);

/// Installs the global subscriber; keep the guard alive until exit, its drop
/// writes what is buffered.
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
/// bytes are dropped and counted. The [`LineWriter`] is the subscriber's writer.
pub fn spawn(out: Box<dyn Write + Send>, limit: usize, linger: Duration) -> (LineWriter, LogFlush) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
        limit,
    });
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || drain(&shared, out, linger))
    };
    let writer = LineWriter {
        shared: shared.clone(),
    };
    // Without a writer thread (cannot spawn), lines are dropped, not blocked on.
    let flush = LogFlush {
        shared,
        thread: thread.ok(),
    };
    (writer, flush)
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    limit: usize,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    dropped: u64,
    /// The writer waits for a line: the next one wakes it.
    idle: bool,
    closing: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The subscriber's writer: each `write` is one formatted line.
#[derive(Clone)]
pub struct LineWriter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LineWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineWriter").finish_non_exhaustive()
    }
}

/// One event's handle on the buffer.
#[derive(Debug)]
pub struct Line<'a>(&'a LineWriter);

impl<'a> MakeWriter<'a> for LineWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line(self)
    }
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let shared = &self.0.shared;
        let mut state = shared.lock();
        if state.pending.len() + buf.len() > shared.limit {
            state.dropped += 1;
        } else {
            state.pending.extend_from_slice(buf);
            if std::mem::take(&mut state.idle) {
                drop(state);
                shared.wake.notify_one();
            }
        }
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
        if !state.closing {
            drop(state);
            std::thread::sleep(linger);
            state = shared.lock();
        }
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
            return;
        }
    }
}

/// Writes what is buffered when dropped (at exit).
#[derive(Debug)]
pub struct LogFlush {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Drop for LogFlush {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

    use std::sync::mpsc;
    use std::time::Instant;

    use super::*;

    /// A sink that records each `write` call, and can be held shut.
    #[derive(Clone, Default)]
    struct Sink {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.writes.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.writes.lock().unwrap().concat()).unwrap()
        }
        fn calls(&self) -> usize {
            self.writes.lock().unwrap().len()
        }
    }

    /// Waits until the writer thread waits for lines.
    fn wait_idle(writer: &LineWriter) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !writer.shared.lock().idle {
            assert!(Instant::now() < deadline, "the writer thread never waited");
            std::thread::yield_now();
        }
    }

    fn line(writer: &LineWriter, text: &str) {
        writer.make_writer().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_in_order_per_thread() {
        let sink = Sink::default();
        let (writer, flush) = spawn(Box::new(sink.clone()), BUFFER_LIMIT, LINGER);
        wait_idle(&writer);
        std::thread::scope(|s| {
            for t in 0..4 {
                let writer = &writer;
                s.spawn(move || {
                    for i in 0..500 {
                        line(
                            writer,
                            &format!("thread {t} line {i} {}\n", "x".repeat(i % 97)),
                        );
                    }
                });
            }
        });
        drop(flush);
        let text = sink.text();
        let mut next = [0usize; 4];
        for l in text.lines() {
            let words: Vec<&str> = l.split(' ').collect();
            let (t, i): (usize, usize) = (words[1].parse().unwrap(), words[3].parse().unwrap());
            assert_eq!(i, next[t], "thread {t}'s lines out of order: {l}");
            assert_eq!(words[4].len(), i % 97, "line cut: {l}");
            next[t] += 1;
        }
        assert_eq!(next, [500; 4], "every line arrives once");
    }

    #[test]
    fn a_burst_of_lines_is_written_in_a_few_calls() {
        let sink = Sink::default();
        // A long linger, so that a slow test machine still fits the burst in it.
        let (writer, flush) = spawn(
            Box::new(sink.clone()),
            BUFFER_LIMIT,
            Duration::from_millis(300),
        );
        wait_idle(&writer);
        for i in 0..2000 {
            line(&writer, &format!("line {i}\n"));
        }
        // Written by the writer on its own, not by the flush at the end.
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.text().lines().count() < 2000 {
            assert!(Instant::now() < deadline, "the lines were not written");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(flush);
        // The first line wakes the writer; the rest land within its linger.
        assert!(sink.calls() <= 2, "2000 lines took {} writes", sink.calls());
    }

    #[test]
    fn a_stalled_reader_costs_lines_not_time_and_the_loss_is_reported() {
        let sink = Sink::default();
        let shut = sink.gate.lock().unwrap();
        let (writer, flush) = spawn(Box::new(sink.clone()), 4096, Duration::from_millis(1));
        // The first line goes to the (blocked) writer thread; wait until it has it.
        line(&writer, "first\n");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !writer.shared.lock().pending.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the writer never took the first line"
            );
            std::thread::yield_now();
        }
        // Writing 1 MiB into a 4 KiB buffer returns at once: lines are dropped.
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..10_000 {
                    line(&writer, &format!("line {i:05} {}\n", "y".repeat(90)));
                }
                done_tx.send(()).unwrap();
            });
            done_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("writing lines blocked on a stalled reader");
        });
        drop(shut);
        drop(flush);
        let text = sink.text();
        let kept = text.lines().filter(|l| l.starts_with("line ")).count();
        assert!(
            kept > 0 && kept < 100,
            "{kept} lines kept of 10,000 in 4 KiB"
        );
        let notice = text
            .lines()
            .find(|l| l.starts_with("log: "))
            .expect("a notice of the dropped lines");
        assert_eq!(
            notice,
            format!("log: {} lines dropped, stdout too slow", 10_000 - kept)
        );
    }
}
