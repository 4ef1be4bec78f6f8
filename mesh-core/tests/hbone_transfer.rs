//! HBONE round trips over loopback with real mTLS: bytes both ways, a 256 MiB
//! transfer checked by hash, half-close in each direction, and the splice between
//! sockets and a tunnel.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::copy::{CopyStats, copy_bidirectional};
use mesh_core::hbone::{ConnectHandler, HboneConfig, InboundConnect, SourceMetadata};
use mesh_core::testing::spiffe;
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_arrive_intact_both_ways_with_identities_and_metadata() {
    init_tracing();
    let mesh = Mesh::new();
    let (seen_tx, mut seen_rx) = mpsc::channel(1);
    let server = Server::start(
        mesh.server_store.clone(),
        &mesh.server_id,
        Recorder(seen_tx),
        HboneConfig::default(),
    )
    .await;
    let pool = mesh.pool(HboneConfig::default());
    let mut req = request();
    req.source = SourceMetadata {
        addr: Some("198.18.0.3".parse().unwrap()),
        namespace: Some("frontend".into()),
        workload: Some("client-1".into()),
        ..Default::default()
    };
    let mut stream = pool.connect(mesh.key(&server), req.clone()).await.unwrap();
    assert_eq!(
        echo_once(&mut stream, b"hello through the tunnel").await,
        b"hello through the tunnel"
    );

    let (peer, target, meta, trace) = seen_rx.recv().await.unwrap();
    assert_eq!(peer, spiffe("frontend", "client"));
    assert_eq!(target, req.target);
    assert_eq!(meta, req.source);
    assert_eq!(trace, req.trace.to_string());
}

/// Records what the server saw of each CONNECT, then echoes.
struct Recorder(
    mpsc::Sender<(
        mesh_core::SpiffeId,
        std::net::SocketAddr,
        SourceMetadata,
        String,
    )>,
);

impl ConnectHandler for Recorder {
    async fn handle(&self, connect: InboundConnect) {
        let meta = SourceMetadata::from_headers(connect.headers()).unwrap();
        let trace = connect.headers()["traceparent"]
            .to_str()
            .unwrap()
            .to_string();
        let _ = self
            .0
            .send((connect.peer().clone(), connect.target(), meta, trace))
            .await;
        Echo.handle(connect).await;
    }
}

/// Deterministic pseudo-random bytes (xorshift), so nothing large is kept in memory.
fn fill(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_transfer_is_intact_both_ways() {
    const TOTAL: usize = 256 * 1024 * 1024;
    let mesh = Mesh::new();
    let server = mesh.echo_server(HboneConfig::default()).await;
    let pool = mesh.pool(HboneConfig::default());
    let stream = pool.connect(mesh.key(&server), request()).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = tokio::spawn(async move { send_hashed(&mut wr, TOTAL, 0).await });
    let received = hash_to_eof(&mut rd).await;
    assert_eq!(received.0, TOTAL);
    assert_eq!(received, writer.await.unwrap());
}

/// Client half-closes first: the server reads to EOF, then still answers.
#[tokio::test]
async fn half_close_from_the_client() {
    let mesh = Mesh::new();
    let server = Server::start(
        mesh.server_store.clone(),
        &mesh.server_id,
        ReplyAfterEof,
        HboneConfig::default(),
    )
    .await;
    let pool = mesh.pool(HboneConfig::default());
    let mut stream = pool.connect(mesh.key(&server), request()).await.unwrap();
    stream.write_all(b"question").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"got 8 bytes: question");
}

struct ReplyAfterEof;

impl ConnectHandler for ReplyAfterEof {
    async fn handle(&self, connect: InboundConnect) {
        let mut s = connect.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let reply = format!("got {} bytes: {}", got.len(), String::from_utf8_lossy(&got));
        s.write_all(reply.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    }
}

/// Server half-closes first: the client reads EOF, then still sends.
#[tokio::test]
async fn half_close_from_the_server() {
    let mesh = Mesh::new();
    let (tx, mut rx) = mpsc::channel(1);
    let server = Server::start(
        mesh.server_store.clone(),
        &mesh.server_id,
        GreetThenListen(tx),
        HboneConfig::default(),
    )
    .await;
    let pool = mesh.pool(HboneConfig::default());
    let mut stream = pool.connect(mesh.key(&server), request()).await.unwrap();
    let mut greeting = Vec::new();
    stream.read_to_end(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"hello, then silence");
    stream.write_all(b"still heard").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), b"still heard");
}

struct GreetThenListen(mpsc::Sender<Vec<u8>>);

impl ConnectHandler for GreetThenListen {
    async fn handle(&self, connect: InboundConnect) {
        let mut s = connect.accept().unwrap();
        s.write_all(b"hello, then silence").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let _ = self.0.send(got).await;
    }
}

/// The splice ztunnel runs on each end: app socket <-> tunnel on the client side,
/// tunnel <-> upstream socket on the server side; 64 MiB each way, checked by hash,
/// each direction ending with a half-close the other side still answers after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_splice_between_sockets_and_a_tunnel_moves_bytes_intact_both_ways() {
    const TOTAL: usize = 64 * 1024 * 1024;
    let mesh = Mesh::new();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    // Upstream: reads to EOF (hashing), then answers with its own stream.
    let upstream_task = tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        let got = hash_to_eof(&mut s).await;
        let sent = send_hashed(&mut s, TOTAL, 7).await;
        (got, sent)
    });
    let server_stats = Arc::new(CopyStats::default());
    let server = Server::start(
        mesh.server_store.clone(),
        &mesh.server_id,
        SpliceTo(upstream_addr, server_stats.clone()),
        HboneConfig::default(),
    )
    .await;
    let pool = mesh.pool(HboneConfig::default());
    let mut tunnel = pool.connect(mesh.key(&server), request()).await.unwrap();
    let app_side = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut app = TcpStream::connect(app_side.local_addr().unwrap())
        .await
        .unwrap();
    let (mut accepted, _) = app_side.accept().await.unwrap();
    let client_stats = Arc::new(CopyStats::default());
    let stats = client_stats.clone();
    let client_splice =
        tokio::spawn(async move { copy_bidirectional(&mut accepted, &mut tunnel, &stats).await });

    let sent = send_hashed(&mut app, TOTAL, 3).await;
    let got = hash_to_eof(&mut app).await;
    let (upstream_got, upstream_sent) = upstream_task.await.unwrap();
    assert_eq!(upstream_got, (TOTAL, sent.1));
    assert_eq!(got, (TOTAL, upstream_sent.1));
    let moved = client_splice.await.unwrap().unwrap();
    assert_eq!(moved, (TOTAL as u64, TOTAL as u64));
    assert_eq!((client_stats.a_to_b(), client_stats.b_to_a()), moved);
    wait_until("the server's splice counts", Duration::from_secs(5), || {
        (server_stats.a_to_b(), server_stats.b_to_a()) == (TOTAL as u64, TOTAL as u64)
    })
    .await;
}

/// Splices each tunnel to a TCP upstream, as ztunnel's inbound side does.
struct SpliceTo(SocketAddr, Arc<CopyStats>);

impl ConnectHandler for SpliceTo {
    async fn handle(&self, connect: InboundConnect) {
        let mut upstream = TcpStream::connect(self.0).await.unwrap();
        let mut tunnel = connect.accept().unwrap();
        // A failed splice shows in the test's own assertions (hashes, counts, resets).
        if let Err(e) = copy_bidirectional(&mut tunnel, &mut upstream, &self.1).await {
            tracing::debug!(error = %e, "server splice failed");
        }
    }
}

/// app <-> (splice) <-> tunnel <-> (server's splice) <-> upstream, with the
/// upstream's end accepted: (app, upstream, the client splice's task).
async fn spliced_through_a_tunnel(
    mesh: &Mesh,
) -> (
    TcpStream,
    TcpStream,
    tokio::task::JoinHandle<Result<(u64, u64), mesh_core::copy::CopyError>>,
    Server,
) {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::start(
        mesh.server_store.clone(),
        &mesh.server_id,
        SpliceTo(upstream.local_addr().unwrap(), Arc::default()),
        HboneConfig::default(),
    )
    .await;
    let pool = mesh.pool(HboneConfig::default());
    let mut tunnel = pool.connect(mesh.key(&server), request()).await.unwrap();
    let app_side = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(app_side.local_addr().unwrap())
        .await
        .unwrap();
    let (mut accepted, _) = app_side.accept().await.unwrap();
    let splice = tokio::spawn(async move {
        let stats = CopyStats::default();
        copy_bidirectional(&mut accepted, &mut tunnel, &stats).await
    });
    let mut app = app;
    // The server's splice dials the upstream once the tunnel carries a byte.
    app.write_all(b"x").await.unwrap();
    let (mut far, _) = upstream.accept().await.unwrap();
    let mut first = [0u8; 1];
    far.read_exact(&mut first).await.unwrap();
    (app, far, splice, server)
}

/// Reads to the end of `s`, which must be a reset, not an orderly close.
async fn assert_reset(s: &mut TcpStream, who: &str) {
    let mut rest = Vec::new();
    let end = s.read_to_end(&mut rest).await;
    assert_eq!(
        end.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "{who} saw an orderly end after {} more bytes",
        rest.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_reaches_the_client_app_as_a_reset() {
    init_tracing();
    let mesh = Mesh::new();
    let (mut app, far, splice, _server) = spliced_through_a_tunnel(&mesh).await;
    mesh_core::copy::reset_on_close(&far).unwrap();
    drop(far);
    assert_reset(&mut app, "the client app").await;
    assert!(splice.await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_app_reset_reaches_the_upstream_as_a_reset() {
    init_tracing();
    let mesh = Mesh::new();
    let (app, mut far, splice, _server) = spliced_through_a_tunnel(&mesh).await;
    mesh_core::copy::reset_on_close(&app).unwrap();
    drop(app);
    assert_reset(&mut far, "the upstream").await;
    assert!(splice.await.unwrap().is_err());
}

/// Writes `total` pseudo-random bytes then half-closes; returns (bytes, hash).
async fn send_hashed<W: AsyncWrite + Unpin>(
    s: &mut W,
    total: usize,
    seed: u64,
) -> (usize, Vec<u8>) {
    let mut hash = Sha256::new();
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
    let mut buf = vec![0u8; 100_000];
    let mut sent = 0;
    while sent < total {
        let n = buf.len().min(total - sent);
        fill(&mut state, &mut buf[..n]);
        hash.update(&buf[..n]);
        s.write_all(&buf[..n]).await.unwrap();
        sent += n;
    }
    s.shutdown().await.unwrap();
    (sent, hash.finalize().to_vec())
}

/// Reads to EOF; returns (bytes, hash).
async fn hash_to_eof<R: AsyncRead + Unpin>(s: &mut R) -> (usize, Vec<u8>) {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            return (got, hash.finalize().to_vec());
        }
        hash.update(&buf[..n]);
        got += n;
    }
}

/// Answers the first CONNECT with "done" and END_STREAM and drops the stream
/// unread (h2 then resets it with NO_ERROR); echoes every later one.
#[derive(Clone, Default)]
struct AnswerAndDropFirst(Arc<std::sync::atomic::AtomicUsize>);

impl ConnectHandler for AnswerAndDropFirst {
    async fn handle(&self, connect: InboundConnect) {
        if self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
            return Echo.handle(connect).await;
        }
        let mut tunnel = connect.accept().unwrap();
        tunnel.write_all(b"done").await.unwrap();
        tunnel.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_the_server_ended_and_reset_with_no_error_closes_cleanly() {
    init_tracing();
    let mesh = Mesh::new();
    let server = Server::start(
        mesh.server_store.clone(),
        &mesh.server_id,
        AnswerAndDropFirst::default(),
        HboneConfig::default(),
    )
    .await;
    let pool = mesh.pool(HboneConfig::default());
    let mut first = pool.connect(mesh.key(&server), request()).await.unwrap();
    let mut answer = Vec::new();
    first.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"done");
    // A later tunnel's echo on the same connection: frames arrive in order, so the
    // first stream's RST_STREAM(NO_ERROR) has been seen by now.
    let mut second = pool.connect(mesh.key(&server), request()).await.unwrap();
    assert_eq!(echo_once(&mut second, b"x").await, b"x");
    assert_eq!(pool.stats().connections_opened(), 1);
    // Ending our side of a stream the server ended gracefully is no error.
    first.shutdown().await.unwrap();
}
