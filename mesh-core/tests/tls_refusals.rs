//! Peers that must not get through, each refused with its reason: the wrong server
//! identity, a client of another CA or trust domain, expired certificates, a
//! certificate without a SPIFFE SAN.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod support;

use std::sync::Arc;
use std::time::Duration;

use mesh_core::hbone::{
    ConnectError, ConnectHandler, HboneConfig, HbonePool, InboundConnect, PoolKey, RefusalKind,
};
use mesh_core::testing::{LeafOptions, TestCa, spiffe};
use mesh_core::tls::{IdentityError, SpiffeClientVerifier, identity_error_of, provider};
use mesh_core::{CertStore, SpiffeId, WorkloadCertificate};
use support::*;

fn tls_error(e: &ConnectError) -> &rustls::Error {
    e.tls_error()
        .unwrap_or_else(|| panic!("expected a TLS handshake error, got: {e}"))
}

#[tokio::test]
async fn client_refuses_a_server_with_another_identity() {
    let mesh = Mesh::new();
    let server = mesh.echo_server(HboneConfig::default()).await;
    let pool = mesh.pool(HboneConfig::default());
    let expected = spiffe("backend", "someone-else");
    let key = PoolKey::new(mesh.client_id.clone(), vec![expected.clone()], server.addr);
    let err = pool.connect(key, request()).await.unwrap_err();
    match identity_error_of(tls_error(&err)) {
        Some(IdentityError::UnexpectedIdentity { expected: e, got }) => {
            assert_eq!(e, &vec![expected]);
            assert_eq!(got, &mesh.server_id);
        }
        other => panic!("wrong refusal: {other:?} ({err})"),
    }
    assert!(err.to_string().contains("is not the expected"), "{err}");
    assert_eq!(pool.connection_count(), 0);
}

/// A client whose certificate comes from `issuer` but who trusts the mesh roots.
fn client_store(
    issuer: &TestCa,
    mesh_roots: &TestCa,
    id: &SpiffeId,
    opts: LeafOptions,
) -> Arc<CertStore> {
    let (key, chain) = issuer.issue_raw(id, &opts);
    let cert = WorkloadCertificate::new(key, chain, vec![mesh_roots.root()]).unwrap();
    let store = Arc::new(CertStore::new());
    store.insert(cert);
    store
}

/// Connects with `store`'s identity and returns the reason the server recorded.
async fn refused_by_server(
    mesh: &Mesh,
    store: Arc<CertStore>,
    id: &SpiffeId,
) -> (RefusalKind, String) {
    let server = mesh.echo_server(HboneConfig::default()).await;
    let pool = HbonePool::new(store, HboneConfig::default());
    let key = PoolKey::new(id.clone(), vec![mesh.server_id.clone()], server.addr);
    // TLS 1.3 lets the client finish before the server has judged its certificate, so
    // the failure may surface at the handshake or at the first CONNECT.
    assert!(pool.connect(key, request()).await.is_err());
    wait_until(
        "the server to record a refusal",
        Duration::from_secs(10),
        || server.stats.refusals() == 1,
    )
    .await;
    assert_eq!(server.stats.handshakes(), 0);
    let r = server.stats.recent_refusals().pop().unwrap();
    (r.kind, r.reason)
}

#[tokio::test]
async fn server_refuses_a_client_from_another_ca() {
    let mesh = Mesh::new();
    let stranger = TestCa::new();
    let id = spiffe("frontend", "client");
    let store = client_store(&stranger, &mesh.ca, &id, LeafOptions::default());
    let (kind, reason) = refused_by_server(&mesh, store, &id).await;
    assert_eq!(kind, RefusalKind::UnknownIssuer, "{reason}");
    assert!(reason.contains("UnknownIssuer"), "{reason}");
}

#[tokio::test]
async fn server_refuses_a_client_from_another_trust_domain() {
    let mesh = Mesh::new();
    let id = SpiffeId::new("other.example", "frontend", "client").unwrap();
    let store = client_store(&mesh.ca, &mesh.ca, &id, LeafOptions::default());
    let (kind, reason) = refused_by_server(&mesh, store, &id).await;
    assert_eq!(kind, RefusalKind::BadIdentity, "{reason}");
    assert!(
        reason.contains("trust domain other.example, expected cluster.local"),
        "{reason}"
    );
}

#[tokio::test]
async fn server_refuses_an_expired_client_certificate() {
    let mesh = Mesh::new();
    let id = spiffe("frontend", "client");
    let store = client_store(&mesh.ca, &mesh.ca, &id, LeafOptions::expired());
    let (kind, reason) = refused_by_server(&mesh, store, &id).await;
    assert_eq!(kind, RefusalKind::Expired, "{reason}");
    assert!(reason.contains("certificate expired"), "{reason}");
}

#[tokio::test]
async fn client_refuses_an_expired_server_certificate() {
    let mesh = Mesh::new();
    let (key, chain) = mesh.ca.issue_raw(&mesh.server_id, &LeafOptions::expired());
    let store = Arc::new(CertStore::new());
    store.insert(WorkloadCertificate::new(key, chain, vec![mesh.ca.root()]).unwrap());
    let server = Server::start(store, &mesh.server_id, Echo, HboneConfig::default()).await;
    let err = mesh
        .pool(HboneConfig::default())
        .connect(mesh.key(&server), request())
        .await
        .unwrap_err();
    assert!(
        matches!(
            tls_error(&err),
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. }
            )
        ),
        "{err}"
    );
    assert!(err.to_string().contains("certificate expired"), "{err}");
}

#[tokio::test]
async fn client_refuses_a_server_certificate_without_a_spiffe_san() {
    let mesh = Mesh::new();
    // The store refuses such a certificate, so the server is configured by hand.
    let opts = LeafOptions {
        uris: Some(vec![]),
        ..LeafOptions::default()
    };
    let (key, chain) = mesh.ca.issue_raw(&mesh.server_id, &opts);
    assert!(matches!(
        WorkloadCertificate::new(key.clone_key(), chain.clone(), vec![mesh.ca.root()]),
        Err(mesh_core::CertError::Identity(IdentityError::MissingSan))
    ));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(mesh.ca.root()).unwrap();
    let verifier = SpiffeClientVerifier::new(Arc::new(roots), "cluster.local", provider()).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let server = Server::start_with_tls(tls, Echo, HboneConfig::default()).await;
    let err = mesh
        .pool(HboneConfig::default())
        .connect(mesh.key(&server), request())
        .await
        .unwrap_err();
    assert_eq!(
        identity_error_of(tls_error(&err)),
        Some(&IdentityError::MissingSan),
        "{err}"
    );
    assert!(err.to_string().contains("no URI SAN"), "{err}");
}

#[tokio::test]
async fn a_certificate_with_two_spiffe_sans_is_refused() {
    let ca = TestCa::new();
    let id = spiffe("a", "b");
    let opts = LeafOptions {
        uris: Some(vec![id.to_string(), spiffe("c", "d").to_string()]),
        ..LeafOptions::default()
    };
    let (key, chain) = ca.issue_raw(&id, &opts);
    let err = WorkloadCertificate::new(key, chain, vec![ca.root()]).unwrap_err();
    assert!(
        matches!(
            err,
            mesh_core::CertError::Identity(IdentityError::MultipleSans(2))
        ),
        "{err}"
    );
}

/// Puts the server's certificate back just before the first handshake, as a pod's
/// certificate arriving from the CA after its first connection was accepted.
struct CertArrives {
    store: Arc<CertStore>,
    cert: std::sync::Mutex<Option<WorkloadCertificate>>,
}

impl ConnectHandler for CertArrives {
    async fn before_handshake(&self) {
        let cert = self.cert.lock().unwrap().take();
        if let Some(cert) = cert {
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.store.insert(cert);
        }
    }

    async fn handle(&self, connect: InboundConnect) {
        Echo.handle(connect).await;
    }
}

/// The handler's `before_handshake` runs before the TLS handshake: a certificate
/// that arrives meanwhile is the one presented, instead of a failed handshake.
#[tokio::test]
async fn the_handshake_waits_for_the_handlers_before_handshake() {
    let mesh = Mesh::new();
    let handler = CertArrives {
        store: mesh.server_store.clone(),
        cert: std::sync::Mutex::new(Some(mesh.ca.issue_cert(&mesh.server_id))),
    };
    let server = Server::start(
        mesh.server_store.clone(),
        &mesh.server_id,
        handler,
        HboneConfig::default(),
    )
    .await;
    // Not there when the client connects.
    assert!(mesh.server_store.remove(&mesh.server_id).is_some());
    let pool = mesh.pool(HboneConfig::default());
    let mut s = pool.connect(mesh.key(&server), request()).await.unwrap();
    assert_eq!(echo_once(&mut s, b"just in time").await, b"just in time");
}
