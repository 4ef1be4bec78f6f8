//! Certificate rotation with istiod-lite's CA on real network namespaces: with a
//! 30 s TTL, the client's and the server's certificates are renewed three times
//! under continuous traffic (a long session and a new connection every 200 ms),
//! and no connection fails.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ambit_e2e::mesh_control::{EchoSession, MeshOptions};
use ambit_e2e::{EchoTool, MeshCluster, PodSpec, require_root};

const WAIT: Duration = Duration::from_secs(20);

fn echo() -> EchoTool {
    EchoTool::new(env!("CARGO_BIN_EXE_e2e-tool"))
}

fn pod(name: &str, node: u8, sa: &str) -> PodSpec {
    PodSpec::new(name, node)
        .namespace("shop")
        .cni_arg("K8S_POD_SERVICE_ACCOUNT", sa)
}

/// Every distinct `notAfter` seen for `identity` in node `node`'s dump.
fn record_not_after(mesh: &MeshCluster, node: u8, identity: &str, seen: &mut Vec<u64>) {
    let Ok(dump) = mesh.config_dump(node) else {
        return;
    };
    let not_after = dump["certificates"].as_array().and_then(|cs| {
        cs.iter()
            .find(|c| c["identity"] == identity)
            .and_then(|c| c["notAfter"].as_u64())
    });
    if let Some(t) = not_after
        && !seen.contains(&t)
    {
        seen.push(t);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_three_times_under_traffic_without_a_failed_connection() {
    if !require_root("certificates_rotate_three_times_under_traffic_without_a_failed_connection") {
        return;
    }
    let options =
        MeshOptions::default().istiod_args(["--cert-ttl", "30s", "--max-cert-ttl", "30s"]);
    let mut mesh = MeshCluster::start_with(2, options).await.unwrap();
    let client = mesh.add_pod(pod("client", 1, "client")).await.unwrap();
    let server = mesh.add_pod(pod("server", 2, "server")).await.unwrap();
    let _srv = echo().serve(&server, 8080).await.unwrap();
    let addr = SocketAddr::from((server.ip(), 8080));
    let client_id = "spiffe://cluster.local/ns/shop/sa/client".to_string();
    let server_id = "spiffe://cluster.local/ns/shop/sa/server".to_string();
    let (mut client_certs, mut server_certs) = (Vec::new(), Vec::new());
    mesh.poll("both certificates", WAIT, |m| {
        record_not_after(m, 1, &client_id, &mut client_certs);
        record_not_after(m, 2, &server_id, &mut server_certs);
        (!client_certs.is_empty() && !server_certs.is_empty()).then_some(())
    })
    .await
    .unwrap();
    let dump = mesh.config_dump(1).unwrap();
    let first = dump["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["identity"] == client_id.as_str())
        .unwrap();
    let life = first["notAfter"].as_u64().unwrap() - first["notBefore"].as_u64().unwrap();
    // 30 s, plus the tenth of it the CA backdates notBefore by (and rounding).
    assert!(life <= 34, "the CA ignored --cert-ttl: {first}");

    let session = EchoSession::start(&echo(), &client, addr).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let churn = tokio::spawn({
        let (client, stop) = (client.clone(), Arc::clone(&stop));
        async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let message = format!("rotation-{n}");
                match echo().connect(&client, addr, &message).await {
                    Ok(reply) if reply.trim() == message => ok += 1,
                    Ok(reply) => failed.push(format!("{message}: got {reply:?}")),
                    Err(e) => failed.push(format!("{message}: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (ok, failed)
        }
    });

    // The initial certificate plus three renewals, for both identities.
    let started = Instant::now();
    mesh.poll(
        "three rotations of both certificates",
        Duration::from_secs(150),
        |m| {
            record_not_after(m, 1, &client_id, &mut client_certs);
            record_not_after(m, 2, &server_id, &mut server_certs);
            (client_certs.len() >= 4 && server_certs.len() >= 4).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!("{e}: client certificates {client_certs:?}, server certificates {server_certs:?}")
    });
    let rotated_in = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = churn.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} new connections failed across the rotations: {failed:#?}",
        failed.len(),
        failed.len() as u32 + ok
    );
    assert!(ok >= 20, "only {ok} new connections in {rotated_in:?}");
    let pongs = session.finish().await.unwrap();
    assert!(pongs > 100, "only {pongs} echoes in {rotated_in:?}");
    eprintln!(
        "rotations done in {rotated_in:?}: {ok} new connections, {pongs} session echoes; \
         client notAfter {client_certs:?}, server notAfter {server_certs:?}"
    );
}
