//! One Istio source, operation or `when` condition as a ztunnel `Match`: what
//! ztunnel cannot check is set aside in [`Findings`], what can never match as
//! written (a `spiffe://` principal) is noted and left out.

use ambit_proto::security as pb;
use ambit_proto::security::string_match::MatchType;
use ipnet::IpNet;

use super::{Findings, Problem, Stripped};
use crate::model::{Condition, Operation, Source};
use crate::translate::service::ip_bytes;

/// `None` when the source can never match. `namespace` is the policy's: a bare
/// service account is in it.
pub(super) fn source_match(
    source: &Source,
    namespace: &str,
    path: &str,
    found: &mut Findings,
) -> Option<pb::Match> {
    let l7 = [
        ("requestPrincipals", &source.request_principals),
        ("notRequestPrincipals", &source.not_request_principals),
    ];
    for (field, values) in l7 {
        if !values.is_empty() {
            found.stripped.push(Stripped::l7(format!("{path}.{field}")));
        }
    }
    // The remote address is the client's as an HTTP proxy in front reports it
    // (X-Forwarded-For, PROXY protocol): Istio's ztunnel treats it as L7.
    let remote = [
        ("remoteIpBlocks", &source.remote_ip_blocks),
        ("notRemoteIpBlocks", &source.not_remote_ip_blocks),
    ];
    for (field, blocks) in remote {
        if !blocks.is_empty() {
            found
                .stripped
                .push(Stripped::remote_ip(format!("{path}.{field}")));
        }
    }
    let ip_blocks = |blocks: &[crate::model::Cidr]| blocks.iter().map(|c| ip_block(&c.0)).collect();
    let principals_at = |field: &str| format!("{path}.{field}");
    let not_principals = principals(
        &source.not_principals,
        &principals_at("notPrincipals"),
        true,
        found,
    )?;
    let principals = principals(
        &source.principals,
        &principals_at("principals"),
        false,
        found,
    )?;
    Some(pb::Match {
        principals,
        not_principals,
        namespaces: source.namespaces.iter().map(|n| string_match(n)).collect(),
        not_namespaces: source
            .not_namespaces
            .iter()
            .map(|n| string_match(n))
            .collect(),
        service_accounts: service_accounts(&source.service_accounts, namespace),
        not_service_accounts: service_accounts(&source.not_service_accounts, namespace),
        source_ips: ip_blocks(&source.ip_blocks),
        not_source_ips: ip_blocks(&source.not_ip_blocks),
        ..Default::default()
    })
}

/// `ns/sa`, or a bare `sa` in `namespace` (checked when the policy was read).
fn service_accounts(values: &[String], namespace: &str) -> Vec<pb::ServiceAccountMatch> {
    values
        .iter()
        .map(|value| {
            let (ns, sa) = value.split_once('/').unwrap_or((namespace, value));
            pb::ServiceAccountMatch {
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            }
        })
        .collect()
}

pub(super) fn operation_match(op: &Operation, path: &str, found: &mut Findings) -> pb::Match {
    let l7 = [
        ("hosts", &op.hosts),
        ("notHosts", &op.not_hosts),
        ("methods", &op.methods),
        ("notMethods", &op.not_methods),
        ("paths", &op.paths),
        ("notPaths", &op.not_paths),
    ];
    for (field, values) in l7 {
        if !values.is_empty() {
            found.stripped.push(Stripped::l7(format!("{path}.{field}")));
        }
    }
    let mut ports = |field: &str, values: &[String]| {
        let parsed: Option<Vec<u32>> = values.iter().map(|v| port(v)).collect();
        parsed.unwrap_or_else(|| {
            found.stripped.push(Stripped {
                path: format!("{path}.{field}"),
                why: "a value is not a port 1-65535;".into(),
            });
            Vec::new()
        })
    };
    pb::Match {
        destination_ports: ports("ports", &op.ports),
        not_destination_ports: ports("notPorts", &op.not_ports),
        ..Default::default()
    }
}

/// One `when` condition. Keys ztunnel can check: `source.ip`,
/// `source.namespace`, `source.principal`, `destination.ip`, `destination.port`.
///
/// `None` when the condition can never match (only `spiffe://` principals).
pub(super) fn condition_match(
    c: &Condition,
    path: &str,
    found: &mut Findings,
) -> Option<pb::Match> {
    let mut m = pb::Match::default();
    let parsed = match c.key.as_str() {
        "remote.ip" => {
            found
                .stripped
                .push(Stripped::remote_ip(format!("{path}.key")));
            return Some(pb::Match::default());
        }
        "source.ip" => blocks(c).map(|(yes, no)| {
            m.source_ips = yes;
            m.not_source_ips = no;
        }),
        "destination.ip" => blocks(c).map(|(yes, no)| {
            m.destination_ips = yes;
            m.not_destination_ips = no;
        }),
        "destination.port" => {
            let yes: Option<Vec<u32>> = c.values.iter().map(|v| port(v)).collect();
            let no: Option<Vec<u32>> = c.not_values.iter().map(|v| port(v)).collect();
            yes.zip(no).map(|(yes, no)| {
                m.destination_ports = yes;
                m.not_destination_ports = no;
            })
        }
        "source.namespace" => {
            m.namespaces = c.values.iter().map(|v| string_match(v)).collect();
            m.not_namespaces = c.not_values.iter().map(|v| string_match(v)).collect();
            Some(())
        }
        "source.principal" => {
            m.principals = principals(&c.values, &format!("{path}.values"), false, found)?;
            m.not_principals =
                principals(&c.not_values, &format!("{path}.notValues"), true, found)?;
            Some(())
        }
        key => {
            let why = if key.starts_with("request.") || key.starts_with("experimental.") {
                format!("condition key {key:?} is an L7 (HTTP) attribute and needs a waypoint;")
            } else {
                format!("condition key {key:?} is not one ztunnel knows;")
            };
            found.stripped.push(Stripped {
                path: format!("{path}.key"),
                why,
            });
            return Some(pb::Match::default());
        }
    };
    if parsed.is_none() {
        found.stripped.push(Stripped {
            path: format!("{path}.values"),
            why: format!("a value does not parse for key {:?};", c.key),
        });
        return Some(pb::Match::default());
    }
    Some(m)
}

/// A condition's values and notValues as CIDR blocks; `None` if one does not parse.
fn blocks(c: &Condition) -> Option<(Vec<pb::IpBlock>, Vec<pb::IpBlock>)> {
    let parse = |values: &[String]| -> Option<Vec<pb::IpBlock>> {
        values
            .iter()
            .map(|v| cidr(v).map(|n| ip_block(&n)))
            .collect()
    };
    Some((parse(&c.values)?, parse(&c.not_values)?))
}

fn cidr(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

fn port(text: &str) -> Option<u32> {
    text.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .map(u32::from)
}

fn ip_block(net: &IpNet) -> pb::IpBlock {
    pb::IpBlock {
        address: ip_bytes(&net.network()),
        length: net.prefix_len().into(),
    }
}

/// Istio's string patterns: `*` alone is presence, `*x` a suffix, `x*` a prefix,
/// anything else exact.
pub(in crate::translate) fn string_match(pattern: &str) -> pb::StringMatch {
    let match_type = if pattern == "*" {
        MatchType::Presence(true)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        MatchType::Suffix(suffix.to_string())
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        MatchType::Prefix(prefix.to_string())
    } else {
        MatchType::Exact(pattern.to_string())
    };
    pb::StringMatch {
        match_type: Some(match_type),
    }
}

/// Principal patterns as ztunnel gets them. ztunnel compares a pattern with the
/// peer's identity written without its `spiffe://` scheme (Istio's rule), so a
/// pattern that holds the scheme never matches: it is noted and left out, never
/// sent. `None` when every pattern of a positive list was left out (nothing can
/// match); in a `not` list (`negated`) what is left out simply never excludes.
fn principals(
    values: &[String],
    path: &str,
    negated: bool,
    found: &mut Findings,
) -> Option<Vec<pb::StringMatch>> {
    let mut kept = Vec::new();
    for (i, value) in values.iter().enumerate() {
        if !value.contains(SPIFFE_SCHEME) {
            kept.push(string_match(value));
            continue;
        }
        let effect = if negated {
            "it excludes nobody, so this negation holds for every peer"
        } else {
            "it is left out (with no principal left, this never matches)"
        };
        found.notes.push(Problem {
            field: format!("{path}[{i}]"),
            problem: format!(
                "{value:?} never matches: Istio compares principals with the peer's \
                 identity written without \"spiffe://\" (write {:?}); {effect}",
                value.replacen(SPIFFE_SCHEME, "", 1)
            ),
        });
    }
    (negated || values.is_empty() || !kept.is_empty()).then_some(kept)
}

const SPIFFE_SCHEME: &str = "spiffe://";
