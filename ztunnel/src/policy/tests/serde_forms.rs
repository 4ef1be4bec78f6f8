//! YAML and JSON forms: Istio's wildcard strings, round trips, refusals.

use super::yaml;
use crate::policy::{Action, Authorization, PolicyError, Problem, Scope, StringMatch};

const ISTIO_LIKE: &str = r#"
name: shop-access
namespace: shop
scope: WORKLOAD_SELECTOR
action: ALLOW
selector:
  app: cart
rules:
- clauses:
  - matches:
    - principals: ["cluster.local/ns/shop/sa/frontend", "cluster.local/ns/ops/*"]
      notPrincipals: ["*/sa/bot"]
    - namespaces: ["*"]
      notNamespaces: ["evil"]
      sourceIps: ["198.18.0.0/15", "fd00::/8", "192.0.2.7"]
  - matches:
    - destinationPorts: [8080, 8443]
      notDestinationIps: ["198.18.0.0/15"]
- {}
"#;

#[test]
fn istio_like_yaml_parses() {
    let p = yaml(ISTIO_LIKE);
    assert_eq!(p.scope, Scope::WorkloadSelector);
    assert_eq!(p.action, Action::Allow);
    assert!(!p.dry_run);
    let m = &p.rules[0].clauses[0].matches;
    assert_eq!(
        m[0].principals,
        [
            StringMatch::Exact("cluster.local/ns/shop/sa/frontend".into()),
            StringMatch::Prefix("cluster.local/ns/ops/".into())
        ]
    );
    assert_eq!(m[0].not_principals, [StringMatch::Suffix("/sa/bot".into())]);
    assert_eq!(m[1].namespaces, [StringMatch::Presence]);
    assert_eq!(m[1].source_ips[2].to_string(), "192.0.2.7/32");
    assert!(p.rules[1].clauses.is_empty());
}

#[test]
fn yaml_round_trip() {
    let p = yaml(ISTIO_LIKE);
    let text = serde_yaml_ng::to_string(&p).unwrap();
    assert!(text.contains("- cluster.local/ns/ops/*"), "{text}");
    assert!(
        text.contains("- '*/sa/bot'") || text.contains("- \"*/sa/bot\""),
        "{text}"
    );
    let back: Authorization = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(back, p);
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(serde_json::from_str::<Authorization>(&json).unwrap(), p);
}

#[test]
fn minimal_policy_defaults() {
    let p = yaml("{name: allow-nothing, namespace: shop, scope: NAMESPACE}");
    assert_eq!(p.action, Action::Allow);
    assert!(p.rules.is_empty() && p.selector.is_empty() && !p.dry_run);
    assert_eq!(
        serde_json::to_value(&p).unwrap(),
        serde_json::json!({
            "name": "allow-nothing", "namespace": "shop", "scope": "NAMESPACE",
            "action": "ALLOW", "rules": [],
        })
    );
}

#[test]
fn string_match_wildcard_forms() {
    let cases = [
        ("*", StringMatch::Presence),
        ("foo*", StringMatch::Prefix("foo".into())),
        ("*foo", StringMatch::Suffix("foo".into())),
        ("foo", StringMatch::Exact("foo".into())),
        ("", StringMatch::Exact(String::new())),
    ];
    for (text, want) in cases {
        assert_eq!(StringMatch::parse(text), Ok(want.clone()), "{text:?}");
        assert_eq!(want.to_string(), text);
        let json = serde_json::to_string(&want).unwrap();
        assert_eq!(json, format!("{text:?}"));
    }
    for bad in ["**", "*foo*", "fo*o", "a**"] {
        assert!(StringMatch::parse(bad).is_err(), "{bad:?}");
        assert!(serde_json::from_str::<StringMatch>(&format!("{bad:?}")).is_err());
    }
}

#[test]
fn string_match_map_form_for_literal_stars() {
    let cases = [
        (StringMatch::Exact("a*".into()), r#"{"exact":"a*"}"#),
        (StringMatch::Prefix("*".into()), r#"{"prefix":"*"}"#),
        (StringMatch::Prefix(String::new()), r#"{"prefix":""}"#),
        (StringMatch::Suffix(String::new()), r#"{"suffix":""}"#),
    ];
    for (m, json) in cases {
        assert_eq!(serde_json::to_string(&m).unwrap(), json);
        assert_eq!(serde_json::from_str::<StringMatch>(json).unwrap(), m);
    }
    assert_eq!(
        serde_json::from_str::<StringMatch>(r#"{"presence":true}"#).unwrap(),
        StringMatch::Presence
    );
    for bad in [
        r#"{"presence":false}"#,
        r#"{"regex":"a"}"#,
        "{}",
        r#"{"exact":"a","prefix":"b"}"#,
        "3",
    ] {
        assert!(serde_json::from_str::<StringMatch>(bad).is_err(), "{bad}");
    }
}

#[test]
fn yaml_refusals() {
    let cases = [
        (
            "{name: p, namespace: shop, scope: NAMESPACE, actoin: DENY}",
            "unknown field",
        ),
        (
            "{name: p, namespace: shop, scope: SOMEWHERE}",
            "unknown variant",
        ),
        ("{name: p, namespace: shop}", "missing field `scope`"),
        (
            "{name: p, namespace: shop, scope: NAMESPACE, rules: [{clauses: [{matches: [{ports: [1]}]}]}]}",
            "unknown field `ports`",
        ),
        (
            "{name: p, namespace: shop, scope: NAMESPACE, rules: [{clauses: [{matches: [{sourceIps: [198.18.0.0/33]}]}]}]}",
            "invalid IP block",
        ),
        (
            "{name: p, namespace: shop, scope: NAMESPACE, rules: [{clauses: [{matches: [{sourceIps: [nowhere]}]}]}]}",
            "invalid IP address",
        ),
        (
            "{name: p, namespace: shop, scope: NAMESPACE, rules: [{clauses: [{matches: [{destinationPorts: [70000]}]}]}]}",
            "70000",
        ),
        (
            "{name: p, namespace: shop, scope: NAMESPACE, rules: [{clauses: [{matches: [{principals: [\"a*b\"]}]}]}]}",
            "'*' is only allowed",
        ),
    ];
    for (text, needle) in cases {
        let err = serde_yaml_ng::from_str::<Authorization>(text)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{text}: {err}");
    }
}

#[test]
fn validate_names_the_field() {
    let parse = |s: &str| serde_yaml_ng::from_str::<Authorization>(s).unwrap();
    let cases = [
        (
            "{name: p, namespace: shop, scope: NAMESPACE, rules: [{}, {clauses: [{}, {matches: [{}, {destinationPorts: [80, 0]}]}]}]}",
            "rules[1].clauses[1].matches[1].destinationPorts[1]",
            Problem::Port(0),
        ),
        (
            "{name: p, namespace: shop, scope: NAMESPACE, rules: [{clauses: [{matches: [{notPrincipals: [\"spiffe://cluster.local/*\"]}]}]}]}",
            "rules[0].clauses[0].matches[0].notPrincipals[0]",
            Problem::PrincipalWithScheme,
        ),
        (
            "{name: p, namespace: shop, scope: NAMESPACE, selector: {app: db}}",
            "selector",
            Problem::SelectorWithoutSelectorScope,
        ),
        (
            "{name: '', namespace: shop, scope: NAMESPACE}",
            "name",
            Problem::Empty,
        ),
        (
            "{name: p, namespace: '', scope: NAMESPACE}",
            "namespace",
            Problem::Empty,
        ),
    ];
    for (text, field, problem) in cases {
        let p = parse(text);
        assert_eq!(
            p.validate(),
            Err(PolicyError::new(p.key(), field, problem)),
            "{text}"
        );
    }
}
