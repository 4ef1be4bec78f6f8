//! The CA end to end: a real gRPC server on 127.0.0.1 over the CA's own serving
//! TLS, node tokens from a file, a test identity policy, and mesh-core's RemoteCa
//! (or raw CSRs) as the client. Issuance, TTL caps, every refusal with its reason,
//! the metrics, and the root's files on disk.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ambit_proto::ca::CreateCertificateRequest;
use ambit_proto::ca::certificate_service_client::CertificateServiceClient;
use istiod_lite::auth::tokens::TokenFile;
use istiod_lite::ca::{
    CaMetrics, CaRoot, CaService, CertTtl, IdentityPolicy, ReservedIdentities, RootError,
};
use mesh_core::ca_client::RemoteCa;
use mesh_core::control::{ControlPlane, Token};
use mesh_core::drain::{self, DrainTrigger};
use mesh_core::{CertError, CertificateSource, SpiffeId};
use prometheus_client::registry::Registry;
use rcgen::{CertificateParams, KeyPair, SanType};
use tonic::Code;

const HOUR: Duration = Duration::from_secs(3600);

/// Pods by (node, namespace, service account).
struct Pods(BTreeSet<(String, String, String)>);

impl IdentityPolicy for Pods {
    fn may_issue(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.0.contains(&(
            node.to_owned(),
            namespace.to_owned(),
            service_account.to_owned(),
        ))
    }
}

struct Ca {
    root: Arc<CaRoot>,
    address: String,
    registry: Registry,
    _drain: DrainTrigger,
    _dir: tempfile::TempDir,
}

fn cart() -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", "cart").unwrap()
}

fn istiod() -> SpiffeId {
    SpiffeId::new("cluster.local", "istio-system", "istiod-lite").unwrap()
}

async fn start_ca() -> Ca {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("node-tokens");
    std::fs::write(&tokens, "# node tokens\nnode-a token-a\nnode-b token-b\n").unwrap();
    let ttl = CertTtl {
        default: HOUR,
        max: 2 * HOUR,
    };
    let root =
        Arc::new(CaRoot::load_or_generate(&dir.path().join("ca"), "cluster.local", ttl).unwrap());
    // node-a also runs pods under the reserved accounts: that must not matter.
    let pods = Pods(BTreeSet::from([
        ("node-a".into(), "shop".into(), "cart".into()),
        ("node-b".into(), "shop".into(), "admin".into()),
        ("node-a".into(), "istio-system".into(), "istiod-lite".into()),
        ("node-a".into(), "istio-system".into(), "ztunnel".into()),
    ]));
    let reserved = ReservedIdentities::default()
        .control_plane("istio-system", "istiod-lite")
        .proxy_accounts(&[("istio-system".to_owned(), "ztunnel".to_owned())]);
    let mut registry = Registry::default();
    let service = CaService::new(
        root.clone(),
        Arc::new(TokenFile::load(&tokens).unwrap()),
        Arc::new(pods),
        reserved,
        CaMetrics::new(&mut registry),
    );
    let tls = root.serving_config(&istiod()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (trigger, watcher) = drain::channel();
    tokio::spawn(istiod_lite::xds::serve(
        listener,
        Some(Arc::new(tls)),
        service.into_server(),
        watcher,
    ));
    Ca {
        root,
        address,
        registry,
        _drain: trigger,
        _dir: dir,
    }
}

impl Ca {
    fn control(&self, token: Token) -> ControlPlane {
        ControlPlane {
            address: self.address.clone(),
            identity: istiod(),
            roots: vec![self.root.root()],
            token,
            connect_timeout: Duration::from_secs(5),
        }
    }

    fn remote(&self, token: &str, ttl: Duration) -> RemoteCa {
        RemoteCa::new(&self.control(Token::Static(token.into())), ttl).unwrap()
    }

    /// Sends a raw CSR as node-a; the refusal's code and message.
    async fn refusal_of(&self, csr: String, validity_seconds: i64) -> (Code, String) {
        let control = self.control(Token::Static("token-a".into()));
        let mut client =
            CertificateServiceClient::with_interceptor(control.channel().unwrap(), control.auth());
        let request = CreateCertificateRequest {
            csr,
            validity_seconds,
            metadata: None,
        };
        let status = client.create_certificate(request).await.unwrap_err();
        (status.code(), status.message().to_owned())
    }

    fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }
}

fn csr_with(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn lifetime(cert: &mesh_core::WorkloadCertificate) -> Duration {
    cert.not_after().duration_since(cert.not_before()).unwrap()
}

#[tokio::test]
async fn a_node_obtains_its_pods_identity_with_the_ttl_capped() {
    let ca = start_ca().await;
    // Asks for 48 h: capped at the 2 h maximum (plus the minute of backdating).
    let cert = ca
        .remote("token-a", 48 * HOUR)
        .issue(&cart())
        .await
        .unwrap();
    assert_eq!(cert.identity(), &cart());
    assert_eq!(cert.roots(), &[ca.root.root()]);
    assert_eq!(lifetime(&cert), 2 * HOUR + Duration::from_secs(60));
    // Zero: the CA's default; less than the maximum: as asked.
    let cert = ca
        .remote("token-a", Duration::ZERO)
        .issue(&cart())
        .await
        .unwrap();
    assert_eq!(lifetime(&cert), HOUR + Duration::from_secs(60));
    let cert = ca
        .remote("token-a", Duration::from_secs(300))
        .issue(&cart())
        .await
        .unwrap();
    assert_eq!(lifetime(&cert), Duration::from_secs(330));

    // The leaf serves in mesh TLS: it chains to the root and carries only the URI SAN.
    let (_, leaf) = x509_parser::parse_x509_certificate(cert.chain()[0].as_ref()).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1);
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!leaf.is_ca());
    assert!(
        ca.metrics()
            .contains("istiod_ca_certificates_signed_total 3"),
        "{}",
        ca.metrics()
    );
}

#[tokio::test]
async fn a_service_account_without_a_pod_on_the_callers_node_is_refused() {
    let ca = start_ca().await;
    let admin = SpiffeId::new("cluster.local", "shop", "admin").unwrap();
    let err = ca.remote("token-a", HOUR).issue(&admin).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CertError::Refused(_)), "{text}");
    assert!(text.contains("PermissionDenied"), "{text}");
    assert!(err.is_permanent(), "a refusal is not retried");
    assert!(
        text.contains("node node-a runs no pod of service account admin in namespace shop"),
        "{text}"
    );
    // node-b runs it.
    ca.remote("token-b", HOUR).issue(&admin).await.unwrap();
    let metrics = ca.metrics();
    assert!(
        metrics.contains(r#"istiod_ca_certificates_refused_total{reason="not_on_node"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_control_plane_and_proxy_identities_are_never_issued() {
    let ca = start_ca().await;
    let ztunnel = SpiffeId::new("cluster.local", "istio-system", "ztunnel").unwrap();
    for (id, holder) in [
        (istiod(), "the control plane"),
        (ztunnel, "the node proxies"),
    ] {
        // node-a runs a pod of each account, yet gets neither.
        let err = ca.remote("token-a", HOUR).issue(&id).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("PermissionDenied"), "{text}");
        assert!(
            text.contains(&format!("{id} is reserved for {holder}")),
            "{text}"
        );
    }
    let metrics = ca.metrics();
    assert!(
        metrics.contains(r#"istiod_ca_certificates_refused_total{reason="reserved_identity"} 2"#),
        "{metrics}"
    );
    // Other identities of the node are still issued.
    ca.remote("token-a", HOUR).issue(&cart()).await.unwrap();
}

#[tokio::test]
async fn no_token_or_a_bad_token_is_unauthenticated() {
    let ca = start_ca().await;
    let none = RemoteCa::new(&ca.control(Token::None), HOUR).unwrap();
    let text = none.issue(&cart()).await.unwrap_err().to_string();
    assert!(
        text.contains("Unauthenticated") && text.contains("no bearer token"),
        "{text}"
    );
    let text = ca
        .remote("token-x", HOUR)
        .issue(&cart())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("Unauthenticated") && text.contains("unknown node token"),
        "{text}"
    );
    let metrics = ca.metrics();
    assert!(
        metrics.contains(r#"istiod_ca_certificates_refused_total{reason="unauthenticated"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_request_larger_than_any_valid_one_is_refused_before_its_caller_is_looked_at() {
    let ca = start_ca().await;
    let control = ca.control(Token::Static("token-x".into()));
    let mut client =
        CertificateServiceClient::with_interceptor(control.channel().unwrap(), control.auth());
    let request = CreateCertificateRequest {
        csr: "A".repeat(3 << 20),
        validity_seconds: 3600,
        metadata: None,
    };
    let status = client.create_certificate(request).await.unwrap_err();
    // Refused from the length prefix: the bad token was never checked.
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        !ca.metrics().contains("reason=\"unauthenticated\""),
        "the oversized request reached authentication"
    );
    // A request of the largest valid size is still read and judged.
    let (code, message) = ca
        .refusal_of(
            "A".repeat(istiod_lite::ca::csr::MAX_CSR_PEM_BYTES + 1),
            3600,
        )
        .await;
    assert_eq!(code, Code::InvalidArgument, "{message}");
}

#[tokio::test]
async fn bad_csrs_are_refused_with_a_precise_message() {
    let ca = start_ca().await;
    let two = csr_with(vec![
        uri("spiffe://cluster.local/ns/shop/sa/cart"),
        uri("spiffe://cluster.local/ns/shop/sa/admin"),
    ]);
    let other_td = csr_with(vec![uri("spiffe://evil.example/ns/shop/sa/cart")]);
    let dns = csr_with(vec![SanType::DnsName("cart.shop.svc".try_into().unwrap())]);
    let tampered = {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![uri("spiffe://cluster.local/ns/shop/sa/cart")];
        let mut der = params.serialize_request(&key).unwrap().der().to_vec();
        let at = der.windows(4).position(|w| w == b"cart").unwrap();
        der[at] = b'k';
        pem_of(&der)
    };
    let cases = [
        (
            two,
            "has 2 subject alternative names; exactly one SPIFFE URI is required",
        ),
        (
            other_td,
            "asks for spiffe://evil.example/ns/shop/sa/cart, outside this CA's trust domain cluster.local",
        ),
        (dns, "subject alternative name is a DNS name, not a URI"),
        (
            tampered,
            "signature does not verify with its own public key",
        ),
        ("not a csr".to_owned(), "the CSR is malformed"),
    ];
    for (csr, want) in cases {
        let (code, message) = ca.refusal_of(csr, 0).await;
        assert_eq!(code, Code::InvalidArgument, "{message}");
        assert!(message.contains(want), "{message:?} lacks {want:?}");
    }
    let good = csr_with(vec![uri("spiffe://cluster.local/ns/shop/sa/cart")]);
    let (code, message) = ca.refusal_of(good, -5).await;
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("validity_seconds is -5"), "{message}");
    let metrics = ca.metrics();
    for reason in [
        "csr_multiple_sans",
        "csr_other_trust_domain",
        "csr_non_uri_san",
        "csr_bad_signature",
        "csr_malformed",
        "invalid_ttl",
    ] {
        let line = format!(r#"istiod_ca_certificates_refused_total{{reason="{reason}"}} 1"#);
        assert!(metrics.contains(&line), "{line} missing in\n{metrics}");
    }
}

fn pem_of(der: &[u8]) -> String {
    // rcgen writes PEM only for what it built; a tampered DER gets its PEM here.
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    )
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn the_root_is_kept_on_disk_private_and_reloaded_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let first = CaRoot::load_or_generate(dir.path(), "cluster.local", CertTtl::default()).unwrap();
    let key = dir.path().join("ca-key.pem");
    assert_eq!(mode_of(&key), 0o600);
    assert_eq!(mode_of(&dir.path().join("root-cert.pem")), 0o644);
    let again = CaRoot::load_or_generate(dir.path(), "cluster.local", CertTtl::default()).unwrap();
    assert_eq!(first.root(), again.root());

    // A leaf of the reloaded root verifies against the first one's root.
    let reloaded = Arc::new(again);
    let chain = {
        let csr = csr_with(vec![uri("spiffe://cluster.local/ns/shop/sa/cart")]);
        let verified = istiod_lite::ca::verify_csr(&csr, "cluster.local").unwrap();
        reloaded.sign(&verified, HOUR).unwrap()
    };
    assert_eq!(chain.last().unwrap(), first.root_pem());

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err =
        CaRoot::load_or_generate(dir.path(), "cluster.local", CertTtl::default()).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, RootError::KeyMode { mode: 0o644, .. }),
        "{text}"
    );
    assert!(text.contains("ca-key.pem has mode 0644"), "{text}");
}
