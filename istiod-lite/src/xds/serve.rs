//! Serves gRPC (the xDS and CA services) on a TCP listener, optionally over TLS:
//! a bounded number of connections, TLS handshakes off the accept loop (a failed
//! one is logged and the listener keeps going), and shutdown on drain.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use mesh_core::drain::DrainWatcher;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Connections served at once; the accept loop waits for a slot beyond it.
pub const MAX_CONNECTIONS: usize = 16_384;

/// HTTP/2 streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS):
/// a client past it waits for one of its own streams to end.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// A TLS handshake taking longer than this is abandoned.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted connections handed to the gRPC server but not yet picked up.
const ACCEPT_BACKLOG: usize = 64;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// An accepted connection, plain or TLS, holding its connection slot.
#[derive(Debug)]
pub struct ServerIo {
    stream: Stream,
    info: TcpConnectInfo,
    _slot: OwnedSemaphorePermit,
}

#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connected for ServerIo {
    // The TCP info, so `Request::remote_addr` works over TLS too.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Serves `service` (a tonic service or a set of routes) on `listener` until
/// `drain` signals, then shuts down gracefully. With `tls`, every connection is
/// TLS; a failed handshake is logged and the listener keeps serving.
pub async fn serve<S, B>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    service: S,
    drain: DrainWatcher,
) -> Result<(), ServeError>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let local = listener.local_addr().ok();
    tracing::info!(addr = ?local, tls = tls.is_some(), "gRPC server listening");
    let (conn_tx, conn_rx) = mpsc::channel(ACCEPT_BACKLOG);
    let acceptor = tls.map(TlsAcceptor::from);
    tokio::spawn(accept_loop(listener, acceptor, conn_tx, drain.clone()));
    let incoming = ReceiverStream::new(conn_rx).map(Ok::<ServerIo, io::Error>);
    tonic::transport::Server::builder()
        // A connection's streams at once: a proxy holds one xDS stream and a few
        // certificate calls; without a bound, one connection could hold
        // thousands of half-sent requests in memory.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .serve_with_incoming_shutdown(service, incoming, drain.signaled())
        .await?;
    tracing::info!(addr = ?local, "gRPC server stopped");
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    conns: mpsc::Sender<ServerIo>,
    drain: DrainWatcher,
) {
    // Locals drop in reverse order, and before parameters: so the listener is
    // closed before the drain watcher goes, and a drain that has ended means
    // the port is free (a restart can bind it at once).
    let drain = drain;
    let listener = listener;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            _ = drain.signaled() => return,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = drain.signaled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors and the like: wait a little, keep serving.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let info = TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: Some(peer),
        };
        match &acceptor {
            None => {
                let io = ServerIo {
                    stream: Stream::Plain(tcp),
                    info,
                    _slot: slot,
                };
                if conns.send(io).await.is_err() {
                    return;
                }
            }
            Some(acceptor) => {
                let handshake = acceptor.accept(tcp);
                let conns = conns.clone();
                let drain = drain.clone();
                tokio::spawn(async move {
                    let tls = tokio::select! {
                        _ = drain.signaled() => return,
                        tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => tls,
                    };
                    match tls {
                        Ok(Ok(tls)) => {
                            let io = ServerIo {
                                stream: Stream::Tls(Box::new(tls)),
                                info,
                                _slot: slot,
                            };
                            let _ = conns.send(io).await;
                        }
                        Ok(Err(error)) => tracing::warn!(
                            %peer,
                            error = %mesh_core::tls::describe_io_error(&error),
                            "TLS handshake failed"
                        ),
                        Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
}
