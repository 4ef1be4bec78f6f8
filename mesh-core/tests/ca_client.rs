//! RemoteCa against a tiny CA server of this file: a good answer becomes a
//! workload certificate; a leaf with another identity, from another root (even
//! with that root in the response), or for another key is refused; a refusal keeps
//! the server's message.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_proto::ca::certificate_service_server::{CertificateService, CertificateServiceServer};
use ambit_proto::ca::{CreateCertificateRequest, CreateCertificateResponse};
use mesh_core::ca::validity_for;
use mesh_core::ca_client::RemoteCa;
use mesh_core::control::{ControlPlane, Token};
use mesh_core::testing::{TestCa, spiffe};
use mesh_core::{CertError, CertificateSource};
use rcgen::{CertificateSigningRequestParams, KeyPair, SanType};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// What the test server answers.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Good,
    OtherIdentity,
    OtherRoot,
    OtherKey,
    Refuse,
}

struct Seen {
    authorization: Option<String>,
    validity_seconds: i64,
    sans: Vec<SanType>,
}

struct FakeCa {
    ca: TestCa,
    other: TestCa,
    answer: Answer,
    seen: Arc<Mutex<Vec<Seen>>>,
}

#[tonic::async_trait]
impl CertificateService for FakeCa {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        let request = request.into_inner();
        let csr = CertificateSigningRequestParams::from_pem(&request.csr).unwrap();
        self.seen.lock().unwrap().push(Seen {
            authorization,
            validity_seconds: request.validity_seconds,
            sans: csr.params.subject_alt_names.clone(),
        });
        let SanType::URI(uri) = &csr.params.subject_alt_names[0] else {
            panic!("not a URI SAN")
        };
        let mut uri = uri.as_str().to_owned();
        let (nb, na) = validity_for(Duration::from_secs(3600));
        let stranger = KeyPair::generate().unwrap();
        let (signer, root) = match self.answer {
            Answer::Refuse => {
                return Err(Status::permission_denied(
                    "node n1 runs no pod of service account cart in namespace shop",
                ));
            }
            Answer::OtherRoot => (&self.other, self.other.local_ca().root_pem().to_owned()),
            _ => (&self.ca, self.ca.local_ca().root_pem().to_owned()),
        };
        if let Answer::OtherIdentity = self.answer {
            uri = spiffe("shop", "admin").to_string();
        }
        let leaf = match self.answer {
            Answer::OtherKey => signer
                .local_ca()
                .sign_public_key(&stranger, &[uri], &[], nb, na),
            _ => signer
                .local_ca()
                .sign_public_key(&csr.public_key, &[uri], &[], nb, na),
        }
        .unwrap();
        Ok(Response::new(CreateCertificateResponse {
            cert_chain: vec![leaf.pem(), root],
        }))
    }
}

struct Fixture {
    ca: Arc<RemoteCa>,
    seen: Arc<Mutex<Vec<Seen>>>,
    trusted_root: rustls_pki_types::CertificateDer<'static>,
}

async fn fixture(answer: Answer) -> Fixture {
    let ca = TestCa::new();
    let trusted_root = ca.root();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server = FakeCa {
        ca,
        other: TestCa::new(),
        answer,
        seen: seen.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CertificateServiceServer::new(server))
            .serve_with_incoming(incoming),
    );
    let channel: Channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let control = ControlPlane {
        address: addr.to_string(),
        identity: spiffe("istio-system", "istiod-lite"),
        roots: vec![trusted_root.clone()],
        token: Token::Static("node-secret".into()),
        connect_timeout: Duration::from_secs(5),
    };
    let remote = RemoteCa::with_channel(
        channel,
        control.auth(),
        control.roots.clone(),
        Duration::from_secs(1800),
    )
    .unwrap();
    Fixture {
        ca: Arc::new(remote),
        seen,
        trusted_root,
    }
}

#[tokio::test]
async fn a_good_answer_becomes_a_workload_certificate() {
    let f = fixture(Answer::Good).await;
    let id = spiffe("shop", "cart");
    let cert = f.ca.issue(&id).await.unwrap();
    assert_eq!(cert.identity(), &id);
    assert_eq!(
        cert.chain().len(),
        1,
        "the root is not part of the chain shown"
    );
    assert_eq!(cert.roots(), std::slice::from_ref(&f.trusted_root));
    let seen = f.seen.lock().unwrap();
    let [request] = seen.as_slice() else {
        panic!("one request expected")
    };
    assert_eq!(request.authorization.as_deref(), Some("Bearer node-secret"));
    assert_eq!(request.validity_seconds, 1800);
    assert_eq!(request.sans.len(), 1);
    assert!(matches!(&request.sans[0], SanType::URI(u) if u.as_str() == id.to_string()));
}

#[tokio::test]
async fn each_request_uses_a_fresh_key() {
    let f = fixture(Answer::Good).await;
    let id = spiffe("shop", "cart");
    let a = f.ca.issue(&id).await.unwrap();
    let b = f.ca.issue(&id).await.unwrap();
    assert_ne!(a.chain()[0], b.chain()[0]);
}

#[tokio::test]
async fn a_leaf_for_another_identity_is_refused() {
    let f = fixture(Answer::OtherIdentity).await;
    let err = f.ca.issue(&spiffe("shop", "cart")).await.unwrap_err();
    match err {
        CertError::WrongIdentity { want, got } => {
            assert_eq!(*want, spiffe("shop", "cart"));
            assert_eq!(*got, spiffe("shop", "admin"));
        }
        other => panic!("expected WrongIdentity, got {other}"),
    }
}

#[tokio::test]
async fn a_root_sent_in_the_response_is_not_trusted_for_being_there() {
    let f = fixture(Answer::OtherRoot).await;
    let err = f.ca.issue(&spiffe("shop", "cart")).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("does not chain to the mesh roots"), "{text}");
}

#[tokio::test]
async fn a_leaf_for_another_key_is_refused() {
    let f = fixture(Answer::OtherKey).await;
    let err = f.ca.issue(&spiffe("shop", "cart")).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("does not certify the key of the request"),
        "{text}"
    );
}

#[tokio::test]
async fn a_refusal_keeps_the_servers_reason() {
    let f = fixture(Answer::Refuse).await;
    let err = f.ca.issue(&spiffe("shop", "cart")).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CertError::Refused(_)), "{text}");
    assert!(text.contains("PermissionDenied"), "{text}");
    assert!(err.is_permanent(), "a refusal is not retried");
    assert!(
        text.contains("node n1 runs no pod of service account cart in namespace shop"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unreachable_ca_is_an_error_in_time() {
    // A port nobody listens on: the connection is refused at once.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let ca = RemoteCa::with_channel(
        channel,
        ControlPlane {
            address: addr.to_string(),
            identity: spiffe("istio-system", "istiod-lite"),
            roots: vec![TestCa::new().root()],
            token: Token::None,
            connect_timeout: Duration::from_secs(1),
        }
        .auth(),
        vec![TestCa::new().root()],
        Duration::ZERO,
    )
    .unwrap()
    .with_timeout(Duration::from_secs(5));
    let err = ca.issue(&spiffe("shop", "cart")).await.unwrap_err();
    assert!(matches!(err, CertError::Ca(_)), "{err}");
}

#[tokio::test]
async fn no_roots_is_refused_at_construction() {
    let channel = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
    let auth = ControlPlane {
        address: "127.0.0.1:1".into(),
        identity: spiffe("istio-system", "istiod-lite"),
        roots: vec![],
        token: Token::None,
        connect_timeout: Duration::from_secs(1),
    }
    .auth();
    let err = RemoteCa::with_channel(channel, auth, vec![], Duration::ZERO).unwrap_err();
    assert!(err.to_string().contains("no root"), "{err}");
}
