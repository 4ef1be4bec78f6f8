//! The connection to the control plane (istiod-lite): gRPC over TLS 1.3, the
//! server verified down to its SPIFFE identity against the mesh roots, and the
//! caller authenticated by a bearer token (the node's token, or a projected
//! service-account token), read anew for every call so a rotated token is used.
//!
//! One [`ControlPlane`] serves both clients: delta xDS and the CA.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

use crate::SpiffeId;
use crate::tls::{ALPN_H2, SpiffeServerVerifier, provider};

/// Why the control plane cannot be reached as configured.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control plane address {address:?}: {problem}")]
    Address { address: String, problem: String },
    #[error("control plane roots: {0}")]
    Roots(String),
    #[error("control plane TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Where the bearer token comes from.
#[derive(Clone, Debug)]
pub enum Token {
    /// No token (tests of servers that do not authenticate).
    None,
    Static(String),
    /// Read at every call: Kubernetes rotates projected tokens in place.
    File(PathBuf),
}

/// How to reach and trust the control plane.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    /// `host:port`.
    pub address: String,
    /// The identity the control plane's certificate must carry.
    pub identity: SpiffeId,
    /// The mesh roots the certificate must chain to.
    pub roots: Vec<CertificateDer<'static>>,
    pub token: Token,
    pub connect_timeout: Duration,
}

impl ControlPlane {
    /// A channel that connects on first use and reconnects when the connection
    /// breaks; every call carries the token through [`ControlPlane::auth`].
    pub fn channel(&self) -> Result<Channel, ControlError> {
        let bad = |problem: String| ControlError::Address {
            address: self.address.clone(),
            problem,
        };
        let endpoint = Endpoint::from_shared(format!("http://{}", self.address))
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let connector = TlsDialer::new(self)?;
        Ok(endpoint.connect_with_connector_lazy(connector))
    }

    /// The interceptor that adds `authorization: Bearer <token>` to each call.
    pub fn auth(&self) -> BearerToken {
        BearerToken(Arc::new(self.token.clone()))
    }
}

/// Adds the caller's bearer token to every call.
#[derive(Clone, Debug)]
pub struct BearerToken(Arc<Token>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let token = match self.0.as_ref() {
            Token::None => return Ok(req),
            Token::Static(t) => t.clone(),
            Token::File(path) => std::fs::read_to_string(path).map_err(|e| {
                tonic::Status::unauthenticated(format!("token file {}: {e}", path.display()))
            })?,
        };
        let value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| tonic::Status::unauthenticated("the token is not valid header text"))?;
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

/// Dials TCP then TLS, verifying the control plane's SPIFFE identity.
#[derive(Clone)]
struct TlsDialer {
    address: String,
    tls: TlsConnector,
}

impl TlsDialer {
    fn new(cp: &ControlPlane) -> Result<Self, ControlError> {
        let mut roots = RootCertStore::empty();
        for root in &cp.roots {
            roots
                .add(root.clone())
                .map_err(|e| ControlError::Roots(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(ControlError::Roots("no root certificate".into()));
        }
        let verifier =
            SpiffeServerVerifier::new(Arc::new(roots), vec![cp.identity.clone()], provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Self {
            address: cp.address.clone(),
            tls: TlsConnector::from(Arc::new(config)),
        })
    }
}

impl std::fmt::Debug for TlsDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsDialer")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl tower::Service<Uri> for TlsDialer {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&this.address).await?;
            tcp.set_nodelay(true)?;
            // The server is named by identity, not DNS: the name only fills SNI.
            let name = ServerName::try_from("istiod-lite")
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let tls = this.tls.connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
