//! `admit`: what a connection captured by a pod's 15006 may be relayed to, and
//! the policy a PeerAuthentication STRICT becomes refusing it.

use std::net::IpAddr;

use clap::Parser;

use super::*;
use crate::app::App;
use crate::config::Config;

/// This test's own loopback net: 127.51.0.0/24 (the integration tests use 41-50).
fn ip(host: u8) -> IpAddr {
    IpAddr::from([127, 51, 0, host])
}

/// A ztunnel of node-1 on the local state `state`, its admin, metrics and
/// readiness listeners on `admin_ip`; the temp dir lives as long as it is held.
async fn start_app(state: &str, admin_ip: IpAddr) -> (tempfile::TempDir, App) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.yaml");
    std::fs::write(&path, state).unwrap();
    let local = SocketAddr::new(admin_ip, 0).to_string();
    let config = Config::try_parse_from([
        "ztunnel",
        "--node-name",
        "node-1",
        "--local-state",
        path.to_str().unwrap(),
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
    (dir, app)
}

/// Every inbound TCP segment of a pod is captured, whatever its destination: a
/// forged one naming loopback or another host must not be relayed there from
/// inside the pod. Only the pod's own addresses, on an app port, are admitted.
#[tokio::test]
async fn only_the_pods_own_addresses_are_relayed() {
    let (_dir, app) = start_app(
        &format!(
            "workloads:\n  - {{uid: cart-1, name: cart-1, namespace: shop, serviceAccount: cart, node: node-1, addresses: [\"{}\"]}}\n",
            ip(3)
        ),
        ip(1),
    )
    .await;
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

/// istiod-lite's translation of a mesh-wide PeerAuthentication STRICT: a GLOBAL
/// DENY of any connection without a peer identity, leaving out (by address) a
/// workload whose own policy is PERMISSIVE.
fn strict_state(cart: IpAddr, legacy: IpAddr) -> String {
    format!(
        r#"
workloads:
  - {{uid: cart-1, name: cart-1, namespace: shop, serviceAccount: cart, node: node-1, addresses: ["{cart}"]}}
  - {{uid: legacy-1, name: legacy-1, namespace: shop, serviceAccount: legacy, node: node-1, addresses: ["{legacy}"]}}
policies:
  - name: istio_converted_static_strict
    namespace: istio-system
    scope: GLOBAL
    action: DENY
    rules:
      - clauses:
          - matches:
              - notPrincipals: ["*"]
                notDestinationIps: ["{legacy}/32"]
"#
    )
}

/// Under PeerAuthentication STRICT, plaintext captured on 15006 is refused by the
/// converted policy while a connection with a peer identity (HBONE, mTLS) is
/// allowed by the same policy set; a workload left PERMISSIVE still takes plaintext.
#[tokio::test]
async fn peer_authentication_strict_refuses_plaintext_and_allows_mtls() {
    let (_dir, app) = start_app(&strict_state(ip(23), ip(24)), ip(21)).await;
    let passthrough = |uid: &str, sa: &str, own_port| {
        let pod = Pod {
            uid: uid.into(),
            name: uid.into(),
            namespace: "shop".into(),
            service_account: sa.into(),
        };
        let net = PodNet::local(0).without_source_spoofing();
        InboundPassthrough::new(pod, net, app.inputs.clone(), [own_port; 3])
    };
    for (uid, sa, addr, refused) in [
        ("cart-1", "cart", ip(23), true),
        ("legacy-1", "legacy", ip(24), false),
    ] {
        let inbound = TcpListener::bind(SocketAddr::new(addr, 0)).await.unwrap();
        let own_port = inbound.local_addr().unwrap().port();
        let app_port = TcpListener::bind(SocketAddr::new(addr, 0)).await.unwrap();
        let _caller = TcpStream::connect(inbound.local_addr().unwrap())
            .await
            .unwrap();
        let (captured, src) = inbound.accept().await.unwrap();
        let dst = app_port.local_addr().unwrap();
        let admitted = passthrough(uid, sa, own_port)
            .admit(&captured, src, dst, own_port)
            .await;
        match admitted {
            Err(r) if refused => {
                assert_eq!(r.reason, reason::POLICY, "{}", r.explanation);
                assert_eq!(
                    r.policy.as_deref(),
                    Some("istio-system/istio_converted_static_strict")
                );
            }
            Ok(_) if !refused => {}
            Err(r) => panic!("{uid}: plaintext refused: {}", r.explanation),
            Ok(_) => panic!("{uid}: plaintext admitted under STRICT"),
        }
    }

    // The same connection with a verified peer identity (what HBONE carries).
    let state = app.inputs.state.snapshot();
    let labels = std::collections::BTreeMap::new();
    let frontend = mesh_core::SpiffeId::new("cluster.local", "shop", "frontend").unwrap();
    let decision = state.policies().evaluate(
        &Destination {
            namespace: "shop",
            labels: &labels,
        },
        &Connection {
            src_identity: Some(&frontend),
            src_ip: ip(2),
            dst_ip: ip(23),
            dst_port: 8080,
        },
    );
    assert!(decision.allowed, "mTLS refused: {decision}");
    app.shutdown().await;
}
