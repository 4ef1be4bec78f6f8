//! The delta xDS server over loopback TCP, driven by the generated tonic client:
//! subscriptions, ACK/NACK, resumption with `initial_resource_versions`, a slow
//! client beside a fast one, authentication and TLS.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod harness;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ambit_proto::envoy::config::core::v3::Node;
use ambit_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use ambit_proto::google::rpc;
use harness::*;
use istiod_lite::xds::{
    ResourceStore, XdsMetrics, XdsServer, XdsSettings, format_version, serve, version_of,
};
use mesh_core::drain;
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

#[tokio::test]
async fn wildcard_subscription_gets_everything_then_only_changes() {
    let mesh = start(None).await;
    mesh.server.apply(vec![
        put(W, "a", "1"),
        put(W, "b", "2"),
        put(W, "c", "3"),
        put(S, "svc", "s"),
    ]);
    let mut c = connect(mesh.addr, "n1").await;
    c.send(subscribe(W, &[])).await;
    let first = c.recv().await;
    assert_eq!(first.type_url, W);
    assert_eq!(names(&first), ["a", "b", "c"]);
    assert!(!first.nonce.is_empty() && !first.system_version_info.is_empty());
    let a = first.resources.iter().find(|r| r.name == "a").unwrap();
    assert_eq!(a.version, format_version(version_of(b"1")));
    assert_eq!(a.resource.as_ref().unwrap().type_url, W);
    assert_eq!(a.resource.as_ref().unwrap().value, &b"1"[..]);
    c.ack(&first).await;

    mesh.server.apply(vec![
        put(W, "a", "1"),
        put(W, "b", "2b"),
        del(W, "c"),
        put(S, "svc", "s2"),
    ]);
    let push = c.recv().await;
    assert_ne!(push.nonce, first.nonce);
    assert_eq!(names(&push), ["b"]);
    assert_eq!(push.removed_resources, ["c"]);
    c.quiet().await;
}

#[tokio::test]
async fn named_subscription_and_unsubscribe() {
    let mesh = start(None).await;
    mesh.server
        .apply(vec![put(W, "a", "1"), put(W, "b", "2"), put(W, "c", "3")]);
    let mut c = connect(mesh.addr, "n1").await;
    c.send(subscribe(W, &["a"])).await;
    assert_eq!(names(&c.recv().await), ["a"]);
    c.send(subscribe(W, &["b"])).await;
    assert_eq!(names(&c.recv().await), ["b"]);

    let mut unsub = subscribe(W, &[]);
    unsub.resource_names_unsubscribe = vec!["a".into()];
    c.send(unsub).await;
    mesh.server.apply(vec![
        put(W, "a", "1x"),
        put(W, "b", "2x"),
        put(W, "c", "3x"),
    ]);
    let push = c.recv().await;
    assert_eq!(names(&push), ["b"]);
    assert!(push.removed_resources.is_empty());
    c.quiet().await;

    let debug = mesh.server.debug_snapshot();
    let types = &client_of(&debug, "n1").unwrap().types;
    assert_eq!(
        (types[0].wildcard, types[0].subscribed.clone()),
        (false, vec!["b".to_string()])
    );
}

#[tokio::test]
async fn ack_and_nack_are_tracked_and_the_nack_is_visible() {
    let mesh = start(None).await;
    mesh.server.apply(vec![put(W, "a", "1")]);
    let mut c = connect(mesh.addr, "n1").await;
    c.send(subscribe(W, &[])).await;
    let first = c.recv().await;
    c.ack(&first).await;
    mesh.server.apply(vec![put(W, "a", "broken")]);
    let push = c.recv().await;
    c.send(DeltaDiscoveryRequest {
        type_url: W.into(),
        response_nonce: push.nonce.clone(),
        error_detail: Some(rpc::Status {
            code: 3,
            message: "workload a: bad address".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await;
    eventually("the NACK in the debug view", || {
        let debug = mesh.server.debug_snapshot();
        client_of(&debug, "n1").is_some_and(|c| c.types.iter().any(|t| t.last_nack.is_some()))
    })
    .await;
    let debug = mesh.server.debug_snapshot();
    let client = client_of(&debug, "n1").unwrap();
    assert_eq!(client.node.as_deref(), Some("n1"));
    assert_eq!(client.caller.principal, "test:n1");
    assert!(
        client
            .peer
            .as_deref()
            .is_some_and(|p| p.starts_with("127.0.0.1:"))
    );
    let t = &client.types[0];
    assert_eq!((t.acks, t.nacks), (1, 1));
    assert_eq!(t.last_ack.as_ref().unwrap().nonce, first.nonce);
    let nack = t.last_nack.as_ref().unwrap();
    assert_eq!(
        (nack.nonce.as_str(), nack.message.as_str()),
        (push.nonce.as_str(), "workload a: bad address")
    );
    assert_eq!(nack.resources, ["a"]);
    // Per resource: the refused version is the one sent, and it is not acked.
    let held = mesh.server.client_resources(client.id).unwrap();
    assert_eq!(
        held.types[W]["a"].sent,
        Some(format_version(version_of(b"broken")))
    );
    assert_eq!(held.types[W]["a"].acked, None);

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &mesh.registry).unwrap();
    assert!(
        text.contains(&format!("istiod_xds_nacks_total{{type_url=\"{W}\"}} 1")),
        "{text}"
    );
    assert!(text.contains("istiod_xds_connected_clients 1"), "{text}");
    assert!(
        text.contains(&format!("istiod_xds_pushes_total{{type_url=\"{W}\"}} 1")),
        "{text}"
    );
    // Not resent until it changes.
    c.quiet().await;
}

#[tokio::test]
async fn reconnect_with_initial_versions_gets_only_the_difference() {
    let mesh = start(None).await;
    mesh.server.apply(
        (0..20)
            .map(|i| put(W, &format!("w{i}"), &format!("v1-{i}")))
            .collect(),
    );
    let mut c = connect(mesh.addr, "n1").await;
    c.send(subscribe(W, &[])).await;
    let first = c.recv().await;
    assert_eq!(first.resources.len(), 20);
    c.ack(&first).await;
    let held: HashMap<String, String> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    drop(c);
    eventually("the first stream to go", || {
        mesh.server.connected_clients() == 0
    })
    .await;

    // While disconnected: one changed, one removed, one added.
    mesh.server
        .apply(vec![put(W, "w3", "v2"), del(W, "w7"), put(W, "w20", "new")]);
    let mut c = connect(mesh.addr, "n1").await;
    let mut resume = subscribe(W, &[]);
    resume.initial_resource_versions = held;
    c.send(resume).await;
    let resp = c.recv().await;
    assert_eq!(names(&resp), ["w20", "w3"]);
    assert_eq!(resp.removed_resources, ["w7"]);
    c.quiet().await;
}

#[tokio::test]
async fn a_client_that_does_not_read_does_not_delay_another() {
    let mesh = start(None).await;
    let big = |round: usize| "x".repeat(1 << 20) + &round.to_string();
    mesh.server.apply(vec![put(W, "big", &big(0))]);
    // The stalled client subscribes and never reads again.
    let stalled_stream = connect(mesh.addr, "stalled").await;
    stalled_stream.send(subscribe(W, &[])).await;
    let mut fast = connect(mesh.addr, "fast").await;
    fast.send(subscribe(W, &[])).await;
    let first = fast.recv().await;
    fast.ack(&first).await;
    // 16 MiB of pushes: far beyond the stalled stream's queue and HTTP/2 windows.
    for round in 1..=16 {
        mesh.server.apply(vec![
            put(W, "big", &big(round)),
            put(W, &format!("small{round}"), "s"),
        ]);
        let mut seen = Vec::new();
        while !seen.contains(&format!("small{round}")) {
            let resp = fast.recv().await;
            fast.ack(&resp).await;
            seen.extend(names(&resp));
        }
    }
    let debug = mesh.server.debug_snapshot();
    let stalled = &client_of(&debug, "stalled").unwrap().types[0];
    let fast = &client_of(&debug, "fast").unwrap().types[0];
    // The stalled client's changes wait, coalesced, in its pending set.
    assert!(stalled.pending > 0, "{stalled:?}");
    assert!(
        stalled.resources_sent < fast.resources_sent,
        "{stalled:?} {fast:?}"
    );
    drop(stalled_stream);
}

#[tokio::test]
async fn clients_that_do_not_answer_cannot_hold_the_push_budget() {
    let settings = XdsSettings {
        max_response_bytes: 4096,
        push_budget_bytes: 8192,
        push_budget_hold: Duration::from_millis(500),
        ..fast_settings()
    };
    let mesh = start_with(settings, None).await;
    // Eight resources just over 4 KiB: one per response.
    let body = "x".repeat(4100);
    mesh.server
        .apply((0..8).map(|i| put(W, &format!("r{i}"), &body)).collect());

    // The silent client reads but never answers: two responses fill the budget,
    // the next two come only as the budget they hold expires, then nothing.
    let mut silent = connect(mesh.addr, "silent").await;
    silent.send(subscribe(W, &[])).await;
    for _ in 0..4 {
        assert_eq!(silent.recv().await.resources.len(), 1);
    }
    // The answering client gets everything meanwhile, as budget comes back.
    let mut answering = connect(mesh.addr, "answering").await;
    answering.send(subscribe(W, &[])).await;
    let mut got = Vec::new();
    while got.len() < 8 {
        let resp = answering.recv().await;
        answering.ack(&resp).await;
        got.extend(names(&resp));
    }
    silent.quiet().await;
    eventually("every byte of the budget back", || {
        let debug = mesh.server.debug_snapshot();
        debug.push_budget_available == debug.push_budget_bytes
    })
    .await;
    let debug = mesh.server.debug_snapshot();
    let silent_state = &client_of(&debug, "silent").unwrap().types[0];
    assert_eq!(
        (silent_state.in_flight, silent_state.resources_sent),
        (4, 4)
    );
}

#[tokio::test]
async fn streams_without_a_valid_token_are_refused() {
    let mesh = start(None).await;
    let ch = channel(mesh.addr).await;
    let err = open(ch.clone(), None).await.err().expect("refused");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = open(ch.clone(), Some("forged"))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(mesh.server.connected_clients(), 0);
    assert!(open(ch, Some("good-n1")).await.is_ok());
}

/// A stream's `node.id` must be the node of its token: logs and the debug view
/// show it, so n1's ztunnel cannot report as n2.
#[tokio::test]
async fn a_stream_naming_another_node_is_refused() {
    let mesh = start(None).await;
    mesh.server.apply(vec![put(W, "a", "1")]);
    let mut c = connect(mesh.addr, "n1").await;
    let mut other = subscribe(W, &[]);
    other.node = Some(Node {
        id: "n2".into(),
        ..Default::default()
    });
    c.send(other).await;
    let status = tokio::time::timeout(WAIT, c.rx.message())
        .await
        .expect("an answer in time")
        .expect_err("the stream ends");
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert!(status.message().contains("\"n2\""), "{status}");

    let mut c = connect(mesh.addr, "n1").await;
    c.send(subscribe(W, &[])).await;
    assert_eq!(names(&c.recv().await), ["a"]);
}

/// One node's credential holds at most `max_streams_per_node` streams, and a
/// stream may ask only for the types served: neither can make the server keep
/// state (or spend the shared push budget) without bound.
#[tokio::test]
async fn a_node_holds_few_streams_and_only_served_types() {
    let settings = XdsSettings {
        max_streams_per_node: 2,
        ..fast_settings()
    };
    let mesh = start_with(settings, None).await;
    let ch = channel(mesh.addr).await;
    let first = open(ch.clone(), Some("good-n1")).await.unwrap();
    let _second = open(ch.clone(), Some("good-n1")).await.unwrap();
    let err = open(ch.clone(), Some("good-n1"))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    let mut other = open(ch.clone(), Some("good-n2")).await.unwrap();
    drop(first);
    eventually("n1's first stream to go", || {
        mesh.server.connected_clients() == 2
    })
    .await;
    assert!(open(ch, Some("good-n1")).await.is_ok());

    other
        .send(subscribe("type.googleapis.com/no.such.Type", &[]))
        .await;
    let status = tokio::time::timeout(WAIT, other.rx.message())
        .await
        .expect("an answer in time")
        .expect_err("the stream ends");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("is not served here"), "{status}");
}

#[tokio::test]
async fn drain_ends_every_stream() {
    let (trigger, watcher) = drain::channel();
    let store = Arc::new(ResourceStore::new());
    let (server, service) = XdsServer::new(
        store,
        fast_settings(),
        TestAuth,
        XdsMetrics::unregistered(),
        watcher.clone(),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(serve(listener, None, service, watcher));
    let mut c = connect(addr, "n1").await;
    c.send(subscribe(W, &[])).await;
    c.recv().await;
    let outcome = trigger.drain(Duration::from_secs(5)).await;
    assert_eq!(outcome, drain::DrainOutcome::Graceful);
    serving.await.unwrap().unwrap();
    assert!(matches!(
        tokio::time::timeout(WAIT, c.rx.message()).await.unwrap(),
        Ok(None) | Err(_)
    ));
    assert_eq!(server.connected_clients(), 0);
}

mod tls {
    use hyper_util::rt::TokioIo;
    use mesh_core::testing::{LeafOptions, TestCa, spiffe};
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsConnector;
    use tonic::transport::Endpoint;

    use super::*;

    #[tokio::test]
    async fn tls_serving_survives_a_bad_handshake() {
        let ca = TestCa::new();
        let istiod = spiffe("istio-system", "istiod");
        let ztunnel = spiffe("istio-system", "ztunnel");
        let (key, chain) = ca.issue_raw(&istiod, &LeafOptions::default());
        let mut server_tls =
            rustls::ServerConfig::builder_with_provider(mesh_core::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
        server_tls.alpn_protocols = vec![b"h2".to_vec()];
        let mesh = start(Some(Arc::new(server_tls))).await;
        mesh.server.apply(vec![put(W, "a", "1")]);

        // Garbage instead of a ClientHello: the connection is closed...
        let mut raw = TcpStream::connect(mesh.addr).await.unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(WAIT, raw.read_to_end(&mut buf))
            .await
            .unwrap();

        // ... and the listener keeps serving TLS clients.
        let store = ca.store_for(&[&ztunnel]);
        let client_tls =
            Arc::new(mesh_core::tls::client_config(store, &ztunnel, vec![istiod]).unwrap());
        let addr = mesh.addr;
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let client_tls = client_tls.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let name = ServerName::try_from("istiod.test").map_err(std::io::Error::other)?;
                let tls = TlsConnector::from(client_tls).connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        });
        let ch = Endpoint::from_static("http://istiod.test")
            .connect_with_connector(connector)
            .await
            .unwrap();
        let mut c = open(ch, Some("good-n1")).await.unwrap();
        c.send(subscribe(W, &[])).await;
        assert_eq!(names(&c.recv().await), ["a"]);
    }
}
