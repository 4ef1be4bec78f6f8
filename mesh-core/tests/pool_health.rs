//! Pooled connections that can no longer carry a new tunnel are retired: one whose
//! path went silent, one its server is going away from.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mesh_core::drain::{self, DrainWatcher};
use mesh_core::hbone::{
    ConnectError, ConnectHandler, ConnectRequest, HboneConfig, HboneServer, InboundConnect,
    PoolKey, Refusal, RefusalKind, StatusCode,
};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// A TCP relay to `upstream` whose connections can be cut silently: after
/// [`Relay::black_hole`] the ones it relays move no byte either way and stay open,
/// as when the path to a peer's node is lost without a reset (PINGs go unanswered
/// too). Connections made after the cut are relayed as before.
struct Relay {
    addr: SocketAddr,
    cuts: Arc<Mutex<Vec<oneshot::Sender<()>>>>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cuts = Arc::new(Mutex::new(Vec::new()));
        let pending_cuts = cuts.clone();
        tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let mut up = TcpStream::connect(upstream).await.unwrap();
                let (cut, cut_rx) = oneshot::channel::<()>();
                pending_cuts.lock().unwrap().push(cut);
                tokio::spawn(async move {
                    let cut = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => false,
                        _ = cut_rx => true,
                    };
                    if cut {
                        // Both sockets stay open and unread.
                        let _held = (down, up);
                        std::future::pending::<()>().await;
                    }
                });
            }
        });
        Self { addr, cuts }
    }

    /// Cuts every connection relayed so far.
    fn black_hole(&self) {
        for cut in self.cuts.lock().unwrap().drain(..) {
            let _ = cut.send(());
        }
    }
}

fn with_early_data(data: &'static [u8]) -> ConnectRequest {
    let mut req = request();
    req.early_data = Bytes::from_static(data);
    req
}

/// Reads `want.len()` bytes from a tunnel to an echo server and checks them.
async fn echoed(tunnel: &mut mesh_core::hbone::H2Stream, want: &[u8]) {
    let mut back = vec![0; want.len()];
    tokio::time::timeout(Duration::from_secs(10), tunnel.read_exact(&mut back))
        .await
        .expect("the echo came back")
        .unwrap();
    assert_eq!(back, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gone_silent_is_retired_after_a_connect_with_early_data_goes_unanswered() {
    let mesh = Mesh::new();
    let server = mesh.echo_server(HboneConfig::default()).await;
    let relay = Relay::start(server.addr).await;
    let pool = mesh.pool(HboneConfig {
        connect_timeout: Duration::from_millis(400),
        ..HboneConfig::default()
    });
    let key = PoolKey::new(
        mesh.client_id.clone(),
        vec![mesh.server_id.clone()],
        relay.addr,
    );
    let mut tunnel = pool
        .connect(key.clone(), with_early_data(b"one"))
        .await
        .unwrap();
    echoed(&mut tunnel, b"one").await;
    drop(tunnel);

    relay.black_hole();
    // Early data is never sent twice, so this one fails...
    match pool.connect(key.clone(), with_early_data(b"two")).await {
        Err(ConnectError::Unanswered { early_data, .. }) => assert!(early_data),
        other => panic!("expected no answer, got {other:?}"),
    }
    // ...but the silent connection is gone with it: the next tunnel dials anew.
    let mut tunnel = pool.connect(key, with_early_data(b"three")).await.unwrap();
    echoed(&mut tunnel, b"three").await;
    assert_eq!(pool.stats().connections_opened(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_left_unanswered_together_on_a_dead_connection_share_one_verdict() {
    const TUNNELS: usize = 8;
    let mesh = Mesh::new();
    let server = mesh.echo_server(HboneConfig::default()).await;
    let relay = Relay::start(server.addr).await;
    let config = HboneConfig {
        connect_timeout: Duration::from_millis(400),
        ..HboneConfig::default()
    };
    let answer_timeout = config.answer_timeout();
    let pool = mesh.pool(config);
    let key = PoolKey::new(
        mesh.client_id.clone(),
        vec![mesh.server_id.clone()],
        relay.addr,
    );
    drop(pool.connect(key.clone(), request()).await.unwrap());
    relay.black_hole();
    let started = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..TUNNELS)
        .map(|_| {
            let (pool, key) = (pool.clone(), key.clone());
            tokio::spawn(async move { pool.connect(key, with_early_data(b"x")).await })
        })
        .collect();
    for t in tasks {
        assert!(matches!(
            t.await.unwrap(),
            Err(ConnectError::Unanswered { .. })
        ));
    }
    // One PING's wait (1 s) for all of them, not one each in turn (8 s).
    let took = started.elapsed();
    assert!(
        took < answer_timeout + Duration::from_secs(4),
        "the unanswered tunnels took {took:?}"
    );
}

/// Answers 503 once its dial of the target has timed out, after the whole
/// `connect_timeout`, as ztunnel's inbound does for a target that does not answer.
#[derive(Clone, Debug)]
struct SlowTarget {
    dial_timeout: Duration,
}

impl ConnectHandler for SlowTarget {
    async fn handle(&self, connect: InboundConnect) {
        let dial = std::future::pending::<()>();
        let _ = tokio::time::timeout(self.dial_timeout, dial).await;
        connect.refuse(
            RefusalKind::Unavailable,
            Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "dial timed out"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_dial_timed_out_is_heard_before_the_client_gives_up() {
    let mesh = Mesh::new();
    // The client waits 1.5 x connect_timeout: a 1 s margin over the server's
    // own 2 s dial timeout, wide enough for a loaded machine.
    let config = HboneConfig {
        connect_timeout: Duration::from_secs(2),
        ..HboneConfig::default()
    };
    let handler = SlowTarget {
        dial_timeout: config.connect_timeout,
    };
    let server = Server::start(
        mesh.server_store.clone(),
        &mesh.server_id,
        handler,
        config.clone(),
    )
    .await;
    let pool = mesh.pool(config);
    match pool.connect(mesh.key(&server), with_early_data(b"x")).await {
        Err(ConnectError::Refused { status, .. }) => {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        }
        other => panic!("expected the server's 503, got {other:?}"),
    }
    // A slow target says nothing against the connection.
    assert_eq!(pool.connection_count(), 1);
}

/// Accepts every CONNECT, says "draining" on the tunnel once its server's drain
/// has begun (so after the server's GOAWAY, which its connection task sends
/// first), then holds the tunnel until the client ends it.
#[derive(Clone, Debug)]
struct AnnounceDrain {
    drain: DrainWatcher,
}

impl ConnectHandler for AnnounceDrain {
    async fn handle(&self, connect: InboundConnect) {
        let Ok(mut tunnel) = connect.accept() else {
            return;
        };
        self.drain.signaled().await;
        if tunnel.write_all(b"draining").await.is_ok() {
            let _ = tunnel.read_to_end(&mut Vec::new()).await;
        }
    }
}

/// The listener twice: what an old server drains from and its successor takes over
/// (as a restarted ztunnel takes over its predecessor's listeners).
fn shared_listener() -> (TcpListener, TcpListener) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let again = listener.try_clone().unwrap();
    (
        TcpListener::from_std(listener).unwrap(),
        TcpListener::from_std(again).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_their_server_went_away_from_do_not_use_up_a_tunnels_tries() {
    const CONNECTIONS: usize = 4;
    let mesh = Mesh::new();
    let tls = || mesh_core::tls::server_config(mesh.server_store.clone(), &mesh.server_id).unwrap();
    let (old_listener, new_listener) = shared_listener();
    let addr = old_listener.local_addr().unwrap();
    let (old_drain, old_watcher) = drain::channel();
    let old = HboneServer::new(
        old_listener,
        tls(),
        AnnounceDrain {
            drain: old_watcher.clone(),
        },
        HboneConfig::default(),
    );
    let old_task = tokio::spawn(old.run(old_watcher));

    // Two tunnels a connection, and one of each pair closed: every connection has
    // a free slot and a tunnel that keeps it open through the drain.
    let pool = mesh.pool(HboneConfig {
        max_streams_per_connection: 2,
        ..HboneConfig::default()
    });
    let key = PoolKey::new(mesh.client_id.clone(), vec![mesh.server_id.clone()], addr);
    let mut tunnels = Vec::new();
    for _ in 0..2 * CONNECTIONS {
        tunnels.push(pool.connect(key.clone(), request()).await.unwrap());
    }
    // The pool fills a connection before it opens the next.
    let mut held: Vec<_> = tunnels.into_iter().step_by(2).collect();
    assert_eq!(pool.stats().connections_opened(), CONNECTIONS as u64);
    assert_eq!(pool.connection_count(), CONNECTIONS);

    let draining = tokio::spawn(old_drain.drain(Duration::from_secs(60)));
    old_task.await.unwrap();
    // Each connection's GOAWAY has reached the pool before the word behind it.
    for tunnel in &mut held {
        echoed(tunnel, b"draining").await;
    }
    let new = HboneServer::new(new_listener, tls(), Echo, HboneConfig::default());
    let (_new_drain, new_watcher) = drain::channel();
    tokio::spawn(new.run(new_watcher));

    // The tunnel goes over a fresh connection to the successor.
    let mut tunnel = pool.connect(key, request()).await.unwrap();
    assert_eq!(echo_once(&mut tunnel, b"after").await, b"after");
    assert_eq!(pool.stats().connections_opened(), CONNECTIONS as u64 + 1);
    draining.abort();
}
