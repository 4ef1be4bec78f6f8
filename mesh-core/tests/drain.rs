//! Server drain: new tunnels refused, open ones finish, and at the deadline the rest
//! are forced closed.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod support;

use std::time::Duration;

use mesh_core::drain::DrainOutcome;
use mesh_core::hbone::{ConnectError, HboneConfig, PoolKey};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_refuses_new_tunnels_and_lets_open_ones_finish() {
    init_tracing();
    let mesh = Mesh::new();
    let mut server = mesh.echo_server(HboneConfig::default()).await;
    let pool = mesh.pool(HboneConfig::default());
    let mut open = pool.connect(mesh.key(&server), request()).await.unwrap();
    assert_eq!(echo_once(&mut open, b"before").await, b"before");

    let trigger = server.drain.take().unwrap();
    let drained = tokio::spawn(trigger.drain(Duration::from_secs(60)));
    // The accept loop ends once it sees the drain; then the listener is closed.
    (&mut server.task).await.unwrap();

    // A new tunnel on the existing connection meets GOAWAY, and the retry on a new
    // connection finds the listener closed.
    let err = pool
        .connect(mesh.key(&server), request())
        .await
        .unwrap_err();
    assert!(matches!(err.root(), ConnectError::Dial { .. }), "{err}");
    // So does a client that was never connected.
    let fresh = mesh.pool(HboneConfig::default());
    let key = PoolKey::new(
        mesh.client_id.clone(),
        vec![mesh.server_id.clone()],
        server.addr,
    );
    assert!(fresh.connect(key, request()).await.is_err());

    // The open tunnel still works, both ways, and ends cleanly.
    assert_eq!(echo_once(&mut open, b"during drain").await, b"during drain");
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    drop(open);

    assert_eq!(drained.await.unwrap(), DrainOutcome::Graceful);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_still_open_at_the_deadline_are_forced_closed() {
    let mesh = Mesh::new();
    let mut server = mesh.echo_server(HboneConfig::default()).await;
    let pool = mesh.pool(HboneConfig::default());
    let mut open = pool.connect(mesh.key(&server), request()).await.unwrap();
    assert_eq!(echo_once(&mut open, b"before").await, b"before");

    let trigger = server.drain.take().unwrap();
    let outcome = trigger.drain(Duration::from_millis(300)).await;
    assert_eq!(outcome, DrainOutcome::Forced);

    // The forced tunnel is gone: reading it ends in an error, not a clean EOF.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), open.read(&mut buf))
        .await
        .expect("a forced tunnel must not hang");
    assert!(read.is_err(), "expected a reset, got {read:?}");
}
