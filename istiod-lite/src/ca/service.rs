//! `CreateCertificate`: authenticate the caller's bearer token, verify the CSR,
//! authorize the identity (a node proxy: those its node runs; a workload such as
//! a waypoint: its own only), cap the lifetime, sign. Every decision is counted
//! and logged; a refusal tells the caller why.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ambit_proto::ca::certificate_service_server::{CertificateService, CertificateServiceServer};
use ambit_proto::ca::{CreateCertificateRequest, CreateCertificateResponse};
use tonic::{Request, Response, Status};

use super::csr::{MAX_CSR_PEM_BYTES, verify_csr};
use super::metrics::CaMetrics;
use super::root::CaRoot;
use crate::auth::{AuthError, Authenticator, CaCaller, Caller, bearer_token};

/// The largest `CreateCertificateRequest` taken: the largest CSR the CA signs,
/// and room for the TTL and metadata.
pub const MAX_REQUEST_BYTES: usize = MAX_CSR_PEM_BYTES + 4 * 1024;

/// Which identities a node may obtain: in the mesh, those of service accounts
/// that have a pod on that node.
pub trait IdentityPolicy: Send + Sync + 'static {
    fn may_issue(&self, node: &str, namespace: &str, service_account: &str) -> bool;
}

/// Identities no caller may obtain, whatever pods exist: the control plane's own
/// (proxies trust the control plane by it) and the node proxies' accounts (their
/// tokens act for whole nodes). A pod running under one of them on a node must
/// not let that node's proxy impersonate the control plane or another node.
#[derive(Clone, Debug, Default)]
pub struct ReservedIdentities {
    /// `(namespace, service account)` to what holds it, for the refusal message.
    by_account: BTreeMap<(String, String), &'static str>,
}

impl ReservedIdentities {
    /// Reserves the control plane's identity.
    #[must_use]
    pub fn control_plane(mut self, namespace: &str, service_account: &str) -> Self {
        self.by_account.insert(
            (namespace.to_owned(), service_account.to_owned()),
            "the control plane",
        );
        self
    }

    /// Reserves the accounts whose tokens act as node proxies.
    #[must_use]
    pub fn proxy_accounts<'a>(
        mut self,
        accounts: impl IntoIterator<Item = &'a (String, String)>,
    ) -> Self {
        for account in accounts {
            self.by_account
                .entry(account.clone())
                .or_insert("the node proxies");
        }
        self
    }

    /// What holds `namespace/service_account`, when it is reserved.
    pub fn holder(&self, namespace: &str, service_account: &str) -> Option<&'static str> {
        self.by_account
            .get(&(namespace.to_owned(), service_account.to_owned()))
            .copied()
    }
}

/// The certificate service: a root, an authenticator and an identity policy.
pub struct CaService<A: Authenticator, P: IdentityPolicy> {
    root: Arc<CaRoot>,
    auth: Arc<A>,
    policy: Arc<P>,
    reserved: ReservedIdentities,
    metrics: CaMetrics,
}

impl<A: Authenticator, P: IdentityPolicy> std::fmt::Debug for CaService<A, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// A refused request: the status for the caller, the reason for metrics and logs.
struct Refusal {
    reason: &'static str,
    status: Status,
    caller: Option<Caller>,
}

impl Refusal {
    fn new(reason: &'static str, status: Status) -> Self {
        Self {
            reason,
            status,
            caller: None,
        }
    }

    fn by(mut self, caller: &Caller) -> Self {
        self.caller = Some(caller.clone());
        self
    }
}

impl<A: Authenticator, P: IdentityPolicy> CaService<A, P> {
    /// `reserved` is checked before `policy`: no pod makes a reserved identity
    /// available to a node.
    pub fn new(
        root: Arc<CaRoot>,
        auth: Arc<A>,
        policy: Arc<P>,
        reserved: ReservedIdentities,
        metrics: CaMetrics,
    ) -> Self {
        Self {
            root,
            auth,
            policy,
            reserved,
            metrics,
        }
    }

    /// The tonic service to add to a server. A request larger than any valid one
    /// is refused from its length prefix, before its body is read and before
    /// its caller is authenticated (tonic's default would buffer 4 MiB).
    pub fn into_server(self) -> CertificateServiceServer<Self> {
        CertificateServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    async fn decide(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<CreateCertificateResponse, Refusal> {
        let ca_caller = match bearer_token(&request) {
            Ok(token) => self.auth.authenticate_for_ca(token).await,
            Err(e) => Err(e),
        }
        .map_err(|e| match e {
            AuthError::Unavailable(_) => {
                Refusal::new("auth_unavailable", Status::unavailable(e.to_string()))
            }
            AuthError::Missing | AuthError::Invalid(_) => {
                Refusal::new("unauthenticated", Status::unauthenticated(e.to_string()))
            }
        })?;
        let caller = ca_caller.caller();
        let request = request.into_inner();
        let csr = verify_csr(&request.csr, self.root.trust_domain()).map_err(|e| {
            Refusal::new(e.reason(), Status::invalid_argument(e.to_string())).by(caller)
        })?;
        let requested = u64::try_from(request.validity_seconds).map_err(|_| {
            let message = format!(
                "validity_seconds is {}: it must be 0 (the CA's default) or positive",
                request.validity_seconds
            );
            Refusal::new("invalid_ttl", Status::invalid_argument(message)).by(caller)
        })?;
        let id = csr.identity();
        if let Some(holder) = self.reserved.holder(id.namespace(), id.service_account()) {
            let message = format!(
                "{id} is reserved for {holder}: no workload certificate may carry it, \
                 whatever pods run on node {}",
                caller.node
            );
            return Err(
                Refusal::new("reserved_identity", Status::permission_denied(message)).by(caller),
            );
        }
        match &ca_caller {
            CaCaller::Node(_) => {
                if !self
                    .policy
                    .may_issue(&caller.node, id.namespace(), id.service_account())
                {
                    let message = format!(
                        "node {} runs no pod of service account {} in namespace {}: {} may not obtain {id}",
                        caller.node,
                        id.service_account(),
                        id.namespace(),
                        caller.principal,
                    );
                    return Err(
                        Refusal::new("not_on_node", Status::permission_denied(message)).by(caller),
                    );
                }
            }
            CaCaller::Workload {
                namespace,
                service_account,
                ..
            } => {
                if id.namespace() != namespace || id.service_account() != service_account {
                    let message = format!(
                        "a workload's token obtains only its own identity: {} may not obtain {id}",
                        caller.principal,
                    );
                    return Err(Refusal::new(
                        "not_own_identity",
                        Status::permission_denied(message),
                    )
                    .by(caller));
                }
            }
        }
        let ttl = self.root.ttl().grant(Duration::from_secs(requested));
        let cert_chain = self.root.sign(&csr, ttl).map_err(|e| {
            Refusal::new("signing_failed", Status::internal(e.to_string())).by(caller)
        })?;
        self.metrics.signed.inc();
        tracing::info!(
            node = %caller.node,
            principal = %caller.principal,
            identity = %id,
            ttl_secs = ttl.as_secs(),
            "certificate signed"
        );
        Ok(CreateCertificateResponse { cert_chain })
    }
}

#[tonic::async_trait]
impl<A: Authenticator, P: IdentityPolicy> CertificateService for CaService<A, P> {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let peer = request.remote_addr();
        match self.decide(request).await {
            Ok(response) => Ok(Response::new(response)),
            Err(refusal) => {
                self.metrics.count_refusal(refusal.reason);
                let (node, principal) = refusal
                    .caller
                    .as_ref()
                    .map_or(("-", "-"), |c| (c.node.as_str(), c.principal.as_str()));
                tracing::warn!(
                    ?peer,
                    node,
                    principal,
                    reason = refusal.reason,
                    message = refusal.status.message(),
                    "certificate request refused"
                );
                Err(refusal.status)
            }
        }
    }
}
