//! Logging for every Ambit binary: tracing to stdout through a bounded in-memory
//! queue that drops lines rather than block (a stalled reader of stdout must never
//! stall traffic), `RUST_LOG` filters (default `info`), colours only on a terminal.
//!
//! The writer thread takes every queued line at each wake-up and writes them with
//! as few `write` calls as fit its buffer, flushing when the queue is empty: at
//! thousands of access-log lines a second, a system call per line was a quarter of
//! ztunnel's connection rate.

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines buffered before new ones are dropped. The queue's slots are allocated
/// and written at start (32 bytes each), so this is resident memory: 256 KiB.
const QUEUE_LINES: usize = 8 * 1024;

/// The writer thread's buffer: lines are written to stdout in chunks of up to
/// this, and whatever is left when the queue runs empty.
const WRITE_BUFFER: usize = 64 * 1024;

/// Installs the global subscriber; keep the guard alive until exit so the queue
/// is flushed.
pub fn init() -> WorkerGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .finish(std::io::BufWriter::with_capacity(
            WRITE_BUFFER,
            std::io::stdout(),
        ));
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    guard
}
