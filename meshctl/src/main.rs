//! `meshctl`: the Ambit command-line tool. Today it runs the local demo of the HBONE
//! core; waypoint management, config dumps and `analyze` come with their issues.

mod demo;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about = "The Ambit command-line tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a local demo: two workloads with SPIFFE identities talk over an HBONE
    /// tunnel (mTLS + HTTP/2 CONNECT) on loopback, and refused peers are shown why.
    Demo(demo::DemoArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match Cli::parse().command {
        Command::Demo(args) => demo::run(args).await,
    }
}
