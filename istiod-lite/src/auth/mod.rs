//! Who is calling: xDS and CA clients present a bearer token, and the
//! authenticator maps it to the node the caller runs on.
//!
//! Embedded mode: a token file, one `<node> <token>` per line. Kubernetes mode:
//! the projected service-account token, checked with a TokenReview; for the CA
//! only, a pod's token of any other account stands for that account alone.

pub mod review;
pub mod tokens;

use std::future::Future;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Caller {
    /// The node the caller serves (a ztunnel) or runs on.
    pub node: String,
    /// What the credential says the caller is, for logs and the debug view
    /// (`node-token:<node>`, `system:serviceaccount:istio-system:ztunnel`).
    pub principal: String,
}

/// Why a caller was refused; the message goes back to the client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token in the `authorization` metadata")]
    Missing,
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("cannot check the token now: {0}")]
    Unavailable(String),
}

/// Who asks the CA, and so which identities it may obtain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaCaller {
    /// A node proxy: the identities of the pods its node runs.
    Node(Caller),
    /// A workload's own token (a waypoint's): exactly its service account's
    /// identity, as Istio grants by default.
    Workload {
        caller: Caller,
        namespace: String,
        service_account: String,
    },
}

impl CaCaller {
    /// The caller, for logs.
    pub fn caller(&self) -> &Caller {
        match self {
            CaCaller::Node(caller) | CaCaller::Workload { caller, .. } => caller,
        }
    }
}

/// Maps a bearer token to its caller.
pub trait Authenticator: Send + Sync + 'static {
    /// A node proxy's token (xDS and the CA).
    fn authenticate(&self, token: &str) -> impl Future<Output = Result<Caller, AuthError>> + Send;

    /// A token for the CA: a node proxy's, or where the credential can say so a
    /// workload's. By default node proxies only.
    fn authenticate_for_ca(
        &self,
        token: &str,
    ) -> impl Future<Output = Result<CaCaller, AuthError>> + Send {
        let node = self.authenticate(token);
        async move { node.await.map(CaCaller::Node) }
    }
}

/// One authenticator shared by the xDS server and the CA.
impl<T: Authenticator> Authenticator for std::sync::Arc<T> {
    fn authenticate(&self, token: &str) -> impl Future<Output = Result<Caller, AuthError>> + Send {
        self.as_ref().authenticate(token)
    }

    fn authenticate_for_ca(
        &self,
        token: &str,
    ) -> impl Future<Output = Result<CaCaller, AuthError>> + Send {
        self.as_ref().authenticate_for_ca(token)
    }
}

/// The token of a gRPC call's `authorization: Bearer <token>` metadata.
pub fn bearer_token<T>(request: &tonic::Request<T>) -> Result<&str, AuthError> {
    let value = request
        .metadata()
        .get("authorization")
        .ok_or(AuthError::Missing)?
        .to_str()
        .map_err(|_| AuthError::Invalid("the authorization metadata is not text".into()))?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token.trim())
}
