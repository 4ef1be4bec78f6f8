//! How decisions read: the admin "why denied" line and the JSON dump.

use super::{conn, dst, id, labels, set_of};

fn decide(policies: &[&str], src: Option<(&str, &str)>, src_ip: &str, port: u16) -> String {
    let set = set_of(policies);
    let none = labels(&[]);
    let src = src.map(|(ns, sa)| id(ns, sa));
    set.evaluate(
        &dst("shop", &none),
        &conn(src.as_ref(), src_ip, "198.18.0.10", port),
    )
    .to_string()
}

const NO_SCRAPERS: &str = r#"{name: no-scrapers, namespace: shop, scope: NAMESPACE, action: DENY,
  rules: [{clauses: [{matches: [{namespaces: ["elsewhere"]}]}]}]}"#;

#[test]
fn denied_by_deny_names_policy_rule_and_field() {
    assert_eq!(
        decide(&[NO_SCRAPERS], Some(("elsewhere", "bot")), "198.18.0.1", 80),
        r#"denied by DENY policy shop/no-scrapers rule 0: source namespace "elsewhere" matched"#
    );
}

#[test]
fn allowed_by_allow_shows_the_wildcard_pattern() {
    let policy = r#"{name: shop-peers, namespace: shop, scope: NAMESPACE,
      rules: [{}, {clauses: [{matches: [{principals: ["cluster.local/ns/shop/*"]}]}]}]}"#;
    // Rule 0 has no clauses, so it decides first.
    assert_eq!(
        decide(&[policy], Some(("shop", "cart")), "198.18.0.1", 80),
        "allowed by ALLOW policy shop/shop-peers rule 0: the rule has no conditions"
    );
    let policy = r#"{name: shop-peers, namespace: shop, scope: NAMESPACE,
      rules: [{clauses: [{matches: [{principals: ["cluster.local/ns/shop/*"]}]}]}]}"#;
    assert_eq!(
        decide(&[policy], Some(("shop", "cart")), "198.18.0.1", 80),
        r#"allowed by ALLOW policy shop/shop-peers rule 0: source principal "cluster.local/ns/shop/sa/cart" matched "cluster.local/ns/shop/*""#
    );
}

#[test]
fn evidence_for_each_field() {
    let cases = [
        (
            r#"{notPrincipals: ["cluster.local/ns/shop/sa/frontend"]}"#,
            r#"source principal "cluster.local/ns/shop/sa/cart" is not in notPrincipals"#,
        ),
        (
            r#"{notNamespaces: ["evil"]}"#,
            r#"source namespace "shop" is not in notNamespaces"#,
        ),
        (
            r#"{sourceIps: ["198.18.0.0/15"]}"#,
            "source IP 198.18.0.1 matched 198.18.0.0/15",
        ),
        (
            r#"{notSourceIps: ["fd00::/8"]}"#,
            "source IP 198.18.0.1 is not in notSourceIps",
        ),
        (
            r#"{destinationIps: ["198.18.0.0/15"]}"#,
            "destination IP 198.18.0.10 matched 198.18.0.0/15",
        ),
        (
            r#"{notDestinationIps: ["198.19.0.0/16"]}"#,
            "destination IP 198.18.0.10 is not in notDestinationIps",
        ),
        ("{destinationPorts: [80]}", "destination port 80 matched"),
        (
            "{notDestinationPorts: [22]}",
            "destination port 80 is not in notDestinationPorts",
        ),
        (
            "{serviceAccounts: [{namespace: shop, serviceAccount: cart}]}",
            r#"source principal "cluster.local/ns/shop/sa/cart" is service account shop/cart"#,
        ),
        (
            "{notServiceAccounts: [{namespace: shop, serviceAccount: api}]}",
            r#"source principal "cluster.local/ns/shop/sa/cart" is not in notServiceAccounts"#,
        ),
        // The first field that is set is the one reported.
        (
            r#"{destinationPorts: [80], namespaces: ["sh*"]}"#,
            r#"source namespace "shop" matched "sh*""#,
        ),
    ];
    for (m, reason) in cases {
        let policy = format!(
            "{{name: p, namespace: shop, scope: NAMESPACE, action: DENY, \
             rules: [{{clauses: [{{matches: [{m}]}}]}}]}}"
        );
        let got = decide(&[&policy], Some(("shop", "cart")), "198.18.0.1", 80);
        assert_eq!(
            got,
            format!("denied by DENY policy shop/p rule 0: {reason}"),
            "{m}"
        );
    }
}

#[test]
fn plaintext_source_reads_as_no_identity() {
    let policy = r#"{name: mtls-only, namespace: shop, scope: NAMESPACE, action: DENY,
      rules: [{clauses: [{matches: [{notPrincipals: ["*"]}]}]}]}"#;
    assert_eq!(
        decide(&[policy], None, "198.18.0.1", 80),
        "denied by DENY policy shop/mtls-only rule 0: source has no identity, so notPrincipals held"
    );
}

#[test]
fn plaintext_holds_not_service_accounts() {
    let policy = r#"{name: not-api, namespace: shop, scope: NAMESPACE, action: DENY,
      rules: [{clauses: [{matches: [{notServiceAccounts: [{namespace: shop, serviceAccount: api}]}]}]}]}"#;
    assert_eq!(
        decide(&[policy], None, "198.18.0.1", 80),
        "denied by DENY policy shop/not-api rule 0: source has no identity, so notServiceAccounts held"
    );
}

#[test]
fn allowed_without_policy_says_why() {
    assert_eq!(
        decide(&[], None, "198.18.0.1", 80),
        "allowed: no authorization policy applies"
    );
    assert_eq!(
        decide(&[NO_SCRAPERS], Some(("shop", "cart")), "198.18.0.1", 80),
        "allowed: no DENY policy matched and no ALLOW policy applies"
    );
}

#[test]
fn dry_run_is_appended() {
    let dry = r#"{name: audit, namespace: shop, scope: NAMESPACE, action: DENY, dryRun: true,
      rules: [{clauses: [{matches: [{destinationPorts: [80]}]}]}]}"#;
    let dry_allow = "{name: maybe, namespace: shop, scope: NAMESPACE, dryRun: true}";
    assert_eq!(
        decide(&[dry, dry_allow], Some(("shop", "cart")), "198.18.0.1", 80),
        "allowed: no authorization policy applies; \
         dry-run DENY policy shop/audit would deny (rule 0: destination port 80 matched); \
         dry-run ALLOW policy shop/maybe would not match"
    );
}

#[test]
fn decision_json_for_the_admin_endpoint() {
    let set = set_of(&[NO_SCRAPERS]);
    let none = labels(&[]);
    let bot = id("elsewhere", "bot");
    let decision = set.evaluate(
        &dst("shop", &none),
        &conn(Some(&bot), "198.18.0.1", "198.18.0.10", 80),
    );
    let json = serde_json::to_value(&decision).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "allowed": false,
            "policy": "shop/no-scrapers",
            "rule": 0,
            "reason": "source namespace \"elsewhere\" matched",
        })
    );
}
