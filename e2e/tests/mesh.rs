//! ztunnel on real network namespaces: pods enrolled through the CNI chain, traffic
//! captured in each pod's namespace and carried over HBONE with SPIFFE identities.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::Duration;

use ambit_e2e::{EchoTool, MeshCluster, PodSpec, require_root};

fn echo() -> EchoTool {
    EchoTool::new(env!("CARGO_BIN_EXE_e2e-tool"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshed_pods_talk_on_one_node_and_across_nodes_with_identities() {
    if !require_root("meshed_pods_talk_on_one_node_and_across_nodes_with_identities") {
        return;
    }
    let mut mesh = MeshCluster::start(2).await.unwrap();
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

    for server in [&near, &far] {
        let mut srv = echo().serve(server, 8080).await.unwrap();
        let addr = SocketAddr::from((server.ip(), 8080));
        let reply = echo()
            .connect(&client, addr, "marker-7f3a through the mesh")
            .await
            .unwrap();
        assert_eq!(reply.trim(), "marker-7f3a through the mesh");
        // The server sees the client pod's own address.
        let peer = srv.next_peer(Duration::from_secs(10)).await.unwrap();
        assert_eq!(
            peer.ip(),
            client.ip(),
            "server {} saw {peer}",
            server.name()
        );
    }

    // Both ztunnels logged both identities for the cross-node connection.
    let ids = |l: &str| {
        l.contains("connection complete")
            && l.contains("src_identity=spiffe://cluster.local/ns/shop/sa/default")
            && l.contains("dst_identity=spiffe://cluster.local/ns/shop/sa/default")
    };
    let far_ip = far.ip().to_string();
    let (n1, n2) = mesh.nodes.split_at_mut(1);
    n1[0]
        .ztunnel
        .wait_for_line("node 1 outbound access log", Duration::from_secs(10), |l| {
            ids(l) && l.contains("outbound") && l.contains(&far_ip)
        })
        .await
        .unwrap();
    n2[0]
        .ztunnel
        .wait_for_line("node 2 inbound access log", Duration::from_secs(10), |l| {
            ids(l) && l.contains("inbound") && l.contains(&far_ip)
        })
        .await
        .unwrap();
}
