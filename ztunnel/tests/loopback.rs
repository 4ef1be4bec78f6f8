//! ztunnel end to end on loopback, in one process: two pods (listeners bound to
//! their own 127.x addresses), HBONE between them with real mTLS, L4 policy at the
//! destination, SOCKS5 as the explicit outbound entry, metrics, admin and the why
//! view. The in-pod capture (iptables in pod namespaces) is covered by the e2e
//! suite; here the pods share ztunnel's namespace.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use ztunnel::app::App;
use ztunnel::config::Config;
use ztunnel::proxy::{Pod, PodPorts};

/// Each test uses its own 127.<n>.0.0/24 so tests run in parallel.
fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::from([127, net, 0, host])
}

fn state_yaml(net: u8) -> String {
    format!(
        r#"
workloads:
  - {{uid: frontend-1, name: frontend-1, namespace: shop, serviceAccount: frontend, node: node-1, addresses: ["{f}"]}}
  - {{uid: cart-1, name: cart-1, namespace: shop, serviceAccount: cart, node: node-1, addresses: ["{c}"]}}
  - {{uid: scraper-1, name: scraper-1, namespace: elsewhere, serviceAccount: scraper, node: node-1, addresses: ["{s}"]}}
policies:
  - name: no-elsewhere
    namespace: shop
    scope: NAMESPACE
    action: DENY
    rules:
      - clauses:
          - matches:
              - namespaces: ["elsewhere"]
"#,
        f = ip(net, 2),
        c = ip(net, 3),
        s = ip(net, 4),
    )
}

struct Fixture {
    app: Arc<App>,
    app_seen: tokio::sync::mpsc::Receiver<SocketAddr>,
    app_addr: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn start(net: u8) -> Fixture {
    start_with(net, &[]).await
}

async fn start_with(net: u8, extra: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.yaml");
    std::fs::write(&state, state_yaml(net)).unwrap();
    let loopback = |port: u16| SocketAddr::new(ip(net, 1), port).to_string();
    let config = Config::try_parse_from(
        [
            "ztunnel",
            "--node-name",
            "node-1",
            "--local-state",
            state.to_str().unwrap(),
            "--admin-addr",
            &loopback(0),
            "--metrics-addr",
            &loopback(0),
            "--readiness-addr",
            &loopback(0),
            "--socks5",
            "--socks5-addr",
            &loopback(0),
            "--node-agent-socket",
            dir.path().join("none.sock").to_str().unwrap(),
            "--drain-deadline",
            "2s",
        ]
        .into_iter()
        .chain(extra.iter().copied()),
    )
    .unwrap();
    let app = Arc::new(App::start(config).await.unwrap());
    // cart's proxy, on cart's own address.
    let cart = Pod {
        uid: "cart-1".into(),
        name: "cart-1".into(),
        namespace: "shop".into(),
        service_account: "cart".into(),
    };
    let at = |port| SocketAddr::new(ip(net, 3), port);
    let ports = PodPorts {
        outbound: at(15001),
        inbound_plaintext: at(15006),
        hbone: at(15008),
    };
    app.add_pod(cart, None, ports).await.unwrap();
    // cart's app: echoes, and reports each caller's address.
    let listener = TcpListener::bind(at(8080)).await.unwrap();
    let app_addr = listener.local_addr().unwrap();
    let (tx, app_seen) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = listener.accept().await {
            let _ = tx.send(peer).await;
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    app.set_ready();
    Fixture {
        app,
        app_seen,
        app_addr,
        _dir: dir,
    }
}

/// A SOCKS5 CONNECT from `src` through ztunnel; returns the reply code and stream.
async fn socks5(proxy: SocketAddr, src: IpAddr, dst: SocketAddr) -> (u8, TcpStream) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(src, 0)).unwrap();
    let mut s = sock.connect(proxy).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut greet = [0u8; 2];
    s.read_exact(&mut greet).await.unwrap();
    assert_eq!(greet, [5, 0]);
    let IpAddr::V4(v4) = dst.ip() else {
        panic!("v4 only")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.octets());
    req.extend_from_slice(&dst.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await.unwrap();
    (rep[1], s)
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn metric(text: &str, name: &str, must_contain: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && must_contain.iter().all(|m| l.contains(m)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .reduce(|a, b| a + b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshed_client_reaches_the_server_over_hbone_and_metrics_match() {
    let mut f = start(41).await;
    let proxy = f.app.socks5_addr.unwrap();
    let (code, mut s) = socks5(proxy, ip(41, 2), f.app_addr).await;
    assert_eq!(code, 0, "SOCKS5 refused");
    let msg = b"hello cart, from frontend";
    s.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, msg);
    // While the connection is open, a scrape already counts its bytes.
    let (_, text) = http_get(f.app.metrics_addr, "/metrics").await;
    for reporter in ["reporter=\"source\"", "reporter=\"destination\""] {
        for name in [
            "istio_tcp_sent_bytes_total",
            "istio_tcp_received_bytes_total",
        ] {
            assert_eq!(
                metric(&text, name, &[reporter]),
                Some(msg.len() as f64),
                "{name} {reporter} of the open connection:\n{text}"
            );
        }
    }
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let seen = f.app_seen.recv().await.unwrap();
    if nix::unistd::Uid::effective().is_root() {
        // Delivered with the caller's own address (IP_TRANSPARENT).
        assert_eq!(seen.ip(), ip(41, 2));
    }

    // Both sides' metrics, exactly: one connection, the bytes both ways.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (_, text) = http_get(f.app.metrics_addr, "/metrics").await;
        let closed = metric(
            &text,
            "istio_tcp_connections_closed_total",
            &["reporter=\"destination\""],
        );
        let closed_src = metric(
            &text,
            "istio_tcp_connections_closed_total",
            &["reporter=\"source\""],
        );
        if closed == Some(1.0) && closed_src == Some(1.0) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections never closed:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let dst = [
        "reporter=\"destination\"",
        "source_principal=\"spiffe://cluster.local/ns/shop/sa/frontend\"",
        "destination_principal=\"spiffe://cluster.local/ns/shop/sa/cart\"",
        "source_workload=\"frontend-1\"",
    ];
    assert_eq!(
        metric(&text, "istio_tcp_connections_opened_total", &dst),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "istio_tcp_sent_bytes_total", &dst),
        Some(msg.len() as f64),
        "{text}"
    );
    assert_eq!(
        metric(&text, "istio_tcp_received_bytes_total", &dst),
        Some(msg.len() as f64),
        "{text}"
    );
    let src = ["reporter=\"source\"", "destination_workload=\"cart-1\""];
    assert_eq!(
        metric(&text, "istio_tcp_sent_bytes_total", &src),
        Some(msg.len() as f64),
        "{text}"
    );
    assert!(
        text.contains(
            "ambit_certificate_expiry_seconds{identity=\"spiffe://cluster.local/ns/shop/sa/cart\"}"
        ),
        "{text}"
    );

    promtool_accepts(&text);

    // The admin dump shows the state and certificates, without keys.
    let (status, dump) = http_get(f.app.admin_addr, "/config_dump").await;
    assert_eq!(status, 200);
    assert!(
        dump.contains("\"uid\": \"cart-1\"") && dump.contains("no-elsewhere"),
        "{dump}"
    );
    assert!(
        dump.contains("spiffe://cluster.local/ns/shop/sa/frontend"),
        "{dump}"
    );
    assert!(!dump.contains("PRIVATE KEY"));
    assert_eq!(
        http_get(f.app.readiness_addr, "/healthz/ready").await.0,
        200
    );
    f.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_client_is_refused_counted_and_explained() {
    let f = start(42).await;
    let proxy = f.app.socks5_addr.unwrap();
    let (code, _s) = socks5(proxy, ip(42, 4), f.app_addr).await;
    assert_eq!(code, 2, "expected 'not allowed by ruleset'");
    let (_, text) = http_get(f.app.metrics_addr, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "ambit_connections_denied_total",
            &["reason=\"policy\""]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "ambit_connections_denied_total",
            &["reason=\"denied_by_destination\""]
        ),
        Some(1.0),
        "{text}"
    );
    let (status, why) = http_get(f.app.admin_addr, "/debug/why?format=text").await;
    assert_eq!(status, 200);
    assert!(
        why.contains("denied by DENY policy shop/no-elsewhere rule 0"),
        "{why}"
    );
    assert!(
        why.contains("spiffe://cluster.local/ns/elsewhere/sa/scraper"),
        "{why}"
    );
    // A destination outside the mesh that refuses: "host unreachable", not "not
    // allowed", so the caller can tell a policy from a dead peer.
    let closed = std::net::TcpListener::bind(SocketAddr::new(ip(42, 9), 0))
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, _s) = socks5(proxy, ip(42, 2), closed).await;
    assert_eq!(code, 4, "expected 'host unreachable'");
    f.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_for_an_address_not_of_the_pod_gets_400_and_the_pod_keeps_serving() {
    let f = start(43).await;
    let proxy = f.app.socks5_addr.unwrap();
    // frontend's own address is a mesh workload without a proxy here; asking cart's
    // HBONE listener for another address is refused. Use the pool directly.
    let frontend = mesh_core::SpiffeId::new("cluster.local", "shop", "frontend").unwrap();
    let cart = mesh_core::SpiffeId::new("cluster.local", "shop", "cart").unwrap();
    f.app.inputs.ensure_certificate(&frontend).await.unwrap();
    let pool = mesh_core::hbone::HbonePool::new(f.app.inputs.certs.clone(), Default::default());
    let hbone = SocketAddr::new(ip(43, 3), 15008);
    let key = || mesh_core::hbone::PoolKey::new(frontend.clone(), vec![cart.clone()], hbone);
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
    let frontend = mesh_core::SpiffeId::new("cluster.local", "shop", "frontend").unwrap();
    let cart = mesh_core::SpiffeId::new("cluster.local", "shop", "cart").unwrap();
    f.app.inputs.ensure_certificate(&frontend).await.unwrap();
    let pool = mesh_core::hbone::HbonePool::new(f.app.inputs.certs.clone(), Default::default());
    let key = || {
        mesh_core::hbone::PoolKey::new(
            frontend.clone(),
            vec![cart.clone()],
            SocketAddr::new(ip(46, 3), 15008),
        )
    };
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

/// `promtool check metrics` (Debian package `prometheus`) must accept the exposition.
/// CI installs it; elsewhere a missing promtool skips this check loudly.
fn promtool_accepts(text: &str) {
    let promtool = std::env::var("AMBIT_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must have promtool: {e}"
            );
            eprintln!("SKIPPED promtool check ({promtool}: {e})");
            return;
        }
    };
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool refused the metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_traffic_without_a_failed_connection() {
    let mut f = start_with(44, &["--cert-ttl", "2s"]).await;
    let proxy = f.app.socks5_addr.unwrap();
    let cart = mesh_core::SpiffeId::new("cluster.local", "shop", "cart").unwrap();
    let first = f.app.inputs.certs.get(&cart).unwrap().not_after();
    let mut rotations = f.app.inputs.certs.subscribe();
    let mut seen_rotations = 0;
    let mut n = 0;
    // Keep connecting until cart's certificate has rotated three times.
    while seen_rotations < 3 {
        n += 1;
        let (code, mut s) = socks5(proxy, ip(44, 2), f.app_addr).await;
        assert_eq!(code, 0, "connection {n} refused");
        let msg = format!("request {n}");
        s.write_all(msg.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, msg.as_bytes(), "connection {n}");
        f.app_seen.recv().await.unwrap();
        while let Ok(ev) = rotations.try_recv() {
            if ev == mesh_core::CertEvent::Updated(cart.clone()) {
                seen_rotations += 1;
            }
        }
        assert!(n < 10_000, "no rotation happened");
    }
    assert!(f.app.inputs.certs.get(&cart).unwrap().not_after() > first);
    f.app.shutdown().await;
}
