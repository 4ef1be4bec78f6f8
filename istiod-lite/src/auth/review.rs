//! Kubernetes-mode authentication: a projected service-account token checked with
//! a TokenReview. Only allowed service accounts (ztunnel's, by default) may act for
//! a node, and the node is the one the API server bound the token to. For the CA,
//! a pod-bound token of any other account stands for that account (a waypoint).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use kube::{Api, Client};

use super::{AuthError, Authenticator, CaCaller, Caller};

/// The `user.extra` key under which a pod-bound token names its node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The `user.extra` key under which a pod-bound token names its pod.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// How long a TokenReview may take (kube's client retries 429/503 for long),
/// including its wait for one of the [`MAX_REVIEWS_AT_ONCE`] slots.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// TokenReviews in flight at once, over all callers: each authenticated call
/// costs the API server one, and a burst of callers (every proxy of a cluster
/// reconnecting, or a flood of bogus tokens) must not become a burst on it.
pub const MAX_REVIEWS_AT_ONCE: usize = 32;

/// Checks bearer tokens with the API server's TokenReview. Cheap to clone.
#[derive(Clone)]
pub struct TokenReviewer {
    // Shared: an `Api` is a few hundred bytes and every connection holds one.
    api: Arc<Api<TokenReview>>,
    /// Audiences the token must be valid for; empty means the API server's own.
    audiences: Vec<String>,
    /// `(namespace, service account)` pairs allowed to act as node proxies.
    allowed: BTreeSet<(String, String)>,
    /// One permit per TokenReview in flight.
    slots: Arc<tokio::sync::Semaphore>,
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
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_REVIEWS_AT_ONCE)),
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
        let call = async {
            // Never closed, so the permit always comes.
            let _slot = self.slots.acquire().await;
            self.api.create(&params, &review).await
        };
        let answer = tokio::time::timeout(REVIEW_TIMEOUT, call)
            .await
            .map_err(|_| AuthError::Unavailable("TokenReview timed out".into()))?
            .map_err(|e| AuthError::Unavailable(format!("TokenReview failed: {e}")))?;
        answer
            .status
            .ok_or_else(|| AuthError::Unavailable("TokenReview answer has no status".into()))
    }

    /// The service account an authenticated token for our audiences belongs to.
    fn reviewed(&self, status: TokenReviewStatus) -> Result<Reviewed, AuthError> {
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
        let account = (namespace.to_owned(), account.to_owned());
        let mut extra = user.extra.unwrap_or_default();
        let mut first = |key: &str| {
            extra
                .remove(key)
                .and_then(|values| values.into_iter().next())
                .filter(|v| !v.is_empty())
        };
        Ok(Reviewed {
            node: first(NODE_NAME_EXTRA),
            pod: first(POD_NAME_EXTRA),
            username,
            account,
        })
    }

    /// The node proxy a reviewed token stands for, or why it is refused.
    fn caller(&self, status: TokenReviewStatus) -> Result<Caller, AuthError> {
        self.node_proxy(self.reviewed(status)?)
    }

    fn node_proxy(&self, reviewed: Reviewed) -> Result<Caller, AuthError> {
        let (namespace, account) = &reviewed.account;
        if !self.allowed.contains(&reviewed.account) {
            return Err(AuthError::Invalid(format!(
                "service account {namespace}/{account} may not act as a node proxy"
            )));
        }
        // Bound to a pod (its node recorded in the token): a token bound to a Node
        // object names a node but proves no proxy pod runs there.
        let node = reviewed
            .node
            .filter(|_| reviewed.pod.is_some())
            .ok_or_else(|| {
                AuthError::Invalid(
                    "the token is not bound to a pod on a node (use a projected token)".into(),
                )
            })?;
        Ok(Caller {
            node,
            principal: reviewed.username,
        })
    }

    /// For the CA: a node proxy's token as for xDS; any other account's token,
    /// bound to a pod, stands for that account's identity alone.
    fn ca_caller(&self, status: TokenReviewStatus) -> Result<CaCaller, AuthError> {
        let reviewed = self.reviewed(status)?;
        if self.allowed.contains(&reviewed.account) {
            return self.node_proxy(reviewed).map(CaCaller::Node);
        }
        let (namespace, service_account) = reviewed.account;
        // A pod-bound token: the API server binds one to a pod only if the pod
        // runs as this account (a Node-bound one proves no such thing).
        if reviewed.pod.is_none() {
            return Err(AuthError::Invalid(format!(
                "the token of {namespace}/{service_account} is not bound to a pod (use a projected token)"
            )));
        }
        Ok(CaCaller::Workload {
            caller: Caller {
                node: reviewed.node.unwrap_or_else(|| "-".into()),
                principal: reviewed.username,
            },
            namespace,
            service_account,
        })
    }
}

/// An authenticated service-account token and what it is bound to.
struct Reviewed {
    username: String,
    /// `(namespace, service account)`.
    account: (String, String),
    node: Option<String>,
    pod: Option<String>,
}

fn logged<T>(result: Result<T, AuthError>, caller: impl Fn(&T) -> &Caller) -> Result<T, AuthError> {
    match &result {
        Ok(ok) => {
            let caller = caller(ok);
            tracing::debug!(node = %caller.node, principal = %caller.principal, "token reviewed");
        }
        Err(error) => tracing::info!(%error, "token refused"),
    }
    result
}

impl Authenticator for TokenReviewer {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let status = self.review(token).await?;
        logged(self.caller(status), |c| c)
    }

    async fn authenticate_for_ca(&self, token: &str) -> Result<CaCaller, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let status = self.review(token).await?;
        logged(self.ca_caller(status), CaCaller::caller)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    /// A pod-bound token's review (the pod on `node`), or an unbound one's.
    fn status(user: &str, node: Option<&str>, audiences: &[&str]) -> TokenReviewStatus {
        let extra = node.map(|n| {
            BTreeMap::from([
                (NODE_NAME_EXTRA.to_owned(), vec![n.to_owned()]),
                (POD_NAME_EXTRA.to_owned(), vec![format!("pod-on-{n}")]),
            ])
        });
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
        // Bound to a Node object: a node, no pod.
        let mut node_bound = status("system:serviceaccount:istio-system:ztunnel", None, &[]);
        if let Some(user) = node_bound.user.as_mut() {
            user.extra = Some(BTreeMap::from([(
                NODE_NAME_EXTRA.to_owned(),
                vec!["n1".to_owned()],
            )]));
        }
        assert!(matches!(
            r.caller(node_bound.clone()),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            r.ca_caller(node_bound),
            Err(AuthError::Invalid(_))
        ));
        let not_sa = r.caller(status("alice", Some("n1"), &[]));
        assert!(matches!(not_sa, Err(AuthError::Invalid(_))));

        let r = reviewer(&["istio-ca"]);
        let sa = "system:serviceaccount:istio-system:ztunnel";
        assert!(r.caller(status(sa, Some("n1"), &["istio-ca"])).is_ok());
        let wrong = r.caller(status(sa, Some("n1"), &["other"]));
        assert!(matches!(wrong, Err(AuthError::Invalid(_))));
    }

    #[tokio::test]
    async fn for_the_ca_a_pod_token_stands_for_its_account() {
        let r = reviewer(&["istio-ca"]);
        let node = r.ca_caller(status(
            "system:serviceaccount:istio-system:ztunnel",
            Some("n1"),
            &["istio-ca"],
        ));
        assert!(
            matches!(node, Ok(CaCaller::Node(ref c)) if c.node == "n1"),
            "{node:?}"
        );
        // Bound to a pod by name only (API servers before 1.30 name no node).
        let mut pod_only = status("system:serviceaccount:shop:waypoint", None, &["istio-ca"]);
        if let Some(user) = pod_only.user.as_mut() {
            user.extra = Some(BTreeMap::from([(
                POD_NAME_EXTRA.to_owned(),
                vec!["waypoint-7d9".to_owned()],
            )]));
        }
        let CaCaller::Workload {
            caller,
            namespace,
            service_account,
        } = r.ca_caller(pod_only).unwrap()
        else {
            panic!("not a workload caller");
        };
        assert_eq!(
            (namespace.as_str(), service_account.as_str()),
            ("shop", "waypoint")
        );
        assert_eq!(caller.principal, "system:serviceaccount:shop:waypoint");
        // The audience check holds for workloads too.
        let wrong = r.ca_caller(status(
            "system:serviceaccount:shop:waypoint",
            Some("n1"),
            &["other"],
        ));
        assert!(matches!(wrong, Err(AuthError::Invalid(_))), "{wrong:?}");
    }
}
