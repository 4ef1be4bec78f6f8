//! Property tests: a DENY-everything policy always wins, evaluation never panics
//! and is consistent, dry-run never changes the outcome, and the serde and
//! string-matching shortcuts agree with their plain definitions.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use mesh_core::SpiffeId;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

use crate::policy::{
    Action, Authorization, Clause, Connection, Destination, Match, PolicySet, Rule, Scope,
    ServiceAccountMatch, StringMatch,
};

const NAMESPACES: [&str; 3] = ["istio-system", "shop", "bank"];

fn namespace() -> impl Strategy<Value = String> {
    prop::sample::select(&NAMESPACES[..]).prop_map(String::from)
}

fn string_match() -> impl Strategy<Value = StringMatch> {
    let text = "[a-z*/.]{0,12}";
    prop_oneof![
        Just(StringMatch::Presence),
        text.prop_map(StringMatch::Exact),
        text.prop_map(StringMatch::Prefix),
        text.prop_map(StringMatch::Suffix),
        // Values a principal or namespace of the connections below can take.
        prop::sample::select(&["shop", "bank", "cluster.local/ns/shop/sa/a"][..])
            .prop_map(|s| StringMatch::Exact(s.into())),
    ]
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
        // Close to the blocks below, so blocks sometimes match.
        (0u8..4).prop_map(|n| IpAddr::from([198, 18, 0, n])),
    ]
}

fn ip_block() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, l)| IpNet::new(a.into(), l).unwrap()),
        (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, l)| IpNet::new(a.into(), l).unwrap()),
        (0u8..4, 24u8..=32).prop_map(|(n, l)| IpNet::new([198, 18, 0, n].into(), l).unwrap()),
    ]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![1u16..=65535, 79u16..=81]
}

fn a_match() -> impl Strategy<Value = Match> {
    let strings = || vec(string_match(), 0..3);
    let blocks = || vec(ip_block(), 0..2);
    let ports = || vec(port(), 0..3);
    let accounts = || vec(service_account(), 0..2);
    (
        (strings(), strings(), strings(), strings()),
        (blocks(), blocks(), blocks(), blocks()),
        (ports(), ports()),
        (accounts(), accounts()),
    )
        .prop_map(
            |((p, np, n, nn), (s, ns, d, nd), (dp, ndp), (sa, nsa))| Match {
                principals: p,
                not_principals: np,
                namespaces: n,
                not_namespaces: nn,
                source_ips: s,
                not_source_ips: ns,
                destination_ips: d,
                not_destination_ips: nd,
                destination_ports: dp,
                not_destination_ports: ndp,
                service_accounts: sa,
                not_service_accounts: nsa,
            },
        )
}

fn service_account() -> impl Strategy<Value = ServiceAccountMatch> {
    (namespace(), prop::sample::select(&["default", "web"][..])).prop_map(|(namespace, sa)| {
        ServiceAccountMatch {
            namespace,
            service_account: sa.to_string(),
        }
    })
}

fn rule() -> impl Strategy<Value = Rule> {
    vec(
        vec(a_match(), 0..3).prop_map(|matches| Clause { matches }),
        0..3,
    )
    .prop_map(|clauses| Rule { clauses })
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    btree_map(
        prop::sample::select(&["app", "tier"][..]).prop_map(String::from),
        "[ab]",
        0..2,
    )
}

fn policy(action: impl Strategy<Value = Action>) -> impl Strategy<Value = Authorization> {
    let scope = prop_oneof![
        Just(Scope::Global),
        Just(Scope::Namespace),
        Just(Scope::WorkloadSelector)
    ];
    (
        "[a-e]{1,2}",
        namespace(),
        scope,
        action,
        any::<bool>(),
        labels(),
        vec(rule(), 0..3),
    )
        .prop_map(
            |(name, namespace, scope, action, dry_run, selector, rules)| Authorization {
                name,
                namespace,
                scope,
                action,
                dry_run,
                selector: if scope == Scope::WorkloadSelector {
                    selector
                } else {
                    BTreeMap::new()
                },
                rules,
            },
        )
}

fn any_action() -> impl Strategy<Value = Action> {
    prop_oneof![Just(Action::Allow), Just(Action::Deny)]
}

fn identity() -> impl Strategy<Value = Option<SpiffeId>> {
    let sa = prop::sample::select(&["a", "b"][..]);
    prop::option::of((namespace(), sa).prop_map(|(ns, sa)| mesh_core::testing::spiffe(&ns, sa)))
}

fn set_of(policies: Vec<Authorization>) -> PolicySet {
    let mut set = PolicySet::default();
    for p in policies {
        set.insert(p);
    }
    set
}

proptest! {
    #[test]
    fn deny_everything_always_denies(
        allows in vec(policy(Just(Action::Allow)), 0..6),
        global in any::<bool>(),
        dst_ns in namespace(),
        dst_labels in labels(),
        id in identity(),
        (src_ip, dst_ip, port) in (ip(), ip(), port()),
    ) {
        let mut set = set_of(allows);
        let (ns, scope) = if global {
            ("istio-system".to_string(), Scope::Global)
        } else {
            (dst_ns.clone(), Scope::Namespace)
        };
        set.insert(Authorization {
            name: "zz-deny-all".into(),
            namespace: ns.clone(),
            scope,
            action: Action::Deny,
            dry_run: false,
            selector: BTreeMap::new(),
            rules: vec![Rule::default()],
        });
        let dst = Destination { namespace: &dst_ns, labels: &dst_labels };
        let conn = Connection { src_identity: id.as_ref(), src_ip, dst_ip, dst_port: port };
        let decision = set.evaluate(&dst, &conn);
        prop_assert!(!decision.allowed, "{}", decision);
        prop_assert_eq!(decision.policy, Some(format!("{ns}/zz-deny-all")));
        prop_assert_eq!(decision.rule, Some(0));
    }

    #[test]
    fn evaluation_is_total_and_consistent(
        policies in vec(policy(any_action()), 0..8),
        dst_ns in namespace(),
        dst_labels in labels(),
        id in identity(),
        (src_ip, dst_ip, port) in (ip(), ip(), port()),
    ) {
        let set = set_of(policies);
        let enforced = set.iter().filter(|p| !p.dry_run).map(|p| (**p).clone()).collect();
        let dst = Destination { namespace: &dst_ns, labels: &dst_labels };
        let conn = Connection { src_identity: id.as_ref(), src_ip, dst_ip, dst_port: port };
        let decision = set.evaluate(&dst, &conn);
        let _ = decision.to_string();
        let _ = serde_json::to_string(&decision).unwrap();

        // The deciding policy, if any, applies and its rule does match.
        if let Some(key) = &decision.policy {
            let (ns, name) = key.split_once('/').unwrap();
            let p = set.get(ns, name).unwrap();
            prop_assert!(p.applies_to(&dst, set.root_namespace()) && !p.dry_run);
            prop_assert_eq!(p.matches(&conn).map(|m| m.rule), decision.rule);
            prop_assert_eq!(p.action == Action::Allow, decision.allowed);
        }
        // Every applicable dry-run policy is reported, and removing them all
        // changes nothing.
        let dry = set.applicable(&dst).filter(|p| p.dry_run).count();
        prop_assert_eq!(decision.dry_run.len(), dry);
        let without = set_of(enforced).evaluate(&dst, &conn);
        prop_assert_eq!(
            (without.allowed, &without.policy, without.rule),
            (decision.allowed, &decision.policy, decision.rule)
        );
    }

    #[test]
    fn matches_parts_agrees_with_the_joined_string(
        m in string_match(),
        parts in vec("[a-z*/.]{0,5}", 0..5),
    ) {
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        let joined = parts.concat();
        let plain = match &m {
            StringMatch::Exact(s) => joined == *s,
            StringMatch::Prefix(s) => joined.starts_with(s.as_str()),
            StringMatch::Suffix(s) => joined.ends_with(s.as_str()),
            StringMatch::Presence => !joined.is_empty(),
        };
        prop_assert_eq!(m.matches_parts(&refs), plain);
        prop_assert_eq!(m.matches(&joined), plain);
    }

    #[test]
    fn policies_round_trip_through_yaml(p in policy(any_action())) {
        let text = serde_yaml_ng::to_string(&p).unwrap();
        let back: Authorization = serde_yaml_ng::from_str(&text).unwrap();
        prop_assert_eq!(back, p);
    }
}
