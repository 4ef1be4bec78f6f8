//! `ztunnel`: parse the settings, start, serve until SIGINT or SIGTERM, drain.

use std::sync::Arc;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use ztunnel::app::App;
use ztunnel::config::Config;

// See `docs/benchmarks.md`: with glibc's malloc, each HTTP/2 frame's buffer is
// faulted in anew; mimalloc keeps freed blocks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs go through a bounded in-memory queue: a slow reader of stdout loses log
    // lines, never stalls traffic.
    let (log_writer, _log_flush) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::stdout());
    tracing_subscriber::fmt()
        .with_writer(log_writer)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let config = Config::parse();
    let app = Arc::new(App::start(config).await?);
    tokio::spawn(ztunnel::inpod::run(app.clone()));
    app.set_ready();
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    let outcome = app.shutdown().await;
    tracing::info!(?outcome, "ztunnel stopped");
    Ok(())
}
