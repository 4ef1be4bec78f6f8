//! ztunnel as the node agent's client, against a test agent speaking zds on a real
//! SOCK_SEQPACKET socket: malformed messages are refused with an error ack and the
//! session goes on; pods arrive with their namespace; after a reconnect the snapshot
//! drops pods the agent no longer has.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use ambit_proto::zds::{
    AddWorkload, DelWorkload, NodeAgentMessage, SnapshotSent, WorkloadInfo, ZtunnelMessage,
    node_agent_message::Payload, ztunnel_message,
};
use clap::Parser;
use mesh_core::os::{NetNs, SeqPacket, SeqPacketListener};
use prost::Message;
use ztunnel::app::App;
use ztunnel::config::Config;

async fn start(dir: &std::path::Path, drain_deadline: &str) -> (Arc<App>, SeqPacketListener) {
    let sock = dir.join("zds.sock");
    let listener = SeqPacketListener::bind(&sock).unwrap();
    let config = Config::try_parse_from([
        "ztunnel",
        "--admin-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--readiness-addr",
        "127.0.0.1:0",
        "--drain-deadline",
        drain_deadline,
        "--node-agent-socket",
        sock.to_str().unwrap(),
    ])
    .unwrap();
    let app = Arc::new(App::start(config).await.unwrap());
    tokio::spawn(ztunnel::inpod::run(app.clone()));
    (app, listener)
}

/// Accepts ztunnel's connection and checks its hello.
async fn session(listener: &SeqPacketListener) -> SeqPacket {
    let conn = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("ztunnel never connected")
        .unwrap();
    let (hello, _) = conn.recv().await.unwrap();
    match ZtunnelMessage::decode(hello.as_slice()).unwrap().payload {
        Some(ztunnel_message::Payload::Hello(h)) => assert_eq!(h.version, 1),
        other => panic!("expected hello, got {other:?}"),
    }
    conn
}

async fn ack(conn: &SeqPacket) -> String {
    let (bytes, _) = tokio::time::timeout(Duration::from_secs(10), conn.recv())
        .await
        .expect("no ack")
        .unwrap();
    match ZtunnelMessage::decode(bytes.as_slice()).unwrap().payload {
        Some(ztunnel_message::Payload::Ack(a)) => a.error,
        other => panic!("expected ack, got {other:?}"),
    }
}

fn add(uid: &str) -> Vec<u8> {
    NodeAgentMessage {
        payload: Some(Payload::Add(AddWorkload {
            uid: uid.into(),
            info: Some(WorkloadInfo {
                name: uid.into(),
                namespace: "shop".into(),
                service_account: "cart".into(),
            }),
        })),
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_an_error_ack_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (app, listener) = start(dir.path(), "1s").await;
    let conn = session(&listener).await;

    conn.send(b"\xff\xff not protobuf", None).await.unwrap();
    let e = ack(&conn).await;
    assert!(
        e.starts_with("malformed message: not a NodeAgentMessage"),
        "{e}"
    );

    // Only an unknown field (15): valid protobuf, but no payload. (An empty packet
    // would read as the agent closing the connection.)
    conn.send(&[0x78, 0x01], None).await.unwrap();
    assert_eq!(ack(&conn).await, "malformed message: no payload");

    conn.send(&add("pod-a"), None).await.unwrap();
    assert_eq!(
        ack(&conn).await,
        "add pod-a: no network namespace descriptor attached"
    );

    let del = NodeAgentMessage {
        payload: Some(Payload::Del(DelWorkload {
            uid: "nobody".into(),
        })),
    };
    conn.send(&del.encode_to_vec(), None).await.unwrap();
    assert_eq!(
        ack(&conn).await,
        "",
        "deleting an unknown pod is not an error"
    );
    assert!(app.pod_uids().await.is_empty());
    app.shutdown().await;
}

/// A network namespace made for the test, removed (with what runs inside) at the end.
struct TestNetns(mesh_core::testing::netns::TestNetns);

impl TestNetns {
    fn new() -> Self {
        Self(mesh_core::testing::netns::TestNetns::create("zdst"))
    }

    fn open(&self) -> NetNs {
        NetNs::open(self.0.path()).unwrap()
    }

    /// A TCP connection from inside the namespace to its own `port` on loopback.
    fn connect(&self, port: u16) -> std::io::Result<std::net::TcpStream> {
        self.open()
            .run(|| std::net::TcpStream::connect(("127.0.0.1", port)))
            .unwrap()
    }
}

/// A ztunnel (drain deadline `drain`) serving pod-a and pod-b, each in a
/// namespace of its own, over a session still open.
struct TwoPods {
    ns_a: TestNetns,
    ns_b: TestNetns,
    app: Arc<App>,
    listener: SeqPacketListener,
    conn: SeqPacket,
    _dir: tempfile::TempDir,
}

async fn two_pods(drain: &str) -> TwoPods {
    let (ns_a, ns_b) = (TestNetns::new(), TestNetns::new());
    let dir = tempfile::tempdir().unwrap();
    let (app, listener) = start(dir.path(), drain).await;
    let conn = session(&listener).await;
    for (uid, ns) in [("pod-a", &ns_a), ("pod-b", &ns_b)] {
        conn.send(&add(uid), Some(ns.open().as_fd())).await.unwrap();
        assert_eq!(ack(&conn).await, "", "add {uid}");
    }
    TwoPods {
        ns_a,
        ns_b,
        app,
        listener,
        conn,
        _dir: dir,
    }
}

/// A new session's snapshot as the agent sends it, holding pod-a only: its add,
/// then the marker, each acked without error.
async fn snapshot_of_pod_a(conn: &SeqPacket, ns_a: &TestNetns) {
    conn.send(&add("pod-a"), Some(ns_a.open().as_fd()))
        .await
        .unwrap();
    assert_eq!(ack(conn).await, "");
    let snap = NodeAgentMessage {
        payload: Some(Payload::SnapshotSent(SnapshotSent {})),
    };
    conn.send(&snap.encode_to_vec(), None).await.unwrap();
    assert_eq!(ack(conn).await, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_survive_an_agent_reconnect_and_the_snapshot_drops_the_rest() {
    if !mesh_core::testing::require_root(
        "pods_survive_an_agent_reconnect_and_the_snapshot_drops_the_rest",
    ) {
        return;
    }
    let TwoPods {
        ns_a,
        ns_b: _ns_b,
        app,
        listener,
        conn,
        _dir,
    } = two_pods("1s").await;
    let mut pods = app.pod_uids().await;
    pods.sort();
    assert_eq!(pods, ["pod-a", "pod-b"]);

    // The agent goes away: the pods stay, and ztunnel comes back.
    drop(conn);
    let conn = session(&listener).await;
    assert_eq!(app.pod_uids().await.len(), 2);

    // The new session re-sends only pod-a: pod-b is dropped at the snapshot.
    snapshot_of_pod_a(&conn, &ns_a).await;
    assert_eq!(app.pod_uids().await, ["pod-a"]);
    app.shutdown().await;
}

/// Whether the peer has closed `conn` (FIN or reset), without waiting.
fn closed_by_peer(conn: &std::net::TcpStream) -> bool {
    conn.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    match conn.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

/// After an agent restart every pod is re-sent: a pod re-sent unchanged keeps its
/// proxy and its connections, and no message waits for a drain (30 s here, far
/// over the agent's 5 s ack timeout): a pod left out of the snapshot has its
/// listeners closed at once and its connections left to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_sent_pods_keep_their_connections_and_acks_never_wait_for_a_drain() {
    if !mesh_core::testing::require_root(
        "re_sent_pods_keep_their_connections_and_acks_never_wait_for_a_drain",
    ) {
        return;
    }
    let TwoPods {
        ns_a,
        ns_b,
        app,
        listener,
        conn,
        _dir,
    } = two_pods("30s").await;
    // A connection to each pod's HBONE listener, held open: it is in flight
    // (waiting for its TLS handshake), so a drain would wait for it.
    let held_a = ns_a.connect(15008).unwrap();
    let held_b = ns_b.connect(15008).unwrap();

    drop(conn);
    let conn = session(&listener).await;
    let started = std::time::Instant::now();
    snapshot_of_pod_a(&conn, &ns_a).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "re-send and snapshot took {took:?}"
    );
    assert_eq!(app.pod_uids().await, ["pod-a"]);

    // pod-a's proxy was kept: its connection is open and its listener serves.
    assert!(!closed_by_peer(&held_a), "pod-a's connection was closed");
    drop(ns_a.connect(15008).unwrap());
    // pod-b's listeners are closed, its connection still drains.
    let refused = ns_b.connect(15008).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(
        !closed_by_peer(&held_b),
        "pod-b's connection was cut, not drained"
    );

    // A changed pod (another service account) is replaced in place, as fast.
    let mut changed = NodeAgentMessage::decode(add("pod-a").as_slice()).unwrap();
    if let Some(Payload::Add(a)) = &mut changed.payload {
        a.info.as_mut().unwrap().service_account = "checkout".into();
    }
    let started = std::time::Instant::now();
    conn.send(&changed.encode_to_vec(), Some(ns_a.open().as_fd()))
        .await
        .unwrap();
    assert_eq!(ack(&conn).await, "");
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(ns_a.connect(15008).unwrap());

    // The held connections end, so the drains (and shutdown) finish.
    drop((held_a, held_b));
    app.shutdown().await;
}

/// A pod sent again in another namespace (a new sandbox) whose proxy cannot
/// start there (here pod-b's listeners already hold the ports): the error is
/// acked, and the old sandbox's proxy is not kept serving a namespace that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_moved_to_a_namespace_where_it_cannot_start_is_not_served_from_the_old_one() {
    if !mesh_core::testing::require_root(
        "a_pod_moved_to_a_namespace_where_it_cannot_start_is_not_served_from_the_old_one",
    ) {
        return;
    }
    let TwoPods {
        ns_a,
        ns_b,
        app,
        listener: _listener,
        conn,
        _dir,
    } = two_pods("1s").await;
    conn.send(&add("pod-a"), Some(ns_b.open().as_fd()))
        .await
        .unwrap();
    let error = ack(&conn).await;
    assert!(error.contains("listen on"), "{error}");
    assert_eq!(app.pod_uids().await, ["pod-b"]);
    // pod-a's old listeners are closed.
    let refused = ns_a.connect(15008).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    app.shutdown().await;
}
