//! The CA client: a [`CertificateSource`] that asks istiod-lite's CA. For each
//! identity a fresh P-256 key and a CSR naming exactly that identity; the returned
//! leaf is checked before use: it must chain to the configured mesh roots (a root
//! sent in the response is not trusted for being there), carry the requested
//! identity and certify our key.

use std::sync::Arc;
use std::time::Duration;

use ambit_proto::ca::CreateCertificateRequest;
use ambit_proto::ca::certificate_service_client::CertificateServiceClient;
use rcgen::{CertificateParams, KeyPair, PublicKeyData as _, SanType};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls_pki_types::pem::PemObject as _;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::control::{BearerToken, ControlError, ControlPlane};
use crate::tls::{identity_of_cert, provider};
use crate::{CertError, CertificateSource, SpiffeId, WorkloadCertificate};

/// How long one `CreateCertificate` call may take, connection included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

type Client = CertificateServiceClient<InterceptedService<Channel, BearerToken>>;

/// Certificates from the control plane's CA.
#[derive(Clone)]
pub struct RemoteCa {
    client: Client,
    roots: Vec<CertificateDer<'static>>,
    trust: Arc<RootCertStore>,
    /// Lifetime asked for; zero leaves it to the CA.
    ttl: Duration,
    timeout: Duration,
}

impl std::fmt::Debug for RemoteCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCa")
            .field("roots", &self.roots.len())
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RemoteCa {
    /// A client over the control plane's TLS channel, with its token, trusting
    /// its roots; `ttl` is the lifetime asked for (zero: the CA's default).
    pub fn new(control: &ControlPlane, ttl: Duration) -> Result<Self, ControlError> {
        let channel = control.channel()?;
        Self::with_channel(channel, control.auth(), control.roots.clone(), ttl)
    }

    /// A client over any channel (plain TCP in tests), trusting `roots`.
    pub fn with_channel(
        channel: Channel,
        auth: BearerToken,
        roots: Vec<CertificateDer<'static>>,
        ttl: Duration,
    ) -> Result<Self, ControlError> {
        let mut trust = RootCertStore::empty();
        for root in &roots {
            trust
                .add(root.clone())
                .map_err(|e| ControlError::Roots(e.to_string()))?;
        }
        if trust.is_empty() {
            return Err(ControlError::Roots("no root certificate".into()));
        }
        Ok(Self {
            client: CertificateServiceClient::with_interceptor(channel, auth),
            roots,
            trust: Arc::new(trust),
            ttl,
            timeout: DEFAULT_REQUEST_TIMEOUT,
        })
    }

    /// The mesh roots the issued certificates must chain to.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Replaces the per-call timeout.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn request(&self, identity: &SpiffeId) -> Result<WorkloadCertificate, CertError> {
        // Wiped when dropped; the certificate keeps the DER copy.
        let key = Zeroizing::new(KeyPair::generate().map_err(|e| ca_err("generate key", e))?);
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|e| ca_err("URI SAN", e))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&*key)
            .and_then(|csr| csr.pem())
            .map_err(|e| ca_err("CSR", e))?;
        let request = CreateCertificateRequest {
            csr,
            validity_seconds: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        };
        let mut client = self.client.clone();
        let response = tokio::time::timeout(self.timeout, client.create_certificate(request))
            .await
            .map_err(|_| {
                CertError::Ca(format!(
                    "CreateCertificate for {identity}: no answer within {:?}",
                    self.timeout
                ))
            })?
            .map_err(|status| {
                let text = format!(
                    "CreateCertificate for {identity} refused ({:?}): {}",
                    status.code(),
                    status.message()
                );
                // The CA judged the request itself (not on this node, reserved,
                // a TTL it will not grant): the same request is likely to fail
                // again, so renewal asks only at its longest backoff (the CA may
                // not have seen the pod yet). Unauthenticated stays retryable at
                // the usual pace, since a projected token rotates.
                match status.code() {
                    tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => {
                        CertError::Refused(text)
                    }
                    _ => CertError::Ca(text),
                }
            })?
            .into_inner();
        let chain = self.checked_chain(identity, &key, &response.cert_chain)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        WorkloadCertificate::new(key, chain, self.roots.clone())
    }

    /// The response's chain without the roots, once the leaf is proven to chain to
    /// the configured roots, name `identity` and hold `key`'s public key.
    fn checked_chain(
        &self,
        identity: &SpiffeId,
        key: &KeyPair,
        pems: &[String],
    ) -> Result<Vec<CertificateDer<'static>>, CertError> {
        let mut chain = Vec::new();
        for pem in pems {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                chain.push(cert.map_err(|e| CertError::Pem(format!("issued chain: {e}")))?);
            }
        }
        let leaf = chain.first().ok_or(CertError::EmptyChain)?;
        // Only the leaf and intermediates come from the response; trust is ours.
        let intermediates: Vec<CertificateDer<'static>> = chain[1..]
            .iter()
            .filter(|c| !self.roots.contains(c))
            .cloned()
            .collect();
        let parsed = ParsedCertificate::try_from(leaf)
            .map_err(|e| CertError::Ca(format!("issued certificate: {e}")))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.trust,
            &intermediates,
            UnixTime::now(),
            provider().signature_verification_algorithms.all,
        )
        .map_err(|e| {
            CertError::Ca(format!(
                "issued certificate does not chain to the mesh roots: {e}"
            ))
        })?;
        let got = identity_of_cert(leaf)?;
        if &got != identity {
            return Err(CertError::WrongIdentity {
                want: Box::new(identity.clone()),
                got: Box::new(got),
            });
        }
        let (_, x509) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| CertError::Ca(format!("issued certificate: {e}")))?;
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CertError::Ca(
                "issued certificate does not certify the key of the request".into(),
            ));
        }
        let mut without_roots = vec![leaf.clone()];
        without_roots.extend(intermediates);
        Ok(without_roots)
    }
}

impl CertificateSource for RemoteCa {
    async fn issue(&self, identity: &SpiffeId) -> Result<WorkloadCertificate, CertError> {
        let result = self.request(identity).await;
        match &result {
            Ok(cert) => tracing::debug!(
                %identity,
                not_after = ?cert.not_after(),
                "certificate obtained from the CA"
            ),
            Err(error) => tracing::warn!(%identity, %error, "certificate request failed"),
        }
        result
    }
}

fn ca_err(what: &str, e: impl std::fmt::Display) -> CertError {
    CertError::Ca(format!("{what}: {e}"))
}
