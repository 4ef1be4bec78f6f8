//! Tunnels that share a connection share its HTTP/2 window: tunnels whose far end
//! does not read must not starve a new one.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mesh_core::hbone::{ConnectHandler, ConnectRequest, HboneConfig, InboundConnect};
use support::*;
use tokio::io::AsyncWriteExt;

/// The target port whose tunnels are accepted and never read.
const DEAF_PORT: u16 = 9;

/// Holds the tunnels to [`DEAF_PORT`] unread; echoes the others.
#[derive(Clone, Debug)]
struct DeafOrEcho;

impl ConnectHandler for DeafOrEcho {
    async fn handle(&self, connect: InboundConnect) {
        if connect.target().port() != DEAF_PORT {
            return Echo.handle(connect).await;
        }
        let Ok(_tunnel) = connect.accept() else {
            return;
        };
        std::future::pending::<()>().await;
    }
}

#[tokio::test]
async fn tunnels_whose_target_does_not_read_do_not_starve_a_new_one() {
    const PUSHERS: usize = 4;
    const PUSH: usize = 3 << 20;
    let mesh = Mesh::new();
    let config = HboneConfig::default();
    let stream_window = config.stream_window as usize;
    // Four stream windows fill the connection's: what the defaults make of it.
    assert_eq!(config.connection_window as usize, PUSHERS * stream_window);
    let server = Server::start(
        mesh.server_store.clone(),
        &mesh.server_id,
        DeafOrEcho,
        config.clone(),
    )
    .await;
    let pool = mesh.pool(config);
    let deaf = ConnectRequest::new(format!("198.18.0.10:{DEAF_PORT}").parse().unwrap());
    let pushed = Arc::new(AtomicUsize::new(0));
    for _ in 0..PUSHERS {
        let mut tunnel = pool.connect(mesh.key(&server), deaf.clone()).await.unwrap();
        let pushed = pushed.clone();
        tokio::spawn(async move {
            let chunk = vec![0u8; 64 << 10];
            for _ in 0..PUSH / chunk.len() {
                tunnel.write_all(&chunk).await.unwrap();
                pushed.fetch_add(chunk.len(), Ordering::SeqCst);
            }
        });
    }
    // Each pusher's own window is full, and with them the connection's.
    wait_until(
        "the pushers to fill the windows",
        Duration::from_secs(30),
        || pushed.load(Ordering::SeqCst) >= PUSHERS * stream_window,
    )
    .await;
    assert_eq!(pool.stats().connections_opened(), 1);
    // Stuck long enough for the pool to tell (on tokio's clock).
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(1)).await;
    tokio::time::resume();

    let mut tunnel = pool.connect(mesh.key(&server), request()).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), echo_once(&mut tunnel, b"hello"))
        .await
        .expect("the new tunnel is not starved by the stuck ones");
    assert_eq!(echoed, b"hello");
    assert_eq!(pool.stats().connections_opened(), 2);
}
