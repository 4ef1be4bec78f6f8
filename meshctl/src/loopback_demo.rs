//! `meshctl demo --loopback`, the demo of the HBONE core alone (no root): a CA mints SPIFFE identities, an HBONE server
//! (as a destination node proxy would run) authorizes each CONNECT by the caller's
//! verified identity and splices it to a real TCP app, and clients tunnel to it.
//! The terminal gets a plain summary of who talked to whom and what was refused.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_core::copy::{CopyStats, copy_bidirectional};
use mesh_core::drain::{self, DrainOutcome};
use mesh_core::hbone::{
    ConnectHandler, ConnectRequest, HboneConfig, HbonePool, HboneServer, InboundConnect, PoolKey,
    Refusal, RefusalKind, SourceMetadata, StatusCode,
};
use mesh_core::testing::{TestCa, spiffe};
use mesh_core::{SpiffeId, tls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug)]
pub struct DemoArgs {
    /// Requests each allowed client sends.
    pub rounds: u32,
    /// Namespace whose workloads the destination accepts (the demo's policy).
    pub allow_namespace: String,
}

/// The destination side: only callers from one namespace get through.
struct NamespacePolicy {
    allow: String,
}

impl ConnectHandler for NamespacePolicy {
    async fn handle(&self, connect: InboundConnect) {
        if connect.peer().namespace() != self.allow {
            let reason = format!(
                "{} is not in namespace {:?}, which the destination allows",
                connect.peer(),
                self.allow
            );
            return connect.refuse(
                RefusalKind::Denied,
                Refusal::new(StatusCode::FORBIDDEN, reason),
            );
        }
        // Answer 200 only once the upstream app has accepted.
        let mut upstream = match TcpStream::connect(connect.target()).await {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("upstream {}: {e}", connect.target());
                return connect.refuse(
                    RefusalKind::Unavailable,
                    Refusal::new(StatusCode::SERVICE_UNAVAILABLE, reason),
                );
            }
        };
        let Ok(mut tunnel) = connect.accept() else {
            return;
        };
        let stats = CopyStats::default();
        let _ = copy_bidirectional(&mut tunnel, &mut upstream, &stats).await;
    }
}

/// The app behind the destination: answers each line in upper case.
async fn run_app(listener: TcpListener) {
    while let Ok((mut conn, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = conn.read(&mut buf).await {
                if n == 0
                    || conn
                        .write_all(&buf[..n].to_ascii_uppercase())
                        .await
                        .is_err()
                {
                    break;
                }
            }
        });
    }
}

struct Outcome {
    from: SpiffeId,
    to: String,
    result: String,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    println!("Ambit local demo: SPIFFE identities and HBONE tunnels on loopback\n");
    let ca = TestCa::new();
    let cart = spiffe("shop", "cart");
    let frontend = spiffe("shop", "frontend");
    let intruder = spiffe("elsewhere", "scraper");
    println!("CA minted identities:\n  {cart}\n  {frontend}\n  {intruder}\n");

    let app = TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = app.local_addr()?;
    tokio::spawn(run_app(app));

    let server_store = ca.store_for(&[&cart]);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server = HboneServer::new(
        listener,
        tls::server_config(server_store, &cart)?,
        NamespacePolicy {
            allow: args.allow_namespace.clone(),
        },
        HboneConfig::default(),
    );
    let hbone_addr = server.local_addr()?;
    let stats = server.stats();
    let (trigger, watcher) = drain::channel();
    let server_task = tokio::spawn(server.run(watcher));
    println!("cart's proxy listens for HBONE on {hbone_addr}; the cart app is {app_addr}\n");

    let client_store = ca.store_for(&[&frontend, &intruder]);
    let pool = HbonePool::new(client_store, HboneConfig::default());
    let mut outcomes = Vec::new();

    // 1. frontend -> cart: allowed, several requests over one tunnel.
    outcomes.push(talk(&pool, &frontend, &cart, hbone_addr, app_addr, args.rounds).await);
    // 2. frontend expecting another identity at that address: refused by the client.
    let impostor = spiffe("shop", "payments");
    outcomes.push(talk(&pool, &frontend, &impostor, hbone_addr, app_addr, 1).await);
    // 3. a workload of another namespace: refused by the destination's policy.
    outcomes.push(talk(&pool, &intruder, &cart, hbone_addr, app_addr, 1).await);

    println!("\nSummary");
    for o in &outcomes {
        println!("  {} -> {}\n      {}", o.from, o.to, o.result);
    }
    println!(
        "\ncart's proxy: {} mTLS connections, {} tunnels, {} refused",
        stats.handshakes(),
        stats.tunnels(),
        stats.refusals()
    );
    for r in stats.recent_refusals() {
        println!("  why refused: [{}] {}", r.kind.as_str(), r.reason);
    }

    drop(pool);
    let outcome = trigger.drain(Duration::from_secs(5)).await;
    server_task.await.context("server task")?;
    println!(
        "\nDrained ({}).",
        if outcome == DrainOutcome::Graceful {
            "graceful"
        } else {
            "forced"
        }
    );
    Ok(())
}

async fn talk(
    pool: &HbonePool,
    from: &SpiffeId,
    expect: &SpiffeId,
    hbone: SocketAddr,
    app: SocketAddr,
    rounds: u32,
) -> Outcome {
    let to = format!("{expect} at {hbone} (app {app})");
    let key = PoolKey::new(from.clone(), vec![expect.clone()], hbone);
    let mut req = ConnectRequest::new(app);
    req.source = SourceMetadata {
        addr: Some(std::net::Ipv4Addr::LOCALHOST.into()),
        namespace: Some(from.namespace().to_string()),
        workload: Some(from.service_account().to_string()),
        ..Default::default()
    };
    let started = Instant::now();
    let result = match exchange(pool, key, req, rounds).await {
        Ok((sent, received)) => format!(
            "ALLOWED: {rounds} requests, {sent} bytes sent, {received} bytes received, {:.1} ms",
            started.elapsed().as_secs_f64() * 1000.0
        ),
        Err(e) => format!("REFUSED: {e}"),
    };
    println!("{from} -> {expect}: {result}");
    Outcome {
        from: from.clone(),
        to,
        result,
    }
}

async fn exchange(
    pool: &HbonePool,
    key: PoolKey,
    req: ConnectRequest,
    rounds: u32,
) -> anyhow::Result<(usize, usize)> {
    let mut tunnel = pool.connect(key, req).await?;
    let (mut sent, mut received) = (0, 0);
    for i in 1..=rounds {
        let msg = format!("hello cart, request {i}\n");
        tunnel.write_all(msg.as_bytes()).await?;
        let mut reply = vec![0u8; msg.len()];
        tunnel.read_exact(&mut reply).await?;
        anyhow::ensure!(
            reply == msg.to_ascii_uppercase().as_bytes(),
            "garbled reply"
        );
        println!(
            "    sent {:?}, got {:?}",
            msg.trim_end(),
            String::from_utf8_lossy(&reply).trim_end()
        );
        sent += msg.len();
        received += reply.len();
    }
    tunnel.shutdown().await?;
    Ok((sent, received))
}
