//! Unit tests of a stream's task without the network: requests go in through a
//! channel, responses come out of the one the gRPC service would send, on
//! tokio's paused clock.

use std::sync::Arc;
use std::time::Duration;

use ambit_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_core::drain::{self, DrainTrigger};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::tests::{NoAuth, caller, del, names, put, req};
use super::*;

type Responses = mpsc::Receiver<Result<DeltaDiscoveryResponse, Status>>;

/// A server over `store` and one stream of node-a's into it.
struct Harness {
    server: XdsServer,
    requests: mpsc::Sender<Result<DeltaDiscoveryRequest, Status>>,
    responses: Responses,
    trigger: Option<DrainTrigger>,
}

fn start(store: Arc<ResourceStore>, settings: XdsSettings) -> Harness {
    let (trigger, watcher) = drain::channel();
    let (server, _service) =
        XdsServer::new(store, settings, NoAuth, XdsMetrics::unregistered(), watcher).unwrap();
    let (requests, rx) = mpsc::channel(16);
    let responses = server
        .open_stream(caller(), Box::pin(ReceiverStream::new(rx)))
        .unwrap();
    Harness {
        server,
        requests,
        responses,
        trigger: Some(trigger),
    }
}

impl Harness {
    async fn send(&self, request: DeltaDiscoveryRequest) {
        self.requests.send(Ok(request)).await.unwrap();
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        self.responses.recv().await.unwrap().unwrap()
    }

    async fn ack(&self, response: &DeltaDiscoveryResponse) {
        let mut ack = req(&[]);
        ack.response_nonce = response.nonce.clone();
        self.send(ack).await;
    }
}

fn quick() -> XdsSettings {
    XdsSettings {
        debounce_quiet: Duration::from_millis(10),
        debounce_max: Duration::from_millis(50),
        ..XdsSettings::default()
    }
}

/// A client that stops answering is closed after `answer_timeout`: open, it
/// would hold one of its node's streams and, its walk stuck where it stopped,
/// every removal tombstone after it.
#[tokio::test(start_paused = true)]
async fn a_stream_that_stops_answering_is_closed_and_its_tombstones_go() {
    let store = Arc::new(ResourceStore::new());
    store.apply(vec![put("a", "1"), put("b", "1")]);
    let settings = XdsSettings {
        client_queue: 1,
        answer_timeout: Duration::from_secs(60),
        ..quick()
    };
    let mut h = start(store.clone(), settings);
    h.send(req(&[])).await;
    let first = h.recv().await;
    assert_eq!(names(&first), ["a", "b"]);
    h.ack(&first).await;

    // The push of a's removal is never answered: b's removal cannot follow.
    h.server.apply(vec![del("a")]);
    assert_eq!(h.recv().await.removed_resources, ["a"]);
    let sent = tokio::time::Instant::now();
    h.server.apply(vec![del("b")]);
    store.wait_released(store.generation()).await;
    assert_eq!(store.drop_tombstones_before(0), 2, "both held back");

    let early = tokio::time::timeout(Duration::from_secs(59), h.responses.recv()).await;
    assert!(early.is_err(), "still open before the bound: {early:?}");
    let status = tokio::time::timeout(Duration::from_secs(3600), h.responses.recv())
        .await
        .expect("closed after the bound")
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");
    assert!(h.responses.recv().await.is_none(), "the stream ends");
    assert!(sent.elapsed() >= Duration::from_secs(60));
    assert_eq!(h.server.connected_clients(), 0);

    // The next collection no longer waits for it.
    h.server.apply(vec![put("c", "1")]);
    store.wait_released(store.generation()).await;
    assert_eq!(store.drop_tombstones_before(0), 0);
}

/// A client can answer the responses queued for it without reading them (their
/// nonces are easy to guess), then stop reading: the stream's task waits for
/// room in the queue, and that wait must still end when the server drains.
#[tokio::test(start_paused = true)]
async fn a_stream_that_stops_reading_still_ends_on_drain() {
    let store = Arc::new(ResourceStore::new());
    let body = "x".repeat(100);
    store.apply((0..3).map(|i| put(&format!("r{i}"), &body)).collect());
    // A long answer timeout: only the drain can end the wait here.
    let settings = XdsSettings {
        client_queue: 1,
        max_response_bytes: 100,
        answer_timeout: Duration::from_secs(3600),
        ..quick()
    };
    let mut h = start(store, settings);
    h.send(req(&[])).await;
    // On the paused clock, this returns once every task is waiting.
    let settle = || tokio::time::sleep(Duration::from_millis(1));
    settle().await;
    // The first part is queued, unread; its answer lets the second be built,
    // with no room for it in the queue.
    let mut ack = req(&[]);
    ack.response_nonce = "1-1".into();
    h.send(ack).await;
    settle().await;
    let types = &h.server.debug_snapshot().clients[0].types;
    assert_eq!((types[0].acks, types[0].responses_sent), (1, 1));

    let trigger = h.trigger.take().unwrap();
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        trigger.drain(Duration::from_secs(5)).await;
        while h.server.connected_clients() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(drained.is_ok(), "the stream's task ended");
    assert_eq!(names(&h.recv().await), ["r0"]);
    assert!(h.responses.recv().await.is_none());
}
