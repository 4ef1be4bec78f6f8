//! `meshctl`: the Ambit command-line tool. Today it runs the local demo (a mesh on
//! network namespaces); waypoint management, config dumps and `analyze` come with
//! their issues.

mod demo;
mod demo_log;
mod loopback_demo;
mod stop_signal;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about = "The Ambit command-line tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the local mesh (as root): istiod-lite on examples/, two nodes of network
    /// namespaces with sample pods, and who talked to whom, live.
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
