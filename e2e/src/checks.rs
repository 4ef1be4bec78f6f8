//! Checks the e2e tests share: traffic that must pass or be refused, a ztunnel's
//! access log, and lookups in config dumps.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use crate::process::ProcessError;
use crate::{EchoTool, MeshCluster, Pod};

/// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
pub fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// The workload with uid `uid` in a ztunnel config dump.
pub fn workload<'a>(dump: &'a Value, uid: &str) -> Option<&'a Value> {
    dump["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["uid"] == uid)
}

/// Sends one message from `from` to `to` and asserts it came back.
pub async fn assert_echo(tool: &EchoTool, from: &Pod, to: SocketAddr, message: &str) {
    let reply = tool
        .connect(from, to, message)
        .await
        .unwrap_or_else(|e| panic!("{} -> {to}: {e}", from.name()));
    assert_eq!(reply.trim(), message, "{} -> {to}", from.name());
}

/// A connection the destination refused: the captured connection is closed
/// without a reply (or the client fails).
pub async fn assert_refused(tool: &EchoTool, from: &Pod, to: SocketAddr) {
    let reply = tool
        .connect(from, to, "should-be-refused")
        .await
        .unwrap_or_default();
    assert_eq!(reply, "", "{} -> {to} was not refused", from.name());
}

/// A captured connection its ztunnel refused (the destination's policy, no route):
/// the client sees a reset, never an orderly close that a client could take for an
/// empty reply. Its error is ECONNRESET, or ENOTCONN / EPIPE when the reset came
/// before its half-close or write: none of these follows a FIN.
pub async fn assert_reset(tool: &EchoTool, from: &Pod, to: SocketAddr) {
    assert_reset_sending(tool, from, to, "should-be-reset").await;
}

/// Like [`assert_reset`], sending `message`: [`crate::echo::RESET_REQUEST`] has
/// the server itself reset the connection.
pub async fn assert_reset_sending(tool: &EchoTool, from: &Pod, to: SocketAddr, message: &str) {
    match tool.connect(from, to, message).await {
        Ok(reply) => panic!(
            "{} -> {to} was closed in order (reply {reply:?}), not reset",
            from.name()
        ),
        Err(ProcessError::Failed { stderr, .. }) => {
            let reset = ["os error 104", "os error 107", "os error 32"];
            assert!(
                reset.iter().any(|code| stderr.contains(code)),
                "{} -> {to} failed without a reset: {stderr}",
                from.name()
            );
        }
        Err(e) => panic!("{} -> {to}: {e}", from.name()),
    }
}

/// `client` reaches `near` (same node) and `far` (node 2) on port 8080 through
/// the mesh with a marker message; each server sees the client pod's own address,
/// and both ztunnels logged both identities (`identity`) for the cross-node
/// connection.
pub async fn assert_talk_with_identities(
    tool: &EchoTool,
    mesh: &mut MeshCluster,
    client: &Pod,
    [near, far]: [&Pod; 2],
    identity: &str,
) {
    const MARKER: &str = "marker-7f3a through the mesh";
    for server in [near, far] {
        let mut srv = tool.serve(server, 8080).await.expect("echo server");
        let addr = SocketAddr::from((server.ip(), 8080));
        assert_echo(tool, client, addr, MARKER).await;
        // A reset by the server reaches the client as a reset, never as an orderly
        // end that would make a cut-off reply look complete.
        assert_reset_sending(tool, client, addr, crate::echo::RESET_REQUEST).await;
        let peer = srv
            .next_peer(Duration::from_secs(10))
            .await
            .expect("the server saw a connection");
        assert_eq!(
            peer.ip(),
            client.ip(),
            "server {} saw {peer}",
            server.name()
        );
    }
    let (src, dst) = (
        format!("src_identity={identity}"),
        format!("dst_identity={identity}"),
    );
    let far_ip = far.ip().to_string();
    for (node, direction) in [(1, "outbound"), (2, "inbound")] {
        let what = format!("node {node} {direction} access log");
        let want = [src.as_str(), dst.as_str(), direction, far_ip.as_str()];
        access_log(mesh, node, &what, &want, Duration::from_secs(10)).await;
    }
}

/// Waits up to `wait` for node `node`'s ztunnel to log a completed connection
/// whose line holds every string of `want`; returns the line.
pub async fn access_log(
    mesh: &mut MeshCluster,
    node: u8,
    what: &str,
    want: &[&str],
    wait: Duration,
) -> String {
    mesh.nodes[usize::from(node) - 1]
        .ztunnel
        .wait_for_line(what, wait, |l| {
            l.contains("connection complete") && want.iter().all(|w| l.contains(w))
        })
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Whether `needle` occurs in `haystack` (a packet capture, a log).
pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// A Namespace document, enrolled in the mesh or not.
pub fn namespace_yaml(name: &str, ambient: bool) -> String {
    let labels = if ambient {
        "\n  labels:\n    istio.io/dataplane-mode: ambient"
    } else {
        ""
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n")
}
