//! The HBONE pool: streams per connection, one connection opened at a time per key,
//! idle and old connections retired (on tokio's paused clock), and the pool's drain.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod support;

use std::sync::Arc;
use std::time::Duration;

use mesh_core::hbone::HboneConfig;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Barrier;

/// 200 tunnels open at once over one pool: exactly ceil(200 / streams-per-connection)
/// TLS connections, counted at both ends.
async fn concurrent_tunnels(streams_per_connection: usize) {
    const TUNNELS: usize = 200;
    let mesh = Mesh::new();
    let server = mesh.echo_server(HboneConfig::default()).await;
    let pool = mesh.pool(HboneConfig {
        max_streams_per_connection: streams_per_connection,
        ..HboneConfig::default()
    });
    let all_open = Arc::new(Barrier::new(TUNNELS));
    let tasks: Vec<_> = (0..TUNNELS)
        .map(|i| {
            let (pool, key, all_open) = (pool.clone(), mesh.key(&server), all_open.clone());
            tokio::spawn(async move {
                let mut s = pool.connect(key, request()).await.unwrap();
                // Hold every tunnel open until all 200 are, so none frees a slot early.
                all_open.wait().await;
                let msg = format!("tunnel {i}");
                assert_eq!(echo_once(&mut s, msg.as_bytes()).await, msg.as_bytes());
                s.shutdown().await.unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await.unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let want = TUNNELS.div_ceil(streams_per_connection) as u64;
    assert_eq!(pool.stats().connections_opened(), want);
    assert_eq!(server.stats.handshakes(), want);
    assert_eq!(server.stats.tunnels(), TUNNELS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streams_use_two_connections_at_the_default_limit() {
    concurrent_tunnels(HboneConfig::default().max_streams_per_connection).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streams_use_seven_connections_at_thirty_per_connection() {
    concurrent_tunnels(30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_tunnels_reuse_one_connection_and_other_keys_get_their_own() {
    let mesh = Mesh::new();
    let server = mesh.echo_server(HboneConfig::default()).await;
    let pool = mesh.pool(HboneConfig::default());
    for _ in 0..5 {
        let mut s = pool.connect(mesh.key(&server), request()).await.unwrap();
        assert_eq!(echo_once(&mut s, b"x").await, b"x");
    }
    assert_eq!(pool.stats().connections_opened(), 1);
    // Another expected-identity set is another key, so another connection.
    let other_key = mesh_core::hbone::PoolKey::new(
        mesh.client_id.clone(),
        vec![
            mesh.server_id.clone(),
            mesh_core::testing::spiffe("backend", "v2"),
        ],
        server.addr,
    );
    let mut s = pool.connect(other_key, request()).await.unwrap();
    assert_eq!(echo_once(&mut s, b"y").await, b"y");
    assert_eq!(pool.stats().connections_opened(), 2);
    assert_eq!(pool.connection_count(), 2);
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_its_idle_time() {
    let idle = Duration::from_secs(30);
    let mesh = Mesh::new();
    let server = mesh.echo_server(HboneConfig::default()).await;
    let pool = mesh.pool(HboneConfig {
        pool_idle_timeout: idle,
        ..HboneConfig::default()
    });
    let mut s = pool.connect(mesh.key(&server), request()).await.unwrap();
    assert_eq!(echo_once(&mut s, b"x").await, b"x");

    // From here on the clock only moves when the test moves it.
    tokio::time::pause();
    // While a tunnel is open, idle time does not count.
    tokio::time::advance(idle * 2).await;
    assert_eq!(pool.connection_count(), 1);
    drop(s);
    tokio::time::advance(idle - Duration::from_secs(1)).await;
    assert_eq!(pool.connection_count(), 1, "closed before its idle time");
    tokio::time::advance(Duration::from_secs(2)).await;
    wait_until(
        "the idle connection to close",
        Duration::from_secs(60),
        || pool.connection_count() == 0,
    )
    .await;
    assert_eq!(pool.stats().connections_closed(), 1);

    // The next tunnel opens a new connection.
    let mut s = pool.connect(mesh.key(&server), request()).await.unwrap();
    assert_eq!(echo_once(&mut s, b"y").await, b"y");
    assert_eq!(pool.stats().connections_opened(), 2);
}

#[tokio::test]
async fn failed_dials_leave_no_key_behind() {
    let mesh = Mesh::new();
    let pool = mesh.pool(HboneConfig::default());
    // Ports that were listening a moment ago: each dial is refused.
    for _ in 0..5 {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let key = mesh_core::hbone::PoolKey::new(
            mesh.client_id.clone(),
            vec![mesh.server_id.clone()],
            closed,
        );
        let err = pool.connect(key, request()).await.unwrap_err();
        assert!(err.to_string().contains(&closed.to_string()), "{err}");
    }
    assert_eq!(pool.key_count(), 0);
    // A key that works is still kept while its connection lives.
    let server = mesh.echo_server(HboneConfig::default()).await;
    let mut s = pool.connect(mesh.key(&server), request()).await.unwrap();
    assert_eq!(echo_once(&mut s, b"x").await, b"x");
    assert_eq!(pool.key_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_waiting_on_a_failing_open_share_its_error() {
    const CALLERS: usize = 5;
    let mesh = Mesh::new();
    // Accepts TCP and never answers the TLS handshake.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    let pool = mesh.pool(HboneConfig {
        connect_timeout: Duration::from_millis(300),
        ..HboneConfig::default()
    });
    let key =
        mesh_core::hbone::PoolKey::new(mesh.client_id.clone(), vec![mesh.server_id.clone()], addr);
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (pool, key) = (pool.clone(), key.clone());
            tokio::spawn(async move { pool.connect(key, request()).await })
        })
        .collect();
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
    }
    // One dial for all of them: the others took the first one's error.
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(pool.key_count(), 0);
    // A later caller tries again.
    let err = pool.connect(key, request()).await.unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    silent.abort();
}

/// A server that allows 2 streams per connection, and a fresh pool for it whose
/// own limit is the default (100).
async fn two_streams_per_connection() -> (Mesh, Server, mesh_core::hbone::HbonePool) {
    let mesh = Mesh::new();
    let server = mesh
        .echo_server(HboneConfig {
            server_max_streams: 2,
            ..HboneConfig::default()
        })
        .await;
    let pool = mesh.pool(HboneConfig {
        connect_timeout: Duration::from_secs(2),
        ..HboneConfig::default()
    });
    (mesh, server, pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_keeps_to_the_servers_stream_limit() {
    let (mesh, server, pool) = two_streams_per_connection().await;
    // Held open together: 2 per connection, as the server's SETTINGS say.
    let mut tunnels = Vec::new();
    for i in 0..5 {
        let mut s = pool.connect(mesh.key(&server), request()).await.unwrap();
        let msg = format!("tunnel {i}");
        assert_eq!(echo_once(&mut s, msg.as_bytes()).await, msg.as_bytes());
        tunnels.push(s);
    }
    assert_eq!(pool.stats().connections_opened(), 3);
    assert_eq!(pool.stats().connections_closed(), 0);
    assert_eq!(server.stats.tunnels(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_a_fresh_pool_keeps_to_the_servers_stream_limit() {
    const TUNNELS: usize = 10;
    let (mesh, server, pool) = two_streams_per_connection().await;
    let all_open = Arc::new(Barrier::new(TUNNELS));
    let tasks: Vec<_> = (0..TUNNELS)
        .map(|i| {
            let (pool, key, all_open) = (pool.clone(), mesh.key(&server), all_open.clone());
            tokio::spawn(async move {
                let opened = pool.connect(key, request()).await;
                // Every tunnel is held until all have been tried, so none frees a
                // slot early; a failure is reported after that.
                all_open.wait().await;
                let mut s = opened.unwrap();
                let msg = format!("tunnel {i}");
                assert_eq!(echo_once(&mut s, msg.as_bytes()).await, msg.as_bytes());
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // Two per connection, as the server's SETTINGS say, from the first burst on.
    assert_eq!(pool.stats().connections_opened(), (TUNNELS / 2) as u64);
    assert_eq!(pool.stats().connections_closed(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_idle_connections_at_once_and_busy_ones_when_their_tunnels_end() {
    let mesh = Mesh::new();
    let server = mesh.echo_server(HboneConfig::default()).await;
    let (trigger, watcher) = mesh_core::drain::channel();
    // Far beyond the test's patience: only the drain can close these connections.
    let pool = mesh
        .pool(HboneConfig {
            pool_idle_timeout: Duration::from_secs(3600),
            ..HboneConfig::default()
        })
        .with_drain(watcher);
    let mut idle = pool.connect(mesh.key(&server), request()).await.unwrap();
    assert_eq!(echo_once(&mut idle, b"x").await, b"x");
    drop(idle);
    let busy_key = mesh_core::hbone::PoolKey::new(
        mesh.client_id.clone(),
        vec![
            mesh.server_id.clone(),
            mesh_core::testing::spiffe("backend", "v2"),
        ],
        server.addr,
    );
    let mut busy = pool.connect(busy_key.clone(), request()).await.unwrap();
    assert_eq!(pool.connection_count(), 2);

    let draining = tokio::spawn(trigger.drain(Duration::from_secs(3600)));
    wait_until(
        "the drain to close the idle connection",
        Duration::from_secs(10),
        || pool.connection_count() == 1,
    )
    .await;
    // The busy connection carries its tunnel to the end, and holds the drain
    // until then; a tunnel asked for meanwhile (a connection accepted just before
    // the drain) rides it rather than dialling one of its own.
    assert_eq!(echo_once(&mut busy, b"still").await, b"still");
    let mut late = pool.connect(busy_key, request()).await.unwrap();
    assert_eq!(echo_once(&mut late, b"late").await, b"late");
    assert_eq!(pool.stats().connections_opened(), 2);
    assert!(!draining.is_finished());
    drop(late);
    drop(busy);
    let outcome = tokio::time::timeout(Duration::from_secs(10), draining)
        .await
        .expect("the drain ended once the last tunnel did")
        .unwrap();
    assert_eq!(outcome, mesh_core::drain::DrainOutcome::Graceful);
    assert_eq!(pool.stats().connections_closed(), 2);
    assert_eq!(pool.connection_count(), 0);
}

/// A connection past `age` takes no new tunnel; its own carry on. Runs on tokio's
/// paused clock once the first tunnel is up.
async fn a_connection_retires_after(config: HboneConfig, age: Duration) {
    let mesh = Mesh::new();
    let server = mesh.echo_server(HboneConfig::default()).await;
    let pool = mesh.pool(config);
    let mut old = pool.connect(mesh.key(&server), request()).await.unwrap();
    assert_eq!(echo_once(&mut old, b"x").await, b"x");

    tokio::time::pause();
    tokio::time::advance(age - Duration::from_secs(60)).await;
    tokio::time::resume();
    let mut same = pool.connect(mesh.key(&server), request()).await.unwrap();
    assert_eq!(echo_once(&mut same, b"y").await, b"y");
    assert_eq!(pool.stats().connections_opened(), 1, "retired too early");

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(120)).await;
    tokio::time::resume();
    let mut new = pool.connect(mesh.key(&server), request()).await.unwrap();
    assert_eq!(echo_once(&mut new, b"z").await, b"z");
    assert_eq!(pool.stats().connections_opened(), 2);
    assert_eq!(server.stats.handshakes(), 2);
    // The old connection is out of the pool; its tunnels carry on to their end.
    assert_eq!(pool.connection_count(), 1);
    assert_eq!(pool.stats().connections_closed(), 1);
    assert_eq!(echo_once(&mut old, b"still").await, b"still");
    assert_eq!(echo_once(&mut same, b"too").await, b"too");
}

#[tokio::test]
async fn a_connection_older_than_its_max_age_takes_no_new_tunnel() {
    let age = Duration::from_secs(3600);
    let config = HboneConfig {
        pool_max_connection_age: age,
        ..HboneConfig::default()
    };
    a_connection_retires_after(config, age).await;
}

#[tokio::test]
async fn a_connection_takes_no_new_tunnel_once_its_certificate_is_due_for_renewal() {
    // The test CA's certificates live 24 h and are renewed at half their life.
    let config = HboneConfig {
        pool_max_connection_age: Duration::from_secs(100 * 3600),
        ..HboneConfig::default()
    };
    a_connection_retires_after(config, Duration::from_secs(12 * 3600)).await;
}
