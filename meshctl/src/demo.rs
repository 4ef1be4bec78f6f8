//! `meshctl demo`: the local mesh, as a newcomer first sees it. A two-node cluster
//! of network namespaces (standard CNI plugins plus Ambit's), a node agent and a
//! ztunnel per node, istiod-lite serving the YAML of `examples/` (watched: edit a
//! file and the next requests show it), sample pods talking, and one line per
//! connection on the terminal: who called whom, with which identities, and what
//! policy allowed or refused. Ctrl-C removes everything it created.

use std::path::PathBuf;
use std::time::Duration;

use ambit_e2e::{EchoTool, MeshCluster, Pod, PodSpec, workspace_bin};
use anyhow::{Context, bail};

use crate::demo_log::{Event, parse_event};

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
    crate::packages::ensure()?;
    let config_dir = args
        .config_dir
        .canonicalize()
        .with_context(|| format!("--config-dir {}", args.config_dir.display()))?;
    say("building the mesh binaries (first run: a few minutes)...");
    let tool = EchoTool::new(workspace_bin("e2e-tool"));
    say(&format!(
        "starting istiod-lite on {} and two nodes (node agent + ztunnel each)...",
        config_dir.display()
    ));
    let mut mesh = MeshCluster::start_with_config(2, config_dir.clone())
        .await
        .context("starting the mesh")?;
    // The namespaces come from examples/namespaces.yaml, not from the harness.
    mesh.own_namespace("shop");
    mesh.own_namespace("legacy");
    let pods = add_pods(&mut mesh).await?;
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
        request(&tool, &pods.frontend, REVIEWS_VIP, "reviews (VIP)").await;
        request(&tool, &pods.legacy, &reviews_v1, "reviews-v1").await;
        report(&mut mesh).await;
        if args.rounds != 0 && round >= args.rounds {
            break;
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            () = tokio::time::sleep(args.interval) => {}
        }
    }
    say("stopping: removing pods, processes and namespaces...");
    drop(servers);
    drop(mesh);
    say("done: nothing left behind.");
    Ok(())
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

/// What the ztunnels logged since the last round: completed inbound connections
/// with both identities, and refusals with the policy that decided.
async fn report(mesh: &mut MeshCluster) {
    for node in &mut mesh.nodes {
        while let Ok(line) = node.ztunnel.next_line(Duration::from_millis(200)).await {
            match parse_event(&line) {
                Some(Event::Completed(c)) if c.direction == "inbound" => say(&format!(
                    "     ztunnel: {} ({}) -> {} ({}): {} B sent, {} B back",
                    c.src_workload,
                    c.src_identity,
                    c.dst_workload,
                    c.dst_identity,
                    c.sent,
                    c.received
                )),
                Some(Event::Refused(r)) => {
                    let who = if r.src_identity == "-" {
                        "no identity".to_string()
                    } else {
                        r.src_identity.clone()
                    };
                    say(&format!(
                        "     ztunnel REFUSED {} ({who}) -> {}: {}",
                        r.src, r.dst, r.explanation
                    ));
                }
                _ => {}
            }
        }
    }
}

fn say(line: &str) {
    println!("{line}");
}
