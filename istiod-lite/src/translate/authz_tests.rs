//! Tests of AuthorizationPolicy translation: scope, each field and its not-form,
//! wildcards, clause structure, fail-closed L7 handling and its reports.

use ambit_proto::AUTHORIZATION_TYPE_URL;
use ambit_proto::security::{self as sec, string_match::MatchType};
use prost::Message;

use super::tests::{labels, meta};
use super::*;
use crate::model::{
    AuthorizationPolicy, AuthorizationPolicySpec, Cidr, Condition, Operation, ParentRef,
    PolicyAction, PolicyRule, RuleFrom, RuleTo, Source, WorkloadSelector,
};

pub(super) fn policy(ns: &str, name: &str, spec: AuthorizationPolicySpec) -> ObjectChange {
    ObjectChange::Upsert(Object::AuthorizationPolicy(AuthorizationPolicy {
        meta: meta(ns, name, &[]),
        spec,
    }))
}

/// Translates one policy; `None` when no resource is sent.
pub(super) fn translate(
    t: &mut Translator,
    ns: &str,
    spec: AuthorizationPolicySpec,
) -> Option<sec::Authorization> {
    let updates = t.apply(vec![policy(ns, "p", spec)]);
    let u = updates
        .iter()
        .find(|u| u.type_url == AUTHORIZATION_TYPE_URL)?;
    assert_eq!(u.name, format!("{ns}/p"));
    Some(sec::Authorization::decode(u.body.clone()?).unwrap())
}

pub(super) fn one(spec: AuthorizationPolicySpec) -> sec::Authorization {
    translate(
        &mut Translator::new(TranslateSettings::default()),
        "shop",
        spec,
    )
    .unwrap()
}

pub(super) fn rule_from(sources: Vec<Source>) -> PolicyRule {
    PolicyRule {
        from: Some(
            sources
                .into_iter()
                .map(|source| RuleFrom { source })
                .collect(),
        ),
        ..Default::default()
    }
}

pub(super) fn rule_to(ops: Vec<Operation>) -> PolicyRule {
    PolicyRule {
        to: Some(
            ops.into_iter()
                .map(|operation| RuleTo { operation })
                .collect(),
        ),
        ..Default::default()
    }
}

pub(super) fn when(key: &str, values: &[&str], not_values: &[&str]) -> Condition {
    Condition {
        key: key.into(),
        values: values.iter().map(|v| v.to_string()).collect(),
        not_values: not_values.iter().map(|v| v.to_string()).collect(),
    }
}

pub(super) fn spec(action: PolicyAction, rules: Vec<PolicyRule>) -> AuthorizationPolicySpec {
    AuthorizationPolicySpec {
        action,
        rules,
        ..Default::default()
    }
}

pub(super) fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub(super) fn cidrs(v: &[&str]) -> Vec<Cidr> {
    v.iter().map(|s| Cidr(s.parse().unwrap())).collect()
}

pub(super) fn exact(s: &str) -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(MatchType::Exact(s.into())),
    }
}

pub(super) fn block(addr: &[u8], length: u32) -> sec::IpBlock {
    sec::IpBlock {
        address: addr.to_vec(),
        length,
    }
}

/// The single match of a rule's single clause.
pub(super) fn only_match(a: &sec::Authorization) -> &sec::Match {
    assert_eq!(a.rules.len(), 1);
    assert_eq!(a.rules[0].clauses.len(), 1);
    assert_eq!(a.rules[0].clauses[0].matches.len(), 1);
    &a.rules[0].clauses[0].matches[0]
}

#[test]
fn scope_action_selector_and_dry_run() {
    let mut t = Translator::new(TranslateSettings::default());
    let a = translate(&mut t, "istio-system", spec(PolicyAction::Allow, vec![])).unwrap();
    assert_eq!(
        (a.scope, a.action),
        (sec::Scope::Global as i32, sec::Action::Allow as i32)
    );
    assert!(a.rules.is_empty(), "rules: [] ALLOW allows nothing");
    let a = translate(&mut t, "shop", spec(PolicyAction::Deny, vec![])).unwrap();
    assert_eq!(
        (a.scope, a.action),
        (sec::Scope::Namespace as i32, sec::Action::Deny as i32)
    );
    let mut s = spec(PolicyAction::Allow, vec![PolicyRule::default()]);
    s.selector = Some(WorkloadSelector {
        match_labels: labels(&[("app", "web")]),
    });
    let a = translate(&mut t, "shop", s.clone()).unwrap();
    assert_eq!(a.scope, sec::Scope::WorkloadSelector as i32);
    assert_eq!(a.selector.get("app").map(String::as_str), Some("web"));
    assert_eq!(
        a.rules,
        vec![sec::Rule { clauses: vec![] }],
        "{{}} matches everything"
    );
    assert!(!a.dry_run);

    let mut dry = AuthorizationPolicy {
        meta: meta("shop", "dry", &[]),
        spec: spec(PolicyAction::Deny, vec![]),
    };
    dry.meta
        .annotations
        .insert("istio.io/dry-run".into(), "true".into());
    let updates = t.apply(vec![ObjectChange::Upsert(Object::AuthorizationPolicy(dry))]);
    let a = sec::Authorization::decode(updates[0].body.clone().unwrap()).unwrap();
    assert!(a.dry_run);
    assert!(t.reports().is_empty());
}

#[test]
fn target_refs_audit_and_custom_send_nothing() {
    let mut t = Translator::new(TranslateSettings::default());
    assert!(translate(&mut t, "shop", spec(PolicyAction::Allow, vec![])).is_some());
    let mut s = spec(PolicyAction::Allow, vec![]);
    s.target_refs = vec![ParentRef {
        kind: Some("Service".into()),
        name: "web".into(),
        ..Default::default()
    }];
    // The policy moves to a waypoint: ztunnel's copy is removed.
    let updates = t.apply(vec![policy("shop", "p", s)]);
    assert_eq!(updates.len(), 1);
    assert!(updates[0].body.is_none());
    assert_eq!(t.counts(), (0, 0, 0));
    // ... and the policy is reported as enforced nowhere, naming its target.
    let reports = t.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].error.field, "spec.targetRefs");
    assert!(
        reports[0].error.problem.contains("NOT enforced")
            && reports[0].error.problem.contains("Service \"web\""),
        "{}",
        reports[0].error.problem
    );
    let mut s = spec(PolicyAction::Allow, vec![]);
    s.target_ref = Some(ParentRef::default());
    assert!(translate(&mut t, "shop", s).is_none());
    let reports = t.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].error.field, "spec.targetRef");
    // Back to a selector-less policy: ztunnel enforces it and the report goes.
    assert!(translate(&mut t, "shop", spec(PolicyAction::Allow, vec![])).is_some());
    assert!(t.reports().is_empty());

    assert!(translate(&mut t, "shop", spec(PolicyAction::Audit, vec![])).is_none());
    let reports = t.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].origin, "translate");
    assert_eq!(reports[0].error.field, "spec.action");
    assert_eq!(reports[0].error.kind, "AuthorizationPolicy");
    assert!(translate(&mut t, "shop", spec(PolicyAction::Custom, vec![])).is_none());
    assert!(reports[0].error.problem.contains("AUDIT"));
    t.apply(vec![ObjectChange::Delete(ObjectKey::new(
        Kind::AuthorizationPolicy,
        "shop",
        "p",
    ))]);
    assert!(
        t.reports().is_empty(),
        "deleting the policy clears its report"
    );
}

#[test]
fn sources_with_wildcards_and_not_forms() {
    let src = Source {
        principals: strings(&["*", "*/sa/web", "cluster.local/ns/shop/*"]),
        not_principals: strings(&["cluster.local/ns/shop/sa/bad"]),
        namespaces: strings(&["shop", "team-*"]),
        not_namespaces: strings(&["kube-system"]),
        ip_blocks: cidrs(&["198.18.1.0/24", "198.18.0.0/16"]),
        not_ip_blocks: cidrs(&["198.18.9.0/24", "fd00::/8"]),
        ..Default::default()
    };
    let a = one(spec(PolicyAction::Allow, vec![rule_from(vec![src])]));
    let m = only_match(&a);
    let mt = |m: &sec::StringMatch| m.match_type.clone().unwrap();
    assert_eq!(
        m.principals.iter().map(mt).collect::<Vec<_>>(),
        [
            MatchType::Presence(true),
            MatchType::Suffix("/sa/web".into()),
            MatchType::Prefix("cluster.local/ns/shop/".into()),
        ]
    );
    assert_eq!(m.not_principals, [exact("cluster.local/ns/shop/sa/bad")]);
    assert_eq!(
        m.namespaces.iter().map(mt).collect::<Vec<_>>(),
        [
            MatchType::Exact("shop".into()),
            MatchType::Prefix("team-".into())
        ]
    );
    assert_eq!(m.not_namespaces, [exact("kube-system")]);
    assert_eq!(
        m.source_ips,
        [block(&[198, 18, 1, 0], 24), block(&[198, 18, 0, 0], 16)]
    );
    let mut v6 = vec![0xfd];
    v6.extend([0; 15]);
    assert_eq!(
        m.not_source_ips,
        [block(&[198, 18, 9, 0], 24), block(&v6, 8)]
    );
    assert!(m.destination_ports.is_empty());
}

#[test]
fn operations_and_conditions() {
    let rule = PolicyRule {
        to: Some(vec![RuleTo {
            operation: Operation {
                ports: strings(&["80", "443"]),
                not_ports: strings(&["8080"]),
                ..Default::default()
            },
        }]),
        when: vec![
            when("source.ip", &["198.18.0.0/16"], &["198.18.1.1"]),
            when("source.ip", &["198.18.0.0/15"], &[]),
            when("source.namespace", &["shop"], &["dev-*"]),
            when("source.principal", &["*"], &["cluster.local/ns/x/sa/y"]),
            when("destination.ip", &["198.19.0.10"], &["198.19.0.0/24"]),
            when("destination.port", &["80"], &["81"]),
        ],
        ..Default::default()
    };
    let a = one(spec(PolicyAction::Deny, vec![rule]));
    let clauses = &a.rules[0].clauses;
    assert_eq!(clauses.len(), 7, "one clause for `to`, one per condition");
    let m = |i: usize| &clauses[i].matches[0];
    assert_eq!(
        (
            m(0).destination_ports.clone(),
            m(0).not_destination_ports.clone()
        ),
        (vec![80, 443], vec![8080])
    );
    assert_eq!(m(1).source_ips, [block(&[198, 18, 0, 0], 16)]);
    assert_eq!(m(1).not_source_ips, [block(&[198, 18, 1, 1], 32)]);
    assert_eq!(m(2).source_ips, [block(&[198, 18, 0, 0], 15)]);
    assert_eq!(m(3).namespaces, [exact("shop")]);
    assert_eq!(
        m(3).not_namespaces[0].match_type,
        Some(MatchType::Prefix("dev-".into()))
    );
    assert_eq!(
        m(4).principals[0].match_type,
        Some(MatchType::Presence(true))
    );
    assert_eq!(m(4).not_principals, [exact("cluster.local/ns/x/sa/y")]);
    assert_eq!(m(5).destination_ips, [block(&[198, 19, 0, 10], 32)]);
    assert_eq!(m(5).not_destination_ips, [block(&[198, 19, 0, 0], 24)]);
    assert_eq!(
        (
            m(6).destination_ports.clone(),
            m(6).not_destination_ports.clone()
        ),
        (vec![80], vec![81])
    );
}

#[test]
fn from_and_to_lists_are_one_clause_each() {
    let rule = PolicyRule {
        from: Some(vec![
            RuleFrom {
                source: Source {
                    namespaces: strings(&["a"]),
                    ..Default::default()
                },
            },
            RuleFrom {
                source: Source {
                    namespaces: strings(&["b"]),
                    ..Default::default()
                },
            },
        ]),
        to: Some(vec![
            RuleTo {
                operation: Operation {
                    ports: strings(&["80"]),
                    ..Default::default()
                },
            },
            RuleTo {
                operation: Operation {
                    ports: strings(&["81"]),
                    ..Default::default()
                },
            },
        ]),
        when: vec![],
    };
    let a = one(spec(PolicyAction::Allow, vec![rule, PolicyRule::default()]));
    assert_eq!(a.rules.len(), 2);
    let clauses = &a.rules[0].clauses;
    assert_eq!(clauses.len(), 2);
    assert_eq!(
        clauses[0].matches.len(),
        2,
        "sources are OR'd in one clause"
    );
    assert_eq!(clauses[0].matches[1].namespaces, [exact("b")]);
    assert_eq!(
        clauses[1].matches.len(),
        2,
        "operations are OR'd in one clause"
    );
    assert_eq!(clauses[1].matches[1].destination_ports, [81]);
    assert!(a.rules[1].clauses.is_empty());
}

#[test]
fn l7_in_allow_drops_the_rule_and_is_reported() {
    let mut t = Translator::new(TranslateSettings::default());
    let l7 = PolicyRule {
        from: Some(vec![RuleFrom {
            source: Source {
                principals: strings(&["x"]),
                ..Default::default()
            },
        }]),
        to: Some(vec![RuleTo {
            operation: Operation {
                methods: strings(&["GET"]),
                ..Default::default()
            },
        }]),
        when: vec![when("request.headers[x-a]", &["1"], &[])],
    };
    let l4 = rule_from(vec![Source {
        principals: strings(&["y"]),
        ..Default::default()
    }]);
    let a = translate(
        &mut t,
        "shop",
        spec(PolicyAction::Allow, vec![l7.clone(), l4]),
    )
    .unwrap();
    assert_eq!(a.action, sec::Action::Allow as i32);
    assert_eq!(a.rules.len(), 1, "the L7 rule never matches");
    assert_eq!(a.rules[0].clauses[0].matches[0].principals, [exact("y")]);
    let fields: Vec<_> = t.reports().into_iter().map(|r| r.error.field).collect();
    assert_eq!(
        fields,
        [
            "spec.rules[0].to[0].operation.methods",
            "spec.rules[0].when[0].key"
        ]
    );

    // Only L7: nothing is allowed (fail closed).
    let a = translate(&mut t, "shop", spec(PolicyAction::Allow, vec![l7])).unwrap();
    assert!(a.rules.is_empty());

    // Fixing the policy clears the reports.
    translate(&mut t, "shop", spec(PolicyAction::Allow, vec![])).unwrap();
    assert!(t.reports().is_empty());
}

#[test]
fn l7_in_deny_is_ignored_so_it_denies_more() {
    let mut t = Translator::new(TranslateSettings::default());
    // DENY GET from x: ztunnel denies everything from x.
    let rule = PolicyRule {
        from: Some(vec![RuleFrom {
            source: Source {
                principals: strings(&["x"]),
                not_request_principals: strings(&["*"]),
                ..Default::default()
            },
        }]),
        to: Some(vec![RuleTo {
            operation: Operation {
                not_paths: strings(&["/health"]),
                ..Default::default()
            },
        }]),
        when: vec![when("request.auth.claims[iss]", &["a"], &[])],
    };
    let a = translate(&mut t, "shop", spec(PolicyAction::Deny, vec![rule])).unwrap();
    assert_eq!(a.action, sec::Action::Deny as i32);
    assert_eq!(only_match(&a).principals, [exact("x")]);
    // Three fields set aside, and the `to` alternative left with nothing.
    assert_eq!(t.reports().len(), 4);
    assert!(t.reports()[0].error.problem.contains("denies more"));

    // DENY on hosts only: every connection is denied.
    let a = translate(
        &mut t,
        "shop",
        spec(
            PolicyAction::Deny,
            vec![rule_to(vec![Operation {
                hosts: strings(&["a"]),
                ..Default::default()
            }])],
        ),
    )
    .unwrap();
    assert_eq!(a.rules, vec![sec::Rule { clauses: vec![] }]);
    let fields: Vec<_> = t.reports().into_iter().map(|r| r.error.field).collect();
    assert_eq!(
        fields,
        ["spec.rules[0].to[0].operation.hosts", "spec.rules[0].to[0]"]
    );
    assert!(t.reports()[1].error.problem.contains("EVERY connection"));

    // An unknown key or a bad value is handled the same way.
    let bad = PolicyRule {
        when: vec![
            when("connection.sni", &["a"], &[]),
            when("source.ip", &["not-an-ip"], &[]),
        ],
        ..Default::default()
    };
    let a = translate(&mut t, "shop", spec(PolicyAction::Deny, vec![bad])).unwrap();
    assert_eq!(a.rules, vec![sec::Rule { clauses: vec![] }]);
    let fields: Vec<_> = t.reports().into_iter().map(|r| r.error.field).collect();
    assert_eq!(
        fields,
        ["spec.rules[0].when[0].key", "spec.rules[0].when[1].values"]
    );
}

#[test]
fn each_policy_change_recomputes_only_that_authorization() {
    let mut t = Translator::new(TranslateSettings::default());
    let batch = (0..50)
        .map(|i| policy("shop", &format!("p{i}"), spec(PolicyAction::Allow, vec![])))
        .collect();
    assert_eq!(t.apply(batch).len(), 50);
    let updates = t.apply(vec![policy("shop", "p7", spec(PolicyAction::Deny, vec![]))]);
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].name, "shop/p7");
    assert_eq!(t.counts(), (0, 0, 50));
}

/// An empty `from` built past the model's check is never read as "any
/// source": the ALLOW rule drops, and it is reported.
#[test]
fn empty_from_is_not_any_source() {
    let mut t = Translator::new(TranslateSettings::default());
    let empty = PolicyRule {
        from: Some(vec![]),
        ..Default::default()
    };
    let a = translate(&mut t, "shop", spec(PolicyAction::Allow, vec![empty])).unwrap();
    assert!(a.rules.is_empty(), "{:?}", a.rules);
    let fields: Vec<_> = t.reports().into_iter().map(|r| r.error.field).collect();
    assert_eq!(fields, ["spec.rules[0].from"]);
}
