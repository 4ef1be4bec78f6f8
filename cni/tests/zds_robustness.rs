//! A misbehaving ztunnel costs only its own connection: the agent logs it, drops
//! it, and serves the next ztunnel and the plugin as before; a bad plugin request
//! gets a clear refusal. No root needed.
#![allow(clippy::unwrap_used)]

mod support;

use ambit_cni::api::{AgentReply, AgentRequest};
use ambit_cni::plugin::AgentClient;
use ambit_cni::zds;
use ambit_proto::zds::node_agent_message::Payload;
use support::*;

const GARBAGE: &[u8] = b"\xff\xff\xff not protobuf";

async fn agent_still_serves_plugins(agent: &TestAgent) {
    let client = AgentClient::new(&agent.plugin_socket, EVENT_TIMEOUT);
    let reply = tokio::task::spawn_blocking(move || client.request(&AgentRequest::List))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(reply, AgentReply::Ok { .. }), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_instead_of_hello_drops_only_that_connection() {
    let agent = TestAgent::start();
    let bad = FakeZtunnel::connect(&agent.zds_socket).await;
    bad.send_raw(GARBAGE).await;
    bad.expect_closed().await;

    let (_good, pods) = FakeZtunnel::attach(&agent.zds_socket).await;
    assert!(pods.is_empty());
    agent_still_serves_plugins(&agent).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_instead_of_an_ack_or_out_of_turn_drops_only_that_connection() {
    let agent = TestAgent::start();

    // Garbage where the snapshot's ack belongs.
    let bad = FakeZtunnel::connect(&agent.zds_socket).await;
    bad.send_raw(&zds::encode_hello(1)).await;
    assert!(matches!(bad.recv().await, (Payload::SnapshotSent(_), None)));
    bad.send_raw(GARBAGE).await;
    bad.expect_closed().await;

    // Garbage out of turn, on an attached connection.
    let (bad, _) = FakeZtunnel::attach(&agent.zds_socket).await;
    bad.send_raw(GARBAGE).await;
    bad.expect_closed().await;

    // A hello of an unknown version.
    let bad = FakeZtunnel::connect(&agent.zds_socket).await;
    bad.send_raw(&zds::encode_hello(99)).await;
    bad.expect_closed().await;

    let (_good, pods) = FakeZtunnel::attach(&agent.zds_socket).await;
    assert!(pods.is_empty());
    agent_still_serves_plugins(&agent).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_connection_replaces_the_older_one() {
    let agent = TestAgent::start();
    let (old, _) = FakeZtunnel::attach(&agent.zds_socket).await;
    let (_new, _) = FakeZtunnel::attach(&agent.zds_socket).await;
    old.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_plugin_requests_get_an_error_reply() {
    use std::io::{Read, Write};
    let agent = TestAgent::start();
    let path = agent.plugin_socket.clone();
    let reply = tokio::task::spawn_blocking(move || {
        let mut stream = std::os::unix::net::UnixStream::connect(path).unwrap();
        stream.write_all(b"{\"op\":\"explode\"}").unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    })
    .await
    .unwrap();
    let reply: AgentReply = serde_json::from_str(&reply).unwrap();
    assert!(
        matches!(
            &reply,
            AgentReply::Failed {
                kind: ambit_cni::api::FailureKind::BadRequest,
                ..
            }
        ),
        "{reply:?}"
    );
    agent_still_serves_plugins(&agent).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_refuses_a_pod_with_an_ipv6_address() {
    let agent = TestAgent::start();
    let client = AgentClient::new(&agent.plugin_socket, EVENT_TIMEOUT);
    let pod = ambit_cni::api::Pod {
        uid: "uid-v6".into(),
        name: "v6".into(),
        namespace: "shop".into(),
        service_account: "web".into(),
        container_id: "c6".into(),
        netns: "/run/netns/does-not-matter".into(),
        ips: vec![
            "198.18.0.6".parse().unwrap(),
            "2001:db8::6".parse().unwrap(),
        ],
    };
    let reply = tokio::task::spawn_blocking(move || client.request(&AgentRequest::Add { pod }))
        .await
        .unwrap()
        .unwrap();
    let AgentReply::Failed { kind, message } = reply else {
        panic!("an IPv6 pod was accepted: {reply:?}");
    };
    assert_eq!(kind, ambit_cni::api::FailureKind::BadRequest);
    assert!(message.contains("IPv6 is not supported"), "{message}");
}

/// A slow ztunnel holds up only what needs its answer: while it sits on each
/// ack of a snapshot, plugin requests that do not need it are answered at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_snapshot_does_not_hold_up_plugin_requests() {
    let dir = tempfile::tempdir().unwrap();
    // Six saved pods; plain files stand in for their namespaces (what the agent
    // checks at load is the inode).
    let mut saved = Vec::new();
    for i in 0..6 {
        let netns = dir.path().join(format!("ns-{i}"));
        std::fs::write(&netns, "").unwrap();
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&netns).unwrap());
        let pod = ambit_cni::api::Pod {
            uid: format!("uid-{i}"),
            name: format!("web-{i}"),
            namespace: "shop".into(),
            service_account: "web".into(),
            container_id: format!("c{i}"),
            netns,
            ips: vec![format!("198.18.0.{}", 100 + i).parse().unwrap()],
        };
        saved.push(serde_json::json!({ "pod": pod, "netnsInode": inode }));
    }
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(
        dir.path().join("state/pods.json"),
        serde_json::json!({ "pods": saved }).to_string(),
    )
    .unwrap();
    // The test agents' ack timeout (10 s) is well over the 3 s asked of List.
    let agent = TestAgent::start_in(dir.path());

    let zt = FakeZtunnel::connect(&agent.zds_socket).await;
    zt.send_raw(&zds::encode_hello(1)).await;
    let mut got = Vec::new();
    for _ in 0..6 {
        let (Payload::Add(add), Some(_)) = zt.recv().await else {
            panic!("expected a pod of the snapshot");
        };
        got.push(add.uid);
        // ztunnel sits on this ack; the plugin is answered meanwhile.
        let client = AgentClient::new(&agent.plugin_socket, std::time::Duration::from_secs(3));
        let reply = tokio::task::spawn_blocking(move || client.request(&AgentRequest::List))
            .await
            .unwrap();
        let Ok(AgentReply::Ok { pods, .. }) = reply else {
            panic!("List while ztunnel holds an ack: {reply:?}");
        };
        assert_eq!(pods.len(), 6);
        zt.ack("").await;
    }
    assert!(matches!(zt.recv().await, (Payload::SnapshotSent(_), None)));
    zt.ack("").await;
    got.sort();
    assert_eq!(got, (0..6).map(|i| format!("uid-{i}")).collect::<Vec<_>>());
    agent.stop().await;
}
