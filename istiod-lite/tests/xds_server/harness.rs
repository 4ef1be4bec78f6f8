//! What the xDS server tests share: a server on loopback TCP with a test
//! authenticator (`good-<node>` tokens), and one delta ADS stream seen from the
//! client side.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_proto::envoy::config::core::v3::Node;
use ambit_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use bytes::Bytes;
use istiod_lite::auth::{AuthError, Authenticator, Caller};
use istiod_lite::xds::{
    ResourceStore, ResourceUpdate, XdsDebug, XdsMetrics, XdsServer, XdsSettings, serve,
};
use mesh_core::drain::{self, DrainTrigger};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

pub(crate) const W: &str = ambit_proto::WORKLOAD_TYPE_URL;
pub(crate) const S: &str = ambit_proto::SERVICE_TYPE_URL;
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// Tokens `good-<node>` are valid for `<node>`; nothing else is.
pub(crate) struct TestAuth;

impl Authenticator for TestAuth {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        let node = token
            .strip_prefix("good-")
            .ok_or_else(|| AuthError::Invalid("unknown token".into()))?;
        Ok(Caller {
            node: node.into(),
            principal: format!("test:{node}"),
        })
    }
}

pub(crate) fn put(type_url: &'static str, name: &str, body: &str) -> ResourceUpdate {
    ResourceUpdate {
        type_url,
        name: name.into(),
        body: Some(Bytes::from(body.to_string())),
    }
}

pub(crate) fn del(type_url: &'static str, name: &str) -> ResourceUpdate {
    ResourceUpdate {
        type_url,
        name: name.into(),
        body: None,
    }
}

pub(crate) struct Mesh {
    pub(crate) server: XdsServer,
    pub(crate) addr: SocketAddr,
    pub(crate) registry: prometheus_client::registry::Registry,
    _trigger: DrainTrigger,
}

pub(crate) fn fast_settings() -> XdsSettings {
    XdsSettings {
        debounce_quiet: Duration::from_millis(10),
        debounce_max: Duration::from_millis(50),
        ..Default::default()
    }
}

pub(crate) async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Mesh {
    start_with(fast_settings(), tls).await
}

pub(crate) async fn start_with(
    settings: XdsSettings,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Mesh {
    let (trigger, watcher) = drain::channel();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = XdsMetrics::new(&mut registry);
    let store = Arc::new(ResourceStore::new());
    let (server, service) =
        XdsServer::new(store, settings, TestAuth, metrics, watcher.clone()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, tls, service, watcher));
    Mesh {
        server,
        addr,
        registry,
        _trigger: trigger,
    }
}

/// One delta ADS stream seen from the client side.
pub(crate) struct Stream {
    pub(crate) tx: mpsc::Sender<DeltaDiscoveryRequest>,
    pub(crate) rx: Streaming<DeltaDiscoveryResponse>,
    /// The node of the stream's token: the `node.id` its requests carry.
    node: Option<String>,
}

pub(crate) async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub(crate) async fn open(channel: Channel, token: Option<&str>) -> Result<Stream, tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let rx = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .delta_aggregated_resources(request)
        .await?
        .into_inner();
    let node = token
        .and_then(|t| t.strip_prefix("good-"))
        .map(str::to_string);
    Ok(Stream { tx, rx, node })
}

pub(crate) async fn connect(addr: SocketAddr, node: &str) -> Stream {
    open(channel(addr).await, Some(&format!("good-{node}")))
        .await
        .unwrap()
}

/// A subscription request; [`Stream::send`] adds the stream's node.
pub(crate) fn subscribe(type_url: &str, names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

impl Stream {
    /// Sends `req`, naming the stream's node unless it names one itself.
    pub(crate) async fn send(&self, mut req: DeltaDiscoveryRequest) {
        if req.node.is_none() {
            req.node = self.node.clone().map(|id| Node {
                id,
                ..Default::default()
            });
        }
        self.tx.send(req).await.unwrap();
    }

    pub(crate) async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("a response in time")
            .unwrap()
            .unwrap()
    }

    pub(crate) async fn ack(&self, resp: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    /// Asserts nothing arrives for a moment (used after the expected responses).
    pub(crate) async fn quiet(&mut self) {
        let next = tokio::time::timeout(Duration::from_millis(300), self.rx.message()).await;
        assert!(next.is_err(), "unexpected response: {next:?}");
    }
}

pub(crate) fn names(resp: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut n: Vec<String> = resp.resources.iter().map(|r| r.name.clone()).collect();
    n.sort();
    n
}

pub(crate) async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(crate) fn client_of<'a>(
    debug: &'a XdsDebug,
    node: &str,
) -> Option<&'a istiod_lite::xds::ClientDebug> {
    debug.clients.iter().find(|c| c.caller.node == node)
}
