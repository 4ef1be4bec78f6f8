//! The cluster builder itself: pods get routed addresses that survive end to end,
//! and a cluster leaves nothing behind, also when its test panics.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;

use ambit_e2e::underlay::{MAX_NODES, WIRE_BRIDGE, pod_bridge_name};
use ambit_e2e::{
    Cluster, ClusterPrefix, CniPlugin, EchoTool, PodSpec, WAIT_TIMEOUT, list_netns, process,
    require_root,
};
use serde_json::json;

const TOOL: &str = env!("CARGO_BIN_EXE_e2e-tool");

/// Names of the root namespace's interfaces (`ip -br link`, without `@peer`).
fn root_links() -> BTreeSet<String> {
    let out = Command::new("ip").args(["-br", "link"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect()
}

fn owned_netns(prefix: &ClusterPrefix) -> Vec<String> {
    list_netns()
        .into_iter()
        .filter(|n| prefix.owns(n))
        .collect()
}

/// Whether `pid` has exited (gone, or a zombie not yet reaped).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // `pid (comm) S ...`: the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Asserts the cluster with `prefix` left no namespace, root interface or temp dir.
fn assert_nothing_left(prefix: &ClusterPrefix, links_before: &BTreeSet<String>, dir: &Path) {
    assert_eq!(owned_netns(prefix), Vec::<String>::new(), "namespaces left");
    let after = root_links();
    let new: Vec<_> = after.difference(links_before).collect();
    assert!(new.is_empty(), "root namespace gained interfaces: {new:?}");
    // The bridges the harness makes live in its namespaces; one in the root
    // namespace is a leak, even one an earlier run left (which the diff misses).
    let bridges: Vec<_> = after
        .iter()
        .filter(|l| *l == WIRE_BRIDGE || (1..=MAX_NODES).any(|n| **l == pod_bridge_name(n)))
        .collect();
    assert!(
        bridges.is_empty(),
        "harness bridges in the root namespace: {bridges:?}"
    );
    assert!(!dir.exists(), "temp dir {} left", dir.display());
}

fn in_subnet(ip: Ipv4Addr, node: u8) -> bool {
    ip.octets()[..3] == [198, 18, node]
}

#[tokio::test]
async fn server_sees_client_pod_ips_on_same_and_other_node() {
    if !require_root("server_sees_client_pod_ips_on_same_and_other_node") {
        return;
    }
    let mut cluster = Cluster::builder().nodes(2).build().unwrap();
    let server_pod = cluster.add_pod(PodSpec::new("server", 1)).unwrap();
    let near = cluster.add_pod(PodSpec::new("near", 1)).unwrap();
    let far = cluster.add_pod(PodSpec::new("far", 2)).unwrap();
    assert!(in_subnet(server_pod.ip(), 1), "{}", server_pod.ip());
    assert!(in_subnet(near.ip(), 1), "{}", near.ip());
    assert!(in_subnet(far.ip(), 2), "{}", far.ip());
    assert_ne!(server_pod.ip(), near.ip());

    let tool = EchoTool::new(TOOL);
    let mut server = tool.serve(&server_pod, 7000).await.unwrap();
    for client in [&near, &far] {
        let message = format!("hello from {}", client.name());
        let reply = tool.connect(client, server.addr(), &message).await.unwrap();
        assert_eq!(reply, message);
        let peer = server.next_peer(WAIT_TIMEOUT).await.unwrap();
        assert_eq!(
            peer.ip(),
            IpAddr::V4(client.ip()),
            "the server must see pod {}'s own address (no NAT on the way)",
            client.name()
        );
    }
    cluster.shutdown().unwrap();
}

#[tokio::test]
async fn dropping_the_cluster_leaves_nothing_behind() {
    if !require_root("dropping_the_cluster_leaves_nothing_behind") {
        return;
    }
    let links_before = root_links();
    let mut cluster = Cluster::builder().nodes(2).build().unwrap();
    let a = cluster.add_pod(PodSpec::new("a", 1)).unwrap();
    cluster.add_pod(PodSpec::new("b", 2)).unwrap();
    let prefix = cluster.prefix().clone();
    let dir = cluster.state_dir().unwrap().to_owned();
    // wire + 2 nodes + 2 pods
    assert_eq!(owned_netns(&prefix).len(), 5, "{:?}", owned_netns(&prefix));
    assert!(
        dir.join("node-1/ipam/ambit").is_dir(),
        "host-local state lives in the cluster's dir"
    );

    // A server still running, with its handle alive, when the cluster goes.
    let mut server = EchoTool::new(TOOL).serve(&a, 7001).await.unwrap();
    drop(cluster);

    let status = server.process().wait(WAIT_TIMEOUT).await.unwrap();
    assert!(
        !status.success(),
        "the teardown killed the server: {status}"
    );
    assert_nothing_left(&prefix, &links_before, &dir);
}

#[test]
fn teardown_runs_when_the_test_body_panics() {
    if !require_root("teardown_runs_when_the_test_body_panics") {
        return;
    }
    let links_before = root_links();
    let (tx, rx) = std::sync::mpsc::channel();
    let body = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut cluster = Cluster::builder().nodes(2).build().unwrap();
            let pod = cluster.add_pod(PodSpec::new("doomed", 2)).unwrap();
            let server = EchoTool::new(TOOL).serve(&pod, 7002).await.unwrap();
            let pid = server.pid().unwrap();
            // Leak the handle: only the cluster's teardown can stop this process.
            std::mem::forget(server);
            let dir = cluster.state_dir().unwrap().to_owned();
            tx.send((cluster.prefix().clone(), dir, pid)).unwrap();
            panic!("deliberate panic in the test body (expected in this test's output)");
        });
    });
    assert!(body.join().is_err(), "the body was meant to panic");
    let (prefix, dir, pid) = rx.recv().unwrap();
    assert_nothing_left(&prefix, &links_before, &dir);
    assert!(exited(pid), "server pid {pid} survived the panic");
}

#[tokio::test]
async fn chained_plugins_run_after_bridge_with_its_result() {
    if !require_root("chained_plugins_run_after_bridge_with_its_result") {
        return;
    }
    // The standard `tuning` plugin needs bridge's result as `prevResult` and hands
    // it on: the pod keeps its address and gets tuning's MTU on eth0.
    let tuning = CniPlugin::standard("tuning", json!({ "mtu": 1280 }));
    let mut cluster = Cluster::builder()
        .nodes(1)
        .chain_plugin(tuning)
        .build()
        .unwrap();
    let pod = cluster.add_pod(PodSpec::new("tuned", 1)).unwrap();
    assert!(in_subnet(pod.ip(), 1), "{}", pod.ip());

    let mut cmd = pod.command("ip");
    cmd.args(["-o", "link", "show", "eth0"]);
    let link = process::run_output("ip link in pod", cmd, WAIT_TIMEOUT)
        .await
        .unwrap();
    assert!(link.contains("mtu 1280"), "{link}");

    // DEL runs tuning then bridge and frees the address for the next pod.
    let ip = pod.ip();
    cluster.delete_pod("tuned").unwrap();
    assert!(cluster.pod("tuned").is_none());
    let again = cluster.add_pod(PodSpec::new("again", 1)).unwrap();
    assert!(in_subnet(again.ip(), 1), "{}", again.ip());
    assert_ne!(
        again.ip(),
        ip,
        "host-local hands out the next address, not a freed one"
    );
    cluster.shutdown().unwrap();
}

#[tokio::test]
async fn failed_cni_add_is_undone_and_reported() {
    if !require_root("failed_cni_add_is_undone_and_reported") {
        return;
    }
    // A chained plugin that refuses every ADD with a spec error object.
    let bin = ambit_e2e::naming::temp_dir("refuse-plugin").unwrap();
    let refuse = bin.path().join("refuse");
    // Written by a child process: were this process to hold the file open for
    // writing, a fork by a parallel test could make exec fail with ETXTBSY.
    let script = "#!/bin/sh\ncat >/dev/null\n[ \"$CNI_COMMAND\" = DEL ] && exit 0\n\
                  echo '{\"cniVersion\":\"1.0.0\",\"code\":7,\"msg\":\"refused by test\"}'\nexit 1\n";
    let written = Command::new("sh")
        .args([
            "-c",
            "printf '%s' \"$1\" > \"$2\" && chmod 755 \"$2\"",
            "sh",
            script,
        ])
        .arg(&refuse)
        .status()
        .unwrap();
    assert!(written.success());
    let mut cluster = Cluster::builder()
        .chain_plugin(CniPlugin::new(&refuse, json!({})))
        .build()
        .unwrap();

    let err = cluster.add_pod(PodSpec::new("rejected", 1)).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("code 7") && text.contains("refused by test"),
        "{text}"
    );
    assert!(cluster.pod("rejected").is_none());
    // Only the wire and the node remain: the pod's namespace went with the error.
    assert_eq!(
        owned_netns(cluster.prefix()).len(),
        2,
        "{:?}",
        owned_netns(cluster.prefix())
    );
    // bridge's DEL ran, so host-local holds no address for the pod.
    let ipam = cluster.state_dir().unwrap().join("node-1/ipam/ambit");
    let held: Vec<_> = std::fs::read_dir(&ipam)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<Ipv4Addr>().is_ok())
        .collect();
    assert!(held.is_empty(), "addresses still reserved: {held:?}");
    cluster.shutdown().unwrap();
}
