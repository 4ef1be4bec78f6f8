//! Unit tests of the xDS pieces without a network: the store's versioning, the
//! debounce timing (paused clock), the fan-out, and one client's protocol state.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ambit_proto::envoy::config::core::v3::Node;
use ambit_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use ambit_proto::google::rpc;
use bytes::Bytes;
use tokio::time::Instant;

use super::client::{ClientState, Feedback, Limits};
use super::debounce::Debounce;
use super::store::lock;
use super::*;
use crate::auth::Caller;

pub(super) const T: &str = ambit_proto::WORKLOAD_TYPE_URL;

pub(super) fn put(name: &str, body: &str) -> ResourceUpdate {
    ResourceUpdate {
        type_url: T,
        name: name.into(),
        body: Some(Bytes::from(body.to_string())),
    }
}

pub(super) fn del(name: &str) -> ResourceUpdate {
    ResourceUpdate {
        type_url: T,
        name: name.into(),
        body: None,
    }
}

pub(super) fn caller() -> Caller {
    Caller {
        node: "node-a".into(),
        principal: "node-token:node-a".into(),
    }
}

pub(super) fn client(max_response_bytes: usize) -> ClientState {
    client_with_names(max_response_bytes, 1 << 16)
}

pub(super) fn client_with_names(max_response_bytes: usize, max_names: usize) -> ClientState {
    ClientState::new(
        7,
        caller(),
        None,
        Limits {
            max_names_per_type: max_names,
            max_response_bytes,
            max_in_flight: 4,
        },
    )
}

pub(super) fn req(subscribe: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: "node-a".into(),
            ..Default::default()
        }),
        type_url: T.into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub(super) fn names(resp: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut n: Vec<String> = resp.resources.iter().map(|r| r.name.clone()).collect();
    n.sort();
    n
}

/// Which of `responses` say more parts of the first sync follow.
fn more_to_come(responses: &[DeltaDiscoveryResponse]) -> Vec<bool> {
    responses
        .iter()
        .map(|r| {
            r.system_version_info
                .ends_with(mesh_core::xds::MORE_TO_COME)
        })
        .collect()
}

/// Every response the client is owed now.
pub(super) fn drain_responses(
    client: &mut ClientState,
    store: &ResourceStore,
) -> Vec<DeltaDiscoveryResponse> {
    let mut out = Vec::new();
    while let Some(o) = client.next_response(&store.read()) {
        out.push(o.response);
    }
    out
}

#[test]
fn identical_bytes_are_no_change() {
    let store = ResourceStore::new();
    assert_eq!(store.apply(vec![put("a", "1"), put("b", "2")]), 2);
    let (v1, _) = store.get(T, "a").unwrap();
    assert_eq!(store.apply(vec![put("a", "1")]), 0);
    assert_eq!(store.apply(vec![del("missing")]), 0);
    assert_eq!(store.apply(vec![put("a", "other")]), 1);
    assert_ne!(store.get(T, "a").unwrap().0, v1);
    assert_eq!(store.apply(vec![del("b")]), 1);
    assert_eq!(store.len(T), 1);
    assert_eq!(parse_version(&format_version(v1)), Some(v1));
    assert_eq!(parse_version("nope"), None);
    let batch = store.take_pending().unwrap();
    let mut changed = batch.changes[T]
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>();
    changed.sort();
    assert_eq!(changed, ["a", "b"]);
    assert!(store.take_pending().is_none());
}

#[test]
fn settings_are_checked_by_name() {
    assert!(XdsSettings::default().validate().is_ok());
    let bad = XdsSettings {
        client_queue: 0,
        ..Default::default()
    };
    assert_eq!(bad.validate().unwrap_err().name, "client_queue");
    let bad = XdsSettings {
        debounce_max: Duration::from_millis(1),
        ..Default::default()
    };
    assert_eq!(bad.validate().unwrap_err().name, "debounce_max");
    let bad = XdsSettings {
        answer_timeout: Duration::ZERO,
        ..Default::default()
    };
    assert_eq!(bad.validate().unwrap_err().name, "answer_timeout");
}

#[tokio::test(start_paused = true)]
async fn debounce_waits_for_quiet() {
    let store = Arc::new(ResourceStore::new());
    let debounce = Debounce {
        quiet: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    let start = Instant::now();
    let writer = store.clone();
    tokio::spawn(async move {
        for i in 0..3 {
            writer.apply(vec![put(&format!("w{i}"), "x")]);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    });
    let batch = debounce.next_batch(&store).await;
    // Last change at 60 ms, then 100 ms of quiet.
    assert_eq!(start.elapsed(), Duration::from_millis(160));
    assert_eq!(batch.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn debounce_never_waits_past_the_max() {
    let store = Arc::new(ResourceStore::new());
    let debounce = Debounce {
        quiet: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    let start = Instant::now();
    let writer = store.clone();
    tokio::spawn(async move {
        for i in 0..100 {
            writer.apply(vec![put("w", &i.to_string())]);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let batch = debounce.next_batch(&store).await;
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(batch.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn several_applies_become_one_push() {
    let (_trigger, drain) = mesh_core::drain::channel();
    let store = Arc::new(ResourceStore::new());
    let (server, _service) = XdsServer::new(
        store,
        XdsSettings::default(),
        NoAuth,
        XdsMetrics::unregistered(),
        drain,
    )
    .unwrap();
    let handle = server_core(&server).register(caller(), None).unwrap();
    for i in 0..5 {
        server.apply(vec![put(&format!("w{i}"), "x")]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let inbox = lock(&handle.inbox);
    assert_eq!(inbox.batches.len(), 1);
    assert_eq!(inbox.batches[0].len(), 5);
}

fn server_core(server: &XdsServer) -> &server::Core {
    server.core()
}

/// Refuses everyone: the pipeline test connects no stream.
pub(super) struct NoAuth;

impl crate::auth::Authenticator for NoAuth {
    async fn authenticate(&self, _token: &str) -> Result<Caller, crate::auth::AuthError> {
        Err(crate::auth::AuthError::Missing)
    }
}

#[test]
fn wildcard_gets_everything_named_gets_only_named() {
    let store = ResourceStore::new();
    store.apply(vec![put("a", "1"), put("b", "2"), put("c", "3")]);
    let mut wild = client(1 << 20);
    assert_eq!(
        wild.handle_request(req(&[]), &store.read()),
        Ok(Feedback::None)
    );
    let r = drain_responses(&mut wild, &store);
    assert_eq!(r.len(), 1);
    assert_eq!(names(&r[0]), ["a", "b", "c"]);
    assert_eq!(r[0].resources[0].resource.as_ref().unwrap().type_url, T);

    let mut named = client(1 << 20);
    named
        .handle_request(req(&["b", "zz"]), &store.read())
        .unwrap();
    let r = drain_responses(&mut named, &store);
    assert_eq!(r.len(), 1);
    assert_eq!(names(&r[0]), ["b"]);
    assert_eq!(named.node.as_deref(), Some("node-a"));

    // A change to `a` reaches the wildcard client only; a removal of `b` reaches both.
    store.apply(vec![put("a", "1b"), del("b")]);
    let batch = store.take_pending().unwrap();
    wild.merge_batch(&batch);
    named.merge_batch(&batch);
    let r = drain_responses(&mut wild, &store);
    assert_eq!(
        (names(&r[0]), r[0].removed_resources.clone()),
        (vec!["a".to_string()], vec!["b".to_string()])
    );
    let r = drain_responses(&mut named, &store);
    assert_eq!(r.len(), 1);
    assert!(r[0].resources.is_empty());
    assert_eq!(r[0].removed_resources, ["b"]);
}

#[test]
fn unsubscribe_sends_no_removal() {
    let store = ResourceStore::new();
    store.apply(vec![put("a", "1"), put("b", "2")]);
    let mut c = client(1 << 20);
    c.handle_request(req(&["a", "b"]), &store.read()).unwrap();
    drain_responses(&mut c, &store);
    let mut unsub = req(&[]);
    unsub.resource_names_unsubscribe = vec!["a".into()];
    c.handle_request(unsub, &store.read()).unwrap();
    assert!(drain_responses(&mut c, &store).is_empty());
    store.apply(vec![put("a", "changed"), del("b")]);
    c.merge_batch(&store.take_pending().unwrap());
    let r = drain_responses(&mut c, &store);
    assert_eq!(r.len(), 1);
    assert!(r[0].resources.is_empty());
    assert_eq!(r[0].removed_resources, ["b"]);
}

#[test]
fn initial_versions_send_only_the_difference() {
    let store = ResourceStore::new();
    store.apply(vec![
        put("same", "1"),
        put("changed", "new"),
        put("new", "3"),
    ]);
    let same = format_version(store.get(T, "same").unwrap().0);
    let mut first = req(&[]);
    first.initial_resource_versions = HashMap::from([
        ("same".to_string(), same),
        ("changed".to_string(), format_version(version_of(b"old"))),
        ("gone".to_string(), format_version(version_of(b"x"))),
    ]);
    let mut c = client(1 << 20);
    c.handle_request(first, &store.read()).unwrap();
    let r = drain_responses(&mut c, &store);
    assert_eq!(r.len(), 1);
    assert_eq!(names(&r[0]), ["changed", "new"]);
    assert_eq!(r[0].removed_resources, ["gone"]);
}

#[test]
fn nacked_resources_are_not_resent_until_they_change() {
    let store = ResourceStore::new();
    store.apply(vec![put("a", "1")]);
    let mut c = client(1 << 20);
    c.handle_request(req(&[]), &store.read()).unwrap();
    let r = drain_responses(&mut c, &store);
    let mut ack = req(&[]);
    ack.response_nonce = r[0].nonce.clone();
    assert_eq!(c.handle_request(ack, &store.read()), Ok(Feedback::Ack));

    store.apply(vec![put("a", "bad")]);
    c.merge_batch(&store.take_pending().unwrap());
    let r = drain_responses(&mut c, &store);
    let mut nack = req(&[]);
    nack.response_nonce = r[0].nonce.clone();
    nack.error_detail = Some(rpc::Status {
        code: 3,
        message: "cannot parse a".into(),
        details: vec![],
    });
    let fb = c.handle_request(nack, &store.read()).unwrap();
    assert!(matches!(fb, Feedback::Nack { ref message, .. } if message == "cannot parse a"));
    let debug = c.debug(&store.read());
    let nack = debug.types[0].last_nack.clone().unwrap();
    assert_eq!(
        (nack.message.as_str(), nack.resources.clone()),
        ("cannot parse a", vec!["a".to_string()])
    );
    assert_eq!(debug.types[0].acks, 1);

    // A resync (or an unrelated batch) does not resend the refused version...
    c.resync(Instant::now());
    assert!(drain_responses(&mut c, &store).is_empty());
    // ... a new version is sent.
    store.apply(vec![put("a", "fixed")]);
    c.merge_batch(&store.take_pending().unwrap());
    assert_eq!(names(&drain_responses(&mut c, &store)[0]), ["a"]);
}

#[test]
fn large_pushes_are_split_and_nonces_are_fresh() {
    let store = ResourceStore::new();
    let big = "x".repeat(100);
    store.apply((0..10).map(|i| put(&format!("r{i}"), &big)).collect());
    let mut c = client(250);
    c.handle_request(req(&[]), &store.read()).unwrap();
    let r = drain_responses(&mut c, &store);
    assert_eq!(r.len(), 4, "3 + 3 + 3 + 1 resources");
    assert_eq!(r.iter().map(|r| r.resources.len()).sum::<usize>(), 10);
    let mut nonces: Vec<&str> = r.iter().map(|r| r.nonce.as_str()).collect();
    nonces.dedup();
    assert_eq!(nonces.len(), 4);
    assert_eq!(c.debug(&store.read()).types[0].in_flight, 4);
    // The first sync's parts say more follow, but its last: the client is synced
    // only once it has everything.
    let more = more_to_come(&r);
    assert_eq!(more, [true, true, true, false]);
    // A later push split the same way is not part of the first sync.
    store.apply(
        (0..10)
            .map(|i| put(&format!("r{i}"), &"y".repeat(100)))
            .collect(),
    );
    c.merge_batch(&store.take_pending().unwrap());
    let r = drain_responses(&mut c, &store);
    assert!(r.len() > 1);
    assert!(r.iter().all(|r| {
        !r.system_version_info
            .ends_with(mesh_core::xds::MORE_TO_COME)
    }));
}

#[test]
fn changes_to_unsubscribed_types_are_ignored() {
    let store = ResourceStore::new();
    let mut c = client(1 << 20);
    c.handle_request(req(&["a"]), &store.read()).unwrap();
    drain_responses(&mut c, &store);
    store.apply(vec![
        put("b", "1"),
        ResourceUpdate {
            type_url: ambit_proto::SERVICE_TYPE_URL,
            name: "a".into(),
            body: Some(Bytes::from_static(b"s")),
        },
    ]);
    c.merge_batch(&store.take_pending().unwrap());
    assert!(!c.has_work(store.released()));
}

#[test]
fn a_stream_subscribes_a_bounded_number_of_names() {
    let store = ResourceStore::new();
    let mut c = client_with_names(1 << 20, 4);
    c.handle_request(req(&["a", "b", "c"]), &store.read())
        .unwrap();
    let err = c
        .handle_request(req(&["d", "e"]), &store.read())
        .unwrap_err();
    assert!(
        err.to_string().contains("more than 4 resource names"),
        "{err}"
    );
    // Names already subscribed do not count again: a, b, c and a new d make 4.
    c.handle_request(req(&["a", "b", "c", "d"]), &store.read())
        .unwrap();
    // Nor can a reconnect claim more, or a name be huge.
    let mut claims = req(&[]);
    claims.initial_resource_versions = (0..5).map(|i| (format!("r{i}"), "1".into())).collect();
    let mut fresh = client_with_names(1 << 20, 4);
    let err = fresh.handle_request(claims, &store.read()).unwrap_err();
    assert!(err.to_string().contains("claimed held"), "{err}");
    let err = fresh
        .handle_request(req(&[&"n".repeat(2000)]), &store.read())
        .unwrap_err();
    assert!(err.to_string().contains("longer than 1024 bytes"), "{err}");
}

/// The first sync ends with a part not marked `MORE_TO_COME` even when all that
/// was left after the last full part is nothing to send (here the tombstone of a
/// removal from before the client came): an empty last part, not none.
#[test]
fn a_first_sync_always_ends_with_an_unmarked_part() {
    let store = ResourceStore::new();
    let big = "x".repeat(100);
    store.apply((0..4).map(|i| put(&format!("r{i}"), &big)).collect());
    store.apply(vec![del("r3")]);
    let mut c = client(250);
    c.handle_request(req(&[]), &store.read()).unwrap();
    let r = drain_responses(&mut c, &store);
    let more = more_to_come(&r);
    assert_eq!(more, [true, false], "{r:?}");
    assert_eq!(names(&r[0]), ["r0", "r1", "r2"]);
    assert!(r[1].resources.is_empty() && r[1].removed_resources.is_empty());
}

/// A wildcard reconnect claims every resource it was sent: only claims of names
/// the server does not have (removals it will owe) count against
/// `max_names_per_type`, so a store larger than the bound does not lock every
/// client out after a restart, and the state a claim list makes stays bounded.
#[test]
fn a_wildcard_reconnect_may_claim_everything_the_store_has() {
    let store = ResourceStore::new();
    store.apply((0..5).map(|i| put(&format!("r{i}"), "1")).collect());
    let mut c = client_with_names(1 << 20, 4);
    c.handle_request(req(&[]), &store.read()).unwrap();
    let held: HashMap<String, String> = drain_responses(&mut c, &store)
        .iter()
        .flat_map(|r| r.resources.iter())
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    assert_eq!(held.len(), 5);

    let mut resume = req(&["*"]);
    resume.initial_resource_versions = held.clone();
    resume
        .initial_resource_versions
        .extend((0..4).map(|i| (format!("gone{i}"), "1".into())));
    let mut again = client_with_names(1 << 20, 4);
    again.handle_request(resume, &store.read()).unwrap();
    let r = drain_responses(&mut again, &store);
    assert_eq!(r.len(), 1);
    assert!(r[0].resources.is_empty(), "everything is held already");
    assert_eq!(r[0].removed_resources.len(), 4);

    // One more name the server does not have is one too many.
    let mut resume = req(&[]);
    resume.initial_resource_versions = held;
    resume
        .initial_resource_versions
        .extend((0..5).map(|i| (format!("gone{i}"), "1".into())));
    let err = client_with_names(1 << 20, 4)
        .handle_request(resume, &store.read())
        .unwrap_err();
    assert!(err.to_string().contains("more than 4"), "{err}");
}

/// A proxy reports the node it serves in `node.id`, and logs and the debug view
/// show it: with node-a's credential it cannot say it is node-b.
#[test]
fn a_stream_cannot_name_another_node_than_its_credential() {
    let store = ResourceStore::new();
    let mut c = client(1 << 20);
    let mut other = req(&[]);
    other.node = Some(Node {
        id: "node-b".into(),
        ..Default::default()
    });
    let err = c.handle_request(other, &store.read()).unwrap_err();
    assert_eq!(err.status().code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.to_string().contains("\"node-b\""), "{err}");
    assert_eq!(c.node, None);

    let mut none = req(&[]);
    none.node = None;
    c.handle_request(none, &store.read()).unwrap();
    c.handle_request(req(&[]), &store.read()).unwrap();
    assert_eq!(c.debug(&store.read()).node.as_deref(), Some("node-a"));
}
