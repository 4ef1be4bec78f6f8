//! `ztunnel`: parse the settings, start, serve until SIGINT or SIGTERM, drain.

use std::sync::Arc;

use clap::Parser;
use ztunnel::app::App;
use ztunnel::config::Config;

// See `docs/benchmarks.md`: with glibc's malloc, each HTTP/2 frame's buffer is
// faulted in anew; mimalloc keeps freed blocks. Built with `no_thp` (Cargo.toml):
// with transparent huge pages, each touched 2 MiB region of its arena was resident
// whole. Where THP is `always` system-wide, `MIMALLOC_ALLOW_THP=0` turns it off
// for the process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // Before any thread starts: every copy of the process is affected.
    let copies = mesh_core::os::prefer_vector_copies();
    let config = Config::parse();
    config.runtime()?.block_on(run(config, copies))
}

async fn run(config: Config, copies: mesh_core::os::CopyTuning) -> anyhow::Result<()> {
    let _log_flush = mesh_core::logging::init();
    mesh_core::fd_limit::raise();
    tracing::info!("{copies}");
    let app = Arc::new(App::start(config).await?);
    tokio::spawn(ztunnel::inpod::run(app.clone()));
    app.set_ready();
    mesh_core::drain::stop_requested().await?;
    tracing::info!("shutting down");
    let outcome = app.shutdown().await;
    tracing::info!(?outcome, "ztunnel stopped");
    Ok(())
}
