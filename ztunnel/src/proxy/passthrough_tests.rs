//! `admit`: what a connection captured by a pod's 15006 may be relayed to.

use std::net::IpAddr;

use clap::Parser;

use super::*;
use crate::app::App;
use crate::config::Config;

/// This test's own loopback net: 127.51.0.0/24 (the integration tests use 41-50).
fn ip(host: u8) -> IpAddr {
    IpAddr::from([127, 51, 0, host])
}

/// Every inbound TCP segment of a pod is captured, whatever its destination: a
/// forged one naming loopback or another host must not be relayed there from
/// inside the pod. Only the pod's own addresses, on an app port, are admitted.
#[tokio::test]
async fn only_the_pods_own_addresses_are_relayed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.yaml");
    std::fs::write(
        &state,
        format!(
            "workloads:\n  - {{uid: cart-1, name: cart-1, namespace: shop, serviceAccount: cart, node: node-1, addresses: [\"{}\"]}}\n",
            ip(3)
        ),
    )
    .unwrap();
    let local = SocketAddr::new(ip(1), 0).to_string();
    let config = Config::try_parse_from([
        "ztunnel",
        "--node-name",
        "node-1",
        "--local-state",
        state.to_str().unwrap(),
        "--admin-addr",
        &local,
        "--metrics-addr",
        &local,
        "--readiness-addr",
        &local,
        "--node-agent-socket",
        dir.path().join("none.sock").to_str().unwrap(),
    ])
    .unwrap();
    let app = App::start(config).await.unwrap();
    let pod = Pod {
        uid: "cart-1".into(),
        name: "cart-1".into(),
        namespace: "shop".into(),
        service_account: "cart".into(),
    };
    // The pod's 15006 stand-in, its app, and a listener that is not the pod's.
    let inbound = TcpListener::bind(SocketAddr::new(ip(3), 0)).await.unwrap();
    let own_port = inbound.local_addr().unwrap().port();
    let app_port = TcpListener::bind(SocketAddr::new(ip(3), 0)).await.unwrap();
    let elsewhere = TcpListener::bind(SocketAddr::new(ip(9), 0)).await.unwrap();
    let passthrough = InboundPassthrough::new(
        pod,
        PodNet::local(0).without_source_spoofing(),
        app.inputs.clone(),
        [own_port, own_port, own_port],
    );
    let _caller = TcpStream::connect(inbound.local_addr().unwrap())
        .await
        .unwrap();
    let (captured, src) = inbound.accept().await.unwrap();

    for dst in [
        elsewhere.local_addr().unwrap(),
        SocketAddr::new(
            IpAddr::from([127, 0, 0, 1]),
            app_port.local_addr().unwrap().port(),
        ),
    ] {
        let refused = passthrough
            .admit(&captured, src, dst, own_port)
            .await
            .err()
            .unwrap_or_else(|| panic!("{dst} was relayed"));
        assert_eq!(refused.reason, reason::BAD_DESTINATION, "{dst}");
        assert!(
            refused
                .explanation
                .contains("is not an address of pod shop/cart-1"),
            "{}",
            refused.explanation
        );
    }
    let (upstream, info) = passthrough
        .admit(&captured, src, app_port.local_addr().unwrap(), own_port)
        .await
        .unwrap_or_else(|r| panic!("the pod's own address refused: {}", r.explanation));
    assert_eq!(
        upstream.peer_addr().unwrap(),
        app_port.local_addr().unwrap()
    );
    assert_eq!(info.destination, app_port.local_addr().unwrap());

    // A connection without an original destination (not redirected, or its
    // conntrack entry gone) is refused like any other: reset, counted, explained.
    let mut caller = TcpStream::connect(inbound.local_addr().unwrap())
        .await
        .unwrap();
    let (captured, src) = inbound.accept().await.unwrap();
    let missing = std::io::Error::from_raw_os_error(nix::libc::ENOENT);
    passthrough
        .serve(captured, src, Err(missing), own_port)
        .await;
    let mut buf = [0u8; 1];
    let read = tokio::io::AsyncReadExt::read(&mut caller, &mut buf).await;
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the caller sees a reset, not an orderly end"
    );
    let why = app.inputs.why.entries();
    let refused = why
        .iter()
        .find(|r| r.reason == reason::NO_ORIGINAL_DESTINATION)
        .unwrap_or_else(|| panic!("not in the why view: {why:?}"));
    assert_eq!(
        refused.destination,
        inbound.local_addr().unwrap().to_string()
    );
    assert!(
        refused.explanation.contains("no original destination"),
        "{}",
        refused.explanation
    );
    let text = app.inputs.metrics.encode();
    assert!(
        text.contains("ambit_connections_denied_total{reason=\"no_original_destination\"} 1"),
        "{text}"
    );
    app.shutdown().await;
}
