//! Shared fixtures of the HBONE integration tests: a test CA, servers on loopback
//! with simple handlers, and a wait-for-condition helper.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::drain::{self, DrainTrigger};
use mesh_core::hbone::{
    ConnectHandler, ConnectRequest, H2Stream, HboneConfig, HbonePool, HboneServer, InboundConnect,
    PoolKey, ServerStats,
};
use mesh_core::testing::{TestCa, spiffe};
use mesh_core::{CertStore, SpiffeId, tls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Accepts every CONNECT and echoes the tunnel's bytes back, half-close included.
#[derive(Clone, Debug, Default)]
pub struct Echo;

impl ConnectHandler for Echo {
    async fn handle(&self, connect: InboundConnect) {
        let Ok(stream) = connect.accept() else { return };
        let (mut r, mut w) = tokio::io::split(stream);
        if tokio::io::copy(&mut r, &mut w).await.is_ok() {
            let _ = w.shutdown().await;
        }
    }
}

/// A running server and what the tests look at.
pub struct Server {
    pub addr: SocketAddr,
    pub stats: Arc<ServerStats>,
    pub drain: Option<DrainTrigger>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn start<H: ConnectHandler>(
        store: Arc<CertStore>,
        id: &SpiffeId,
        handler: H,
        config: HboneConfig,
    ) -> Self {
        let tls = tls::server_config(store, id).expect("server TLS config");
        Self::start_with_tls(tls, handler, config).await
    }

    pub async fn start_with_tls<H: ConnectHandler>(
        tls: rustls::ServerConfig,
        handler: H,
        config: HboneConfig,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = HboneServer::new(listener, tls, handler, config);
        let addr = server.local_addr().unwrap();
        let stats = server.stats();
        let (trigger, watcher) = drain::channel();
        let task = tokio::spawn(server.run(watcher));
        Self {
            addr,
            stats,
            drain: Some(trigger),
            task,
        }
    }
}

/// A CA, a server identity and a client identity with their stores.
pub struct Mesh {
    pub ca: TestCa,
    pub server_id: SpiffeId,
    pub client_id: SpiffeId,
    pub server_store: Arc<CertStore>,
    pub client_store: Arc<CertStore>,
}

impl Mesh {
    pub fn new() -> Self {
        let ca = TestCa::new();
        let server_id = spiffe("backend", "server");
        let client_id = spiffe("frontend", "client");
        let server_store = ca.store_for(&[&server_id]);
        let client_store = ca.store_for(&[&client_id]);
        Self {
            ca,
            server_id,
            client_id,
            server_store,
            client_store,
        }
    }

    pub async fn echo_server(&self, config: HboneConfig) -> Server {
        Server::start(self.server_store.clone(), &self.server_id, Echo, config).await
    }

    pub fn pool(&self, config: HboneConfig) -> HbonePool {
        HbonePool::new(self.client_store.clone(), config)
    }

    pub fn key(&self, server: &Server) -> PoolKey {
        PoolKey::new(
            self.client_id.clone(),
            vec![self.server_id.clone()],
            server.addr,
        )
    }
}

/// A CONNECT to an address in the test range (the echo handler ignores it).
pub fn request() -> ConnectRequest {
    ConnectRequest::new("198.18.0.10:8080".parse().unwrap())
}

/// Writes `msg`, reads the same number of bytes back.
pub async fn echo_once(stream: &mut H2Stream, msg: &[u8]) -> Vec<u8> {
    stream.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    stream.read_exact(&mut back).await.unwrap();
    back
}

/// Polls `cond` until it holds, failing the test after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Logs to the test output when RUST_LOG is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
