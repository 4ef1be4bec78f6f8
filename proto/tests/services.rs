//! The two gRPC services over a real tonic transport on 127.0.0.1: the generated
//! clients reach the generated servers, and the servers answer on the exact HTTP/2
//! paths Envoy and Ambit's other components use (a raw call with a hand-written
//! path gets `Unimplemented` if the proto package or names drift).

use std::convert::Infallible;
use std::net::SocketAddr;

use ambit_proto::ca::certificate_service_client::CertificateServiceClient;
use ambit_proto::ca::certificate_service_server::{CertificateService, CertificateServiceServer};
use ambit_proto::ca::{CreateCertificateRequest, CreateCertificateResponse};
use ambit_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ambit_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use futures_util::stream::{self, BoxStream, StreamExt};
use tonic::body::Body;
use tonic::codegen::http::{self, uri::PathAndQuery};
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

const ADS_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const CA_PATH: &str = "/ambit.ca.v1.CertificateService/CreateCertificate";

/// Answers every delta request with one response naming what it subscribed to.
struct EchoAds;

#[tonic::async_trait]
impl AggregatedDiscoveryService for EchoAds {
    type DeltaAggregatedResourcesStream =
        BoxStream<'static, Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let responses = request.into_inner().map(|request| {
            request.map(|request| DeltaDiscoveryResponse {
                type_url: request.type_url,
                nonce: format!("for-{}", request.resource_names_subscribe.join(",")),
                ..DeltaDiscoveryResponse::default()
            })
        });
        Ok(Response::new(responses.boxed()))
    }
}

/// "Signs" by echoing the CSR back as the leaf, followed by a fixed root.
struct EchoCa;

#[tonic::async_trait]
impl CertificateService for EchoCa {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(CreateCertificateResponse {
            cert_chain: vec![
                format!("{}/{}s", request.csr, request.validity_seconds),
                "root".to_owned(),
            ],
        }))
    }
}

/// Serves `service` on an ephemeral loopback port until the test's runtime ends.
async fn spawn<S>(service: S) -> Channel
where
    S: tonic::codegen::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + NamedService
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind loopback");
    let addr = incoming.local_addr().expect("bound address");
    tokio::spawn(Server::builder().serve_with_incoming(service, incoming));
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid endpoint")
        .connect()
        .await
        .expect("connect to test server")
}

fn subscribe(name: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: ambit_proto::WORKLOAD_TYPE_URL.to_owned(),
        resource_names_subscribe: vec![name.to_owned()],
        ..DeltaDiscoveryRequest::default()
    }
}

#[test]
fn service_names_match_the_proto_packages() {
    assert_eq!(
        <AggregatedDiscoveryServiceServer<EchoAds> as NamedService>::NAME,
        "envoy.service.discovery.v3.AggregatedDiscoveryService"
    );
    assert_eq!(
        <CertificateServiceServer<EchoCa> as NamedService>::NAME,
        "ambit.ca.v1.CertificateService"
    );
}

#[tokio::test]
async fn delta_ads_streams_between_generated_client_and_server() {
    let channel = spawn(AggregatedDiscoveryServiceServer::new(EchoAds)).await;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let requests = stream::iter([subscribe("a"), subscribe("b")]);
    let mut responses = client
        .delta_aggregated_resources(requests)
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().unwrap();
    assert_eq!(first.nonce, "for-a");
    assert_eq!(first.type_url, ambit_proto::WORKLOAD_TYPE_URL);
    assert_eq!(responses.message().await.unwrap().unwrap().nonce, "for-b");
    assert!(responses.message().await.unwrap().is_none());
}

#[tokio::test]
async fn delta_ads_answers_on_envoys_path() {
    let channel = spawn(AggregatedDiscoveryServiceServer::new(EchoAds)).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut responses = grpc
        .streaming(
            Request::new(stream::iter([subscribe("raw")])),
            PathAndQuery::from_static(ADS_PATH),
            ProstCodec::<DeltaDiscoveryRequest, DeltaDiscoveryResponse>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(responses.message().await.unwrap().unwrap().nonce, "for-raw");
}

#[tokio::test]
async fn ca_signs_through_generated_client() {
    let channel = spawn(CertificateServiceServer::new(EchoCa)).await;
    let mut client = CertificateServiceClient::new(channel);
    let response = client
        .create_certificate(CreateCertificateRequest {
            csr: "csr".to_owned(),
            validity_seconds: 3600,
            metadata: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.cert_chain, ["csr/3600s", "root"]);
}

#[tokio::test]
async fn ca_answers_on_its_path_and_rejects_others() {
    let channel = spawn(CertificateServiceServer::new(EchoCa)).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    let request = || CreateCertificateRequest {
        csr: "raw".to_owned(),
        ..CreateCertificateRequest::default()
    };
    let codec = ProstCodec::<CreateCertificateRequest, CreateCertificateResponse>::default;

    grpc.ready().await.unwrap();
    let response = grpc
        .unary(
            Request::new(request()),
            PathAndQuery::from_static(CA_PATH),
            codec(),
        )
        .await
        .unwrap();
    assert_eq!(response.into_inner().cert_chain[0], "raw/0s");

    // Control: a near-miss path is refused, so the check above is meaningful.
    grpc.ready().await.unwrap();
    let refused = grpc
        .unary(
            Request::new(request()),
            PathAndQuery::from_static("/ambit.ca.v1.CertificateService/Sign"),
            codec(),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented);
}
