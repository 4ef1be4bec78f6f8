//! What the loopback tests share: one ztunnel in this process with a pod (cart)
//! whose listeners are bound to its own 127.<net>.0.3, an app behind it, and
//! clients for SOCKS5, HTTP and the metrics text.
#![allow(dead_code)] // each test file uses part of it

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use ztunnel::app::App;
use ztunnel::config::Config;
use ztunnel::proxy::{Pod, PodPorts};

/// Each test uses its own 127.<n>.0.0/24 so tests run in parallel.
pub fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::from([127, net, 0, host])
}

pub fn state_yaml(net: u8) -> String {
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

pub struct Fixture {
    pub app: Arc<App>,
    pub app_seen: tokio::sync::mpsc::Receiver<SocketAddr>,
    pub app_addr: SocketAddr,
    _dir: tempfile::TempDir,
}

pub async fn start(net: u8) -> Fixture {
    start_with(net, &[]).await
}

pub async fn start_with(net: u8, extra: &[&str]) -> Fixture {
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
pub async fn socks5(proxy: SocketAddr, src: IpAddr, dst: SocketAddr) -> (u8, TcpStream) {
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

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
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

pub fn metric(text: &str, name: &str, must_contain: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && must_contain.iter().all(|m| l.contains(m)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .reduce(|a, b| a + b)
}

impl Fixture {
    /// A client of cart's HBONE listener (net `net`) as frontend: a pool holding
    /// frontend's certificate, and the key of cart's listener.
    pub async fn frontend_client(
        &self,
        net: u8,
    ) -> (mesh_core::hbone::HbonePool, mesh_core::hbone::PoolKey) {
        let frontend = mesh_core::SpiffeId::new("cluster.local", "shop", "frontend").unwrap();
        let cart = mesh_core::SpiffeId::new("cluster.local", "shop", "cart").unwrap();
        self.app.inputs.ensure_certificate(&frontend).await.unwrap();
        let pool =
            mesh_core::hbone::HbonePool::new(self.app.inputs.certs.clone(), Default::default());
        let hbone = SocketAddr::new(ip(net, 3), 15008);
        (
            pool,
            mesh_core::hbone::PoolKey::new(frontend, vec![cart], hbone),
        )
    }
}
