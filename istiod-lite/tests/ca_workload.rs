//! The CA with Kubernetes tokens (TokenReview against the fake API server): a
//! pod's token of any service account obtains exactly that account's identity,
//! as a waypoint needs; a node proxy's token keeps node-scoped authorization; xDS
//! still takes node proxies only.

#![allow(clippy::unwrap_used)]

mod fake_apiserver;

use std::sync::Arc;

use ambit_proto::ca::CreateCertificateRequest;
use ambit_proto::ca::certificate_service_server::CertificateService;
use fake_apiserver::{FakeApiServer, TokenAnswer};
use istiod_lite::auth::Authenticator;
use istiod_lite::auth::review::TokenReviewer;
use istiod_lite::ca::{CaMetrics, CaRoot, CaService, CertTtl, IdentityPolicy, ReservedIdentities};
use istiod_lite::source::kube::client_for;
use prometheus_client::registry::Registry;
use rcgen::{CertificateParams, KeyPair, SanType};
use tonic::Code;

/// node-1 runs pods of shop/cart only.
struct NodeOneRunsCart;

impl IdentityPolicy for NodeOneRunsCart {
    fn may_issue(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        (node, namespace, service_account) == ("node-1", "shop", "cart")
    }
}

/// A pod-bound token (the pod on `node`), or an unbound one without `node`.
fn answer(username: &str, node: Option<&str>) -> TokenAnswer {
    TokenAnswer {
        username: username.into(),
        node: node.map(Into::into),
        pod: node.map(|n| format!("a-pod-on-{n}")),
        audiences: vec!["istio-ca".into()],
    }
}

async fn api_server() -> FakeApiServer {
    let server = FakeApiServer::start().await;
    server.add_token(
        "ztunnel-token",
        answer("system:serviceaccount:istio-system:ztunnel", Some("node-1")),
    );
    server.add_token(
        "waypoint-token",
        answer("system:serviceaccount:shop:waypoint", Some("node-2")),
    );
    server.add_token(
        "control-plane-token",
        answer(
            "system:serviceaccount:istio-system:istiod-lite",
            Some("node-2"),
        ),
    );
    // A token the API server bound to no pod (no node, no pod name).
    server.add_token(
        "unbound-token",
        answer("system:serviceaccount:shop:waypoint", None),
    );
    // Tokens bound to a Node object: a node name, no pod. Anyone allowed to mint
    // tokens for the account can get one without running a pod as it.
    for (token, username) in [
        ("node-bound-token", "system:serviceaccount:shop:waypoint"),
        (
            "node-bound-ztunnel-token",
            "system:serviceaccount:istio-system:ztunnel",
        ),
    ] {
        server.add_token(
            token,
            TokenAnswer {
                pod: None,
                ..answer(username, Some("node-1"))
            },
        );
    }
    server
}

struct Fixture {
    service: CaService<TokenReviewer, NodeOneRunsCart>,
    reviewer: TokenReviewer,
    metrics: CaMetrics,
    _server: FakeApiServer,
}

async fn fixture() -> Fixture {
    let server = api_server().await;
    let reviewer = TokenReviewer::new(client_for(server.url()).unwrap())
        .with_audiences(["istio-ca".to_owned()]);
    let metrics = CaMetrics::new(&mut Registry::default());
    let reserved = ReservedIdentities::default()
        .control_plane("istio-system", "istiod-lite")
        .proxy_accounts(&[("istio-system".to_owned(), "ztunnel".to_owned())]);
    let service = CaService::new(
        Arc::new(CaRoot::generate("cluster.local", CertTtl::default()).unwrap()),
        Arc::new(reviewer.clone()),
        Arc::new(NodeOneRunsCart),
        reserved,
        metrics.clone(),
    );
    Fixture {
        service,
        reviewer,
        metrics,
        _server: server,
    }
}

fn request(token: &str, identity: &str) -> tonic::Request<CreateCertificateRequest> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let mut request = tonic::Request::new(CreateCertificateRequest {
        csr,
        validity_seconds: 0,
        metadata: None,
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

impl Fixture {
    /// The identity of the signed leaf, or the refusal's code and message.
    async fn ask(&self, token: &str, identity: &str) -> Result<String, (Code, String)> {
        match self
            .service
            .create_certificate(request(token, identity))
            .await
        {
            Ok(response) => {
                let chain = response.into_inner().cert_chain;
                let leaf: rustls_pki_types::CertificateDer<'_> =
                    rustls_pki_types::pem::PemObject::from_pem_slice(chain[0].as_bytes()).unwrap();
                Ok(mesh_core::tls::identity_of_cert(&leaf).unwrap().to_string())
            }
            Err(status) => Err((status.code(), status.message().to_owned())),
        }
    }
}

const WAYPOINT: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";

#[tokio::test]
async fn a_workload_token_obtains_its_own_identity_and_nothing_else() {
    let f = fixture().await;
    assert_eq!(f.ask("waypoint-token", WAYPOINT).await.unwrap(), WAYPOINT);

    let (code, message) = f.ask("waypoint-token", CART).await.unwrap_err();
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(
        message.contains("only its own identity")
            && message.contains("system:serviceaccount:shop:waypoint may not obtain")
            && message.contains(CART),
        "{message}"
    );
    assert_eq!(f.metrics.refused_count("not_own_identity"), 1);
    // Another namespace's account of the same name is another identity.
    let elsewhere = "spiffe://cluster.local/ns/other/sa/waypoint";
    assert!(f.ask("waypoint-token", elsewhere).await.is_err());
    assert_eq!(f.metrics.refused_count("not_own_identity"), 2);
}

#[tokio::test]
async fn node_tokens_stay_node_scoped_and_reserved_identities_stay_reserved() {
    let f = fixture().await;
    assert_eq!(f.ask("ztunnel-token", CART).await.unwrap(), CART);
    let (code, message) = f.ask("ztunnel-token", WAYPOINT).await.unwrap_err();
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert_eq!(f.metrics.refused_count("not_on_node"), 1);

    // Neither the control plane's identity nor a proxy's, even with its own token.
    let istiod = "spiffe://cluster.local/ns/istio-system/sa/istiod-lite";
    let (code, _) = f.ask("control-plane-token", istiod).await.unwrap_err();
    assert_eq!(code, Code::PermissionDenied);
    assert_eq!(f.metrics.refused_count("reserved_identity"), 1);
}

#[tokio::test]
async fn a_token_bound_to_no_pod_is_refused() {
    let f = fixture().await;
    let (code, message) = f.ask("unbound-token", WAYPOINT).await.unwrap_err();
    assert_eq!(code, Code::Unauthenticated, "{message}");
    assert!(message.contains("not bound to a pod"), "{message}");
}

#[tokio::test]
async fn a_token_bound_to_a_node_object_is_refused() {
    let f = fixture().await;
    let (code, message) = f.ask("node-bound-token", WAYPOINT).await.unwrap_err();
    assert_eq!(code, Code::Unauthenticated, "{message}");
    assert!(message.contains("not bound to a pod"), "{message}");
    // Not as a node proxy either.
    let refused = f
        .reviewer
        .authenticate("node-bound-ztunnel-token")
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("not bound to a pod"),
        "{refused}"
    );
}

#[tokio::test]
async fn xds_still_takes_node_proxies_only() {
    let f = fixture().await;
    assert_eq!(
        f.reviewer.authenticate("ztunnel-token").await.unwrap().node,
        "node-1"
    );
    let refused = f.reviewer.authenticate("waypoint-token").await.unwrap_err();
    assert!(
        refused.to_string().contains("may not act as a node proxy"),
        "{refused}"
    );
}
