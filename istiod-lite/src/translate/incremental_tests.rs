//! Tests that one change recomputes only what depends on it (counted through the
//! updates returned), and that equal content encodes to equal bytes.

use ambit_proto::WORKLOAD_TYPE_URL;
use ambit_proto::workload as pb;
use prost::Message;

use super::tests::{
    meta, namespace, pod, protocol, service, summary, translator, up_pod, up_svc, workload,
};
use super::*;

#[test]
fn namespace_relabel_enrolls_its_pods_and_touches_nothing_else() {
    let mut t = translator();
    t.apply(vec![
        namespace("shop", &[]),
        up_pod(pod("shop", "a", "198.18.0.1", &[])),
        up_pod(pod("shop", "b", "198.18.0.2", &[])),
        up_svc(service(
            "shop",
            "web",
            Some(&[("app", "web")]),
            "198.19.0.10",
        )),
        up_pod(pod("other", "c", "198.18.0.3", &[])),
    ]);
    let updates = t.apply(vec![namespace(
        "shop",
        &[("istio.io/dataplane-mode", "ambient")],
    )]);
    assert_eq!(
        summary(&updates),
        [
            ("service", "shop/web.shop.svc.cluster.local".into(), false),
            ("workload", "shop/a".into(), false),
            ("workload", "shop/b".into(), false),
        ]
    );
    assert_eq!(
        protocol(&workload(&updates, "shop/a")),
        pb::TunnelProtocol::Hbone
    );
}

#[test]
fn one_change_recomputes_only_what_depends_on_it() {
    let mut t = translator();
    let mut batch = vec![namespace("ns-0", &[("istio.io/dataplane-mode", "ambient")])];
    for s in 0..20 {
        let app = format!("app-{s}");
        batch.push(up_svc(service(
            "ns-0",
            &app,
            Some(&[("app", app.as_str())]),
            &format!("198.19.1.{s}"),
        )));
        for p in 0..10 {
            let ip = format!("198.18.{s}.{p}");
            batch.push(up_pod(pod(
                "ns-0",
                &format!("{app}-{p}"),
                &ip,
                &[("app", app.as_str())],
            )));
        }
    }
    let updates = t.apply(batch);
    assert_eq!(updates.len(), 220);
    assert_eq!(t.counts(), (200, 20, 0));
    assert_eq!(t.store.len(), 221);

    // One pod: only its workload.
    let mut p = pod("ns-0", "app-3-4", "198.18.3.4", &[("app", "app-3")]);
    p.ready = false;
    assert_eq!(
        summary(&t.apply(vec![up_pod(p)])),
        [("workload", "ns-0/app-3-4".into(), false)]
    );

    // One service's selector moves from app-5 to app-6: the service and the 20
    // pods of both selectors.
    let moved = service("ns-0", "app-5", Some(&[("app", "app-6")]), "198.19.1.5");
    let updates = summary(&t.apply(vec![up_svc(moved)]));
    assert_eq!(updates.len(), 21);
    assert!(updates.iter().all(|(ty, name, _)| *ty == "service"
        || name.starts_with("ns-0/app-5-")
        || name.starts_with("ns-0/app-6-")));

    // A batch touching the same pod twice yields it once.
    let a = pod("ns-0", "app-1-1", "198.18.1.1", &[("app", "app-1")]);
    assert_eq!(t.apply(vec![up_pod(a.clone()), up_pod(a)]).len(), 1);

    // Kinds nothing depends on yet recompute nothing.
    let sa = Object::ServiceAccount(crate::model::ServiceAccount {
        meta: meta("ns-0", "sa", &[]),
    });
    assert!(t.apply(vec![ObjectChange::Upsert(sa)]).is_empty());
}

#[test]
fn equal_content_encodes_to_equal_bytes() {
    let many: Vec<(&str, &str)> = vec![("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"), ("e", "5")];
    let mut first = None;
    for _ in 0..5 {
        let mut t = translator();
        let mut batch = vec![up_pod(pod("shop", "a", "198.18.0.1", &many))];
        for (i, (k, v)) in many.iter().enumerate() {
            batch.push(up_svc(service(
                "shop",
                &format!("s{i}"),
                Some(&[(*k, *v)]),
                &format!("198.19.0.{i}"),
            )));
        }
        let updates = t.apply(batch);
        let body = updates
            .iter()
            .find(|u| u.type_url == WORKLOAD_TYPE_URL)
            .unwrap()
            .body
            .clone();
        let w = pb::Workload::decode(body.clone().unwrap()).unwrap();
        assert_eq!((w.services.len(), w.labels.len()), (5, 5));
        match &first {
            None => first = Some(body),
            Some(f) => assert_eq!(*f, body),
        }
    }
}
