//! ztunnel's local mode (no control plane): every ztunnel reads one state file and
//! signs with a CA root on disk. One traffic test and the bad-file test keep this
//! mode covered; the other traffic tests run with istiod-lite (`tests/mesh.rs`).
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::Duration;

use ambit_e2e::checks;
use ambit_e2e::{EchoTool, MeshCluster, PodSpec, require_root};

fn echo() -> EchoTool {
    EchoTool::new(env!("CARGO_BIN_EXE_e2e-tool"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_pods_talk_on_one_node_and_across_nodes_with_identities() {
    if !require_root("local_mode_pods_talk_on_one_node_and_across_nodes_with_identities") {
        return;
    }
    let mut mesh = MeshCluster::start_local(2).await.unwrap();
    let client = mesh
        .add_pod(PodSpec::new("client", 1).namespace("shop"))
        .await
        .unwrap();
    let near = mesh
        .add_pod(PodSpec::new("near", 1).namespace("shop"))
        .await
        .unwrap();
    let far = mesh
        .add_pod(PodSpec::new("far", 2).namespace("shop"))
        .await
        .unwrap();
    mesh.write_state("").await.unwrap();

    let id = "spiffe://cluster.local/ns/shop/sa/default";
    checks::assert_talk_with_identities(&echo(), &mut mesh, &client, [&near, &far], id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_state_file_is_reported_and_the_mesh_keeps_working() {
    if !require_root("a_malformed_state_file_is_reported_and_the_mesh_keeps_working") {
        return;
    }
    let mut mesh = MeshCluster::start_local(1).await.unwrap();
    let client = mesh
        .add_pod(PodSpec::new("client", 1).namespace("shop"))
        .await
        .unwrap();
    let server = mesh
        .add_pod(PodSpec::new("server", 1).namespace("shop"))
        .await
        .unwrap();
    mesh.write_state("").await.unwrap();
    let _srv = echo().serve(&server, 8080).await.unwrap();
    let addr = SocketAddr::from((server.ip(), 8080));

    mesh.write_raw_state("workloads:\n  - uid: x\n    addresses: [not-an-ip\n")
        .unwrap();
    mesh.nodes[0]
        .ztunnel
        .wait_for_line("the refusal", Duration::from_secs(10), |l| {
            l.contains("local state refused")
        })
        .await
        .unwrap();
    let dump = mesh.fetch(1, "127.0.0.1:15000", "/config_dump").unwrap();
    assert!(
        dump.contains("\"localStateError\"") && dump.contains("does not parse"),
        "{dump}"
    );
    assert!(
        dump.contains(&format!("\"{}\"", server.ip())),
        "the last good state was lost:\n{dump}"
    );
    assert_eq!(
        echo()
            .connect(&client, addr, "still works")
            .await
            .unwrap()
            .trim(),
        "still works"
    );
}
