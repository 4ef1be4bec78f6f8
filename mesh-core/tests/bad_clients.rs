//! Clients that get refused, and the server serving the next client afterwards:
//! plaintext, TLS 1.2 only, a non-CONNECT method, a missing or malformed authority.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use mesh_core::hbone::{HboneConfig, MAX_HEADER_LIST, REASON_HEADER, RefusalKind};
use mesh_core::tls;
use rustls_pki_types::ServerName;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The server still serves a well-behaved client.
async fn assert_still_serving(mesh: &Mesh, server: &Server) {
    let pool = mesh.pool(HboneConfig::default());
    let mut s = pool.connect(mesh.key(server), request()).await.unwrap();
    assert_eq!(echo_once(&mut s, b"next client").await, b"next client");
}

async fn last_refusal(server: &Server, count: u64) -> (RefusalKind, String) {
    wait_until(
        "the refusal to be recorded",
        Duration::from_secs(10),
        || server.stats.refusals() >= count,
    )
    .await;
    let r = server.stats.recent_refusals().pop().unwrap();
    (r.kind, r.reason)
}

#[tokio::test]
async fn plaintext_is_refused_and_the_listener_keeps_serving() {
    let mesh = Mesh::new();
    let server = mesh.echo_server(HboneConfig::default()).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"CONNECT 198.18.0.10:80 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // The server answers with at most a TLS alert, then closes.
    let mut buf = Vec::new();
    let _ = tcp.read_to_end(&mut buf).await;
    assert!(
        !buf.starts_with(b"HTTP/"),
        "plaintext must get no HTTP answer"
    );
    let (kind, reason) = last_refusal(&server, 1).await;
    assert_eq!(kind, RefusalKind::NotTls, "{reason}");
    assert_still_serving(&mesh, &server).await;
}

#[tokio::test]
async fn a_tls12_only_client_is_refused() {
    let mesh = Mesh::new();
    let server = mesh.echo_server(HboneConfig::default()).await;
    // Same certificates and verifier as a mesh client, but TLS 1.2 only.
    let mesh_client = tls::client_config(
        mesh.client_store.clone(),
        &mesh.client_id,
        vec![mesh.server_id.clone()],
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(mesh.ca.root()).unwrap();
    let mut full = rustls::crypto::aws_lc_rs::default_provider();
    full.cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS12);
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(full))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_cert_resolver(mesh_client.client_auth_cert_resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = ServerName::IpAddress(server.addr.ip().into());
    let err = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("alert"), "{err}");
    let (kind, reason) = last_refusal(&server, 1).await;
    assert_eq!(kind, RefusalKind::TlsVersion, "{reason}");
    assert_still_serving(&mesh, &server).await;
}

/// An mTLS + HTTP/2 connection that sends whatever requests the test builds.
async fn raw_h2(mesh: &Mesh, server: &Server) -> h2::client::SendRequest<Bytes> {
    let tls = raw_tls(mesh, server).await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    send
}

async fn raw_tls(mesh: &Mesh, server: &Server) -> tokio_rustls::client::TlsStream<TcpStream> {
    let config = tls::client_config(
        mesh.client_store.clone(),
        &mesh.client_id,
        vec![mesh.server_id.clone()],
    )
    .unwrap();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = ServerName::IpAddress(server.addr.ip().into());
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

async fn send(
    h2: &h2::client::SendRequest<Bytes>,
    method: Method,
    uri: &str,
) -> (StatusCode, String) {
    let req = Request::builder().method(method).uri(uri).body(()).unwrap();
    let mut h2 = h2.clone().ready().await.unwrap();
    let (resp, _body) = h2.send_request(req, false).unwrap();
    let resp = resp.await.unwrap();
    let reason = resp
        .headers()
        .get(REASON_HEADER)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (resp.status(), reason)
}

#[tokio::test]
async fn bad_requests_get_4xx_with_a_reason_on_a_connection_that_keeps_working() {
    let mesh = Mesh::new();
    let server = mesh.echo_server(HboneConfig::default()).await;
    let observed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let to = observed.clone();
    assert!(
        server
            .stats
            .on_refusal(Box::new(move |kind| to.lock().unwrap().push(kind)))
    );
    assert!(!server.stats.on_refusal(Box::new(|_| {})), "set once");
    let h2 = raw_h2(&mesh, &server).await;

    let (status, reason) = send(&h2, Method::POST, "https://198.18.0.10:8080/").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reason, "method POST is not CONNECT");

    let (status, reason) = send(&h2, Method::CONNECT, "backend.svc:8080").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reason.contains("is not ip:port"), "{reason}");

    let (status, reason) = send(&h2, Method::CONNECT, "198.18.0.10:0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reason.contains("port 0"), "{reason}");

    // The same connection still carries a valid tunnel.
    let (status, _) = send(&h2, Method::CONNECT, "198.18.0.10:8080").await;
    assert_eq!(status, StatusCode::OK);

    let kinds: Vec<RefusalKind> = server
        .stats
        .recent_refusals()
        .iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            RefusalKind::BadMethod,
            RefusalKind::BadAuthority,
            RefusalKind::BadAuthority
        ]
    );
    assert_eq!(
        *observed.lock().unwrap(),
        kinds,
        "the observer saw each one"
    );
    assert_still_serving(&mesh, &server).await;
}

/// HEADERS are not flow-controlled: a CONNECT whose headers exceed
/// `MAX_HEADER_LIST` is refused (431, or the stream reset) instead of being held,
/// and the connection goes on serving.
#[tokio::test]
async fn a_connect_with_oversized_headers_is_refused() {
    let mesh = Mesh::new();
    let server = mesh.echo_server(HboneConfig::default()).await;
    let h2 = raw_h2(&mesh, &server).await;
    let big = "k=".to_string() + &"v".repeat(MAX_HEADER_LIST as usize);
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("198.18.0.10:8080")
        .header("baggage", big)
        .body(())
        .unwrap();
    let mut ready = h2.clone().ready().await.unwrap();
    let (resp, _body) = ready.send_request(req, false).unwrap();
    match resp.await {
        Ok(resp) => assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(e) => assert_eq!(e.reason(), Some(h2::Reason::REFUSED_STREAM), "{e}"),
    }
    // A CONNECT just under the bound on the same connection is served.
    let (status, _) = send(&h2, Method::CONNECT, "198.18.0.10:8080").await;
    assert_eq!(status, StatusCode::OK);
    assert_still_serving(&mesh, &server).await;
}

/// h2's client will not send a CONNECT without `:authority`, so this one is written
/// as raw HTTP/2 frames: preface, SETTINGS, and a HEADERS frame holding `:method`.
#[tokio::test]
async fn a_connect_without_authority_gets_400() {
    let mesh = Mesh::new();
    let server = mesh.echo_server(HboneConfig::default()).await;
    let mut tls = raw_tls(&mesh, &server).await;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&frame(0x4, 0, 0, &[])); // SETTINGS, empty
    // HPACK: literal without indexing, name = static index 2 (:method), value CONNECT.
    let mut block = vec![0x02, 7];
    block.extend_from_slice(b"CONNECT");
    out.extend_from_slice(&frame(0x1, 0x4, 1, &block)); // HEADERS, END_HEADERS, stream 1
    tls.write_all(&out).await.unwrap();

    // Read frames until the response HEADERS on stream 1.
    let status_block = loop {
        let mut head = [0u8; 9];
        tls.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        tls.read_exact(&mut payload).await.unwrap();
        if head[3] == 0x1 && stream == 1 {
            break payload;
        }
    };
    // HPACK static index 12 is ":status: 400".
    assert_eq!(
        status_block[0],
        0x80 | 12,
        "response was not 400: {status_block:?}"
    );
    let (kind, reason) = last_refusal(&server, 1).await;
    assert_eq!(kind, RefusalKind::BadAuthority);
    assert_eq!(reason, "CONNECT has no :authority");
    assert_still_serving(&mesh, &server).await;
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}
