//! The checks a request passes before it touches a client's state: a served
//! type, the node it names, names of a sane length and a bounded number of
//! claimed versions.

use ambit_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tonic::Status;

use super::super::entries::TypeEntries;
use super::WILDCARD;
use crate::auth::Caller;

/// The longest resource name a request may carry: far above any real one (a
/// uid, `<namespace>/<name>`), so names cannot carry megabytes each.
const MAX_NAME_LEN: usize = 1024;

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("the request has no type_url")]
    NoTypeUrl,
    #[error("type {0:?} is not served here (served: {types})", types = super::super::SERVED_TYPES.join(", "))]
    UnknownType(String),
    #[error(
        "more than {max} resource names subscribed (or claimed held; a wildcard stream may also claim every resource the server has) for {type_url}"
    )]
    TooManyNames { type_url: String, max: usize },
    #[error("a resource name longer than {max} bytes")]
    NameTooLong { max: usize },
    #[error("node.id {claimed:?} is not the node of the caller's credential ({node:?})")]
    OtherNode { claimed: String, node: String },
}

impl RequestError {
    /// The status the stream ends with.
    pub(crate) fn status(&self) -> Status {
        match self {
            RequestError::OtherNode { .. } => Status::permission_denied(self.to_string()),
            _ => Status::invalid_argument(self.to_string()),
        }
    }
}

/// Checks `req` from `caller`, whose state for the type is `started` (or not
/// yet), against the type's `entries`; `max` is `max_names_per_type`.
pub(super) fn check(
    req: &DeltaDiscoveryRequest,
    caller: &Caller,
    started: bool,
    entries: Option<&TypeEntries>,
    max: usize,
) -> Result<(), RequestError> {
    if req.type_url.is_empty() {
        return Err(RequestError::NoTypeUrl);
    }
    // Every type a client names gets state and an answer: only served ones.
    if !super::super::SERVED_TYPES.contains(&req.type_url.as_str()) {
        return Err(RequestError::UnknownType(req.type_url.clone()));
    }
    // Logs and the debug view show it: a proxy cannot pass for another node.
    if let Some(claimed) = node_id(req)
        && claimed != caller.node
    {
        return Err(RequestError::OtherNode {
            claimed: claimed.to_string(),
            node: caller.node.clone(),
        });
    }
    let mut names = req
        .resource_names_subscribe
        .iter()
        .chain(req.resource_names_unsubscribe.iter())
        .chain(req.initial_resource_versions.keys());
    if names.any(|n| n.len() > MAX_NAME_LEN) {
        return Err(RequestError::NameTooLong { max: MAX_NAME_LEN });
    }
    if claims_over_bound(req, started, entries, max) {
        return Err(RequestError::TooManyNames {
            type_url: req.type_url.clone(),
            max,
        });
    }
    Ok(())
}

/// The node id the request carries, if any.
pub(super) fn node_id(req: &DeltaDiscoveryRequest) -> Option<&str> {
    req.node
        .as_ref()
        .map(|n| n.id.as_str())
        .filter(|id| !id.is_empty())
}

/// Whether a type's first request, subscribing `subscribe`, is a wildcard one
/// (explicitly, or by naming nothing: the legacy form).
pub(super) fn opens_wildcard(subscribe: &[String]) -> bool {
    subscribe.is_empty() || subscribe.iter().any(|n| n == WILDCARD)
}

/// Whether the versions `req` claims the client holds are more than a stream may
/// claim. A wildcard subscription starting here may claim every resource the
/// store has (a reconnect claims everything it was sent, however many) and at
/// most `max` names more: those become removals owed, the only claims whose
/// state the store's size does not bound. Otherwise at most `max` claims.
fn claims_over_bound(
    req: &DeltaDiscoveryRequest,
    started: bool,
    entries: Option<&TypeEntries>,
    max: usize,
) -> bool {
    let claims = &req.initial_resource_versions;
    if started || !opens_wildcard(&req.resource_names_subscribe) {
        return claims.len() > max;
    }
    let live = entries.map_or(0, TypeEntries::len);
    claims.len() > live.saturating_add(max)
        || claims
            .keys()
            .filter(|name| entries.is_none_or(|e| e.get(name).is_none()))
            .count()
            > max
}
