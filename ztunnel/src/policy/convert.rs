//! xDS `ambit.security.v1.Authorization` to the policy model. Every value is
//! checked here, so a bad resource is refused (and NACKed) with the policy and the
//! field named, and nothing invalid reaches evaluation.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ambit_proto::security as proto;
use ambit_proto::security::string_match::MatchType;
use ipnet::IpNet;

use super::error::{FieldError, PolicyError, Problem};
use super::model::{Action, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch};
use super::string_match::StringMatch;

impl TryFrom<proto::Authorization> for Authorization {
    type Error = PolicyError;

    fn try_from(p: proto::Authorization) -> Result<Self, PolicyError> {
        let key = format!("{}/{}", p.namespace, p.name);
        let fail = |field: &str, problem| PolicyError::new(key.clone(), field, problem);
        if p.name.is_empty() {
            return Err(fail("name", Problem::Empty));
        }
        if p.namespace.is_empty() {
            return Err(fail("namespace", Problem::Empty));
        }
        let scope = proto::Scope::try_from(p.scope).map_err(|_| {
            let problem = Problem::UnknownEnum {
                kind: "Scope",
                value: p.scope,
            };
            fail("scope", problem)
        })?;
        let action = proto::Action::try_from(p.action).map_err(|_| {
            let problem = Problem::UnknownEnum {
                kind: "Action",
                value: p.action,
            };
            fail("action", problem)
        })?;
        let scope = Scope::from(scope);
        let rules = p
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, rule)| {
                Rule::try_from(rule)
                    .map_err(|e| e.within(format_args!("rules[{i}]")).in_policy(&key))
            })
            .collect::<Result<_, _>>()?;
        // The proto leaves the selector unused outside WORKLOAD_SELECTOR; drop it so
        // the model (and the admin dump) never shows a selector that does nothing.
        let selector = match scope {
            Scope::WorkloadSelector => p.selector.into_iter().collect(),
            Scope::Global | Scope::Namespace => BTreeMap::new(),
        };
        Ok(Authorization {
            name: p.name,
            namespace: p.namespace,
            scope,
            action: action.into(),
            dry_run: p.dry_run,
            selector,
            rules,
        })
    }
}

impl From<proto::Scope> for Scope {
    fn from(scope: proto::Scope) -> Self {
        match scope {
            proto::Scope::Global => Scope::Global,
            proto::Scope::Namespace => Scope::Namespace,
            proto::Scope::WorkloadSelector => Scope::WorkloadSelector,
        }
    }
}

impl From<proto::Action> for Action {
    fn from(action: proto::Action) -> Self {
        match action {
            proto::Action::Allow => Action::Allow,
            proto::Action::Deny => Action::Deny,
        }
    }
}

impl TryFrom<proto::Rule> for Rule {
    type Error = FieldError;

    fn try_from(rule: proto::Rule) -> Result<Self, FieldError> {
        let clauses = rule
            .clauses
            .into_iter()
            .enumerate()
            .map(|(i, c)| Clause::try_from(c).map_err(|e| e.within(format_args!("clauses[{i}]"))))
            .collect::<Result<_, _>>()?;
        Ok(Rule { clauses })
    }
}

impl TryFrom<proto::Clause> for Clause {
    type Error = FieldError;

    fn try_from(clause: proto::Clause) -> Result<Self, FieldError> {
        let matches = clause
            .matches
            .into_iter()
            .enumerate()
            .map(|(i, m)| Match::try_from(m).map_err(|e| e.within(format_args!("matches[{i}]"))))
            .collect::<Result<_, _>>()?;
        Ok(Clause { matches })
    }
}

impl TryFrom<proto::Match> for Match {
    type Error = FieldError;

    fn try_from(m: proto::Match) -> Result<Self, FieldError> {
        Ok(Match {
            principals: principals("principals", m.principals)?,
            not_principals: principals("not_principals", m.not_principals)?,
            namespaces: strings("namespaces", m.namespaces)?,
            not_namespaces: strings("not_namespaces", m.not_namespaces)?,
            source_ips: ip_blocks("source_ips", &m.source_ips)?,
            not_source_ips: ip_blocks("not_source_ips", &m.not_source_ips)?,
            destination_ips: ip_blocks("destination_ips", &m.destination_ips)?,
            not_destination_ips: ip_blocks("not_destination_ips", &m.not_destination_ips)?,
            destination_ports: ports("destination_ports", &m.destination_ports)?,
            not_destination_ports: ports("not_destination_ports", &m.not_destination_ports)?,
            service_accounts: service_accounts("service_accounts", m.service_accounts)?,
            not_service_accounts: service_accounts("not_service_accounts", m.not_service_accounts)?,
        })
    }
}

impl TryFrom<proto::StringMatch> for StringMatch {
    type Error = Problem;

    fn try_from(m: proto::StringMatch) -> Result<Self, Problem> {
        match m.match_type {
            Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s)),
            Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s)),
            Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s)),
            Some(MatchType::Presence(true)) => Ok(StringMatch::Presence),
            Some(MatchType::Presence(false)) => Err(Problem::PresenceFalse),
            None => Err(Problem::MissingMatchType),
        }
    }
}

/// Converts one CIDR block: 4 or 16 address bytes, a prefix no longer than them.
fn ip_block(block: &proto::IpBlock) -> Result<IpNet, Problem> {
    let addr = match block.address.len() {
        4 => {
            let mut octets = [0u8; 4];
            octets.copy_from_slice(&block.address);
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        16 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&block.address);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        n => return Err(Problem::AddressLength(n)),
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let too_long = Problem::PrefixLength {
        length: block.length,
        max,
    };
    let length = u8::try_from(block.length).map_err(|_| too_long.clone())?;
    IpNet::new(addr, length).map_err(|_| too_long)
}

fn strings(field: &str, values: Vec<proto::StringMatch>) -> Result<Vec<StringMatch>, FieldError> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            StringMatch::try_from(m).map_err(|p| FieldError::new(format!("{field}[{i}]"), p))
        })
        .collect()
}

fn principals(
    field: &str,
    values: Vec<proto::StringMatch>,
) -> Result<Vec<StringMatch>, FieldError> {
    let converted = strings(field, values)?;
    match converted.iter().position(StringMatch::has_spiffe_scheme) {
        Some(i) => Err(FieldError::new(
            format!("{field}[{i}]"),
            Problem::PrincipalWithScheme,
        )),
        None => Ok(converted),
    }
}

fn ip_blocks(field: &str, blocks: &[proto::IpBlock]) -> Result<Vec<IpNet>, FieldError> {
    blocks
        .iter()
        .enumerate()
        .map(|(i, b)| ip_block(b).map_err(|p| FieldError::new(format!("{field}[{i}]"), p)))
        .collect()
}

fn ports(field: &str, ports: &[u32]) -> Result<Vec<u16>, FieldError> {
    ports
        .iter()
        .enumerate()
        .map(|(i, &p)| match u16::try_from(p) {
            Ok(port) if port != 0 => Ok(port),
            _ => Err(FieldError::new(format!("{field}[{i}]"), Problem::Port(p))),
        })
        .collect()
}

/// Service accounts, both parts non-empty (an empty one would match no peer and
/// only hide a translation bug).
fn service_accounts(
    field: &str,
    accounts: Vec<proto::ServiceAccountMatch>,
) -> Result<Vec<ServiceAccountMatch>, FieldError> {
    accounts
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let part = if a.namespace.is_empty() {
                "namespace"
            } else if a.service_account.is_empty() {
                "service_account"
            } else {
                return Ok(ServiceAccountMatch {
                    namespace: a.namespace,
                    service_account: a.service_account,
                });
            };
            Err(FieldError::new(
                format!("{field}[{i}].{part}"),
                Problem::Empty,
            ))
        })
        .collect()
}
