//! Tests of what concerns waypoints: the `use-waypoint` labels carried to
//! workloads and services, and the kinds only a waypoint would enforce, reported
//! as not enforced while loaded.

use ambit_proto::workload as pb;

use super::tests::{
    labels, meta, namespace, pod, service, service_of, translator, up_pod, up_svc, workload,
};
use super::*;

fn waypoint_host(w: Option<&pb::GatewayAddress>) -> Option<(String, String, u32)> {
    let w = w?;
    match &w.destination {
        Some(pb::gateway_address::Destination::Hostname(h)) => {
            Some((h.namespace.clone(), h.hostname.clone(), w.hbone_mtls_port))
        }
        _ => None,
    }
}

#[test]
fn waypoint_labels() {
    let mut t = translator();
    let mut own = service("shop", "own", None, "198.19.0.31");
    own.meta.labels = labels(&[("istio.io/use-waypoint", "svc-wp")]);
    let updates = t.apply(vec![
        namespace(
            "shop",
            &[
                ("istio.io/dataplane-mode", "ambient"),
                ("istio.io/use-waypoint", "wp"),
            ],
        ),
        up_pod(pod("shop", "a", "198.18.0.1", &[])),
        up_pod(pod(
            "shop",
            "off",
            "198.18.0.2",
            &[("istio.io/use-waypoint", "none")],
        )),
        up_pod(pod(
            "shop",
            "far",
            "198.18.0.3",
            &[
                ("istio.io/use-waypoint", "shared"),
                ("istio.io/use-waypoint-namespace", "infra"),
            ],
        )),
        up_pod(pod(
            "shop",
            "wp-pod",
            "198.18.0.4",
            &[("gateway.networking.k8s.io/gateway-name", "wp")],
        )),
        up_svc(service("shop", "web", None, "198.19.0.30")),
        up_svc(own),
    ]);
    let wp = |ns: &str, name: &str| {
        Some((
            ns.to_string(),
            format!("{name}.{ns}.svc.cluster.local"),
            15008,
        ))
    };
    assert_eq!(
        waypoint_host(workload(&updates, "shop/a").waypoint.as_ref()),
        wp("shop", "wp")
    );
    assert_eq!(
        waypoint_host(workload(&updates, "shop/off").waypoint.as_ref()),
        None
    );
    assert_eq!(
        waypoint_host(workload(&updates, "shop/far").waypoint.as_ref()),
        wp("infra", "shared")
    );
    assert_eq!(
        waypoint_host(workload(&updates, "shop/wp-pod").waypoint.as_ref()),
        None
    );
    let web = service_of(&updates, "shop/web.shop.svc.cluster.local");
    assert_eq!(waypoint_host(web.waypoint.as_ref()), wp("shop", "wp"));
    let own = service_of(&updates, "shop/own.shop.svc.cluster.local");
    assert_eq!(waypoint_host(own.waypoint.as_ref()), wp("shop", "svc-wp"));
}

#[test]
fn waypoint_only_kinds_are_reported_as_not_enforced_while_loaded() {
    let mut t = translator();
    let route = Object::HttpRoute(crate::model::HttpRoute {
        meta: meta("shop", "r", &[]),
        parent_refs: Vec::new(),
        rules: serde_json::Value::Null,
    });
    let rule = Object::DestinationRule(crate::model::DestinationRule {
        meta: meta("shop", "d", &[]),
        host: "web.shop.svc.cluster.local".into(),
        traffic_policy: serde_json::Value::Null,
    });
    let updates = t.apply(vec![
        ObjectChange::Upsert(route.clone()),
        ObjectChange::Upsert(rule),
    ]);
    assert!(updates.is_empty(), "nothing reaches ztunnel");
    let reports = t.reports();
    let named: Vec<(&str, &str)> = reports
        .iter()
        .map(|r| (r.error.kind.as_str(), r.error.name.as_str()))
        .collect();
    assert_eq!(named, [("HTTPRoute", "r"), ("DestinationRule", "d")]);
    assert!(
        reports
            .iter()
            .all(|r| r.error.problem.contains("NOT enforced"))
    );
    // Re-applied unchanged: still one report each; deleted: its report goes.
    t.apply(vec![ObjectChange::Upsert(route)]);
    assert_eq!(t.reports().len(), 2);
    t.apply(vec![ObjectChange::Delete(ObjectKey::new(
        Kind::HttpRoute,
        "shop",
        "r",
    ))]);
    let reports = t.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].error.kind, "DestinationRule");
}
