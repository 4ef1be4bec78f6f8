//! `PolicySet` bookkeeping: insert, replace, remove, lookups and the admin dump.

use super::{dst, labels, yaml};
use crate::policy::{Action, PolicySet, Scope};

fn named(ns: &str, name: &str, action: &str) -> String {
    format!("{{name: {name}, namespace: {ns}, scope: NAMESPACE, action: {action}}}")
}

#[test]
fn insert_replace_remove() {
    let mut set = PolicySet::default();
    assert_eq!(set.root_namespace(), "istio-system");
    assert!(set.is_empty());

    assert!(set.insert(yaml(&named("shop", "a", "ALLOW"))).is_none());
    assert!(set.insert(yaml(&named("shop", "b", "ALLOW"))).is_none());
    assert!(set.insert(yaml(&named("bank", "a", "ALLOW"))).is_none());
    assert_eq!(set.len(), 3);

    let replaced = set
        .insert(yaml(&named("shop", "a", "DENY")))
        .expect("replaced");
    assert_eq!(replaced.action, Action::Allow);
    assert_eq!(set.len(), 3);
    assert_eq!(set.get("shop", "a").map(|p| p.action), Some(Action::Deny));

    assert_eq!(
        set.remove("shop", "a").map(|p| p.key()),
        Some("shop/a".to_string())
    );
    assert!(set.remove("shop", "a").is_none());
    assert!(set.remove("nowhere", "a").is_none());
    assert_eq!(set.len(), 2);
    assert!(set.remove("bank", "a").is_some());
    assert!(set.remove("shop", "b").is_some());
    assert!(set.is_empty());
    assert_eq!(set.iter().count(), 0);
}

#[test]
fn iter_visits_every_policy() {
    let mut set = PolicySet::new("mesh-root");
    for (ns, name) in [
        ("shop", "b"),
        ("shop", "a"),
        ("bank", "c"),
        ("mesh-root", "d"),
    ] {
        set.insert(yaml(&named(ns, name, "ALLOW")));
    }
    let mut keys: Vec<String> = set.iter().map(|p| p.key()).collect();
    keys.sort();
    assert_eq!(keys, ["bank/c", "mesh-root/d", "shop/a", "shop/b"]);
}

#[test]
fn custom_root_namespace_owns_global_policies() {
    let mut set = PolicySet::new("mesh-root");
    set.insert(yaml(
        "{name: g, namespace: mesh-root, scope: GLOBAL, action: DENY, rules: [{}]}",
    ));
    set.insert(yaml(
        "{name: g, namespace: istio-system, scope: GLOBAL, action: DENY, rules: [{}]}",
    ));
    let none = labels(&[]);
    let shop = dst("shop", &none);
    let applicable: Vec<String> = set.applicable(&shop).map(|p| p.key()).collect();
    assert_eq!(applicable, ["mesh-root/g"]);
}

#[test]
fn applicable_filters_by_scope_and_selector() {
    let mut set = PolicySet::default();
    set.insert(yaml("{name: ns, namespace: shop, scope: NAMESPACE}"));
    set.insert(yaml(
        "{name: db, namespace: shop, scope: WORKLOAD_SELECTOR, selector: {app: db}}",
    ));
    set.insert(yaml(
        "{name: all, namespace: shop, scope: WORKLOAD_SELECTOR}",
    ));
    set.insert(yaml("{name: other, namespace: bank, scope: NAMESPACE}"));
    set.insert(yaml("{name: g, namespace: istio-system, scope: GLOBAL}"));
    let web = labels(&[("app", "web")]);
    let keys: Vec<String> = set
        .applicable(&dst("shop", &web))
        .map(|p| p.key())
        .collect();
    // An empty selector selects every workload of the namespace, as in Istio.
    assert_eq!(keys, ["istio-system/g", "shop/all", "shop/ns"]);
    let db = labels(&[("app", "db")]);
    let keys: Vec<String> = set.applicable(&dst("shop", &db)).map(|p| p.key()).collect();
    assert_eq!(keys, ["istio-system/g", "shop/all", "shop/db", "shop/ns"]);
}

#[test]
fn root_selector_policies_apply_in_every_namespace_once() {
    let mut set = PolicySet::new("mesh-root");
    set.insert(yaml(
        "{name: db, namespace: mesh-root, scope: WORKLOAD_SELECTOR, selector: {app: db}}",
    ));
    set.insert(yaml("{name: ns, namespace: mesh-root, scope: NAMESPACE}"));
    // Not the root here: its selector stays in its own namespace.
    set.insert(yaml(
        "{name: db, namespace: istio-system, scope: WORKLOAD_SELECTOR, selector: {app: db}}",
    ));
    let db = labels(&[("app", "db")]);
    let keys = |ns| -> Vec<String> { set.applicable(&dst(ns, &db)).map(|p| p.key()).collect() };
    assert_eq!(keys("shop"), ["mesh-root/db"]);
    assert_eq!(keys("mesh-root"), ["mesh-root/db", "mesh-root/ns"]);
    assert_eq!(keys("istio-system"), ["mesh-root/db", "istio-system/db"]);
    let web = labels(&[("app", "web")]);
    assert_eq!(set.applicable(&dst("shop", &web)).count(), 0);
}

#[test]
fn admin_dump_is_sorted_json() {
    let mut set = PolicySet::default();
    set.insert(yaml(&named("shop", "b", "ALLOW")));
    set.insert(yaml(&named("bank", "z", "DENY")));
    set.insert(yaml(&named("shop", "a", "ALLOW")));
    let json = serde_json::to_value(&set).unwrap();
    assert_eq!(json["rootNamespace"], "istio-system");
    let keys: Vec<String> = json["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["namespace"].as_str().unwrap(),
                p["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(keys, ["bank/z", "shop/a", "shop/b"]);
    assert_eq!(json["policies"][0]["scope"], "NAMESPACE");
    assert_eq!(json["policies"][0]["action"], "DENY");
    assert_eq!(json["policies"][0]["rules"], serde_json::json!([]));
    assert!(matches!(
        set.get("bank", "z").map(|p| p.scope),
        Some(Scope::Namespace)
    ));
}
