//! `istiod-lite`: parse the settings, start the control plane, run until SIGINT or
//! SIGTERM, then drain.

use clap::Parser;
use istiod_lite::app::App;
use istiod_lite::config::Config;
use tokio::signal::unix::{SignalKind, signal};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _log_flush = mesh_core::logging::init();
    let config = Config::parse();
    let app = App::start(config).await?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    let outcome = app.shutdown().await;
    tracing::info!(?outcome, "istiod-lite stopped");
    Ok(())
}
