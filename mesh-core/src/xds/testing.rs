//! A scripted delta ADS server for tests of xDS clients (this crate's and the
//! proxies'): TLS with a test CA leaf for the control plane's identity, every
//! client stream handed to the test, which reads the requests and sends the
//! responses it wants. Behind the `testing` feature.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ambit_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as PbResource,
};
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

use super::Resource;
use crate::SpiffeId;
use crate::control::{ControlPlane, Token};
use crate::testing::{LeafOptions, TestCa, spiffe};
use crate::tls::{ALPN_H2, provider};

/// The token test clients send and [`AdsStream::authorization`] shows.
pub const TEST_TOKEN: &str = "test-node-token";

/// How long a test waits for a stream or a request before failing.
const WAIT: Duration = Duration::from_secs(10);

/// The identity istiod-lite serves with in the default trust domain.
pub fn control_plane_identity() -> SpiffeId {
    spiffe("istio-system", "istiod-lite")
}

/// A TLS 1.3 server config for `identity`, signed by `ca`, no client auth.
pub fn server_tls(ca: &TestCa, identity: &SpiffeId) -> rustls::ServerConfig {
    let (key, chain) = ca.issue_raw(identity, &LeafOptions::default());
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server certificate");
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config
}

/// One client stream, as the test sees it.
#[derive(Debug)]
pub struct AdsStream {
    /// The `authorization` header of the call.
    pub authorization: Option<String>,
    requests: mpsc::UnboundedReceiver<DeltaDiscoveryRequest>,
    responses: mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, tonic::Status>>,
}

impl AdsStream {
    /// The next request of the client; panics after a while without one.
    pub async fn recv(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(WAIT, self.requests.recv())
            .await
            .expect("a request from the client in time")
            .expect("the client's request stream is open")
    }

    /// The next request, if one comes within `wait`.
    pub async fn try_recv(&mut self, wait: Duration) -> Option<DeltaDiscoveryRequest> {
        tokio::time::timeout(wait, self.requests.recv())
            .await
            .ok()
            .flatten()
    }

    /// Sends `response` and returns the client's ACK or NACK of it.
    pub async fn reply_to(&mut self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let nonce = response.nonce.clone();
        self.send(response);
        let reply = self.recv().await;
        assert_eq!(
            reply.response_nonce, nonce,
            "the reply answers the response"
        );
        reply
    }

    pub fn send(&self, response: DeltaDiscoveryResponse) {
        let _ = self.responses.send(Ok(response));
    }

    /// Ends the stream with `status` (the client then reconnects).
    pub fn fail(self, status: tonic::Status) {
        let _ = self.responses.send(Err(status));
    }

    /// Ends the stream as a restarting server would: UNAVAILABLE with `message`.
    pub fn close(self, message: &str) {
        self.fail(tonic::Status::unavailable(message));
    }
}

/// A response of `type_url` with `nonce`, carrying `resources` and `removed`.
pub fn response(
    type_url: &str,
    nonce: &str,
    resources: Vec<Resource>,
    removed: Vec<String>,
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.to_string(),
        nonce: nonce.to_string(),
        removed_resources: removed,
        resources: resources
            .into_iter()
            .map(|r| {
                let mut pb = PbResource {
                    name: r.name,
                    version: r.version,
                    resource: Some(Default::default()),
                    ..Default::default()
                };
                if let Some(any) = pb.resource.as_mut() {
                    any.type_url = type_url.to_string();
                    any.value = r.body.clone();
                }
                pb
            })
            .collect(),
        ..Default::default()
    }
}

/// A running test ADS server on loopback; stopped when dropped.
#[derive(Debug)]
pub struct AdsServer {
    pub addr: SocketAddr,
    roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    streams: mpsc::UnboundedReceiver<AdsStream>,
    tasks: Vec<JoinHandle<()>>,
}

impl AdsServer {
    /// Serves on a free loopback port as [`control_plane_identity`].
    pub async fn start(ca: &TestCa) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::serve(ca, listener)
    }

    /// Serves on `listener` (e.g. the port of a stopped server).
    pub fn serve(ca: &TestCa, listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("local address");
        let tls = TlsAcceptor::from(Arc::new(server_tls(ca, &control_plane_identity())));
        let (conn_tx, mut conn_rx) = mpsc::channel::<TlsConn>(16);
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let tls = tls.clone();
                let conn_tx = conn_tx.clone();
                tokio::spawn(async move {
                    if let Ok(stream) = tls.accept(tcp).await {
                        let _ = conn_tx.send(TlsConn(Box::new(stream))).await;
                    }
                });
            }
        });
        let incoming = futures_util::StreamExt::map(
            futures_util::stream::poll_fn(move |cx| conn_rx.poll_recv(cx)),
            Ok::<TlsConn, std::io::Error>,
        );
        let (stream_tx, streams) = mpsc::unbounded_channel();
        let service = AggregatedDiscoveryServiceServer::new(FakeAds { streams: stream_tx })
            .max_decoding_message_size(super::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(super::MAX_MESSAGE_SIZE);
        let serve = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .serve_with_incoming(service, incoming)
                .await;
        });
        Self {
            addr,
            roots: vec![ca.root()],
            streams,
            tasks: vec![accept, serve],
        }
    }

    /// How a client reaches and trusts this server (with [`TEST_TOKEN`]).
    pub fn control_plane(&self) -> ControlPlane {
        ControlPlane {
            address: self.addr.to_string(),
            identity: control_plane_identity(),
            roots: self.roots.clone(),
            token: Token::Static(TEST_TOKEN.to_string()),
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// The next client stream; panics after a while without one.
    pub async fn accept(&mut self) -> AdsStream {
        tokio::time::timeout(WAIT, self.streams.recv())
            .await
            .expect("a client stream in time")
            .expect("the server is running")
    }
}

impl Drop for AdsServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct FakeAds {
    streams: mpsc::UnboundedSender<AdsStream>,
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeAds {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<ResponseStream>, tonic::Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut inbound = request.into_inner();
        let (req_tx, requests) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                if req_tx.send(r).is_err() {
                    return;
                }
            }
        });
        let (responses, mut resp_rx) = mpsc::unbounded_channel();
        self.streams
            .send(AdsStream {
                authorization,
                requests,
                responses,
            })
            .map_err(|_| tonic::Status::unavailable("the test is gone"))?;
        let out = futures_util::stream::poll_fn(move |cx| resp_rx.poll_recv(cx));
        Ok(tonic::Response::new(Box::pin(out)))
    }
}

/// An accepted TLS connection, in the shape tonic's server takes.
struct TlsConn(Box<tokio_rustls::server::TlsStream<TcpStream>>);

impl Connected for TlsConn {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(self.get_mut().0.as_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_shutdown(cx)
    }
}
