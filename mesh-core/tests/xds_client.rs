//! The delta xDS client against a scripted ADS server over TLS: wildcard
//! subscriptions, ACK, NACK with the refused resource named while the rest
//! applies, resumption from the accepted versions, and backoff.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use ambit_proto::{SERVICE_TYPE_URL, WORKLOAD_TYPE_URL};
use bytes::Bytes;
use mesh_core::drain::{self, DrainTrigger};
use mesh_core::testing::TestCa;
use mesh_core::xds::testing::{AdsServer, AdsStream, TEST_TOKEN, response};
use mesh_core::xds::{
    BackoffConfig, Handler, Node, Refusal, Resource, XdsClient, XdsSnapshot, XdsStatus,
};
use tokio::sync::watch;

/// Records what it applies; refuses the names in `refuse`.
#[derive(Debug, Default)]
struct Recorder {
    applied: Mutex<HashMap<String, Bytes>>,
    removed: Mutex<Vec<String>>,
    refuse: Mutex<HashSet<String>>,
    /// Refused names it keeps to apply later (`Handler::holds_back`).
    hold: Mutex<HashSet<String>>,
}

impl Handler for Recorder {
    fn apply(
        &self,
        _type_url: &str,
        updated: Vec<Resource>,
        removed: Vec<String>,
    ) -> Result<(), Vec<Refusal>> {
        let refuse = self.refuse.lock().unwrap();
        let mut refused = Vec::new();
        let mut applied = self.applied.lock().unwrap();
        for r in updated {
            if refuse.contains(&r.name) {
                refused.push((r.name, "field addresses: 3 bytes is not an IP".to_string()));
            } else {
                applied.insert(r.name, r.body);
            }
        }
        for name in removed {
            applied.remove(&name);
            self.removed.lock().unwrap().push(name);
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(refused)
        }
    }

    fn holds_back(&self, _type_url: &str, name: &str) -> bool {
        self.hold.lock().unwrap().contains(name)
    }
}

fn res(name: &str, version: &str) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        body: Bytes::from(format!("{name}@{version}")),
    }
}

fn node() -> Node {
    Node {
        id: "node-1".into(),
        cluster: "test".into(),
        metadata: None,
    }
}

struct Running {
    recorder: Arc<Recorder>,
    status: XdsStatus,
    synced: watch::Receiver<bool>,
    drain: DrainTrigger,
    task: tokio::task::JoinHandle<()>,
}

fn start(server: &AdsServer) -> Running {
    let recorder = Arc::new(Recorder::default());
    let client = XdsClient::new(
        &server.control_plane(),
        node(),
        vec![WORKLOAD_TYPE_URL, SERVICE_TYPE_URL],
        recorder.clone(),
    )
    .unwrap()
    .with_backoff(BackoffConfig {
        min: Duration::from_millis(10),
        ..BackoffConfig::default()
    });
    let status = client.status();
    let synced = client.synced();
    let (drain, watcher) = drain::channel();
    let task = tokio::spawn(client.run(watcher));
    Running {
        recorder,
        status,
        synced,
        drain,
        task,
    }
}

/// The initial subscriptions of a stream, by type.
async fn subscriptions(stream: &mut AdsStream) -> BTreeMap<String, DeltaDiscoveryRequest> {
    let mut by_type = BTreeMap::new();
    for _ in 0..2 {
        let r = stream.recv().await;
        by_type.insert(r.type_url.clone(), r);
    }
    by_type
}

async fn wait_status(status: &XdsStatus, what: impl Fn(&XdsSnapshot) -> bool) -> XdsSnapshot {
    let mut rx = status.subscribe();
    let waited = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| what(s))).await;
    waited.unwrap().unwrap().clone()
}

#[tokio::test]
async fn subscribes_to_every_type_by_wildcard_and_stops_on_drain() {
    let ca = TestCa::new();
    let mut server = AdsServer::start(&ca).await;
    let client = start(&server);
    let mut stream = server.accept().await;
    assert_eq!(
        stream.authorization.as_deref(),
        Some(format!("Bearer {TEST_TOKEN}").as_str())
    );
    let subs = subscriptions(&mut stream).await;
    assert_eq!(
        subs.keys().map(String::as_str).collect::<Vec<_>>(),
        [SERVICE_TYPE_URL, WORKLOAD_TYPE_URL]
    );
    for r in subs.values() {
        assert_eq!(r.resource_names_subscribe, ["*"]);
        assert!(r.initial_resource_versions.is_empty());
        assert!(r.response_nonce.is_empty() && r.error_detail.is_none());
        assert_eq!(r.node.as_ref().unwrap().id, "node-1");
    }
    let s = wait_status(&client.status, |s| s.connected).await;
    assert_eq!(s.streams, 1);
    assert!(!s.synced && !*client.synced.borrow());

    client.drain.drain(Duration::from_secs(5)).await;
    client.task.await.unwrap();
    assert!(!client.status.snapshot().connected);
}

#[tokio::test]
async fn acks_a_good_response_and_is_synced_after_every_type() {
    let ca = TestCa::new();
    let mut server = AdsServer::start(&ca).await;
    let mut client = start(&server);
    let mut stream = server.accept().await;
    subscriptions(&mut stream).await;

    stream.send(response(
        WORKLOAD_TYPE_URL,
        "n1",
        vec![res("a", "1"), res("b", "1")],
        vec![],
    ));
    let ack = stream.recv().await;
    assert_eq!(ack.type_url, WORKLOAD_TYPE_URL);
    assert_eq!(ack.response_nonce, "n1");
    assert!(ack.error_detail.is_none());
    assert_eq!(
        client.recorder.applied.lock().unwrap()["a"],
        Bytes::from("a@1")
    );
    let s = client.status.snapshot();
    assert_eq!(s.types[WORKLOAD_TYPE_URL].resources, 2);
    assert_eq!(
        s.types[WORKLOAD_TYPE_URL].last_ack.as_ref().unwrap().0,
        "n1"
    );
    assert!(!*client.synced.borrow(), "one type is still unanswered");

    // A part of a split first sync (more to come) does not count...
    let mut part = response(SERVICE_TYPE_URL, "n2", vec![res("s1", "1")], vec![]);
    part.system_version_info = format!("7{}", mesh_core::xds::MORE_TO_COME);
    stream.send(part);
    assert_eq!(stream.recv().await.response_nonce, "n2");
    assert!(
        !*client.synced.borrow(),
        "the service type's sync is not over"
    );
    assert!(!client.status.snapshot().synced);
    // ...its last part does (here empty: an empty first response counts too).
    stream.send(response(SERVICE_TYPE_URL, "n3", vec![], vec![]));
    assert_eq!(stream.recv().await.response_nonce, "n3");
    tokio::time::timeout(Duration::from_secs(5), client.synced.wait_for(|s| *s))
        .await
        .unwrap()
        .unwrap();
    assert!(client.status.snapshot().synced);
}

#[tokio::test]
async fn nacks_the_refused_resource_while_the_others_apply() {
    let ca = TestCa::new();
    let mut server = AdsServer::start(&ca).await;
    let client = start(&server);
    let mut stream = server.accept().await;
    subscriptions(&mut stream).await;
    client.recorder.refuse.lock().unwrap().insert("bad".into());

    stream.send(response(
        WORKLOAD_TYPE_URL,
        "n1",
        vec![res("good", "1"), res("bad", "1")],
        vec![],
    ));
    let nack = stream.recv().await;
    assert_eq!(nack.response_nonce, "n1");
    let detail = nack.error_detail.unwrap();
    assert_eq!(detail.code, 3, "INVALID_ARGUMENT");
    assert!(
        detail.message.contains("bad: field addresses"),
        "{}",
        detail.message
    );
    assert!(!detail.message.contains("good"), "{}", detail.message);
    assert!(client.recorder.applied.lock().unwrap().contains_key("good"));

    let s = client.status.snapshot();
    let t = &s.types[WORKLOAD_TYPE_URL];
    assert_eq!(t.resources, 1, "only the accepted resource is held");
    assert_eq!(t.last_nack.as_ref().unwrap().nonce, "n1");
    assert!(t.last_ack.is_none());

    // A resource without a body is refused by the client itself.
    let mut empty = response(WORKLOAD_TYPE_URL, "n2", vec![res("x", "1")], vec![]);
    empty.resources[0].resource = None;
    let nack = stream.reply_to(empty).await;
    assert!(
        nack.error_detail
            .unwrap()
            .message
            .contains("x: the resource has no body")
    );
}

#[tokio::test]
async fn reconnects_with_the_versions_it_accepted() {
    let ca = TestCa::new();
    let mut server = AdsServer::start(&ca).await;
    let client = start(&server);
    let mut stream = server.accept().await;
    subscriptions(&mut stream).await;

    let ok = stream
        .reply_to(response(
            WORKLOAD_TYPE_URL,
            "n1",
            vec![res("a", "1"), res("b", "1"), res("gone", "1")],
            vec![],
        ))
        .await;
    assert!(ok.error_detail.is_none());
    // a@2 is refused: a stays at version 1; c is new and refused: not held;
    // h is refused but held back by the handler: held at its version.
    client.recorder.refuse.lock().unwrap().extend([
        "a".to_string(),
        "c".to_string(),
        "h".to_string(),
    ]);
    client.recorder.hold.lock().unwrap().insert("h".to_string());
    let nack = stream
        .reply_to(response(
            WORKLOAD_TYPE_URL,
            "n2",
            vec![res("a", "2"), res("b", "2"), res("c", "1"), res("h", "1")],
            vec!["gone".into()],
        ))
        .await;
    assert!(nack.error_detail.is_some());
    assert_eq!(
        client.recorder.applied.lock().unwrap()["a"],
        Bytes::from("a@1")
    );
    stream
        .reply_to(response(
            SERVICE_TYPE_URL,
            "n3",
            vec![res("svc", "7")],
            vec![],
        ))
        .await;

    stream.close("control plane restarting");
    let mut again = server.accept().await;
    let subs = subscriptions(&mut again).await;
    let versions = |t: &str| -> BTreeMap<String, String> {
        subs[t]
            .initial_resource_versions
            .clone()
            .into_iter()
            .collect()
    };
    assert_eq!(
        versions(WORKLOAD_TYPE_URL),
        BTreeMap::from([
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
            ("h".into(), "1".into())
        ])
    );
    assert_eq!(
        versions(SERVICE_TYPE_URL),
        BTreeMap::from([("svc".into(), "7".into())])
    );
    let s = wait_status(&client.status, |s| s.streams == 2 && s.connected).await;
    assert!(
        s.last_error
            .as_deref()
            .unwrap()
            .contains("control plane restarting"),
        "{:?}",
        s.last_error
    );
    assert!(s.synced, "synced stays true across a reconnect");
}

#[tokio::test(start_paused = true)]
async fn backs_off_exponentially_on_a_refused_connection_and_never_gives_up() {
    let ca = TestCa::new();
    // A port nothing listens on.
    let server = AdsServer::start(&ca).await;
    let mut control = server.control_plane();
    drop(server);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    control.address = closed.local_addr().unwrap().to_string();
    drop(closed);

    let client = XdsClient::new(
        &control,
        node(),
        vec![WORKLOAD_TYPE_URL],
        Recorder::default(),
    )
    .unwrap();
    let status = client.status();
    let mut rx = status.subscribe();
    let (_drain, watcher) = drain::channel();
    tokio::spawn(client.run(watcher));

    let mut last_failure = tokio::time::Instant::now();
    let mut last_delay = Duration::ZERO;
    for n in 1..=10u32 {
        rx.wait_for(|s| s.failures == n).await.unwrap();
        let s = rx.borrow().clone();
        let now = tokio::time::Instant::now();
        if n > 1 {
            assert!(
                now - last_failure >= last_delay,
                "attempt {n} came {:?} after a failure that chose {last_delay:?}",
                now - last_failure
            );
        }
        let nominal = Duration::from_millis(100)
            .saturating_mul(1 << (n - 1))
            .min(Duration::from_secs(15));
        let delay = s.retry_in.unwrap();
        assert!(
            delay >= nominal * 4 / 5 && delay <= nominal * 6 / 5,
            "failure {n}: {delay:?} for a nominal {nominal:?}"
        );
        assert!(!s.connected && s.last_error.is_some());
        last_failure = now;
        last_delay = delay;
    }
}
