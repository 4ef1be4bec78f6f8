//! The HBONE server closes a connection that has carried no tunnel for its idle
//! limit, so parked connections cannot hold every accept slot.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod support;

use std::time::Duration;

use mesh_core::hbone::HboneConfig;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_gives_its_slot_up_after_the_idle_limit() {
    let mesh = Mesh::new();
    let server = mesh
        .echo_server(HboneConfig {
            server_max_connections: 1,
            server_idle_timeout: Duration::from_millis(300),
            ..HboneConfig::default()
        })
        .await;
    // The client would keep its connection for an hour: only the server ends it.
    let client = HboneConfig {
        pool_idle_timeout: Duration::from_secs(3600),
        connect_timeout: Duration::from_secs(10),
        ..HboneConfig::default()
    };
    let parked = mesh.pool(client.clone());
    let mut tunnel = parked.connect(mesh.key(&server), request()).await.unwrap();
    assert_eq!(echo_once(&mut tunnel, b"x").await, b"x");
    drop(tunnel);

    // The only slot is taken until the parked connection has idled its limit.
    let other = mesh.pool(client);
    let mut tunnel = other.connect(mesh.key(&server), request()).await.unwrap();
    assert_eq!(echo_once(&mut tunnel, b"y").await, b"y");
    // The parked pool saw the GOAWAY and dropped its connection.
    wait_until(
        "the parked pool to drop its connection",
        Duration::from_secs(10),
        || parked.connection_count() == 0,
    )
    .await;
    assert_eq!(server.stats.handshakes(), 2);
}

#[tokio::test]
async fn a_connection_with_an_open_tunnel_is_not_idle() {
    let mesh = Mesh::new();
    let limit = Duration::from_secs(1);
    let server = mesh
        .echo_server(HboneConfig {
            server_idle_timeout: limit,
            ..HboneConfig::default()
        })
        .await;
    let pool = mesh.pool(HboneConfig::default());
    let mut tunnel = pool.connect(mesh.key(&server), request()).await.unwrap();
    assert_eq!(echo_once(&mut tunnel, b"x").await, b"x");
    // Quiet for several idle limits, but open: the server's checks find it busy.
    tokio::time::pause();
    for _ in 0..5 {
        tokio::time::advance(limit).await;
    }
    tokio::time::resume();
    assert_eq!(echo_once(&mut tunnel, b"y").await, b"y");
    // No GOAWAY came: the next tunnel shares the connection.
    let mut again = pool.connect(mesh.key(&server), request()).await.unwrap();
    assert_eq!(echo_once(&mut again, b"z").await, b"z");
    assert_eq!(pool.stats().connections_opened(), 1);
    assert_eq!(server.stats.handshakes(), 1);
}
