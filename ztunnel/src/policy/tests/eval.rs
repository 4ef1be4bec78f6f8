//! The evaluation table: one row per behaviour, each a policy set, a destination,
//! a connection and the expected decision.

use super::{conn, dst, id, labels, set_of};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    AllowedBy(&'static str, usize),
    DeniedBy(&'static str, usize),
    /// ALLOW policies applied and none matched.
    NoAllowMatched,
    /// Allowed with no policy deciding.
    Allowed,
}

impl Want {
    /// (allowed, deciding policy, rule), as a decision reports them.
    fn expected(self) -> (bool, Option<&'static str>, Option<usize>) {
        match self {
            Want::AllowedBy(p, r) => (true, Some(p), Some(r)),
            Want::DeniedBy(p, r) => (false, Some(p), Some(r)),
            Want::NoAllowMatched => (false, None, None),
            Want::Allowed => (true, None, None),
        }
    }
}

struct Case {
    name: &'static str,
    policies: &'static [&'static str],
    dst_ns: &'static str,
    dst_labels: &'static [(&'static str, &'static str)],
    /// Source (namespace, service account); `None` is plaintext.
    src: Option<(&'static str, &'static str)>,
    src_ip: &'static str,
    dst_ip: &'static str,
    port: u16,
    want: Want,
}

const FE_ONLY: &str = r#"
name: fe-only
namespace: shop
scope: NAMESPACE
action: ALLOW
rules:
- clauses: [{matches: [{principals: ["cluster.local/ns/shop/sa/frontend"]}]}]
"#;

const NO_SCRAPERS: &str = r#"
name: no-scrapers
namespace: shop
scope: NAMESPACE
action: DENY
rules: [{clauses: [{matches: [{namespaces: ["elsewhere"]}]}]}]
"#;

const PORT_8080: &str = r#"
{name: web-port, namespace: shop, scope: NAMESPACE,
 rules: [{clauses: [{matches: [{destinationPorts: [8080]}]}]}]}
"#;

const NOT_FRONTEND: &str = r#"
{name: only-fe, namespace: shop, scope: NAMESPACE, action: DENY,
 rules: [{clauses: [{matches: [{notPrincipals: ["cluster.local/ns/shop/sa/frontend"]}]}]}]}
"#;

const NOT_EVIL: &str = r#"
{name: not-evil, namespace: shop, scope: NAMESPACE,
 rules: [{clauses: [{matches: [{notNamespaces: ["evil"]}]}]}]}
"#;

const NOT_SRC_NET: &str = r#"
{name: not-lab, namespace: shop, scope: NAMESPACE, action: DENY,
 rules: [{clauses: [{matches: [{notSourceIps: ["198.18.0.0/15", "fd00::/8"]}]}]}]}
"#;

const NOT_DST_IP: &str = r#"
{name: not-vip, namespace: shop, scope: NAMESPACE, action: DENY,
 rules: [{clauses: [{matches: [{notDestinationIps: ["198.18.0.10"]}]}]}]}
"#;

const NOT_ADMIN_PORT: &str = r#"
{name: not-admin, namespace: shop, scope: NAMESPACE,
 rules: [{clauses: [{matches: [{notDestinationPorts: [9000]}]}]}]}
"#;

const SRC_NETS: &str = r#"
{name: lab, namespace: shop, scope: NAMESPACE,
 rules: [{clauses: [{matches: [{sourceIps: ["198.18.0.0/15", "fd00::/8", "192.0.2.7"]}]}]}]}
"#;

const DST_NET_V6: &str = r#"
{name: v6-only, namespace: shop, scope: NAMESPACE,
 rules: [{clauses: [{matches: [{destinationIps: ["2001:db8:1::/48"]}]}]}]}
"#;

const DRY_DENY_ALL: &str = r#"
{name: would-deny, namespace: shop, scope: NAMESPACE, action: DENY, dryRun: true, rules: [{}]}
"#;

const DRY_ALLOW_FE: &str = r#"
{name: would-allow, namespace: shop, scope: NAMESPACE, dryRun: true,
 rules: [{clauses: [{matches: [{principals: ["cluster.local/ns/shop/sa/frontend"]}]}]}]}
"#;

const ALLOW_ALL: &str = "{name: allow-all, namespace: shop, scope: NAMESPACE, rules: [{}]}";
const DENY_ALL: &str =
    "{name: deny-all, namespace: shop, scope: NAMESPACE, action: DENY, rules: [{}]}";
const ALLOW_NOTHING: &str = "{name: allow-nothing, namespace: shop, scope: NAMESPACE}";
const DENY_NO_RULES: &str = "{name: deny-nothing, namespace: shop, scope: NAMESPACE, action: DENY}";
const EMPTY_CLAUSE: &str =
    "{name: empty-clause, namespace: shop, scope: NAMESPACE, rules: [{clauses: [{}]}]}";
const EMPTY_MATCH: &str =
    "{name: empty-match, namespace: shop, scope: NAMESPACE, rules: [{clauses: [{matches: [{}]}]}]}";

const DENY_DB: &str = r#"
{name: lock-db, namespace: shop, scope: WORKLOAD_SELECTOR, action: DENY,
 selector: {app: db, tier: data}, rules: [{}]}
"#;

const GLOBAL_DENY_PLAINTEXT: &str = r#"
{name: mtls-only, namespace: istio-system, scope: GLOBAL, action: DENY,
 rules: [{clauses: [{matches: [{notPrincipals: ["*"]}]}]}]}
"#;

const GLOBAL_OUTSIDE_ROOT: &str =
    "{name: not-really-global, namespace: shop, scope: GLOBAL, action: DENY, rules: [{}]}";
const ROOT_NS_SCOPED: &str =
    "{name: root-only, namespace: istio-system, scope: NAMESPACE, action: DENY, rules: [{}]}";

const ROOT_DENY_DB: &str = r#"
{name: lock-all-dbs, namespace: istio-system, scope: WORKLOAD_SELECTOR, action: DENY,
 selector: {app: db}, rules: [{}]}
"#;
const ROOT_ALLOW_DB_FE: &str = r#"
{name: db-from-fe, namespace: istio-system, scope: WORKLOAD_SELECTOR, selector: {app: db},
 rules: [{clauses: [{matches: [{principals: ["cluster.local/ns/shop/sa/frontend"]}]}]}]}
"#;

const ANY_PRINCIPAL: &str = r#"
{name: any-peer, namespace: shop, scope: NAMESPACE,
 rules: [{clauses: [{matches: [{principals: ["*"]}]}]}]}
"#;

const ANY_NAMESPACE: &str = r#"
{name: any-ns, namespace: shop, scope: NAMESPACE,
 rules: [{clauses: [{matches: [{namespaces: ["*"]}]}]}]}
"#;

const TWO_RULES: &str = r#"
name: two-rules
namespace: shop
scope: NAMESPACE
rules:
- clauses: [{matches: [{principals: ["cluster.local/ns/shop/*"]}]}]
- clauses: [{matches: [{principals: ["*/sa/admin"]}]}]
"#;

const AND_CLAUSES: &str = r#"
name: fe-on-8080
namespace: shop
scope: NAMESPACE
rules:
- clauses:
  - matches: [{namespaces: ["shop"]}, {principals: ["cluster.local/ns/ops/sa/admin"]}]
  - matches: [{destinationPorts: [8080]}]
"#;

const FIELDS_AND: &str = r#"
{name: fe-from-lab, namespace: shop, scope: NAMESPACE,
 rules: [{clauses: [{matches: [{namespaces: ["shop"], sourceIps: ["198.18.0.0/15"]}]}]}]}
"#;

const API_SA: &str = r#"
{name: api-only, namespace: shop, scope: NAMESPACE,
 rules: [{clauses: [{matches: [{serviceAccounts: [{namespace: shop, serviceAccount: api}]}]}]}]}
"#;

const NOT_API_SA: &str = r#"
{name: not-api, namespace: shop, scope: NAMESPACE,
 rules: [{clauses: [{matches: [{notServiceAccounts: [{namespace: shop, serviceAccount: api}]}]}]}]}
"#;

fn case(name: &'static str, policies: &'static [&'static str], want: Want) -> Case {
    Case {
        name,
        policies,
        dst_ns: "shop",
        dst_labels: &[],
        src: Some(("shop", "frontend")),
        src_ip: "198.18.2.3",
        dst_ip: "198.18.0.10",
        port: 8080,
        want,
    }
}

fn from(mut c: Case, ns: &'static str, sa: &'static str) -> Case {
    c.src = Some((ns, sa));
    c
}

fn plaintext(mut c: Case) -> Case {
    c.src = None;
    c
}

#[rustfmt::skip]
fn cases() -> Vec<Case> {
    use Want::*;
    vec![
        case("allow by service account", &[FE_ONLY], AllowedBy("shop/fe-only", 0)),
        from(case("allow by sa: other sa", &[FE_ONLY], NoAllowMatched), "shop", "cart"),
        from(case("allow by sa: same sa other ns", &[FE_ONLY], NoAllowMatched), "ops", "frontend"),
        from(case("deny by namespace", &[NO_SCRAPERS], DeniedBy("shop/no-scrapers", 0)), "elsewhere", "bot"),
        case("deny by namespace: other ns passes", &[NO_SCRAPERS], Allowed),
        case("port-scoped rule: port matches", &[PORT_8080], AllowedBy("shop/web-port", 0)),
        Case { port: 9090, ..case("port-scoped rule: other port", &[PORT_8080], NoAllowMatched) },
        case("notPrincipals: listed principal passes", &[NOT_FRONTEND], Allowed),
        from(case("notPrincipals: others denied", &[NOT_FRONTEND], DeniedBy("shop/only-fe", 0)), "shop", "cart"),
        plaintext(case("notPrincipals: plaintext denied", &[NOT_FRONTEND], DeniedBy("shop/only-fe", 0))),
        case("notNamespaces: other ns allowed", &[NOT_EVIL], AllowedBy("shop/not-evil", 0)),
        from(case("notNamespaces: listed ns denied", &[NOT_EVIL], NoAllowMatched), "evil", "x"),
        plaintext(case("notNamespaces: plaintext holds", &[NOT_EVIL], AllowedBy("shop/not-evil", 0))),
        case("notSourceIps: inside v4 passes", &[NOT_SRC_NET], Allowed),
        Case { src_ip: "fd00::1", ..case("notSourceIps: inside v6 passes", &[NOT_SRC_NET], Allowed) },
        Case { src_ip: "192.168.1.1", ..case("notSourceIps: outside denied", &[NOT_SRC_NET], DeniedBy("shop/not-lab", 0)) },
        case("notDestinationIps: listed passes", &[NOT_DST_IP], Allowed),
        Case { dst_ip: "198.18.0.11", ..case("notDestinationIps: other denied", &[NOT_DST_IP], DeniedBy("shop/not-vip", 0)) },
        case("notDestinationPorts: other port allowed", &[NOT_ADMIN_PORT], AllowedBy("shop/not-admin", 0)),
        Case { port: 9000, ..case("notDestinationPorts: listed denied", &[NOT_ADMIN_PORT], NoAllowMatched) },
        case("sourceIps v4 block", &[SRC_NETS], AllowedBy("shop/lab", 0)),
        Case { src_ip: "fd12:3456::1", ..case("sourceIps v6 block", &[SRC_NETS], AllowedBy("shop/lab", 0)) },
        Case { src_ip: "::ffff:198.18.9.9", ..case("sourceIps v4-mapped v6", &[SRC_NETS], AllowedBy("shop/lab", 0)) },
        Case { src_ip: "192.0.2.7", ..case("sourceIps bare address", &[SRC_NETS], AllowedBy("shop/lab", 0)) },
        Case { src_ip: "192.0.2.8", ..case("sourceIps bare address is /32", &[SRC_NETS], NoAllowMatched) },
        Case { src_ip: "2001:db8::1", ..case("sourceIps v6 outside", &[SRC_NETS], NoAllowMatched) },
        Case { dst_ip: "2001:db8:1:2::5", ..case("destinationIps v6 inside", &[DST_NET_V6], AllowedBy("shop/v6-only", 0)) },
        Case { dst_ip: "2001:db8:2::5", ..case("destinationIps v6 outside", &[DST_NET_V6], NoAllowMatched) },
        case("destinationIps v4 never in v6 block", &[DST_NET_V6], NoAllowMatched),
        case("dry-run DENY is not enforced", &[DRY_DENY_ALL], Allowed),
        from(case("dry-run ALLOW is not enforced", &[DRY_ALLOW_FE], Allowed), "shop", "cart"),
        case("DENY wins over ALLOW", &[ALLOW_ALL, DENY_ALL], DeniedBy("shop/deny-all", 0)),
        from(case("DENY wins over a matching ALLOW", &[FE_ONLY, NO_SCRAPERS], DeniedBy("shop/no-scrapers", 0)), "elsewhere", "frontend"),
        case("ALLOW with no rules denies everything", &[ALLOW_NOTHING], NoAllowMatched),
        case("ALLOW with no rules beside a match", &[ALLOW_NOTHING, FE_ONLY], AllowedBy("shop/fe-only", 0)),
        case("DENY with no rules denies nothing", &[DENY_NO_RULES], Allowed),
        case("rule with no clauses matches all", &[ALLOW_ALL], AllowedBy("shop/allow-all", 0)),
        plaintext(case("rule with no clauses matches plaintext", &[ALLOW_ALL], AllowedBy("shop/allow-all", 0))),
        case("clause with no matches matches all", &[EMPTY_CLAUSE], AllowedBy("shop/empty-clause", 0)),
        case("match with no fields matches nothing", &[EMPTY_MATCH], NoAllowMatched),
        Case { dst_labels: &[("app", "db"), ("tier", "data"), ("v", "2")], ..case("selector: matching labels", &[DENY_DB], DeniedBy("shop/lock-db", 0)) },
        Case { dst_labels: &[("app", "db")], ..case("selector: some labels only", &[DENY_DB], Allowed) },
        Case { dst_labels: &[("app", "web"), ("tier", "data")], ..case("selector: other value", &[DENY_DB], Allowed) },
        Case { dst_ns: "bank", dst_labels: &[("app", "db"), ("tier", "data")], ..case("selector: other namespace", &[DENY_DB], Allowed) },
        Case { dst_ns: "bank", ..case("namespace scope: other namespace", &[DENY_ALL], Allowed) },
        Case { dst_ns: "bank", ..plaintext(case("global from root applies everywhere", &[GLOBAL_DENY_PLAINTEXT], DeniedBy("istio-system/mtls-only", 0))) },
        Case { dst_ns: "bank", ..case("global from root: mTLS passes", &[GLOBAL_DENY_PLAINTEXT], Allowed) },
        case("global outside root is ignored", &[GLOBAL_OUTSIDE_ROOT], Allowed),
        case("root namespace scope stays in root", &[ROOT_NS_SCOPED], Allowed),
        Case { dst_ns: "istio-system", ..case("root namespace scope in root", &[ROOT_NS_SCOPED], DeniedBy("istio-system/root-only", 0)) },
        Case { dst_labels: &[("app", "db")], ..case("root selector: applies in another namespace", &[ROOT_DENY_DB], DeniedBy("istio-system/lock-all-dbs", 0)) },
        Case { dst_ns: "bank", dst_labels: &[("app", "db")], ..case("root selector: applies in every namespace", &[ROOT_DENY_DB], DeniedBy("istio-system/lock-all-dbs", 0)) },
        Case { dst_ns: "istio-system", dst_labels: &[("app", "db")], ..case("root selector: applies in root", &[ROOT_DENY_DB], DeniedBy("istio-system/lock-all-dbs", 0)) },
        Case { dst_labels: &[("app", "web")], ..case("root selector: other labels", &[ROOT_DENY_DB], Allowed) },
        Case { dst_labels: &[("app", "db")], ..case("root selector: ALLOW enables access control", &[ROOT_ALLOW_DB_FE], AllowedBy("istio-system/db-from-fe", 0)) },
        Case { dst_labels: &[("app", "db")], ..from(case("root selector: ALLOW elsewhere denies", &[ROOT_ALLOW_DB_FE], NoAllowMatched), "shop", "cart") },
        Case { dst_labels: &[("app", "db")], ..case("root selector: DENY beside a local ALLOW", &[ROOT_DENY_DB, ALLOW_ALL], DeniedBy("istio-system/lock-all-dbs", 0)) },
        case("principals * matches any identity", &[ANY_PRINCIPAL], AllowedBy("shop/any-peer", 0)),
        plaintext(case("principals * never matches plaintext", &[ANY_PRINCIPAL], NoAllowMatched)),
        plaintext(case("namespaces * never matches plaintext", &[ANY_NAMESPACE], NoAllowMatched)),
        case("prefix principal, rule 0", &[TWO_RULES], AllowedBy("shop/two-rules", 0)),
        from(case("suffix principal, rule 1", &[TWO_RULES], AllowedBy("shop/two-rules", 1)), "ops", "admin"),
        from(case("neither rule", &[TWO_RULES], NoAllowMatched), "ops", "viewer"),
        case("clauses AND: both hold", &[AND_CLAUSES], AllowedBy("shop/fe-on-8080", 0)),
        from(case("clauses AND: matches OR", &[AND_CLAUSES], AllowedBy("shop/fe-on-8080", 0)), "ops", "admin"),
        Case { port: 80, ..case("clauses AND: one fails", &[AND_CLAUSES], NoAllowMatched) },
        case("fields AND: both hold", &[FIELDS_AND], AllowedBy("shop/fe-from-lab", 0)),
        Case { src_ip: "192.168.0.1", ..case("fields AND: one fails", &[FIELDS_AND], NoAllowMatched) },
        from(case("serviceAccounts: listed sa allowed", &[API_SA], AllowedBy("shop/api-only", 0)), "shop", "api"),
        from(case("serviceAccounts: other sa denied", &[API_SA], NoAllowMatched), "shop", "other"),
        from(case("serviceAccounts: same sa other ns denied", &[API_SA], NoAllowMatched), "bank", "api"),
        plaintext(case("serviceAccounts: plaintext denied", &[API_SA], NoAllowMatched)),
        from(case("notServiceAccounts: listed sa denied", &[NOT_API_SA], NoAllowMatched), "shop", "api"),
        from(case("notServiceAccounts: other sa allowed", &[NOT_API_SA], AllowedBy("shop/not-api", 0)), "shop", "other"),
        plaintext(case("notServiceAccounts: plaintext holds", &[NOT_API_SA], AllowedBy("shop/not-api", 0))),
        case("no policy at all", &[], Allowed),
    ]
}

#[test]
fn evaluation_table() {
    let mut failures = Vec::new();
    for c in cases() {
        let set = set_of(c.policies);
        let dst_labels = labels(c.dst_labels);
        let src = c.src.map(|(ns, sa)| id(ns, sa));
        let decision = set.evaluate(
            &dst(c.dst_ns, &dst_labels),
            &conn(src.as_ref(), c.src_ip, c.dst_ip, c.port),
        );
        let got = (decision.allowed, decision.policy.as_deref(), decision.rule);
        let reason_ok = match c.want {
            Want::NoAllowMatched => decision.reason.starts_with("no ALLOW policy matched"),
            _ => !decision.reason.is_empty(),
        };
        if got != c.want.expected() || !reason_ok {
            failures.push(format!("{}: want {:?}, got {decision}", c.name, c.want));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn dry_run_results_are_reported() {
    let set = set_of(&[DRY_DENY_ALL, DRY_ALLOW_FE, FE_ONLY]);
    let none = labels(&[]);
    let cart = id("shop", "cart");
    let decision = set.evaluate(
        &dst("shop", &none),
        &conn(Some(&cart), "198.18.0.1", "198.18.0.10", 80),
    );
    assert!(!decision.allowed, "{decision}");
    let reported: Vec<_> = decision
        .dry_run
        .iter()
        .map(|r| (r.policy.as_str(), r.matched, r.rule))
        .collect();
    assert_eq!(
        reported,
        [
            ("shop/would-allow", false, None),
            ("shop/would-deny", true, Some(0))
        ]
    );
}

#[test]
fn no_allow_matched_lists_the_allow_policies_considered() {
    let set = set_of(&[FE_ONLY, PORT_8080, ALLOW_NOTHING, NO_SCRAPERS, DRY_ALLOW_FE]);
    let none = labels(&[]);
    let cart = id("shop", "cart");
    let decision = set.evaluate(
        &dst("shop", &none),
        &conn(Some(&cart), "198.18.0.1", "198.18.0.10", 9090),
    );
    assert!(!decision.allowed);
    assert_eq!(
        decision.reason,
        "no ALLOW policy matched (considered: shop/allow-nothing, shop/fe-only, shop/web-port)"
    );
}

#[test]
fn global_policies_come_before_namespace_ones() {
    let global_deny =
        "{name: z-global, namespace: istio-system, scope: GLOBAL, action: DENY, rules: [{}]}";
    let set = set_of(&[DENY_ALL, global_deny]);
    let none = labels(&[]);
    let fe = id("shop", "frontend");
    let decision = set.evaluate(
        &dst("shop", &none),
        &conn(Some(&fe), "198.18.0.1", "198.18.0.10", 80),
    );
    assert_eq!(decision.policy.as_deref(), Some("istio-system/z-global"));
}

/// A service account matches whatever the peer's trust domain, as in Istio.
#[test]
fn service_accounts_ignore_the_trust_domain() {
    let set = super::set_of(&[API_SA]);
    let none = labels(&[]);
    let other_td = mesh_core::SpiffeId::parse("spiffe://other.example/ns/shop/sa/api").unwrap();
    let decision = set.evaluate(
        &dst("shop", &none),
        &conn(Some(&other_td), "198.18.0.1", "198.18.0.10", 80),
    );
    assert!(decision.allowed, "{decision}");
}
