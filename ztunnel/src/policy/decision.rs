//! The outcome of authorizing one connection, with enough detail for the access
//! log and the admin "why denied" view: the deciding policy and rule, the first
//! condition that held, and what dry-run policies would have done.

use std::fmt;

use serde::Serialize;

use super::eval::RuleMatch;
use super::model::{Action, Authorization};

/// Whether a connection may proceed, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the policy that decided, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Index of the deciding policy's rule that matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    pub reason: String,
    /// Every applicable dry-run policy, in evaluation order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<DryRunResult>,
}

/// What one dry-run policy would have done had it been enforced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DryRunResult {
    /// `namespace/name`.
    pub policy: String,
    pub action: Action,
    pub matched: bool,
    /// The rule that matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// The first condition that held; empty when the policy did not match.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl Decision {
    /// Allowed with no policy deciding: none applies, or only DENY ones that
    /// did not match (`reason` says which).
    pub(super) fn allowed_without_policy(reason: &str, dry_run: Vec<DryRunResult>) -> Self {
        Self {
            allowed: true,
            policy: None,
            rule: None,
            reason: reason.to_string(),
            dry_run,
        }
    }

    /// `policy` matched and its action decides.
    pub(super) fn matched(
        policy: &Authorization,
        matched: &RuleMatch<'_>,
        dry_run: Vec<DryRunResult>,
    ) -> Self {
        Self {
            allowed: policy.action == Action::Allow,
            policy: Some(policy.key()),
            rule: Some(matched.rule),
            reason: matched.evidence.to_string(),
            dry_run,
        }
    }

    /// ALLOW policies apply but none matched.
    pub(super) fn no_allow_matched<'p>(
        considered: impl Iterator<Item = &'p Authorization>,
        dry_run: Vec<DryRunResult>,
    ) -> Self {
        let mut reason = String::from("no ALLOW policy matched (considered:");
        for (i, policy) in considered.enumerate() {
            reason.push_str(if i == 0 { " " } else { ", " });
            reason.push_str(&policy.namespace);
            reason.push('/');
            reason.push_str(&policy.name);
        }
        reason.push(')');
        Self {
            allowed: false,
            policy: None,
            rule: None,
            reason,
            dry_run,
        }
    }

    /// The action of the deciding policy, if one decided.
    pub fn action(&self) -> Option<Action> {
        self.policy.as_ref().map(|_| {
            if self.allowed {
                Action::Allow
            } else {
                Action::Deny
            }
        })
    }
}

impl DryRunResult {
    pub(super) fn new(policy: &Authorization, matched: Option<&RuleMatch<'_>>) -> Self {
        Self {
            policy: policy.key(),
            action: policy.action,
            matched: matched.is_some(),
            rule: matched.map(|m| m.rule),
            reason: matched.map(|m| m.evidence.to_string()).unwrap_or_default(),
        }
    }
}

/// `denied by DENY policy shop/no-scrapers rule 0: source namespace "elsewhere"
/// matched`, then what each dry-run policy would have done.
impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "allowed" } else { "denied" };
        match (&self.policy, self.rule, self.action()) {
            (Some(policy), Some(rule), Some(action)) => write!(
                f,
                "{verdict} by {action} policy {policy} rule {rule}: {}",
                self.reason
            )?,
            _ => write!(f, "{verdict}: {}", self.reason)?,
        }
        for result in &self.dry_run {
            write!(f, "; {result}")?;
        }
        Ok(())
    }
}

impl fmt::Display for DryRunResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dry-run {} policy {} ", self.action, self.policy)?;
        match (self.matched, self.rule) {
            (true, Some(rule)) => {
                let effect = match self.action {
                    Action::Allow => "allow",
                    Action::Deny => "deny",
                };
                write!(f, "would {effect} (rule {rule}: {})", self.reason)
            }
            _ => f.write_str("would not match"),
        }
    }
}
