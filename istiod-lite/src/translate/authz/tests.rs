//! Istio's own reading of what ztunnel gets: `spiffe://` principals, remote IPs.
//! The shared helpers are in `translate/authz_tests.rs`.

use ambit_proto::security as sec;
use prost::Message;

use crate::model::{
    AuthorizationPolicy, Object, ObjectChange, Operation, PolicyAction, PolicyRule, Source,
    WorkloadSelector,
};
use crate::translate::authz_tests::{
    block, cidrs, exact, one, only_match, policy, rule_from, rule_to, spec, strings, translate,
    when,
};
use crate::translate::tests::meta;
use crate::translate::{TranslateSettings, Translator};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn fields(t: &Translator) -> Vec<String> {
    t.reports().into_iter().map(|r| r.error.field).collect()
}

fn holds_no_scheme(a: &sec::Authorization) {
    assert!(!format!("{a:?}").contains("spiffe://"), "{a:?}");
}

/// ztunnel strips `spiffe://` from the peer's identity, not from the pattern:
/// `ALLOW principals: [spiffe://...]` allows nobody.
#[test]
fn allow_with_spiffe_principal_allows_nobody() {
    let mut t = Translator::new(TranslateSettings::default());
    let src = Source {
        principals: strings(&[WEB]),
        ..Default::default()
    };
    let a = translate(
        &mut t,
        "shop",
        spec(PolicyAction::Allow, vec![rule_from(vec![src])]),
    )
    .unwrap();
    assert!(a.rules.is_empty(), "{:?}", a.rules);
    assert_eq!(
        fields(&t),
        [
            "spec.rules[0].from[0].source.principals[0]",
            "spec.rules[0]"
        ]
    );
    let problem = &t.reports()[0].error.problem;
    assert!(
        problem.contains("never matches") && problem.contains("\"cluster.local/ns/shop/sa/web\""),
        "{problem}"
    );

    // Beside a pattern written without the scheme, only that one is kept.
    let src = Source {
        principals: strings(&[WEB, "cluster.local/ns/shop/sa/api"]),
        ..Default::default()
    };
    let a = one(spec(PolicyAction::Allow, vec![rule_from(vec![src])]));
    holds_no_scheme(&a);
    assert_eq!(
        a.rules[0].clauses[0].matches[0].principals,
        [exact("cluster.local/ns/shop/sa/api")]
    );
}

/// `DENY notPrincipals: [spiffe://.../good]` excludes nobody: it denies every
/// peer. `DENY principals: [spiffe://...]` denies nobody.
#[test]
fn deny_with_spiffe_principals() {
    let mut t = Translator::new(TranslateSettings::default());
    let src = Source {
        not_principals: strings(&["spiffe://cluster.local/ns/shop/sa/good"]),
        ..Default::default()
    };
    let a = translate(
        &mut t,
        "shop",
        spec(PolicyAction::Deny, vec![rule_from(vec![src])]),
    )
    .unwrap();
    assert_eq!(a.rules, [sec::Rule { clauses: vec![] }], "denies everyone");
    assert_eq!(
        fields(&t),
        ["spec.rules[0].from[0].source.notPrincipals[0]"]
    );
    assert!(t.reports()[0].error.problem.contains("every peer"));

    let only_web = Source {
        principals: strings(&[WEB]),
        ..Default::default()
    };
    let other = Source {
        namespaces: strings(&["other"]),
        ..Default::default()
    };
    let a = one(spec(
        PolicyAction::Deny,
        vec![rule_from(vec![only_web.clone()])],
    ));
    assert!(a.rules.is_empty(), "denies nobody: {:?}", a.rules);
    // Beside another source, that source alone is left out of the clause.
    let a = one(spec(
        PolicyAction::Deny,
        vec![rule_from(vec![only_web, other])],
    ));
    let clause = &a.rules[0].clauses[0];
    assert_eq!(clause.matches.len(), 1);
    assert_eq!(clause.matches[0].namespaces, [exact("other")]);
}

/// `when: source.principal` follows the same rule: values with the scheme
/// never match, notValues with it never exclude.
#[test]
fn spiffe_principal_conditions() {
    let mut t = Translator::new(TranslateSettings::default());
    let rule = PolicyRule {
        when: vec![when("source.principal", &[WEB], &[])],
        ..Default::default()
    };
    let a = translate(&mut t, "shop", spec(PolicyAction::Allow, vec![rule])).unwrap();
    assert!(a.rules.is_empty());
    assert_eq!(
        fields(&t),
        ["spec.rules[0].when[0].values[0]", "spec.rules[0]"]
    );

    let rule = PolicyRule {
        when: vec![
            when("source.principal", &[], &[WEB]),
            when("source.namespace", &["shop"], &[]),
        ],
        ..Default::default()
    };
    let a = translate(&mut t, "shop", spec(PolicyAction::Deny, vec![rule])).unwrap();
    holds_no_scheme(&a);
    let clauses = &a.rules[0].clauses;
    assert_eq!(
        clauses.len(),
        1,
        "the notValues condition holds for everyone"
    );
    assert_eq!(clauses[0].matches[0].namespaces, [exact("shop")]);
    assert_eq!(fields(&t), ["spec.rules[0].when[0].notValues[0]"]);
}

/// `remoteIpBlocks`, `notRemoteIpBlocks` and `remote.ip` are the client's address
/// as HTTP reports it: L7 in Istio's ztunnel, never the peer's address.
#[test]
fn remote_ip_is_l7() {
    let mut t = Translator::new(TranslateSettings::default());
    // ALLOW on a remote IP alone allows nothing.
    let remote = Source {
        remote_ip_blocks: cidrs(&["198.18.0.0/16"]),
        ..Default::default()
    };
    let a = translate(
        &mut t,
        "shop",
        spec(PolicyAction::Allow, vec![rule_from(vec![remote])]),
    )
    .unwrap();
    assert!(a.rules.is_empty(), "{:?}", a.rules);
    assert_eq!(fields(&t), ["spec.rules[0].from[0].source.remoteIpBlocks"]);
    let problem = &t.reports()[0].error.problem;
    assert!(
        problem.contains("X-Forwarded-For") && problem.contains("allows nothing"),
        "{problem}"
    );

    // DENY from istio-ingress unless the remote IP is listed: every connection
    // from istio-ingress is denied.
    let ingress = Source {
        namespaces: strings(&["istio-ingress"]),
        not_remote_ip_blocks: cidrs(&["198.18.5.0/24"]),
        ..Default::default()
    };
    let a = translate(
        &mut t,
        "shop",
        spec(PolicyAction::Deny, vec![rule_from(vec![ingress])]),
    )
    .unwrap();
    let m = only_match(&a);
    assert_eq!(m.namespaces, [exact("istio-ingress")]);
    assert!(m.not_source_ips.is_empty(), "{m:?}");
    assert_eq!(
        fields(&t),
        ["spec.rules[0].from[0].source.notRemoteIpBlocks"]
    );
    assert!(t.reports()[0].error.problem.contains("denies more"));

    // DENY ipBlocks A and remoteIpBlocks B denies A.
    let both = Source {
        ip_blocks: cidrs(&["198.18.0.0/24"]),
        remote_ip_blocks: cidrs(&["198.19.0.0/24"]),
        ..Default::default()
    };
    let a = one(spec(PolicyAction::Deny, vec![rule_from(vec![both])]));
    assert_eq!(only_match(&a).source_ips, [block(&[198, 18, 0, 0], 24)]);

    // when: remote.ip, the same.
    let rule = PolicyRule {
        when: vec![when("remote.ip", &["198.18.0.0/16"], &[])],
        ..Default::default()
    };
    let a = translate(
        &mut t,
        "shop",
        spec(PolicyAction::Allow, vec![rule.clone()]),
    )
    .unwrap();
    assert!(a.rules.is_empty());
    assert_eq!(fields(&t), ["spec.rules[0].when[0].key"]);
    let a = one(spec(PolicyAction::Deny, vec![rule]));
    assert_eq!(a.rules, [sec::Rule { clauses: vec![] }]);
}

/// `serviceAccounts` become `ServiceAccountMatch`es; a bare account is in the
/// policy's namespace.
#[test]
fn service_accounts_are_sent() {
    let src = Source {
        service_accounts: strings(&["shop/api", "web"]),
        not_service_accounts: strings(&["other/x"]),
        ..Default::default()
    };
    let a = one(spec(PolicyAction::Allow, vec![rule_from(vec![src])]));
    let m = only_match(&a);
    let sa = |ns: &str, sa: &str| sec::ServiceAccountMatch {
        namespace: ns.into(),
        service_account: sa.into(),
    };
    assert_eq!(m.service_accounts, [sa("shop", "api"), sa("shop", "web")]);
    assert_eq!(m.not_service_accounts, [sa("other", "x")]);
}

/// The dry-run flag follows Istio's booleans; a value that is none is never
/// enforced as if it were "false".
#[test]
fn dry_run_values() {
    let mut t = Translator::new(TranslateSettings::default());
    for (value, want) in [
        ("True", Some(true)),
        ("1", Some(true)),
        ("F", Some(false)),
        ("yes", None),
    ] {
        let mut p = AuthorizationPolicy {
            meta: meta("shop", "p", &[]),
            spec: spec(PolicyAction::Deny, vec![PolicyRule::default()]),
        };
        p.meta
            .annotations
            .insert("istio.io/dry-run".into(), value.into());
        let updates = t.apply(vec![ObjectChange::Upsert(Object::AuthorizationPolicy(p))]);
        let sent = updates
            .first()
            .and_then(|u| u.body.clone())
            .map(|b| sec::Authorization::decode(b).unwrap());
        assert_eq!(sent.map(|a| a.dry_run), want, "{value}");
    }
    assert_eq!(fields(&t), ["metadata.annotations[istio.io/dry-run]"]);
}

/// `selector: {}` attaches the policy to no workload (Istio ambient), where no
/// selector at all means the whole namespace.
#[test]
fn empty_selector_applies_to_nothing() {
    let mut t = Translator::new(TranslateSettings::default());
    let allow_nothing = || spec(PolicyAction::Allow, vec![]);
    assert!(translate(&mut t, "shop", allow_nothing()).is_some());
    let mut s = allow_nothing();
    s.selector = Some(WorkloadSelector::default());
    // The namespace-wide copy ztunnel had is removed, and it is said.
    let updates = t.apply(vec![policy("shop", "p", s)]);
    assert_eq!(updates.len(), 1);
    assert!(updates[0].body.is_none());
    assert_eq!(fields(&t), ["spec.selector"]);
    assert!(t.reports()[0].error.problem.contains("applies to nothing"));
    // Back to no selector: the namespace again.
    let a = translate(&mut t, "shop", allow_nothing()).unwrap();
    assert_eq!(a.scope, sec::Scope::Namespace as i32);
    assert!(t.reports().is_empty());
}

/// A DENY `to` list with an L7-only alternative beside an L4 one: Ambit fails
/// closed (the list stops narrowing the rule, so the DENY refuses every
/// connection in scope) where Istio skips the alternative (istio/istio#61126);
/// the report says so plainly.
#[test]
fn deny_with_an_l7_only_alternative_says_it_denies_everything() {
    let mut t = Translator::new(TranslateSettings::default());
    let rule = rule_to(vec![
        Operation {
            ports: strings(&["22"]),
            ..Default::default()
        },
        Operation {
            methods: strings(&["POST"]),
            ..Default::default()
        },
    ]);
    let a = translate(&mut t, "shop", spec(PolicyAction::Deny, vec![rule])).unwrap();
    assert_eq!(a.rules, [sec::Rule { clauses: vec![] }], "fails closed");
    let reports = t.reports();
    let note = reports
        .iter()
        .find(|r| r.error.field == "spec.rules[0].to[1]")
        .expect("the L7-only alternative is reported");
    let problem = &note.error.problem;
    assert!(
        problem.contains("refuses EVERY connection in the policy's scope")
            && problem.contains("istio/istio#61126"),
        "{problem}"
    );

    // With a `from` clause left, the DENY refuses all its sources' connections.
    let mut rule = rule_to(vec![
        Operation {
            ports: strings(&["22"]),
            ..Default::default()
        },
        Operation {
            paths: strings(&["/admin"]),
            ..Default::default()
        },
    ]);
    rule.from = rule_from(vec![Source {
        namespaces: strings(&["guest"]),
        ..Default::default()
    }])
    .from;
    let a = translate(&mut t, "shop", spec(PolicyAction::Deny, vec![rule])).unwrap();
    assert_eq!(a.rules[0].clauses.len(), 1, "only the from clause is left");
    let reports = t.reports();
    let note = reports
        .iter()
        .find(|r| r.error.field == "spec.rules[0].to[1]")
        .unwrap();
    assert!(
        note.error
            .problem
            .contains("every connection its other conditions match"),
        "{}",
        note.error.problem
    );
}
