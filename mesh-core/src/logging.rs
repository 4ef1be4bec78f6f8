//! Logging for every Ambit binary: tracing to stdout through a bounded in-memory
//! queue that drops lines rather than block (a stalled reader of stdout must never
//! stall traffic), `RUST_LOG` filters (default `info`), colours only on a terminal.

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines buffered before new ones are dropped.
const QUEUE_LINES: usize = 64 * 1024;

/// Installs the global subscriber; keep the guard alive until exit so the queue
/// is flushed.
pub fn init() -> WorkerGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .finish(std::io::stdout());
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    guard
}
