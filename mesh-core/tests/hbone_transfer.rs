//! HBONE round trips over loopback with real mTLS: bytes both ways, a 256 MiB
//! transfer checked by hash, and half-close in each direction.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod support;

use mesh_core::hbone::{ConnectHandler, HboneConfig, InboundConnect, SourceMetadata};
use mesh_core::testing::spiffe;
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

    let writer = tokio::spawn(async move {
        let mut hash = Sha256::new();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0;
        while sent < TOTAL {
            fill(&mut state, &mut buf);
            hash.update(&buf);
            wr.write_all(&buf).await.unwrap();
            sent += buf.len();
        }
        wr.shutdown().await.unwrap();
        hash.finalize()
    });
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0;
    loop {
        let n = rd.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        received += n;
    }
    assert_eq!(received, TOTAL);
    assert_eq!(hash.finalize(), writer.await.unwrap());
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
