//! Kubernetes-mode authentication: a projected service-account token checked with
//! a TokenReview. Only allowed service accounts (ztunnel's, by default) may act for
//! a node, and the node is the one the API server bound the token to.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use kube::{Api, Client};

use super::{AuthError, Authenticator, Caller};

/// The `user.extra` key under which a pod-bound token names its node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// How long a TokenReview may take (kube's client retries 429/503 for long).
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks bearer tokens with the API server's TokenReview. Cheap to clone.
#[derive(Clone)]
pub struct TokenReviewer {
    // Shared: an `Api` is a few hundred bytes and every connection holds one.
    api: Arc<Api<TokenReview>>,
    /// Audiences the token must be valid for; empty means the API server's own.
    audiences: Vec<String>,
    /// `(namespace, service account)` pairs allowed to act as node proxies.
    allowed: BTreeSet<(String, String)>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audiences", &self.audiences)
            .field("allowed", &self.allowed)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    /// Accepts tokens of `istio-system/ztunnel` for the API server's audience.
    pub fn new(client: Client) -> Self {
        Self {
            api: Arc::new(Api::all(client)),
            audiences: Vec::new(),
            allowed: BTreeSet::from([("istio-system".to_owned(), "ztunnel".to_owned())]),
        }
    }

    /// The audiences a token must carry one of (e.g. `istio-ca`).
    #[must_use]
    pub fn with_audiences(mut self, audiences: impl IntoIterator<Item = String>) -> Self {
        self.audiences = audiences.into_iter().collect();
        self
    }

    /// Replaces the service accounts allowed to act as node proxies.
    #[must_use]
    pub fn with_allowed(mut self, accounts: impl IntoIterator<Item = (String, String)>) -> Self {
        self.allowed = accounts.into_iter().collect();
        self
    }

    async fn review(&self, token: &str) -> Result<TokenReviewStatus, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..TokenReview::default()
        };
        let params = PostParams::default();
        let call = self.api.create(&params, &review);
        let answer = tokio::time::timeout(REVIEW_TIMEOUT, call)
            .await
            .map_err(|_| AuthError::Unavailable("TokenReview timed out".into()))?
            .map_err(|e| AuthError::Unavailable(format!("TokenReview failed: {e}")))?;
        answer
            .status
            .ok_or_else(|| AuthError::Unavailable("TokenReview answer has no status".into()))
    }

    /// The caller a reviewed token stands for, or why it is refused.
    fn caller(&self, status: TokenReviewStatus) -> Result<Caller, AuthError> {
        if status.authenticated != Some(true) {
            let reason = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "not authenticated".into());
            return Err(AuthError::Invalid(reason));
        }
        // An audience-aware server names the audiences it checked; one that
        // does not cannot be trusted to have checked ours.
        if !self.audiences.is_empty() {
            let granted = status.audiences.unwrap_or_default();
            if !granted.iter().any(|a| self.audiences.contains(a)) {
                return Err(AuthError::Invalid(format!(
                    "the token is not for audience {:?}",
                    self.audiences
                )));
            }
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, account)) = username
            .strip_prefix(SERVICE_ACCOUNT_PREFIX)
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(AuthError::Invalid(format!(
                "{username:?} is not a service account"
            )));
        };
        if !self
            .allowed
            .contains(&(namespace.to_owned(), account.to_owned()))
        {
            return Err(AuthError::Invalid(format!(
                "service account {namespace}/{account} may not act as a node proxy"
            )));
        }
        let node = user
            .extra
            .unwrap_or_default()
            .remove(NODE_NAME_EXTRA)
            .and_then(|names| names.into_iter().next())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                AuthError::Invalid(
                    "the token is not bound to a pod on a node (use a projected token)".into(),
                )
            })?;
        Ok(Caller {
            node,
            principal: username,
        })
    }
}

impl Authenticator for TokenReviewer {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let status = self.review(token).await?;
        let result = self.caller(status);
        match &result {
            Ok(caller) => {
                tracing::debug!(node = %caller.node, principal = %caller.principal, "token reviewed")
            }
            Err(error) => tracing::info!(%error, "token refused"),
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn status(user: &str, node: Option<&str>, audiences: &[&str]) -> TokenReviewStatus {
        let extra =
            node.map(|n| BTreeMap::from([(NODE_NAME_EXTRA.to_owned(), vec![n.to_owned()])]));
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra,
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    fn reviewer(audiences: &[&str]) -> TokenReviewer {
        // Never contacted: these tests only judge answers.
        let client = crate::source::kube::client_for("http://127.0.0.1:9").unwrap();
        TokenReviewer::new(client).with_audiences(audiences.iter().map(|a| a.to_string()))
    }

    #[tokio::test]
    async fn judges_answers() {
        let r = reviewer(&[]);
        let ok = r.caller(status(
            "system:serviceaccount:istio-system:ztunnel",
            Some("n1"),
            &[],
        ));
        assert_eq!(ok.unwrap().node, "n1");
        let no_node = r.caller(status(
            "system:serviceaccount:istio-system:ztunnel",
            None,
            &[],
        ));
        assert!(matches!(no_node, Err(AuthError::Invalid(_))));
        let not_sa = r.caller(status("alice", Some("n1"), &[]));
        assert!(matches!(not_sa, Err(AuthError::Invalid(_))));

        let r = reviewer(&["istio-ca"]);
        let sa = "system:serviceaccount:istio-system:ztunnel";
        assert!(r.caller(status(sa, Some("n1"), &["istio-ca"])).is_ok());
        let wrong = r.caller(status(sa, Some("n1"), &["other"]));
        assert!(matches!(wrong, Err(AuthError::Invalid(_))));
    }
}
