//! ztunnel takes no pod before its state source has synced: with an empty state
//! every destination would pass through in plaintext. A test node agent listens
//! on a real SOCK_SEQPACKET socket; ztunnel must not connect to it (nor report
//! ready) until xDS has answered every type or the local file has been applied.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ambit_proto::zds::{ZtunnelMessage, ztunnel_message};
use ambit_proto::{AUTHORIZATION_TYPE_URL, SERVICE_TYPE_URL, WORKLOAD_TYPE_URL};
use clap::Parser;
use mesh_core::os::SeqPacketListener;
use mesh_core::testing::TestCa;
use mesh_core::xds::testing::{AdsServer, TEST_TOKEN, response};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel::app::App;
use ztunnel::config::Config;

/// How long the node agent waits to be sure ztunnel does not connect: ztunnel's
/// first attempt comes at once when it may connect (the tests below show it).
const NO_CONNECTION: Duration = Duration::from_secs(1);

/// Starts ztunnel with `args` and the node agent's socket in `dir`, marked
/// started as `main` does, and its node-agent client running.
async fn start(dir: &Path, args: &[&str]) -> (Arc<App>, SeqPacketListener) {
    let sock = dir.join("zds.sock");
    let listener = SeqPacketListener::bind(&sock).unwrap();
    let config = Config::try_parse_from(
        [
            "ztunnel",
            "--admin-addr",
            "127.53.0.1:0",
            "--metrics-addr",
            "127.53.0.1:0",
            "--readiness-addr",
            "127.53.0.1:0",
            "--drain-deadline",
            "1s",
            "--node-agent-socket",
            sock.to_str().unwrap(),
        ]
        .into_iter()
        .chain(args.iter().copied()),
    )
    .unwrap();
    let app = Arc::new(App::start(config).await.unwrap());
    tokio::spawn(ztunnel::inpod::run(app.clone()));
    app.set_ready();
    (app, listener)
}

/// Fails if ztunnel connects to the node agent within [`NO_CONNECTION`].
async fn assert_no_connection(listener: &SeqPacketListener, why: &str) {
    let accepted = tokio::time::timeout(NO_CONNECTION, listener.accept()).await;
    assert!(
        accepted.is_err(),
        "ztunnel connected to the node agent {why}"
    );
}

/// Waits for ztunnel's connection and checks its hello.
async fn assert_connects(listener: &SeqPacketListener) {
    let conn = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("ztunnel never connected once synced")
        .unwrap();
    let (hello, _) = conn.recv().await.unwrap();
    assert!(matches!(
        ZtunnelMessage::decode(hello.as_slice()).unwrap().payload,
        Some(ztunnel_message::Payload::Hello(_))
    ));
}

async fn readiness(app: &App) -> u16 {
    let mut s = TcpStream::connect(app.readiness_addr).await.unwrap();
    s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: z\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text[9..12].parse().unwrap()
}

/// The mesh roots of `ca` and the test token, as files in `dir`: (roots, token).
fn control_plane_files(dir: &Path, ca: &TestCa) -> (String, String) {
    let root = dir.join("root.pem");
    std::fs::write(&root, ca.local_ca().root_pem()).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, format!("{TEST_TOKEN}\n")).unwrap();
    (
        root.to_str().unwrap().to_string(),
        token.to_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_control_plane_unreachable_no_pod_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let (root, token) = control_plane_files(dir.path(), &TestCa::new());
    let args = [
        "--xds-address",
        "127.53.0.1:1",
        "--root-cert",
        &root,
        "--token-file",
        &token,
    ];
    let (app, listener) = start(dir.path(), &args).await;
    assert_no_connection(&listener, "with xDS unreachable").await;
    assert_eq!(readiness(&app).await, 503);
    assert!(app.pod_uids().await.is_empty());
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_mode_takes_pods_once_every_type_has_answered() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let mut server = AdsServer::serve(&ca, TcpListener::bind("127.53.0.2:0").await.unwrap());
    let (root, token) = control_plane_files(dir.path(), &ca);
    let address = server.addr.to_string();
    let args = [
        "--xds-address",
        &address,
        "--root-cert",
        &root,
        "--token-file",
        &token,
    ];
    let (app, listener) = start(dir.path(), &args).await;
    let mut stream = server.accept().await;
    for _ in 0..3 {
        stream.recv().await;
    }
    // Two types of three answered: still not synced.
    for type_url in [WORKLOAD_TYPE_URL, SERVICE_TYPE_URL] {
        let ack = stream
            .reply_to(response(type_url, "n1", vec![], vec![]))
            .await;
        assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    }
    assert_no_connection(&listener, "before the policies' first response").await;
    assert_eq!(readiness(&app).await, 503);

    stream.send(response(AUTHORIZATION_TYPE_URL, "n1", vec![], vec![]));
    assert_connects(&listener).await;
    assert_eq!(readiness(&app).await, 200);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_file_refused_at_start_holds_pods_until_a_good_one_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.yaml");
    std::fs::write(&state, "workloads: [").unwrap();
    let args = [
        "--local-state",
        state.to_str().unwrap(),
        "--local-state-poll",
        "20ms",
    ];
    let (app, listener) = start(dir.path(), &args).await;
    assert_no_connection(&listener, "with the state file refused").await;
    assert_eq!(readiness(&app).await, 503);

    std::fs::write(
        &state,
        "workloads:\n  - {uid: cart-1, name: cart-1, namespace: shop, addresses: [\"127.53.0.3\"]}\n",
    )
    .unwrap();
    assert_connects(&listener).await;
    assert_eq!(readiness(&app).await, 200);
    assert!(app.inputs.state.snapshot().workload("cart-1").is_some());
    app.shutdown().await;
}
