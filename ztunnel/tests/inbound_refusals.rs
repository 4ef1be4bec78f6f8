//! A pod's inbound side on loopback refusing what it must: a CONNECT for an
//! address that is not the pod's, a client the pod's HBONE server will not take,
//! more tunnels than `--max-connections`; and the `forwarded` source address,
//! trusted only for the caller's own workloads.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use support::{http_get, ip, metric, socks5, start, start_with};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_for_an_address_not_of_the_pod_gets_400_and_the_pod_keeps_serving() {
    let f = start(43).await;
    let proxy = f.app.socks5_addr.unwrap();
    // frontend's own address is a mesh workload without a proxy here; asking cart's
    // HBONE listener for another address is refused. Use the pool directly.
    let (pool, cart) = f.frontend_client(43).await;
    let hbone = SocketAddr::new(ip(43, 3), 15008);
    let key = || cart.clone();
    let err = pool
        .connect(
            key(),
            mesh_core::hbone::ConnectRequest::new(SocketAddr::new(ip(43, 4), 8080)),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("400")
            && err
                .to_string()
                .contains("is not an address of pod shop/cart-1"),
        "{err}"
    );
    // The pod's own address, but a port of ztunnel's: the tunnel would lead back
    // into ztunnel, not to the app.
    let err = pool
        .connect(key(), mesh_core::hbone::ConnectRequest::new(hbone))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("400") && err.to_string().contains("is ztunnel's own"),
        "{err}"
    );
    // Still serving.
    let (code, s) = socks5(proxy, ip(43, 2), f.app_addr).await;
    assert_eq!(code, 0);
    drop(s);
    assert_eq!(
        f.app.shutdown().await,
        mesh_core::drain::DrainOutcome::Graceful
    );
}

/// A pod takes at most `--max-connections` tunnels at once, however many callers
/// and HBONE connections carry them: the next one gets 503, counted and explained,
/// and a slot freed is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_takes_at_most_max_connections_tunnels() {
    let f = start_with(46, &["--max-connections", "2"]).await;
    let (pool, cart) = f.frontend_client(46).await;
    let key = || cart.clone();
    let open = || pool.connect(key(), mesh_core::hbone::ConnectRequest::new(f.app_addr));
    let first = open().await.unwrap();
    let _second = open().await.unwrap();
    let err = open().await.unwrap_err().to_string();
    assert!(
        err.contains("503") && err.contains("2 tunnels open"),
        "{err}"
    );
    let (_, text) = http_get(f.app.metrics_addr, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "ambit_connections_denied_total",
            &["reason=\"overloaded\""]
        ),
        Some(1.0),
        "{text}"
    );
    let (_, why) = http_get(f.app.admin_addr, "/debug/why?format=text").await;
    assert!(
        why.contains("the most it takes (--max-connections)"),
        "{why}"
    );

    // The first tunnel ends; its slot is taken again once the pod's side has
    // closed it (the next refusals, if any, come before that).
    drop(first);
    let mut third = None;
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < give_up {
        match open().await {
            Ok(s) => {
                third = Some(s);
                break;
            }
            Err(e) => assert!(e.to_string().contains("503"), "{e}"),
        }
        tokio::task::yield_now().await;
    }
    assert!(third.is_some(), "the freed slot was never taken again");
    drop((third, _second));
    f.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_by_a_pods_hbone_server_show_in_the_why_view_and_the_metrics() {
    let f = start(45).await;
    // A client whose certificate comes from another CA: cart's HBONE server refuses
    // the handshake before any CONNECT reaches ztunnel's handler.
    let stranger_ca = mesh_core::testing::TestCa::new();
    let frontend = mesh_core::SpiffeId::new("cluster.local", "shop", "frontend").unwrap();
    let cart = mesh_core::SpiffeId::new("cluster.local", "shop", "cart").unwrap();
    // It trusts cart's CA, so only the server's check can fail.
    f.app.inputs.ensure_certificate(&cart).await.unwrap();
    let (key, chain) = stranger_ca.issue_raw(
        &frontend,
        &mesh_core::testing::LeafOptions::valid_for(Duration::from_secs(3600)),
    );
    let store = Arc::new(mesh_core::CertStore::new());
    store.insert(mesh_core::WorkloadCertificate::new(key, chain, f.app.inputs.ca.roots()).unwrap());
    let pool = mesh_core::hbone::HbonePool::new(store, Default::default());
    let key =
        mesh_core::hbone::PoolKey::new(frontend, vec![cart], SocketAddr::new(ip(45, 3), 15008));
    let _refused = pool
        .connect(
            key,
            mesh_core::hbone::ConnectRequest::new(SocketAddr::new(ip(45, 3), 8080)),
        )
        .await
        .unwrap_err();
    let mut why = String::new();
    for _ in 0..100 {
        why = http_get(f.app.admin_addr, "/debug/why").await.1;
        if why.contains("unknown_issuer") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(why.contains("\"reason\": \"unknown_issuer\""), "{why}");
    assert!(why.contains("shop/cart-1"), "{why}");

    // A mesh client whose request is not a CONNECT: 405 from the server itself.
    let frontend = mesh_core::SpiffeId::new("cluster.local", "shop", "frontend").unwrap();
    let cart = mesh_core::SpiffeId::new("cluster.local", "shop", "cart").unwrap();
    f.app.inputs.ensure_certificate(&frontend).await.unwrap();
    let tls =
        mesh_core::tls::client_config(f.app.inputs.certs.clone(), &frontend, vec![cart]).unwrap();
    let tcp = TcpStream::connect(SocketAddr::new(ip(45, 3), 15008))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(ip(45, 3).into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap();
    let (h2, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("https://198.18.0.10:8080/")
        .body(())
        .unwrap();
    let (resp, _) = h2.ready().await.unwrap().send_request(req, true).unwrap();
    assert_eq!(
        resp.await.unwrap().status(),
        http::StatusCode::METHOD_NOT_ALLOWED
    );

    // Both counted by reason, as soon as they are recorded.
    let (_, text) = http_get(f.app.metrics_addr, "/metrics").await;
    let denied = |reason: &str| {
        let label = format!("reason=\"{reason}\"");
        metric(&text, "ambit_connections_denied_total", &[&label])
    };
    assert_eq!(denied("unknown_issuer"), Some(1.0), "{text}");
    assert_eq!(denied("bad_method"), Some(1.0), "{text}");
    f.app.shutdown().await;
}

/// A client ztunnel that cannot dial from its pod's own address (SOCKS5, a pool
/// shared by the node) names it in `forwarded`; the pod's side believes it only
/// when the address is a workload with the caller's verified identity, so a
/// caller cannot borrow another workload's address (and the policies that name
/// it). The app sees the address believed (IP_TRANSPARENT, so root only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_source_counts_only_for_the_callers_own_workloads() {
    if !mesh_core::testing::require_root(
        "a_forwarded_source_counts_only_for_the_callers_own_workloads",
    ) {
        return;
    }
    let mut f = start(47).await;
    let (pool, cart) = f.frontend_client(47).await;
    let key = || cart.clone();
    let mut seen_from = async |claimed| {
        let mut req = mesh_core::hbone::ConnectRequest::new(f.app_addr);
        req.source.addr = Some(claimed);
        let tunnel = pool.connect(key(), req).await.unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), f.app_seen.recv())
            .await
            .unwrap()
            .unwrap();
        drop(tunnel);
        seen.ip()
    };
    // frontend-1's own address, with frontend's certificate: believed.
    assert_eq!(seen_from(ip(47, 2)).await, ip(47, 2));
    // scraper-1's address (another identity), and an address of no workload:
    // the tunnel's own source is used instead.
    for claimed in [ip(47, 4), ip(47, 99)] {
        let seen = seen_from(claimed).await;
        assert_ne!(seen, claimed, "{claimed} was believed from frontend");
    }
    f.app.shutdown().await;
}

/// A caller denied by policy learns that it was, not which policy and rule
/// decided (that would map the destination's policies for it): the detail is
/// in the destination's why view only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_denial_tells_the_caller_no_policy_detail() {
    let f = start(52).await;
    let scraper = mesh_core::SpiffeId::new("cluster.local", "elsewhere", "scraper").unwrap();
    let cart = mesh_core::SpiffeId::new("cluster.local", "shop", "cart").unwrap();
    f.app.inputs.ensure_certificate(&scraper).await.unwrap();
    let pool = mesh_core::hbone::HbonePool::new(f.app.inputs.certs.clone(), Default::default());
    let key =
        mesh_core::hbone::PoolKey::new(scraper, vec![cart], SocketAddr::new(ip(52, 3), 15008));
    let err = pool
        .connect(key, mesh_core::hbone::ConnectRequest::new(f.app_addr))
        .await
        .unwrap_err();
    let mesh_core::hbone::ConnectError::Refused { status, reason, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(*status, http::StatusCode::FORBIDDEN);
    assert_eq!(reason, ztunnel::proxy::POLICY_DENIAL_ON_WIRE);
    let (_, why) = http_get(f.app.admin_addr, "/debug/why?format=text").await;
    assert!(why.contains("shop/no-elsewhere"), "{why}");
    f.app.shutdown().await;
}
