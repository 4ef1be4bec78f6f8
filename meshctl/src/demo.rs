//! `meshctl demo`: the local mesh, as a newcomer first sees it. A two-node cluster
//! of network namespaces (standard CNI plugins plus Ambit's), a node agent and a
//! ztunnel per node, istiod-lite serving the YAML of `examples/` (watched: edit a
//! file and the next requests show it), sample pods talking, and one line per
//! connection on the terminal: who called whom, with which identities, and what
//! policy allowed or refused. Ctrl-C removes everything it created.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_e2e::{EchoTool, MeshCluster, Pod, PodSpec, workspace_bin};
use anyhow::{Context, bail};

use crate::demo_log::{Event, parse_event};
use crate::stop_signal::StopSignals;

/// The demo's service VIP (examples/services.yaml).
const REVIEWS_VIP: &str = "198.19.200.10:9080";
const SERVER_PORT: u16 = 8080;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The directory of YAML istiod-lite serves (watched).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"))]
    config_dir: PathBuf,
    /// Stop after this many rounds of requests (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    rounds: u32,
    /// Pause between rounds.
    #[arg(long, default_value = "2s", value_parser = mesh_core::settings::parse_duration)]
    interval: Duration,
    /// Run the loopback demo of the HBONE core instead (no root needed).
    #[arg(long)]
    loopback: bool,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.loopback {
        let rounds = if args.rounds == 0 { 3 } else { args.rounds };
        return crate::loopback_demo::run(crate::loopback_demo::DemoArgs {
            rounds,
            allow_namespace: "shop".into(),
        })
        .await;
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the demo builds network namespaces, veths and iptables rules: run it as root \
             (or `meshctl demo --loopback` for the HBONE core alone)"
        );
    }
    ambit_e2e::packages::ensure()?;
    // Before anything is created: from here on a signal stops the demo through its
    // teardown. The mesh's processes run in process groups of their own, so a
    // Ctrl-C reaches meshctl alone and the teardown goes in order.
    let mut signals = StopSignals::register().context("registering signal handlers")?;
    ambit_e2e::process::use_own_process_groups();
    let config_dir = args
        .config_dir
        .canonicalize()
        .with_context(|| format!("--config-dir {}", args.config_dir.display()))?;
    say("building the mesh binaries (first run: a few minutes)...");
    let mut build = tokio::task::spawn_blocking(|| workspace_bin("e2e-tool"));
    let tool = match signals.race(&mut build).await {
        Ok(built) => EchoTool::new(built.context("building the mesh binaries")?),
        Err(signal) => {
            // The runtime would wait for the blocking build on the way out: stop
            // it, and let it end (it fails at once) before returning.
            ambit_e2e::cancel_build();
            let _ = build.await;
            say(&format!("{signal}: stopped before anything was created."));
            return Ok(());
        }
    };
    say(&format!(
        "starting istiod-lite on {} and two nodes (node agent + ztunnel each)...",
        config_dir.display()
    ));
    // Interrupted while starting, the half-built mesh is dropped inside the
    // future, and its guards remove what it had created.
    let started = signals
        .race(MeshCluster::start_with_config(2, config_dir.clone()))
        .await;
    let mut mesh = match started {
        Ok(mesh) => mesh.context("starting the mesh")?,
        Err(signal) => {
            say(&format!(
                "{signal}: stopped while starting; removed what was created."
            ));
            return Ok(());
        }
    };
    let outcome = signals
        .race(show(&mut mesh, &tool, &args, &config_dir))
        .await;
    let stopped_by = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => {
            say("stopping after an error: removing pods, processes and namespaces...");
            // The error is the one to report; a failed teardown is printed too.
            if let Err(t) = mesh.shutdown().await {
                eprintln!("meshctl demo: {t}");
            }
            return Err(e);
        }
        Err(signal) => Some(signal),
    };
    match stopped_by {
        Some(signal) => say(&format!(
            "{signal}: stopping: removing pods, processes and namespaces..."
        )),
        None => say("stopping: removing pods, processes and namespaces..."),
    }
    mesh.shutdown()
        .await
        .context("the demo's teardown failed; `ip netns list` and /tmp show what is left")?;
    say("done: nothing left behind.");
    Ok(())
}

/// The demo proper, on a running mesh: the sample pods and their servers, then
/// rounds of requests with what the ztunnels saw, until `args.rounds` (or forever:
/// the caller races this against the stop signals).
async fn show(
    mesh: &mut MeshCluster,
    tool: &EchoTool,
    args: &DemoArgs,
    config_dir: &Path,
) -> anyhow::Result<()> {
    // The namespaces come from examples/namespaces.yaml, not from the harness.
    mesh.own_namespace("shop");
    mesh.own_namespace("legacy");
    let pods = add_pods(mesh).await?;
    // Killed on drop; the teardown kills what runs in the pods anyway.
    let mut servers = Vec::new();
    for pod in [&pods.reviews_v1, &pods.reviews_v2] {
        servers.push(tool.serve(pod, SERVER_PORT).await?);
    }
    say("");
    say("The mesh is up. Pods:");
    for p in [
        &pods.frontend,
        &pods.reviews_v1,
        &pods.reviews_v2,
        &pods.legacy,
    ] {
        say(&format!(
            "  {:<14} {:<7} node-{}  {}",
            p.name(),
            p.namespace(),
            p.node(),
            p.ip()
        ));
    }
    say(&format!(
        "Edit {}/*.yaml while this runs (try policies.yaml); Ctrl-C stops and cleans up.",
        config_dir.display()
    ));
    say("");
    let reviews_v1 = format!("{}:{SERVER_PORT}", pods.reviews_v1.ip());
    let mut round = 0u32;
    loop {
        round += 1;
        say(&format!("-- round {round}"));
        request(tool, &pods.frontend, REVIEWS_VIP, "reviews (VIP)").await;
        request(tool, &pods.legacy, &reviews_v1, "reviews-v1").await;
        report(mesh, &[&pods.frontend, &pods.legacy]).await;
        if args.rounds != 0 && round >= args.rounds {
            return Ok(());
        }
        tokio::time::sleep(args.interval).await;
    }
}

struct DemoPods {
    frontend: Pod,
    reviews_v1: Pod,
    reviews_v2: Pod,
    legacy: Pod,
}

async fn add_pods(mesh: &mut MeshCluster) -> anyhow::Result<DemoPods> {
    let sa = "K8S_POD_SERVICE_ACCOUNT";
    let frontend = PodSpec::new("frontend", 1)
        .namespace("shop")
        .cni_arg(sa, "frontend");
    let v1 = PodSpec::new("reviews-v1", 1)
        .namespace("shop")
        .cni_arg(sa, "reviews")
        .label("app", "reviews")
        .label("version", "v1");
    let v2 = PodSpec::new("reviews-v2", 2)
        .namespace("shop")
        .cni_arg(sa, "reviews")
        .label("app", "reviews")
        .label("version", "v2");
    // Outside the mesh: no capture, no identity.
    let legacy = PodSpec::new("legacy-client", 2)
        .namespace("legacy")
        .cni_arg(sa, "legacy-client")
        .cni_arg("AMBIT_ENROLL", "false");
    Ok(DemoPods {
        frontend: mesh.add_pod(frontend).await?,
        reviews_v1: mesh.add_pod(v1).await?,
        reviews_v2: mesh.add_pod(v2).await?,
        legacy: mesh.add_pod(legacy).await?,
    })
}

/// One request from `from` to `addr`; prints what the client saw.
async fn request(tool: &EchoTool, from: &Pod, addr: &str, what: &str) {
    let Ok(target) = addr.parse() else {
        return;
    };
    let message = format!("hello from {}", from.name());
    match tool.connect(from, target, &message).await {
        Ok(reply) if reply == message => {
            say(&format!("  {} -> {what}: reply received", from.name()))
        }
        Ok(reply) => say(&format!(
            "  {} -> {what}: connection closed without the reply ({} bytes back)",
            from.name(),
            reply.len()
        )),
        Err(e) => {
            // The tool's error ends with the OS's reason (reset, refused...).
            let text = e.to_string();
            let reason = text
                .lines()
                .map(|l| l.trim().trim_end_matches(')'))
                .rfind(|l| !l.is_empty())
                .unwrap_or("failed")
                .to_string();
            say(&format!("  {} -> {what}: no reply ({reason})", from.name()));
        }
    }
}

/// How long a round waits for the ztunnels' lines about its requests: a request
/// that never reached a ztunnel (the client failed) has none.
const REPORT_WAIT: Duration = Duration::from_secs(3);
/// How long one node is waited on before the next is looked at.
const REPORT_STEP: Duration = Duration::from_millis(50);

/// What the ztunnels logged since the last round: completed inbound connections
/// with both identities, and refusals with the policy that decided. Reads until
/// every client of the round (`clients`, one request each) has its outcome logged
/// (a completed inbound connection or a refusal from its address), at most
/// [`REPORT_WAIT`], then takes what else is already there.
async fn report(mesh: &mut MeshCluster, clients: &[&Pod]) {
    let mut waiting: Vec<String> = clients.iter().map(|p| format!("{}:", p.ip())).collect();
    let deadline = tokio::time::Instant::now() + REPORT_WAIT;
    loop {
        let done = waiting.is_empty() || tokio::time::Instant::now() >= deadline;
        // Once done, only what is buffered already (a zero wait still takes it).
        let wait = if done { Duration::ZERO } else { REPORT_STEP };
        let mut read_any = false;
        for node in &mut mesh.nodes {
            let mut wait = wait;
            while let Ok(line) = node.ztunnel.next_line(wait).await {
                read_any = true;
                wait = Duration::ZERO;
                if let Some(src) = show_event(&line) {
                    waiting.retain(|client| !src.starts_with(client.as_str()));
                }
            }
        }
        if done && !read_any {
            return;
        }
    }
}

/// Prints a ztunnel log line the demo shows; returns the source address of a
/// connection's outcome (completed inbound, or refused).
fn show_event(line: &str) -> Option<String> {
    match parse_event(line)? {
        Event::Completed(c) if c.direction.starts_with("inbound") => {
            if c.direction == "inbound" {
                say(&format!(
                    "     ztunnel: {} ({}) -> {} ({}): {} B sent, {} B back",
                    c.src_workload,
                    c.src_identity,
                    c.dst_workload,
                    c.dst_identity,
                    c.sent,
                    c.received
                ));
            }
            Some(c.src)
        }
        Event::Completed(_) => None,
        Event::Refused(r) => {
            let who = if r.src_identity == "-" {
                "no identity".to_string()
            } else {
                r.src_identity.clone()
            };
            say(&format!(
                "     ztunnel REFUSED {} ({who}) -> {}: {}",
                r.src, r.dst, r.explanation
            ));
            Some(r.src)
        }
    }
}

fn say(line: &str) {
    println!("{line}");
}
