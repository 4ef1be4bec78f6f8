//! The mesh path: one HBONE tunnel over 127.0.0.1 with real mTLS, from an
//! [`HbonePool`] client to an [`HboneServer`] whose handler reads and discards.
//! The pooled HTTP/2 connection is opened once (TLS handshake included) and reused;
//! each transfer is a new CONNECT tunnel on it, as ztunnel reuses its connections.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use mesh_core::drain::{self, DrainTrigger};
use mesh_core::hbone::{
    ConnectHandler, ConnectRequest, HboneConfig, HbonePool, HboneServer, InboundConnect, PoolKey,
};
use mesh_core::testing::{TestCa, spiffe};
use mesh_core::tls;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::load::{self, Received};
use crate::{BenchError, Path, Sample};

/// The `:authority` of every tunnel, in the benchmarking range; the handler ignores it.
const TARGET: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10)), 8080);
/// Tunnel receptions reported and not yet read; one transfer runs at a time.
const REPORTS: usize = 4;

/// A client pool, a server on loopback, and the channel the server's handler reports
/// each tunnel's reception on.
#[derive(Debug)]
pub struct MeshPath {
    pool: HbonePool,
    key: PoolKey,
    received: tokio::sync::Mutex<mpsc::Receiver<io::Result<Received>>>,
    write_buffer: usize,
    // Dropped with the path; the server task is aborted then too.
    _drain: DrainTrigger,
    server: JoinHandle<()>,
}

impl MeshPath {
    /// Mints a client and a server identity from a fresh test CA and starts the
    /// server on `receiver`; the client runs where this is called.
    pub async fn new(
        config: HboneConfig,
        write_buffer: usize,
        read_buffer: usize,
        receiver: Handle,
    ) -> Result<Self, BenchError> {
        let ca = TestCa::new();
        let server_id = spiffe("bench", "server");
        let client_id = spiffe("bench", "client");
        let tls = tls::server_config(ca.store_for(&[&server_id]), &server_id)?;
        let (report, received) = mpsc::channel(REPORTS);
        let handler = Discard {
            report,
            read_buffer,
        };
        let (trigger, watcher) = drain::channel();
        let server_config = config.clone();
        let (addr, server) = receiver
            .spawn(async move {
                let listener = TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(BenchError::io("bind the HBONE listener"))?;
                let server = HboneServer::new(listener, tls, handler, server_config);
                let addr = server
                    .local_addr()
                    .map_err(BenchError::io("HBONE listener address"))?;
                Ok::<_, BenchError>((addr, tokio::spawn(server.run(watcher))))
            })
            .await??;
        Ok(Self {
            pool: HbonePool::new(ca.store_for(&[&client_id]), config),
            key: PoolKey::new(client_id, vec![server_id], addr),
            received: tokio::sync::Mutex::new(received),
            write_buffer,
            _drain: trigger,
            server,
        })
    }
}

impl MeshPath {
    /// HBONE connections (TLS handshakes) the client has opened so far.
    pub fn connections_opened(&self) -> u64 {
        self.pool.stats().connections_opened()
    }
}

impl Drop for MeshPath {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Path for MeshPath {
    async fn transfer(&self, bytes: u64) -> Result<Sample, BenchError> {
        // One transfer at a time: the next report on the channel is this tunnel's.
        let mut received = self.received.lock().await;
        let mut tunnel = self
            .pool
            .connect(self.key.clone(), ConnectRequest::new(TARGET))
            .await?;
        let start = Instant::now();
        load::send(&mut tunnel, bytes, self.write_buffer)
            .await
            .map_err(BenchError::io("tunnel send"))?;
        let got = received
            .recv()
            .await
            .ok_or(BenchError::ReceiverGone)?
            .map_err(BenchError::io("tunnel receive"))?;
        // The server ends its side once it has everything; dropping the tunnel earlier
        // would reset the stream.
        load::receive(&mut tunnel, 16 << 10)
            .await
            .map_err(BenchError::io("tunnel close"))?;
        Sample::of(bytes, start, got)
    }
}

/// Accepts every CONNECT, reads the tunnel to its end, reports, and closes its side.
#[derive(Debug)]
struct Discard {
    report: mpsc::Sender<io::Result<Received>>,
    read_buffer: usize,
}

impl ConnectHandler for Discard {
    async fn handle(&self, connect: InboundConnect) {
        let Ok(mut tunnel) = connect.accept() else {
            return;
        };
        let received = load::receive(&mut tunnel, self.read_buffer).await;
        let _ = self.report.send(received).await;
        let _ = tunnel.shutdown().await;
    }
}
