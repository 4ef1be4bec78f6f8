//! L4 authorization: Istio's `AuthorizationPolicy` as ztunnel enforces it on
//! inbound connections (peer identity, namespace, service account, IP blocks,
//! destination port).
//!
//! [`PolicySet`] holds every policy, indexed by namespace so that a connection
//! only looks at the root namespace's and its destination's own policies.

mod convert;
mod decision;
mod error;
mod eval;
mod model;
mod string_match;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;

pub use decision::{Decision, DryRunResult};
pub use error::{FieldError, PolicyError, Problem};
pub use eval::{Connection, Destination, Evidence, RuleMatch};
pub use model::{Action, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch};
pub use string_match::StringMatch;

/// Istio's default root namespace: its GLOBAL policies apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Every authorization policy known to this ztunnel.
#[derive(Clone, Debug)]
pub struct PolicySet {
    root_namespace: String,
    /// namespace -> name -> policy. Names are ordered so evaluation, and so the
    /// policy a decision names, is deterministic.
    by_namespace: HashMap<String, BTreeMap<String, Arc<Authorization>>>,
    len: usize,
}

impl Default for PolicySet {
    fn default() -> Self {
        Self::new(DEFAULT_ROOT_NAMESPACE)
    }
}

impl PolicySet {
    /// An empty set whose GLOBAL policies are taken from `root_namespace`.
    pub fn new(root_namespace: impl Into<String>) -> Self {
        Self {
            root_namespace: root_namespace.into(),
            by_namespace: HashMap::new(),
            len: 0,
        }
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Takes GLOBAL and mesh-wide selector policies from `root_namespace` from now on.
    pub fn set_root_namespace(&mut self, root_namespace: &str) {
        if self.root_namespace != root_namespace {
            self.root_namespace = root_namespace.to_string();
        }
    }

    /// Inserts a policy, replacing (and returning) the one with the same
    /// namespace and name.
    pub fn insert(&mut self, policy: impl Into<Arc<Authorization>>) -> Option<Arc<Authorization>> {
        let policy = policy.into();
        let previous = self
            .by_namespace
            .entry(policy.namespace.clone())
            .or_default()
            .insert(policy.name.clone(), policy);
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }

    /// Removes the policy `namespace/name`, returning it if it was there.
    pub fn remove(&mut self, namespace: &str, name: &str) -> Option<Arc<Authorization>> {
        let policies = self.by_namespace.get_mut(namespace)?;
        let removed = policies.remove(name)?;
        if policies.is_empty() {
            self.by_namespace.remove(namespace);
        }
        self.len -= 1;
        Some(removed)
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&Arc<Authorization>> {
        self.by_namespace.get(namespace)?.get(name)
    }

    /// Every policy; namespaces in no particular order, names in order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.by_namespace.values().flat_map(BTreeMap::values)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The policies that govern `dst`, dry-run ones included: the root
    /// namespace's mesh-wide ones first (GLOBAL, and WORKLOAD_SELECTOR, whose
    /// selector matches workloads of every namespace, as in Istio), then the
    /// destination namespace's.
    pub fn applicable<'s>(
        &'s self,
        dst: &'s Destination<'_>,
    ) -> impl Iterator<Item = &'s Authorization> + 's {
        let root = &self.root_namespace;
        // In the root namespace itself its selector policies come as local ones.
        let in_root = dst.namespace == root;
        let global = self
            .by_namespace
            .get(root)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter(move |p| {
                p.scope == Scope::Global || (p.scope == Scope::WorkloadSelector && !in_root)
            });
        let local = self
            .by_namespace
            .get(dst.namespace)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter(|p| p.scope != Scope::Global);
        global
            .chain(local)
            .map(|p| &**p)
            .filter(move |p| p.applies_to(dst, root))
    }

    /// Authorizes one connection to `dst`: a matching DENY denies; otherwise, if
    /// ALLOW policies apply, one of them must match; with none, allow. Dry-run
    /// policies are evaluated and reported, never enforced.
    pub fn evaluate(&self, dst: &Destination<'_>, conn: &Connection<'_>) -> Decision {
        let mut deny = None;
        let mut allow = None;
        let mut any_deny = false;
        let mut any_allow = false;
        let mut dry_run = Vec::new();
        for policy in self.applicable(dst) {
            if policy.dry_run {
                dry_run.push(DryRunResult::new(policy, policy.matches(conn).as_ref()));
                continue;
            }
            match policy.action {
                Action::Deny => {
                    any_deny = true;
                    if deny.is_none() {
                        deny = policy.matches(conn).map(|m| (policy, m));
                    }
                }
                Action::Allow => {
                    any_allow = true;
                    // Once denied, no ALLOW can change the outcome.
                    if allow.is_none() && deny.is_none() {
                        allow = policy.matches(conn).map(|m| (policy, m));
                    }
                }
            }
        }
        let decision = match (deny, allow) {
            (Some((policy, m)), _) | (None, Some((policy, m))) => {
                Decision::matched(policy, &m, dry_run)
            }
            (None, None) if any_allow => {
                let considered = self
                    .applicable(dst)
                    .filter(|p| !p.dry_run && p.action == Action::Allow);
                Decision::no_allow_matched(considered, dry_run)
            }
            (None, None) if any_deny => Decision::allowed_without_policy(
                "no DENY policy matched and no ALLOW policy applies",
                dry_run,
            ),
            (None, None) => {
                Decision::allowed_without_policy("no authorization policy applies", dry_run)
            }
        };
        tracing::trace!(
            dst_namespace = dst.namespace,
            allowed = decision.allowed,
            policy = decision.policy.as_deref(),
            "authorization decision"
        );
        decision
    }
}

/// The admin dump: the root namespace and every policy, sorted by key.
impl Serialize for PolicySet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut policies: Vec<&Authorization> = self.iter().map(|p| &**p).collect();
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut s = serializer.serialize_struct("PolicySet", 2)?;
        s.serialize_field("rootNamespace", &self.root_namespace)?;
        s.serialize_field("policies", &policies)?;
        s.end()
    }
}
