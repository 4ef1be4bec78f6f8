//! ztunnel fed by delta xDS: a scripted ADS server (TLS, the control plane's
//! identity) sends workloads, services and authorizations; the admin config dump
//! shows them, readiness waits for the first sync, a workload that does not
//! convert is NACKed and its last good version stays in force.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::time::Duration;

use ambit_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use ambit_proto::{
    AUTHORIZATION_TYPE_URL, SERVICE_TYPE_URL, WORKLOAD_TYPE_URL, security, workload,
};
use bytes::Bytes;
use clap::Parser;
use mesh_core::testing::TestCa;
use mesh_core::xds::Resource;
use mesh_core::xds::testing::{AdsServer, AdsStream, TEST_TOKEN, response};
use prost::Message;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel::app::App;
use ztunnel::config::Config;

fn pod(uid: &str, sa: &str, ip: Vec<u8>) -> workload::Workload {
    workload::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "shop".into(),
        service_account: sa.into(),
        node: "node-1".into(),
        // In the mesh: its identity's certificate is fetched ahead.
        tunnel_protocol: workload::TunnelProtocol::Hbone.into(),
        addresses: vec![ip],
        services: [(
            "shop/cart.shop.svc.cluster.local".to_string(),
            workload::PortList {
                ports: vec![workload::Port {
                    service_port: 80,
                    target_port: 8080,
                }],
            },
        )]
        .into(),
        ..Default::default()
    }
}

fn res(name: &str, version: &str, m: &impl Message) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        body: Bytes::from(m.encode_to_vec()),
    }
}

/// `GET path` on `addr`: (status, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: ztunnel\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

async fn config_dump(app: &App) -> Value {
    serde_json::from_str(&get(app.admin_addr, "/config_dump").await.1).unwrap()
}

/// Polls the config dump until `what` holds; fails after 20 s.
async fn wait_dump(app: &App, what: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let dump = config_dump(app).await;
        if what(&dump) {
            return dump;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in 20 s; last dump: {dump:#}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

struct Fixture {
    app: App,
    server: AdsServer,
    _dir: tempfile::TempDir,
}

async fn start() -> Fixture {
    let ca = TestCa::new();
    let server = AdsServer::start(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    std::fs::write(&root, ca.local_ca().root_pem()).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TEST_TOKEN}\n")).unwrap();
    let addr = server.addr.to_string();
    let config = Config::try_parse_from([
        "ztunnel",
        "--node-name",
        "node-1",
        "--xds-address",
        addr.as_str(),
        "--root-cert",
        root.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
        "--admin-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--readiness-addr",
        "127.0.0.1:0",
    ])
    .unwrap();
    let app = App::start(config).await.unwrap();
    app.set_ready();
    Fixture {
        app,
        server,
        _dir: dir,
    }
}

/// Reads the three initial subscriptions.
async fn subscriptions(stream: &mut AdsStream) -> Vec<DeltaDiscoveryRequest> {
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(stream.recv().await);
    }
    subs.sort_by(|a, b| a.type_url.cmp(&b.type_url));
    subs
}

#[tokio::test]
async fn state_comes_from_xds_and_a_bad_workload_is_nacked_keeping_the_last_good() {
    let mut f = start().await;
    let mut stream = f.server.accept().await;
    assert_eq!(
        stream.authorization.as_deref(),
        Some(format!("Bearer {TEST_TOKEN}").as_str())
    );
    let subs = subscriptions(&mut stream).await;
    let types: Vec<&str> = subs.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(
        types,
        [AUTHORIZATION_TYPE_URL, SERVICE_TYPE_URL, WORKLOAD_TYPE_URL]
    );
    assert!(subs.iter().all(|r| r.node.as_ref().unwrap().id == "node-1"));
    assert_eq!(
        get(f.app.readiness_addr, "/healthz/ready").await.0,
        503,
        "not ready before the first sync"
    );

    let ack = stream
        .reply_to(response(
            WORKLOAD_TYPE_URL,
            "w1",
            vec![
                res(
                    "shop/cart-1",
                    "1",
                    &pod("cart-1", "cart", vec![198, 18, 1, 1]),
                ),
                res(
                    "shop/cart-2",
                    "1",
                    &pod("cart-2", "cart", vec![198, 18, 1, 2]),
                ),
            ],
            vec![],
        ))
        .await;
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    let service = workload::Service {
        name: "cart".into(),
        namespace: "shop".into(),
        hostname: "cart.shop.svc.cluster.local".into(),
        addresses: vec![workload::NetworkAddress {
            address: vec![198, 19, 0, 1],
            ..Default::default()
        }],
        ports: vec![workload::Port {
            service_port: 80,
            target_port: 8080,
        }],
        ..Default::default()
    };
    let ack = stream
        .reply_to(response(
            SERVICE_TYPE_URL,
            "s1",
            vec![res("shop/cart.shop.svc.cluster.local", "1", &service)],
            vec![],
        ))
        .await;
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    let policy = security::Authorization {
        name: "deny-elsewhere".into(),
        namespace: "shop".into(),
        scope: security::Scope::Namespace as i32,
        action: security::Action::Deny as i32,
        rules: vec![security::Rule {
            clauses: vec![security::Clause {
                matches: vec![security::Match {
                    namespaces: vec![security::StringMatch {
                        match_type: Some(security::string_match::MatchType::Exact(
                            "elsewhere".into(),
                        )),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    let ack = stream
        .reply_to(response(
            AUTHORIZATION_TYPE_URL,
            "a1",
            vec![res("shop/deny-elsewhere", "1", &policy)],
            vec![],
        ))
        .await;
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);

    let dump = wait_dump(&f.app, |d| d["xds"]["synced"] == true).await;
    let uids: Vec<&str> = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["uid"].as_str().unwrap())
        .collect();
    assert_eq!(uids, ["cart-1", "cart-2"]);
    assert_eq!(dump["services"].as_array().unwrap().len(), 1);
    assert!(
        dump["policies"].to_string().contains("deny-elsewhere"),
        "{}",
        dump["policies"]
    );
    assert_eq!(dump["xds"]["connected"], true);
    assert_eq!(dump["xds"]["types"][WORKLOAD_TYPE_URL]["resources"], 2);
    assert_eq!(
        dump["xds"]["types"][WORKLOAD_TYPE_URL]["lastAck"]["nonce"],
        "w1"
    );
    assert_eq!(get(f.app.readiness_addr, "/healthz/ready").await.0, 200);
    // The certificate of the local pods' identity was fetched before any pod came.
    wait_dump(&f.app, |d| {
        d["certificates"]
            .to_string()
            .contains("spiffe://cluster.local/ns/shop/sa/cart")
    })
    .await;

    // cart-1 changes to an address of 3 bytes: refused, the rest of the response
    // (a new cart-3) applies, and cart-1 stays as it was.
    let nack = stream
        .reply_to(response(
            WORKLOAD_TYPE_URL,
            "w2",
            vec![
                res("shop/cart-1", "2", &pod("cart-1", "cart", vec![198, 18, 1])),
                res(
                    "shop/cart-3",
                    "1",
                    &pod("cart-3", "cart", vec![198, 18, 1, 3]),
                ),
            ],
            vec![],
        ))
        .await;
    let detail = nack.error_detail.unwrap();
    assert_eq!(detail.code, 3);
    assert!(
        detail.message.contains("shop/cart-1") && detail.message.contains("addresses"),
        "{}",
        detail.message
    );
    assert!(!detail.message.contains("cart-3"), "{}", detail.message);
    let dump = config_dump(&f.app).await;
    let workloads = dump["workloads"].as_array().unwrap();
    let cart1 = workloads.iter().find(|w| w["uid"] == "cart-1").unwrap();
    assert_eq!(cart1["addresses"], serde_json::json!(["198.18.1.1"]));
    assert!(workloads.iter().any(|w| w["uid"] == "cart-3"));
    let types = &dump["xds"]["types"][WORKLOAD_TYPE_URL];
    assert_eq!(types["resources"], 3);
    assert_eq!(types["lastNack"]["nonce"], "w2");
    assert!(
        types["lastNack"]["message"]
            .as_str()
            .unwrap()
            .contains("shop/cart-1")
    );

    // After a reconnect the server learns cart-1 is still at version 1.
    stream.close("restarting");
    let mut again = f.server.accept().await;
    let subs = subscriptions(&mut again).await;
    let workloads = &subs[2];
    assert_eq!(workloads.type_url, WORKLOAD_TYPE_URL);
    assert_eq!(workloads.initial_resource_versions["shop/cart-1"], "1");
    assert_eq!(workloads.initial_resource_versions["shop/cart-3"], "1");
    assert_eq!(get(f.app.readiness_addr, "/healthz/ready").await.0, 200);
    f.app.shutdown().await;
}
