//! Tests of the translator's workloads and services, with model objects built
//! directly (and the fixtures the other test files share); recomputation counts
//! are in `incremental_tests.rs`, policy conversion in `authz_tests.rs`.

use std::collections::BTreeMap;

use ambit_proto::workload as pb;
use ambit_proto::{SERVICE_TYPE_URL, WORKLOAD_TYPE_URL};
use prost::Message;

use super::*;
use crate::model::{
    Endpoint, EndpointPort, EndpointSlice, Meta, Namespace, Pod, Service, ServicePort, TargetPort,
};

pub(super) fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(super) fn meta(ns: &str, name: &str, pairs: &[(&str, &str)]) -> Meta {
    Meta {
        name: name.into(),
        namespace: ns.into(),
        labels: labels(pairs),
        ..Meta::default()
    }
}

pub(super) fn namespace(name: &str, pairs: &[(&str, &str)]) -> ObjectChange {
    ObjectChange::Upsert(Object::Namespace(Namespace {
        meta: meta("", name, pairs),
    }))
}

pub(super) fn pod(ns: &str, name: &str, ip: &str, pairs: &[(&str, &str)]) -> Pod {
    Pod {
        meta: meta(ns, name, pairs),
        node_name: "node-a".into(),
        service_account: "default".into(),
        ips: vec![ip.parse().unwrap()],
        host_network: false,
        ready: true,
        terminal: false,
        named_ports: BTreeMap::new(),
        controller: None,
    }
}

pub(super) fn up_pod(p: Pod) -> ObjectChange {
    ObjectChange::Upsert(Object::Pod(p))
}

fn tcp(name: &str, port: u16, target: TargetPort) -> ServicePort {
    ServicePort {
        name: name.into(),
        port,
        target_port: target,
        protocol: "TCP".into(),
        app_protocol: None,
    }
}

pub(super) fn service(
    ns: &str,
    name: &str,
    selector: Option<&[(&str, &str)]>,
    vip: &str,
) -> Service {
    Service {
        meta: meta(ns, name, &[]),
        selector: selector.map(labels),
        cluster_ips: vip.parse().into_iter().collect(),
        ports: vec![tcp("http", 80, TargetPort::Number(8080))],
    }
}

pub(super) fn up_svc(s: Service) -> ObjectChange {
    ObjectChange::Upsert(Object::Service(s))
}

fn slice(ns: &str, name: &str, service: &str, pods: &[&str]) -> ObjectChange {
    ObjectChange::Upsert(Object::EndpointSlice(EndpointSlice {
        meta: meta(ns, name, &[]),
        service_name: service.into(),
        endpoints: pods
            .iter()
            .map(|p| Endpoint {
                addresses: vec![],
                ready: true,
                pod_name: Some(p.to_string()),
                node_name: None,
            })
            .collect(),
        ports: vec![EndpointPort {
            name: "http".into(),
            port: 9090,
        }],
    }))
}

pub(super) fn delete(kind: Kind, ns: &str, name: &str) -> ObjectChange {
    ObjectChange::Delete(ObjectKey::new(kind, ns, name))
}

/// The updates as `(type, name, is_removal)`, sorted.
pub(super) fn summary(updates: &[ResourceUpdate]) -> Vec<(&'static str, String, bool)> {
    let mut s: Vec<_> = updates
        .iter()
        .map(|u| {
            let ty = match u.type_url {
                WORKLOAD_TYPE_URL => "workload",
                SERVICE_TYPE_URL => "service",
                _ => "authorization",
            };
            (ty, u.name.clone(), u.body.is_none())
        })
        .collect();
    s.sort();
    s
}

pub(super) fn workload(updates: &[ResourceUpdate], uid: &str) -> pb::Workload {
    let u = updates
        .iter()
        .find(|u| u.type_url == WORKLOAD_TYPE_URL && u.name == uid)
        .unwrap_or_else(|| panic!("no workload {uid} in {:?}", summary(updates)));
    pb::Workload::decode(u.body.clone().unwrap()).unwrap()
}

pub(super) fn service_of(updates: &[ResourceUpdate], name: &str) -> pb::Service {
    let u = updates
        .iter()
        .find(|u| u.type_url == SERVICE_TYPE_URL && u.name == name)
        .unwrap();
    pb::Service::decode(u.body.clone().unwrap()).unwrap()
}

pub(super) fn translator() -> Translator {
    Translator::new(TranslateSettings::default())
}

pub(super) fn protocol(w: &pb::Workload) -> pb::TunnelProtocol {
    pb::TunnelProtocol::try_from(w.tunnel_protocol).unwrap()
}

#[test]
fn enrollment_by_namespace_pod_label_and_opt_out() {
    let mut t = translator();
    let mut host = pod("shop", "host", "198.18.0.9", &[]);
    host.host_network = true;
    let updates = t.apply(vec![
        namespace("shop", &[("istio.io/dataplane-mode", "ambient")]),
        namespace("plain", &[]),
        up_pod(pod("shop", "a", "198.18.0.1", &[])),
        up_pod(pod(
            "shop",
            "out",
            "198.18.0.2",
            &[("istio.io/dataplane-mode", "none")],
        )),
        up_pod(pod("plain", "b", "198.18.0.3", &[])),
        up_pod(pod(
            "plain",
            "in",
            "198.18.0.4",
            &[("istio.io/dataplane-mode", "ambient")],
        )),
        up_pod(host),
    ]);
    let hbone = pb::TunnelProtocol::Hbone;
    let none = pb::TunnelProtocol::None;
    assert_eq!(protocol(&workload(&updates, "shop/a")), hbone);
    assert_eq!(protocol(&workload(&updates, "shop/out")), none);
    assert_eq!(protocol(&workload(&updates, "plain/b")), none);
    assert_eq!(protocol(&workload(&updates, "plain/in")), hbone);
    // A hostNetwork pod is never captured, and says its address is its node's.
    let host = workload(&updates, "shop/host");
    assert_eq!(protocol(&host), none);
    assert!(host.host_network);
    assert!(!workload(&updates, "shop/a").host_network);
    assert_eq!(t.counts(), (5, 0, 0));
}

#[test]
fn a_finished_pod_leaves_the_workloads_and_its_address_is_free() {
    let mut t = translator();
    let mut job = pod("shop", "job", "198.18.0.7", &[]);
    job.service_account = "batch".into();
    t.apply(vec![
        namespace("shop", &[("istio.io/dataplane-mode", "ambient")]),
        up_pod(job.clone()),
    ]);
    assert!(t.may_issue("node-a", "shop", "batch"));
    job.terminal = true;
    job.ready = false;
    let updates = t.apply(vec![up_pod(job)]);
    assert_eq!(
        summary(&updates),
        vec![("workload", "shop/job".to_string(), true)]
    );
    assert!(!t.may_issue("node-a", "shop", "batch"));
    // A new pod takes the address: the only workload that holds it.
    let updates = t.apply(vec![up_pod(pod("shop", "next", "198.18.0.7", &[]))]);
    assert_eq!(
        summary(&updates),
        vec![("workload", "shop/next".to_string(), false)]
    );
    assert_eq!(t.counts(), (1, 0, 0));
}

#[test]
fn workload_fields() {
    let mut t = translator();
    let mut p = pod(
        "shop",
        "web-1",
        "198.18.0.1",
        &[
            ("app", "web"),
            ("version", "v2"),
            ("app.kubernetes.io/name", "webapp"),
        ],
    );
    p.meta.uid = "1234-uid".into();
    p.ips.push("fd00::1".parse().unwrap());
    p.service_account = "web-sa".into();
    p.ready = false;
    let updates = t.apply(vec![up_pod(p)]);
    let w = workload(&updates, "1234-uid");
    assert_eq!(w.name, "web-1");
    assert_eq!(w.namespace, "shop");
    assert_eq!(
        w.addresses,
        vec![vec![198, 18, 0, 1], {
            let mut v6 = vec![0xfd, 0];
            v6.extend([0; 13]);
            v6.push(1);
            v6
        }]
    );
    assert_eq!(w.service_account, "web-sa");
    assert_eq!(w.trust_domain, "cluster.local");
    assert_eq!(w.node, "node-a");
    assert_eq!(w.status, i32::from(pb::WorkloadStatus::Unhealthy));
    assert_eq!(
        w.canonical_name, "webapp",
        "app.kubernetes.io/name before app"
    );
    assert_eq!(w.canonical_revision, "v2");
    assert_eq!(w.cluster_id, "Kubernetes");
    assert_eq!(w.labels.get("app").map(String::as_str), Some("web"));
    assert!(w.waypoint.is_none());

    let updates = t.apply(vec![up_pod(pod("shop", "bare", "198.18.0.2", &[]))]);
    let w = workload(&updates, "shop/bare");
    assert_eq!(
        (w.canonical_name.as_str(), w.canonical_revision.as_str()),
        ("bare", "latest")
    );
    assert_eq!(w.status, i32::from(pb::WorkloadStatus::Healthy));
}

#[test]
fn pod_without_ip_has_no_workload_and_losing_it_removes_it() {
    let mut t = translator();
    let mut p = pod("shop", "a", "198.18.0.1", &[]);
    p.ips.clear();
    assert!(t.apply(vec![up_pod(p.clone())]).is_empty());
    p.ips.push("198.18.0.1".parse().unwrap());
    assert_eq!(
        summary(&t.apply(vec![up_pod(p.clone())])),
        [("workload", "shop/a".into(), false)]
    );
    p.ips.clear();
    assert_eq!(
        summary(&t.apply(vec![up_pod(p)])),
        [("workload", "shop/a".into(), true)]
    );
    assert_eq!(t.counts(), (0, 0, 0));
}

#[test]
fn pod_removal_and_uid_change_remove_the_workload() {
    let mut t = translator();
    let mut p = pod("shop", "a", "198.18.0.1", &[]);
    p.meta.uid = "u1".into();
    t.apply(vec![up_pod(p.clone())]);
    p.meta.uid = "u2".into();
    let updates = t.apply(vec![up_pod(p)]);
    assert_eq!(
        summary(&updates),
        [
            ("workload", "u1".into(), true),
            ("workload", "u2".into(), false)
        ]
    );
    let updates = t.apply(vec![delete(Kind::Pod, "shop", "a")]);
    assert_eq!(summary(&updates), [("workload", "u2".into(), true)]);
    assert!(t.apply(vec![delete(Kind::Pod, "shop", "a")]).is_empty());
}

#[test]
fn service_fields_ports_and_headless() {
    let mut t = translator();
    let mut svc = service("shop", "web", Some(&[("app", "web")]), "198.19.0.10");
    svc.ports = vec![
        tcp("http", 80, TargetPort::Number(8080)),
        tcp("grpc", 9000, TargetPort::Name("grpc".into())),
        tcp("same", 7000, TargetPort::Number(0)),
        ServicePort {
            protocol: "UDP".into(),
            ..tcp("dns", 53, TargetPort::Number(53))
        },
    ];
    let mut headless = service("shop", "db", Some(&[("app", "db")]), "None");
    headless.cluster_ips.clear();
    let updates = t.apply(vec![up_svc(svc), up_svc(headless)]);
    assert_eq!(
        summary(&updates),
        [("service", "shop/web.shop.svc.cluster.local".into(), false)]
    );
    let s = service_of(&updates, "shop/web.shop.svc.cluster.local");
    assert_eq!((s.name.as_str(), s.namespace.as_str()), ("web", "shop"));
    assert_eq!(s.hostname, "web.shop.svc.cluster.local");
    assert_eq!(s.addresses[0].address, vec![198, 19, 0, 10]);
    let ports: Vec<_> = s
        .ports
        .iter()
        .map(|p| (p.service_port, p.target_port))
        .collect();
    assert_eq!(
        ports,
        [(80, 8080), (9000, 0), (7000, 7000)],
        "UDP left out; a named target is 0: each workload numbers it"
    );
    assert!(s.waypoint.is_none());
    assert_eq!(t.counts(), (0, 1, 0));
    let updates = t.apply(vec![delete(Kind::Service, "shop", "web")]);
    assert_eq!(
        summary(&updates),
        [("service", "shop/web.shop.svc.cluster.local".into(), true)]
    );
}

#[test]
fn endpoints_by_selector_with_named_target_ports() {
    let mut t = translator();
    let mut svc = service("shop", "web", Some(&[("app", "web")]), "198.19.0.10");
    svc.ports = vec![
        tcp("http", 80, TargetPort::Number(8080)),
        tcp("grpc", 9000, TargetPort::Name("grpc".into())),
        tcp("admin", 9900, TargetPort::Name("admin".into())),
    ];
    let mut p = pod("shop", "web-1", "198.18.0.1", &[("app", "web")]);
    p.named_ports.insert("grpc".into(), 50051);
    let other = pod("shop", "db-1", "198.18.0.2", &[("app", "db")]);
    let elsewhere = pod("other", "web-2", "198.18.0.3", &[("app", "web")]);
    let updates = t.apply(vec![
        up_svc(svc),
        up_pod(p),
        up_pod(other),
        up_pod(elsewhere),
    ]);
    let w = workload(&updates, "shop/web-1");
    let ports = &w.services["shop/web.shop.svc.cluster.local"].ports;
    let ports: Vec<_> = ports
        .iter()
        .map(|p| (p.service_port, p.target_port))
        .collect();
    assert_eq!(
        ports,
        [(80, 8080), (9000, 50051)],
        "unresolvable named port skipped"
    );
    assert!(workload(&updates, "shop/db-1").services.is_empty());
    assert!(
        workload(&updates, "other/web-2").services.is_empty(),
        "other namespace"
    );
}

#[test]
fn endpoints_by_endpoint_slice_for_selector_less_services() {
    let mut t = translator();
    let updates = t.apply(vec![
        up_svc(service("shop", "ext", None, "198.19.0.20")),
        up_pod(pod("shop", "a", "198.18.0.1", &[])),
        up_pod(pod("shop", "b", "198.18.0.2", &[])),
        slice("shop", "ext-1", "ext", &["a"]),
    ]);
    let w = workload(&updates, "shop/a");
    let ports = &w.services["shop/ext.shop.svc.cluster.local"].ports;
    assert_eq!(
        (ports[0].service_port, ports[0].target_port),
        (80, 9090),
        "slice port by name"
    );
    assert!(workload(&updates, "shop/b").services.is_empty());

    // The slice moves to b: both workloads, and nothing else, are recomputed.
    let updates = t.apply(vec![slice("shop", "ext-1", "ext", &["b"])]);
    assert_eq!(
        summary(&updates),
        [
            ("workload", "shop/a".into(), false),
            ("workload", "shop/b".into(), false)
        ]
    );
    assert!(workload(&updates, "shop/a").services.is_empty());
    assert!(!workload(&updates, "shop/b").services.is_empty());

    // Slices of a service with a selector do not touch workloads.
    t.apply(vec![up_svc(service(
        "shop",
        "sel",
        Some(&[("x", "y")]),
        "198.19.0.21",
    ))]);
    assert!(
        t.apply(vec![slice("shop", "sel-1", "sel", &["a"])])
            .is_empty()
    );

    // Removing the slice removes the service from b.
    let updates = t.apply(vec![delete(Kind::EndpointSlice, "shop", "ext-1")]);
    assert_eq!(summary(&updates), [("workload", "shop/b".into(), false)]);
    assert!(workload(&updates, "shop/b").services.is_empty());
}

#[test]
fn may_issue_follows_pods_on_the_node() {
    let mut t = translator();
    let mut p = pod("shop", "a", "198.18.0.1", &[]);
    p.service_account = "web".into();
    t.apply(vec![up_pod(p.clone())]);
    assert!(t.may_issue("node-a", "shop", "web"));
    assert!(!t.may_issue("node-b", "shop", "web"));
    assert!(!t.may_issue("node-a", "shop", "default"));
    assert!(!t.may_issue("node-a", "other", "web"));
    // Rescheduled: the identity follows the pod.
    p.node_name = "node-b".into();
    t.apply(vec![up_pod(p)]);
    assert!(!t.may_issue("node-a", "shop", "web"));
    assert!(t.may_issue("node-b", "shop", "web"));
    t.apply(vec![delete(Kind::Pod, "shop", "a")]);
    assert!(!t.may_issue("node-b", "shop", "web"));
}

#[test]
fn finished_and_host_network_pods_hold_no_identity() {
    let mut t = translator();
    let mut job = pod("shop", "job", "198.18.0.1", &[]);
    job.service_account = "batch".into();
    t.apply(vec![up_pod(job.clone())]);
    assert!(t.may_issue("node-a", "shop", "batch"));
    // The job completes: its node no longer runs that identity.
    job.terminal = true;
    job.ready = false;
    t.apply(vec![up_pod(job.clone())]);
    assert!(!t.may_issue("node-a", "shop", "batch"));
    // Deleting the finished pod withdraws nothing it did not add.
    let mut other = pod("shop", "other", "198.18.0.2", &[]);
    other.service_account = "batch".into();
    t.apply(vec![up_pod(other), delete(Kind::Pod, "shop", "job")]);
    assert!(t.may_issue("node-a", "shop", "batch"));

    let mut host = pod("kube-system", "agent", "198.19.0.1", &[]);
    host.service_account = "agent".into();
    host.host_network = true;
    t.apply(vec![up_pod(host.clone())]);
    assert!(!t.may_issue("node-a", "kube-system", "agent"));
    host.host_network = false;
    t.apply(vec![up_pod(host)]);
    assert!(t.may_issue("node-a", "kube-system", "agent"));
}

#[test]
fn debug_view_lists_objects() {
    let mut t = translator();
    t.apply(vec![
        namespace("shop", &[]),
        up_pod(pod("shop", "a", "198.18.0.1", &[])),
    ]);
    assert_eq!(t.objects().count(), 2);
    let key = ObjectKey::new(Kind::Pod, "shop", "a");
    assert!(matches!(t.object(&key), Some(Object::Pod(_))));
}
