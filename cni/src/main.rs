//! `ambit-cni`: one binary, two roles. Run by a container runtime (with
//! `CNI_COMMAND` set and no arguments) it is the chained CNI plugin; `ambit-cni
//! agent` is the node agent daemon. The logic lives in the library.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use ambit_cni::agent::{Agent, AgentConfig};
use ambit_cni::plugin;
use anyhow::Context;
use clap::{Parser, Subcommand};

/// How long in-flight plugin requests get to finish at shutdown.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Largest network configuration read from stdin.
const MAX_STDIN: u64 = 1024 * 1024;

#[derive(Parser)]
#[command(
    name = "ambit-cni",
    version,
    about = "Ambit pod enrollment: chained CNI plugin and node agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (the plugin socket and ztunnel's zds socket).
    Agent(Box<AgentConfig>),
    /// Run as the CNI plugin (what a runtime does by calling the binary with
    /// CNI_COMMAND set): reads CNI_* from the environment and the config on stdin.
    Plugin,
}

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() && std::env::args_os().len() == 1 {
        return plugin_main();
    }
    match Cli::parse().command {
        Command::Plugin => plugin_main(),
        Command::Agent(config) => match agent_main(*config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ambit-cni agent: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Logs go to stderr (stdout is the runtime's); `AMBIT_CNI_LOG` sets the filter.
fn plugin_main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AMBIT_CNI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().take(MAX_STDIN).read_to_end(&mut stdin) {
        let err = plugin::CniError::new(plugin::ErrorCode::Io, "cannot read stdin")
            .with_details(e.to_string());
        println!("{}", err.to_json(plugin::PREFERRED_VERSION));
        return ExitCode::FAILURE;
    }
    let out = plugin::run(|k| std::env::var(k).ok(), &stdin);
    let mut stdout = std::io::stdout().lock();
    if !out.stdout.is_empty() {
        let _ = writeln!(stdout, "{}", out.stdout);
    }
    let _ = stdout.flush();
    if out.exit_code == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn agent_main(config: AgentConfig) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let agent = Agent::bind(config)?;
        let (trigger, watcher) = mesh_core::drain::channel();
        let serving = tokio::spawn(agent.run(watcher));
        shutdown_signal().await?;
        tracing::info!("shutting down");
        let outcome = trigger.drain(DRAIN_DEADLINE).await;
        serving.await.context("agent task")?;
        tracing::info!(?outcome, "drained");
        Ok(())
    })
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("SIGINT handler")?,
        _ = term.recv() => {}
    }
    Ok(())
}
