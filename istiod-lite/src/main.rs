//! `istiod-lite`: parse the settings, start the control plane, run until SIGINT or
//! SIGTERM, then drain.

use clap::Parser;
use istiod_lite::app::App;
use istiod_lite::config::Config;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _log_flush = mesh_core::logging::init();
    mesh_core::fd_limit::raise();
    let config = Config::parse();
    let app = App::start(config).await?;
    mesh_core::drain::stop_requested().await?;
    tracing::info!("shutting down");
    let outcome = app.shutdown().await;
    tracing::info!(?outcome, "istiod-lite stopped");
    Ok(())
}
