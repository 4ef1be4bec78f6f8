//! Early data: bytes sent behind the CONNECT, before its answer.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use mesh_core::hbone::{
    ConnectError, ConnectHandler, HboneConfig, InboundConnect, Refusal, RefusalKind, StatusCode,
};
use support::{Mesh, Server, echo_once, request};
use tokio::io::AsyncReadExt;

/// Refuses the first CONNECT it sees, echoes every later one.
#[derive(Clone, Debug, Default)]
struct RefuseFirst {
    seen: Arc<AtomicUsize>,
}

impl ConnectHandler for RefuseFirst {
    async fn handle(&self, connect: InboundConnect) {
        if self.seen.fetch_add(1, Ordering::SeqCst) == 0 {
            connect.refuse(
                RefusalKind::Denied,
                Refusal::new(StatusCode::FORBIDDEN, "first one"),
            );
            return;
        }
        support::Echo.handle(connect).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_data_is_the_tunnels_first_bytes() {
    let mesh = Mesh::new();
    let server = mesh.echo_server(HboneConfig::default()).await;
    let pool = mesh.pool(HboneConfig::default());
    let mut req = request();
    req.early_data = Bytes::from_static(b"sent with the CONNECT");
    let mut tunnel = pool.connect(mesh.key(&server), req).await.unwrap();
    // Nothing else was written: the echo can only be of the early data.
    let mut back = vec![0; b"sent with the CONNECT".len()];
    tokio::time::timeout(Duration::from_secs(10), tunnel.read_exact(&mut back))
        .await
        .expect("the early data came back")
        .unwrap();
    assert_eq!(back, b"sent with the CONNECT");
    assert_eq!(echo_once(&mut tunnel, b"and after").await, b"and after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connects_early_data_goes_nowhere_and_the_connection_stays_usable() {
    let mesh = Mesh::new();
    let handler = RefuseFirst::default();
    let server = Server::start(
        mesh.server_store.clone(),
        &mesh.server_id,
        handler.clone(),
        HboneConfig::default(),
    )
    .await;
    let pool = mesh.pool(HboneConfig::default());
    let mut req = request();
    req.early_data = Bytes::from(vec![b'x'; 3000]);
    match pool.connect(mesh.key(&server), req).await {
        Err(ConnectError::Refused { status, .. }) => assert_eq!(status, StatusCode::FORBIDDEN),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The next tunnel on the same connection sees only its own bytes.
    let mut tunnel = pool.connect(mesh.key(&server), request()).await.unwrap();
    assert_eq!(echo_once(&mut tunnel, b"clean").await, b"clean");
    assert_eq!(pool.stats().connections_opened(), 1);
    assert_eq!(handler.seen.load(Ordering::SeqCst), 2);
}

/// Holds every CONNECT without answering it.
#[derive(Clone, Debug)]
struct Silent;

impl ConnectHandler for Silent {
    async fn handle(&self, connect: InboundConnect) {
        let _held = connect;
        std::future::pending::<()>().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_left_unanswered_fails_after_the_answer_timeout() {
    let mesh = Mesh::new();
    let config = HboneConfig {
        connect_timeout: Duration::from_millis(300),
        ..HboneConfig::default()
    };
    let server = Server::start(
        mesh.server_store.clone(),
        &mesh.server_id,
        Silent,
        config.clone(),
    )
    .await;
    let pool = mesh.pool(config);
    for early in [Bytes::new(), Bytes::from_static(b"early")] {
        let mut req = request();
        req.early_data = early.clone();
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            pool.connect(mesh.key(&server), req),
        )
        .await
        .expect("the pool gave up on its own");
        match outcome {
            Err(ConnectError::Unanswered { early_data, .. }) => {
                assert_eq!(early_data, !early.is_empty());
            }
            other => panic!("expected no answer, got {other:?}"),
        }
    }
    // Neither was retried on another connection: a fresh connection's silence
    // would repeat, and early data is never sent twice. The connection answers
    // PINGs, so it stays.
    assert_eq!(pool.stats().connections_opened(), 1);
    assert_eq!(pool.connection_count(), 1);
}
