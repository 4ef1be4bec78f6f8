//! An Istio `AuthorizationPolicy` to the `Authorization` ztunnel enforces: scope
//! from namespace and selector, rules as clauses of matches, Istio's `*`
//! wildcards, and fail-closed handling of what ztunnel cannot check (L7 fields).
//!
//! Structure: a rule is an AND of clauses, a clause an OR of matches, a match an
//! AND of fields. An Istio rule maps to one rule: its `from` list (OR of sources)
//! is one clause, its `to` list (OR of operations) another, and each `when`
//! condition one more.
//!
//! What ztunnel cannot check (methods, paths, hosts, request principals,
//! `request.*` keys, values that do not parse) is reported and handled as Istio's
//! ambient control plane does, so the result is never more permissive than the
//! policy: in an ALLOW policy the rule holding it is dropped (it can never be
//! proven to match, so it allows nothing, and an ALLOW policy left without rules
//! allows nothing at all); in a DENY policy the field is ignored, so the rule
//! matches (and denies) more.

use ambit_proto::security as pb;
use ambit_proto::security::string_match::MatchType;
use ipnet::IpNet;

use super::TranslateSettings;
use super::service::ip_bytes;
use crate::model::{AuthorizationPolicy, Condition, Operation, PolicyAction, PolicyRule, Source};

/// Marks a policy that is evaluated and logged but never decides.
pub(super) const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// One thing in a policy ztunnel cannot honour as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Problem {
    /// Path of the field, e.g. `spec.rules[0].to[1].operation.methods`.
    pub field: String,
    pub problem: String,
}

/// The result of translating one policy.
#[derive(Debug, Default)]
pub(super) struct Translated {
    /// `None` when the policy is not for ztunnel (targetRefs) or cannot be applied.
    pub authorization: Option<pb::Authorization>,
    pub problems: Vec<Problem>,
}

/// Translates a policy; see the module doc for the rules.
pub(super) fn build(settings: &TranslateSettings, policy: &AuthorizationPolicy) -> Translated {
    let spec = &policy.spec;
    let mut out = Translated::default();
    // targetRef(s) attach the policy to a waypoint: nothing for ztunnel. Ambit has
    // no waypoint yet, so such a policy is enforced nowhere: say so rather than
    // drop it in silence.
    let target = match (&spec.target_ref, spec.target_refs.first()) {
        (_, Some(first)) => Some(("spec.targetRefs", first)),
        (Some(one), None) => Some(("spec.targetRef", one)),
        (None, None) => None,
    };
    if let Some((field, target)) = target {
        out.problems.push(Problem {
            field: field.into(),
            problem: format!(
                "attaches the policy to {} {:?}, which a waypoint enforces; Ambit has no \
                 waypoint yet, so this policy is NOT enforced (use a selector or no \
                 targetRefs to have ztunnel enforce its L4 part)",
                target.kind.as_deref().unwrap_or("Gateway"),
                target.name
            ),
        });
        return out;
    }
    let action = match spec.action {
        PolicyAction::Allow => pb::Action::Allow,
        PolicyAction::Deny => pb::Action::Deny,
        PolicyAction::Audit | PolicyAction::Custom => {
            let name = if spec.action == PolicyAction::Audit {
                "AUDIT"
            } else {
                "CUSTOM"
            };
            out.problems.push(Problem {
                field: "spec.action".into(),
                problem: format!("{name} is not supported by ztunnel; the policy is not applied"),
            });
            return out;
        }
    };
    let selector = spec
        .selector
        .as_ref()
        .map(|s| &s.match_labels)
        .filter(|labels| !labels.is_empty());
    let namespace = &policy.meta.namespace;
    let scope = match selector {
        Some(_) => pb::Scope::WorkloadSelector,
        None if *namespace == settings.root_namespace => pb::Scope::Global,
        None => pb::Scope::Namespace,
    };
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let mut stripped = Vec::new();
        let converted = convert_rule(rule, &format!("spec.rules[{i}]"), &mut stripped);
        let enforce_without = stripped.is_empty() || action == pb::Action::Deny;
        for field in stripped {
            let effect = match action {
                pb::Action::Allow => {
                    "the rule is dropped from this ALLOW policy (it allows nothing)"
                }
                pb::Action::Deny => "the field is ignored, so this DENY rule denies more",
            };
            out.problems.push(Problem {
                problem: format!("{} ztunnel cannot enforce it: {effect}", field.why),
                field: field.path,
            });
        }
        match converted {
            Some(converted) if enforce_without => rules.push(converted),
            Some(_) => {}
            None => out.problems.push(Problem {
                field: format!("spec.rules[{i}].from"),
                problem: "no source can match: each one's ipBlocks and remoteIpBlocks share no address, so this rule never matches".into(),
            }),
        }
    }
    out.authorization = Some(pb::Authorization {
        name: policy.meta.name.clone(),
        namespace: namespace.clone(),
        scope: scope.into(),
        action: action.into(),
        rules,
        dry_run: policy
            .meta
            .annotations
            .get(DRY_RUN_ANNOTATION)
            .is_some_and(|v| v.eq_ignore_ascii_case("true")),
        selector: selector
            .map(|labels| labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
    });
    out
}

/// A field left out of a match because ztunnel cannot check it.
struct Stripped {
    path: String,
    why: String,
}

impl Stripped {
    fn l7(path: String) -> Self {
        Stripped {
            path,
            why: "an L7 (HTTP) attribute needs a waypoint (use targetRefs);".into(),
        }
    }
}

/// One Istio rule as ztunnel's; what had to be left out lands in `stripped`.
///
/// A list element whose match is empty once stripped matched on L7 alone: with
/// the L7 part ignored it matches everything, so its clause is left out (a rule
/// without clauses matches every connection).
///
/// `None` when the rule can never match (e.g. a source whose `ipBlocks` and
/// `remoteIpBlocks` share no address).
fn convert_rule(rule: &PolicyRule, path: &str, stripped: &mut Vec<Stripped>) -> Option<pb::Rule> {
    let mut clauses = Vec::new();
    // The model refuses an empty `from` / `to`; should one get here, it is not
    // read as "no condition" silently: it is handled as a field ztunnel cannot
    // check (the ALLOW rule drops, the DENY rule ignores it).
    for (name, empty) in [
        ("from", rule.from.as_ref().is_some_and(Vec::is_empty)),
        ("to", rule.to.as_ref().is_some_and(Vec::is_empty)),
    ] {
        if empty {
            stripped.push(Stripped {
                path: format!("{path}.{name}"),
                why: "an empty list is invalid in Istio;".into(),
            });
        }
    }
    let rule_from = rule.from.as_deref().unwrap_or_default();
    let from: Vec<pb::Match> = rule_from
        .iter()
        .enumerate()
        .filter_map(|(j, f)| source_match(&f.source, &format!("{path}.from[{j}].source"), stripped))
        .collect();
    if from.is_empty() && !rule_from.is_empty() {
        // Every source can never match: neither can the rule.
        return None;
    }
    clauses.extend(clause_of(from));
    let to = rule.to.iter().flatten().enumerate().map(|(j, t)| {
        operation_match(&t.operation, &format!("{path}.to[{j}].operation"), stripped)
    });
    clauses.extend(clause_of(to.collect()));
    for (j, condition) in rule.when.iter().enumerate() {
        let m = condition_match(condition, &format!("{path}.when[{j}]"), stripped);
        clauses.extend(clause_of(vec![m]));
    }
    Some(pb::Rule { clauses })
}

/// The clause for an OR list; `None` when the list is empty or one of its
/// matches is empty (matches everything), so the clause adds no condition.
fn clause_of(matches: Vec<pb::Match>) -> Option<pb::Clause> {
    if matches.is_empty() || matches.iter().any(is_empty) {
        return None;
    }
    Some(pb::Clause { matches })
}

fn is_empty(m: &pb::Match) -> bool {
    *m == pb::Match::default()
}

/// `None` when the source can never match.
fn source_match(source: &Source, path: &str, stripped: &mut Vec<Stripped>) -> Option<pb::Match> {
    let l7 = [
        ("requestPrincipals", &source.request_principals),
        ("notRequestPrincipals", &source.not_request_principals),
    ];
    for (field, values) in l7 {
        if !values.is_empty() {
            stripped.push(Stripped::l7(format!("{path}.{field}")));
        }
    }
    // ztunnel sees one source address (no proxy in front adds another), so the
    // peer's and the remote address blocks test the same address. The fields of
    // a source all must hold: the address must be in both lists (their
    // intersection), and in neither of the `not` lists (their union).
    let source_ips = match (&source.ip_blocks[..], &source.remote_ip_blocks[..]) {
        (only, []) | ([], only) => only.iter().map(|c| ip_block(&c.0)).collect(),
        (a, b) => {
            let common = intersect(a, b);
            if common.is_empty() {
                return None;
            }
            common.iter().map(ip_block).collect()
        }
    };
    let not_blocks = |a: &[crate::model::Cidr], b: &[crate::model::Cidr]| {
        a.iter().chain(b).map(|c| ip_block(&c.0)).collect()
    };
    Some(pb::Match {
        principals: source.principals.iter().map(|p| principal(p)).collect(),
        not_principals: source.not_principals.iter().map(|p| principal(p)).collect(),
        namespaces: source.namespaces.iter().map(|n| string_match(n)).collect(),
        not_namespaces: source
            .not_namespaces
            .iter()
            .map(|n| string_match(n))
            .collect(),
        source_ips,
        not_source_ips: not_blocks(&source.not_ip_blocks, &source.not_remote_ip_blocks),
        ..Default::default()
    })
}

/// The addresses in a block of `a` and in a block of `b`, as blocks: of two
/// blocks that overlap, one contains the other.
fn intersect(a: &[crate::model::Cidr], b: &[crate::model::Cidr]) -> Vec<IpNet> {
    let mut common: Vec<IpNet> = Vec::new();
    for x in a.iter().map(|c| c.0) {
        for y in b.iter().map(|c| c.0) {
            let inner = if x.contains(&y) {
                y
            } else if y.contains(&x) {
                x
            } else {
                continue;
            };
            if !common.contains(&inner) {
                common.push(inner);
            }
        }
    }
    common
}

fn operation_match(op: &Operation, path: &str, stripped: &mut Vec<Stripped>) -> pb::Match {
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
            stripped.push(Stripped::l7(format!("{path}.{field}")));
        }
    }
    let mut ports = |field: &str, values: &[String]| {
        let parsed: Option<Vec<u32>> = values.iter().map(|v| port(v)).collect();
        parsed.unwrap_or_else(|| {
            stripped.push(Stripped {
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

/// One `when` condition. Keys ztunnel can check: `source.ip`, `remote.ip`,
/// `source.namespace`, `source.principal`, `destination.ip`, `destination.port`.
fn condition_match(c: &Condition, path: &str, stripped: &mut Vec<Stripped>) -> pb::Match {
    let mut m = pb::Match::default();
    let parsed = match c.key.as_str() {
        "source.ip" | "remote.ip" => blocks(c).map(|(yes, no)| {
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
            m.principals = c.values.iter().map(|v| principal(v)).collect();
            m.not_principals = c.not_values.iter().map(|v| principal(v)).collect();
            Some(())
        }
        key => {
            let why = if key.starts_with("request.") || key.starts_with("experimental.") {
                format!("condition key {key:?} is an L7 (HTTP) attribute and needs a waypoint;")
            } else {
                format!("condition key {key:?} is not one ztunnel knows;")
            };
            stripped.push(Stripped {
                path: format!("{path}.key"),
                why,
            });
            return pb::Match::default();
        }
    };
    if parsed.is_none() {
        stripped.push(Stripped {
            path: format!("{path}.values"),
            why: format!("a value does not parse for key {:?};", c.key),
        });
        return pb::Match::default();
    }
    m
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
pub(super) fn string_match(pattern: &str) -> pb::StringMatch {
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

/// A principal pattern; a leading `spiffe://` (which Istio's schema leaves out
/// and ztunnel refuses) is dropped.
fn principal(pattern: &str) -> pb::StringMatch {
    string_match(pattern.strip_prefix("spiffe://").unwrap_or(pattern))
}
