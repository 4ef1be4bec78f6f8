//! Matching one policy against one connection, as Istio's ztunnel does: rules
//! OR'd, clauses AND'd, matches OR'd, fields AND'd. The first condition that held
//! is kept as [`Evidence`] so a decision can say why, without allocating.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use mesh_core::SpiffeId;

use super::model::{Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch};
use super::string_match::StringMatch;

/// What ztunnel knows about an inbound connection when it authorizes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection<'a> {
    /// The peer's identity from its verified certificate; `None` for plaintext
    /// (captured on 15006), which never satisfies a principals or namespaces match.
    pub src_identity: Option<&'a SpiffeId>,
    pub src_ip: IpAddr,
    /// The original destination: the workload's address, not ztunnel's.
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

/// The destination workload, which decides which policies apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// A policy's rule that matched a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleMatch<'a> {
    /// Index in the policy's `rules`.
    pub rule: usize,
    /// The first condition of the rule that held.
    pub evidence: Evidence<'a>,
}

/// One condition that held, with the connection's value and the policy's pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evidence<'a> {
    /// The rule (or every clause of it) has no conditions.
    Unconditional,
    Principal {
        principal: &'a SpiffeId,
        pattern: &'a StringMatch,
    },
    NotPrincipal {
        principal: Option<&'a SpiffeId>,
    },
    ServiceAccount {
        principal: &'a SpiffeId,
        account: &'a ServiceAccountMatch,
    },
    NotServiceAccount {
        principal: Option<&'a SpiffeId>,
    },
    Namespace {
        namespace: &'a str,
        pattern: &'a StringMatch,
    },
    NotNamespace {
        namespace: Option<&'a str>,
    },
    SourceIp {
        ip: IpAddr,
        block: &'a IpNet,
    },
    NotSourceIp {
        ip: IpAddr,
    },
    DestinationIp {
        ip: IpAddr,
        block: &'a IpNet,
    },
    NotDestinationIp {
        ip: IpAddr,
    },
    DestinationPort {
        port: u16,
    },
    NotDestinationPort {
        port: u16,
    },
}

impl Authorization {
    /// Whether this policy governs `dst`. A GLOBAL policy only counts in the root
    /// namespace; elsewhere it applies to nothing. A selector in the root
    /// namespace matches workloads of every namespace (Istio's rule).
    pub fn applies_to(&self, dst: &Destination<'_>, root_namespace: &str) -> bool {
        match self.scope {
            Scope::Global => self.namespace == root_namespace,
            Scope::Namespace => self.namespace == dst.namespace,
            Scope::WorkloadSelector => {
                (self.namespace == dst.namespace || self.namespace == root_namespace)
                    && self
                        .selector
                        .iter()
                        .all(|(k, v)| dst.labels.get(k) == Some(v))
            }
        }
    }

    /// The first rule that matches `conn`; `None` when none does (always the case
    /// for a policy without rules).
    pub fn matches<'a>(&'a self, conn: &Connection<'a>) -> Option<RuleMatch<'a>> {
        self.rules
            .iter()
            .enumerate()
            .find_map(|(rule, r)| r.matches(conn).map(|evidence| RuleMatch { rule, evidence }))
    }
}

impl Rule {
    fn matches<'a>(&'a self, conn: &Connection<'a>) -> Option<Evidence<'a>> {
        let mut evidence = Evidence::Unconditional;
        for clause in &self.clauses {
            let held = clause.matches(conn)?;
            if evidence == Evidence::Unconditional {
                evidence = held;
            }
        }
        Some(evidence)
    }
}

impl Clause {
    fn matches<'a>(&'a self, conn: &Connection<'a>) -> Option<Evidence<'a>> {
        if self.matches.is_empty() {
            return Some(Evidence::Unconditional);
        }
        self.matches.iter().find_map(|m| m.check(conn))
    }
}

impl Match {
    /// `Some` with the first condition that held when all hold; `None` when one
    /// fails or when there are no conditions at all.
    fn check<'a>(&'a self, conn: &Connection<'a>) -> Option<Evidence<'a>> {
        let mut first = None;
        let id = conn.src_identity;

        if !self.principals.is_empty() {
            let principal = id?;
            let parts = principal_parts(principal);
            let pattern = self.principals.iter().find(|p| p.matches_parts(&parts))?;
            first.get_or_insert(Evidence::Principal { principal, pattern });
        }
        if !self.not_principals.is_empty() {
            if let Some(principal) = id {
                let parts = principal_parts(principal);
                if self.not_principals.iter().any(|p| p.matches_parts(&parts)) {
                    return None;
                }
            }
            first.get_or_insert(Evidence::NotPrincipal { principal: id });
        }

        if !self.service_accounts.is_empty() {
            let principal = id?;
            let account = self
                .service_accounts
                .iter()
                .find(|a| a.matches(principal))?;
            first.get_or_insert(Evidence::ServiceAccount { principal, account });
        }
        if !self.not_service_accounts.is_empty() {
            if id.is_some_and(|p| self.not_service_accounts.iter().any(|a| a.matches(p))) {
                return None;
            }
            first.get_or_insert(Evidence::NotServiceAccount { principal: id });
        }

        let ns = id.map(SpiffeId::namespace);
        if !self.namespaces.is_empty() {
            let namespace = ns?;
            let pattern = self.namespaces.iter().find(|p| p.matches(namespace))?;
            first.get_or_insert(Evidence::Namespace { namespace, pattern });
        }
        if !self.not_namespaces.is_empty() {
            if ns.is_some_and(|n| self.not_namespaces.iter().any(|p| p.matches(n))) {
                return None;
            }
            first.get_or_insert(Evidence::NotNamespace { namespace: ns });
        }

        // A v4-mapped v6 address (dual-stack socket) is matched as the v4 it is.
        let src = conn.src_ip.to_canonical();
        if !self.source_ips.is_empty() {
            let block = self.source_ips.iter().find(|b| b.contains(&src))?;
            first.get_or_insert(Evidence::SourceIp { ip: src, block });
        }
        if !self.not_source_ips.is_empty() {
            if self.not_source_ips.iter().any(|b| b.contains(&src)) {
                return None;
            }
            first.get_or_insert(Evidence::NotSourceIp { ip: src });
        }

        let dst = conn.dst_ip.to_canonical();
        if !self.destination_ips.is_empty() {
            let block = self.destination_ips.iter().find(|b| b.contains(&dst))?;
            first.get_or_insert(Evidence::DestinationIp { ip: dst, block });
        }
        if !self.not_destination_ips.is_empty() {
            if self.not_destination_ips.iter().any(|b| b.contains(&dst)) {
                return None;
            }
            first.get_or_insert(Evidence::NotDestinationIp { ip: dst });
        }

        let port = conn.dst_port;
        if !self.destination_ports.is_empty() {
            if !self.destination_ports.contains(&port) {
                return None;
            }
            first.get_or_insert(Evidence::DestinationPort { port });
        }
        if !self.not_destination_ports.is_empty() {
            if self.not_destination_ports.contains(&port) {
                return None;
            }
            first.get_or_insert(Evidence::NotDestinationPort { port });
        }

        first
    }
}

/// A principal as Istio writes it (`td/ns/x/sa/y`), in parts.
fn principal_parts(id: &SpiffeId) -> [&str; 5] {
    [
        id.trust_domain(),
        "/ns/",
        id.namespace(),
        "/sa/",
        id.service_account(),
    ]
}

/// Formats a principal as Istio writes it, without the `spiffe://` scheme.
struct Principal<'a>(&'a SpiffeId);

impl fmt::Display for Principal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for part in principal_parts(self.0) {
            f.write_str(part)?;
        }
        f.write_str("\"")
    }
}

/// ` "pattern"` unless the pattern is exact (then the value already says it).
struct Pattern<'a>(&'a StringMatch);

impl fmt::Display for Pattern<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_exact() {
            Ok(())
        } else {
            write!(f, " \"{}\"", self.0)
        }
    }
}

impl fmt::Display for Evidence<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Evidence::Unconditional => f.write_str("the rule has no conditions"),
            Evidence::Principal { principal, pattern } => write!(
                f,
                "source principal {} matched{}",
                Principal(principal),
                Pattern(pattern)
            ),
            Evidence::NotPrincipal { principal: Some(p) } => write!(
                f,
                "source principal {} is not in notPrincipals",
                Principal(p)
            ),
            Evidence::NotPrincipal { principal: None } => {
                f.write_str("source has no identity, so notPrincipals held")
            }
            Evidence::ServiceAccount { principal, account } => write!(
                f,
                "source principal {} is service account {account}",
                Principal(principal)
            ),
            Evidence::NotServiceAccount { principal: Some(p) } => write!(
                f,
                "source principal {} is not in notServiceAccounts",
                Principal(p)
            ),
            Evidence::NotServiceAccount { principal: None } => {
                f.write_str("source has no identity, so notServiceAccounts held")
            }
            Evidence::Namespace { namespace, pattern } => write!(
                f,
                "source namespace {namespace:?} matched{}",
                Pattern(pattern)
            ),
            Evidence::NotNamespace { namespace: Some(n) } => {
                write!(f, "source namespace {n:?} is not in notNamespaces")
            }
            Evidence::NotNamespace { namespace: None } => {
                f.write_str("source has no identity, so notNamespaces held")
            }
            Evidence::SourceIp { ip, block } => write!(f, "source IP {ip} matched {block}"),
            Evidence::NotSourceIp { ip } => write!(f, "source IP {ip} is not in notSourceIps"),
            Evidence::DestinationIp { ip, block } => {
                write!(f, "destination IP {ip} matched {block}")
            }
            Evidence::NotDestinationIp { ip } => {
                write!(f, "destination IP {ip} is not in notDestinationIps")
            }
            Evidence::DestinationPort { port } => write!(f, "destination port {port} matched"),
            Evidence::NotDestinationPort { port } => {
                write!(f, "destination port {port} is not in notDestinationPorts")
            }
        }
    }
}
