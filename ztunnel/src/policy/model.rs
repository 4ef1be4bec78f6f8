//! The L4 authorization model: what a policy says, in the shape it is stored,
//! written in the local YAML state file and dumped on the admin endpoint.
//!
//! Field names are camelCase and enum values SCREAMING_SNAKE_CASE, as in Istio's
//! `AuthorizationPolicy`; unknown fields are refused rather than ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use mesh_core::SpiffeId;
use serde::{Deserialize, Deserializer, Serialize};

use super::error::{PolicyError, Problem};
use super::string_match::StringMatch;

/// One authorization policy, as ztunnel enforces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    /// Which workloads the policy applies to.
    pub scope: Scope,
    /// ALLOW unless said otherwise, as in Istio.
    #[serde(default)]
    pub action: Action,
    /// Evaluate and report, never enforce.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dry_run: bool,
    /// With [`Scope::WorkloadSelector`]: labels a workload must all carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// OR'd. No rules at all matches nothing: an ALLOW without rules allows nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Which workloads a policy applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Scope {
    /// Every workload in the mesh; honoured only for policies in the root namespace.
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Workloads in the policy's namespace carrying all `selector` labels; for a
    /// policy in the root namespace, such workloads of every namespace.
    WorkloadSelector,
}

/// What a matching policy does to the connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// A rule matches when every clause matches (AND); no clauses matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub clauses: Vec<Clause>,
}

/// A clause matches when any of its matches matches (OR); no matches matches
/// everything (Istio ztunnel's reading of an empty clause).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Clause {
    #[serde(default)]
    pub matches: Vec<Match>,
}

/// Conditions on one connection. Every non-empty field must hold (AND); inside a
/// field any value may match (OR); a `not_*` field holds when none of its values
/// match. A match with every field empty matches nothing, as in Istio's ztunnel:
/// istiod leaves one behind when it strips conditions ztunnel cannot check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    /// Peer identities without the `spiffe://` scheme: `cluster.local/ns/x/sa/y`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    /// The peer's namespace, from its identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    /// CIDR blocks; a bare address means a single host.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "ip_blocks"
    )]
    pub source_ips: Vec<IpNet>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "ip_blocks"
    )]
    pub not_source_ips: Vec<IpNet>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "ip_blocks"
    )]
    pub destination_ips: Vec<IpNet>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "ip_blocks"
    )]
    pub not_destination_ips: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
    /// The peer's namespace and service account, from its identity, whatever
    /// its trust domain (Istio's `serviceAccounts`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
}

/// One Kubernetes service account, both parts matched exactly.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

impl ServiceAccountMatch {
    /// True when `id` is this account, in any trust domain.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        id.namespace() == self.namespace && id.service_account() == self.service_account
    }

    fn validate(&self) -> Result<(), (&'static str, Problem)> {
        if self.namespace.is_empty() {
            return Err(("namespace", Problem::Empty));
        }
        if self.service_account.is_empty() {
            return Err(("serviceAccount", Problem::Empty));
        }
        Ok(())
    }
}

impl fmt::Display for ServiceAccountMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

impl Authorization {
    /// `namespace/name`: the policy's key, also its xDS resource name.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Checks what serde cannot: run this on policies read from YAML (those built
    /// from xDS are checked during conversion). Fields are named in camelCase.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let fail = |field: String, problem| Err(PolicyError::new(self.key(), field, problem));
        if self.name.is_empty() {
            return fail("name".into(), Problem::Empty);
        }
        if self.namespace.is_empty() {
            return fail("namespace".into(), Problem::Empty);
        }
        if !self.selector.is_empty() && self.scope != Scope::WorkloadSelector {
            return fail("selector".into(), Problem::SelectorWithoutSelectorScope);
        }
        for (r, rule) in self.rules.iter().enumerate() {
            for (c, clause) in rule.clauses.iter().enumerate() {
                for (m, matched) in clause.matches.iter().enumerate() {
                    if let Err((field, problem)) = matched.validate() {
                        let path = format!("rules[{r}].clauses[{c}].matches[{m}].{field}");
                        return fail(path, problem);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Match {
    /// True when no field is set; such a match never matches.
    pub fn is_empty(&self) -> bool {
        self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
    }

    fn validate(&self) -> Result<(), (String, Problem)> {
        let ports = [
            ("destinationPorts", &self.destination_ports),
            ("notDestinationPorts", &self.not_destination_ports),
        ];
        for (field, ports) in ports {
            if let Some(i) = ports.iter().position(|p| *p == 0) {
                return Err((format!("{field}[{i}]"), Problem::Port(0)));
            }
        }
        let accounts = [
            ("serviceAccounts", &self.service_accounts),
            ("notServiceAccounts", &self.not_service_accounts),
        ];
        for (field, accounts) in accounts {
            for (i, account) in accounts.iter().enumerate() {
                if let Err((part, problem)) = account.validate() {
                    return Err((format!("{field}[{i}].{part}"), problem));
                }
            }
        }
        let principals = [
            ("principals", &self.principals),
            ("notPrincipals", &self.not_principals),
        ];
        for (field, patterns) in principals {
            if let Some(i) = patterns.iter().position(StringMatch::has_spiffe_scheme) {
                return Err((format!("{field}[{i}]"), Problem::PrincipalWithScheme));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Global => "GLOBAL",
            Scope::Namespace => "NAMESPACE",
            Scope::WorkloadSelector => "WORKLOAD_SELECTOR",
        })
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        })
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// CIDR blocks in Istio's `ipBlocks` form: `10.0.0.0/8`, or a bare address.
fn ip_blocks<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    let raw = Vec::<String>::deserialize(deserializer)?;
    raw.iter()
        .map(|s| parse_ip_block(s).map_err(serde::de::Error::custom))
        .collect()
}

fn parse_ip_block(s: &str) -> Result<IpNet, String> {
    if s.contains('/') {
        s.parse::<IpNet>()
            .map_err(|e| format!("invalid IP block {s:?}: {e}"))
    } else {
        s.parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|e| format!("invalid IP address {s:?}: {e}"))
    }
}
