//! An Istio `AuthorizationPolicy` to the `Authorization` ztunnel enforces: scope
//! from namespace and selector, rules as clauses of matches, Istio's `*`
//! wildcards, and fail-closed handling of what ztunnel cannot check (L7 fields).
//!
//! Structure: a rule is an AND of clauses, a clause an OR of matches, a match an
//! AND of fields. An Istio rule maps to one rule: its `from` list (OR of sources)
//! is one clause, its `to` list (OR of operations) another, and each `when`
//! condition one more.
//!
//! What ztunnel cannot check (methods, paths, hosts, request principals, remote
//! IPs, `request.*` and `remote.ip` keys, values that do not parse) is reported
//! and handled as Istio's ambient control plane does, so the result is never
//! more permissive than the policy: in an ALLOW policy the rule holding it is
//! dropped (it can never be proven to match, so it allows nothing, and an ALLOW
//! policy left without rules allows nothing at all); in a DENY policy the field
//! is ignored, so the rule matches (and denies) more.
//!
//! A principal written with `spiffe://` never matches in Istio (ztunnel strips
//! the scheme from the peer's identity, not from the pattern): it is reported
//! and never sent; a source or condition left without principals never matches.

mod fields;

use ambit_proto::security as pb;

use super::TranslateSettings;
use crate::model::{AuthorizationPolicy, PolicyAction, PolicyRule};
pub(super) use fields::string_match;
use fields::{condition_match, operation_match, source_match};

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
    // The model refuses any other value; should one get here, the policy is
    // not applied rather than enforced when it may have been meant as a dry run.
    let dry_run = match policy.dry_run() {
        Ok(dry_run) => dry_run,
        Err(value) => {
            out.problems.push(Problem {
                field: format!(
                    "metadata.annotations[{}]",
                    AuthorizationPolicy::DRY_RUN_ANNOTATION
                ),
                problem: format!("{value:?} is not a boolean; the policy is not applied"),
            });
            return out;
        }
    };
    // `selector: {}` (or empty matchLabels) is not "no selector": Istio's ambient
    // control plane attaches such a policy to no workload at all.
    let selector = spec.selector.as_ref().map(|s| &s.match_labels);
    if selector.is_some_and(|labels| labels.is_empty()) {
        out.problems.push(Problem {
            field: "spec.selector".into(),
            problem: "an empty selector selects no workload (as in Istio ambient), so this \
                      policy applies to nothing; remove `selector` to apply it to the whole \
                      namespace (in the root namespace, the mesh)"
                .into(),
        });
        return out;
    }
    let namespace = &policy.meta.namespace;
    let scope = match selector {
        Some(_) => pb::Scope::WorkloadSelector,
        None if *namespace == settings.root_namespace => pb::Scope::Global,
        None => pb::Scope::Namespace,
    };
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let mut found = Findings::default();
        let at = format!("spec.rules[{i}]");
        let converted = convert_rule(rule, namespace, &at, &mut found);
        out.problems.append(&mut found.notes);
        let enforce_without = found.stripped.is_empty() || action == pb::Action::Deny;
        for field in found.stripped {
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
        if let (pb::Action::Deny, Some(rule)) = (action, &converted) {
            for l7 in &found.l7_only {
                out.problems.push(deny_widened(l7, rule));
            }
        }
        match converted {
            Some(converted) if enforce_without => rules.push(converted),
            Some(_) => {}
            None => out.problems.push(Problem {
                field: format!("spec.rules[{i}]"),
                problem: format!(
                    "this rule never matches (see the reports on its fields), so it is left \
                     out: {}",
                    match action {
                        pb::Action::Allow => "it allows nothing",
                        pb::Action::Deny => "it denies nothing",
                    }
                ),
            }),
        }
    }
    out.authorization = Some(pb::Authorization {
        name: policy.meta.name.clone(),
        namespace: namespace.clone(),
        scope: scope.into(),
        action: action.into(),
        rules,
        dry_run,
        selector: selector
            .map(|labels| labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
    });
    out
}

/// What translating one rule found: fields ztunnel cannot check, notes on
/// values that can never match as written, and the `from` / `to` alternatives
/// left with nothing once their L7 fields were set aside.
#[derive(Default)]
struct Findings {
    stripped: Vec<Stripped>,
    notes: Vec<Problem>,
    l7_only: Vec<L7Only>,
}

/// A `from` / `to` alternative made only of what ztunnel cannot check: set
/// aside, it matches every connection, so its whole list adds no condition.
struct L7Only {
    /// `spec.rules[0].to[1]`.
    path: String,
    /// How many alternatives its list has (more than one: Istio would differ).
    alternatives: usize,
}

impl Findings {
    /// Records `m` as L7-only when it came out empty because fields were set
    /// aside while building it (since `stripped_before`).
    fn note_l7_only(
        &mut self,
        m: &pb::Match,
        stripped_before: usize,
        path: String,
        alternatives: usize,
    ) {
        if is_empty(m) && self.stripped.len() > stripped_before {
            self.l7_only.push(L7Only { path, alternatives });
        }
    }
}

/// What an L7-only alternative does to a DENY rule, said plainly: Ambit fails
/// closed where Istio's ztunnel skips the alternative (istio/istio#61126).
fn deny_widened(l7: &L7Only, rule: &pb::Rule) -> Problem {
    let reach = if rule.clauses.is_empty() {
        "this DENY rule now refuses EVERY connection in the policy's scope"
    } else {
        "this DENY rule now refuses every connection its other conditions match, whatever \
         the port or peer this list named"
    };
    let istio = if l7.alternatives > 1 {
        " Istio's ztunnel skips such an alternative and denies only what the others match \
         (istio/istio#61126); Ambit fails closed instead. Give this alternative an L4 field \
         (ports, principals...) or move it to a waypoint policy to narrow the rule."
    } else {
        ""
    };
    Problem {
        field: l7.path.clone(),
        problem: format!(
            "only L7 fields: ignored, this alternative matches every connection, so its list \
             no longer narrows the rule; {reach}.{istio}"
        ),
    }
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

    /// `remoteIpBlocks` and `remote.ip`: the client's address as reported by a
    /// proxy in front (X-Forwarded-For, PROXY protocol), which only HTTP carries;
    /// Istio's ztunnel handles it as L7, not as the peer's address.
    fn remote_ip(path: String) -> Self {
        Stripped {
            path,
            why: "the remote IP is the client's address as HTTP reports it (X-Forwarded-For, \
                  PROXY protocol), an L7 attribute that needs a waypoint (use targetRefs; \
                  ipBlocks is the peer's address);"
                .into(),
        }
    }
}

/// One Istio rule as ztunnel's; what had to be left out lands in `stripped`.
///
/// A list element whose match is empty once stripped matched on L7 alone: with
/// the L7 part ignored it matches everything, so its clause is left out (a rule
/// without clauses matches every connection).
///
/// `None` when the rule can never match: every source, or one condition, can
/// never match (e.g. only `spiffe://` principals).
fn convert_rule(
    rule: &PolicyRule,
    namespace: &str,
    path: &str,
    found: &mut Findings,
) -> Option<pb::Rule> {
    let mut clauses = Vec::new();
    // The model refuses an empty `from` / `to`; should one get here, it is not
    // read as "no condition" silently: it is handled as a field ztunnel cannot
    // check (the ALLOW rule drops, the DENY rule ignores it).
    for (name, empty) in [
        ("from", rule.from.as_ref().is_some_and(Vec::is_empty)),
        ("to", rule.to.as_ref().is_some_and(Vec::is_empty)),
    ] {
        if empty {
            found.stripped.push(Stripped {
                path: format!("{path}.{name}"),
                why: "an empty list is invalid in Istio;".into(),
            });
        }
    }
    let rule_from = rule.from.as_deref().unwrap_or_default();
    let mut from = Vec::new();
    for (j, f) in rule_from.iter().enumerate() {
        let at = format!("{path}.from[{j}]");
        let before = found.stripped.len();
        let m = source_match(&f.source, namespace, &format!("{at}.source"), found);
        if let Some(m) = m {
            found.note_l7_only(&m, before, at, rule_from.len());
            from.push(m);
        }
    }
    if from.is_empty() && !rule_from.is_empty() {
        // Every source can never match: neither can the rule.
        return None;
    }
    clauses.extend(clause_of(from));
    let rule_to = rule.to.as_deref().unwrap_or_default();
    let mut to = Vec::new();
    for (j, t) in rule_to.iter().enumerate() {
        let at = format!("{path}.to[{j}]");
        let before = found.stripped.len();
        let m = operation_match(&t.operation, &format!("{at}.operation"), found);
        found.note_l7_only(&m, before, at, rule_to.len());
        to.push(m);
    }
    clauses.extend(clause_of(to));
    for (j, condition) in rule.when.iter().enumerate() {
        // A condition that can never match makes the whole rule never match.
        let m = condition_match(condition, &format!("{path}.when[{j}]"), found)?;
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

#[cfg(test)]
mod tests;
