//! Tests of applying xDS responses to the state.

use super::*;
use ambit_proto::workload as pb;
use bytes::Bytes;

use crate::state::Route;

fn workload(uid: &str, ip: [u8; 4]) -> pb::Workload {
    pb::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "shop".into(),
        addresses: vec![ip.to_vec()],
        ..Default::default()
    }
}

fn res(name: &str, version: &str, m: &impl Message) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        body: Bytes::from(m.encode_to_vec()),
    }
}

/// hostNetwork pods share their node's address: each is accepted, none is
/// found by that address, and a service picks them as plain-TCP endpoints.
#[test]
fn host_network_pods_share_the_node_address_and_serve_services() {
    let store = Arc::new(StateStore::default());
    let xds = XdsState::new(store.clone());
    let node = [198, 18, 0, 9];
    let host = |uid: &str| {
        let mut w = workload(uid, node);
        w.host_network = true;
        w.services = [(
            "shop/agent.shop.svc.cluster.local".to_string(),
            pb::PortList { ports: vec![] },
        )]
        .into();
        w
    };
    let svc = pb::Service {
        name: "agent".into(),
        namespace: "shop".into(),
        hostname: "agent.shop.svc.cluster.local".into(),
        addresses: vec![pb::NetworkAddress {
            address: vec![198, 18, 100, 9],
            ..Default::default()
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 9100,
        }],
        ..Default::default()
    };
    xds.apply(
        WORKLOAD_TYPE_URL,
        vec![res("h1", "1", &host("h1")), res("h2", "1", &host("h2"))],
        vec![],
    )
    .unwrap();
    xds.apply(
        SERVICE_TYPE_URL,
        vec![res("shop/agent.shop.svc.cluster.local", "1", &svc)],
        vec![],
    )
    .unwrap();
    let state = store.snapshot();
    assert_eq!(state.workloads().count(), 2);
    assert!(state.workload_by_ip(node.into()).is_none());
    let to_vip = "198.18.100.9:80".parse().unwrap();
    match state.route(to_vip).unwrap() {
        crate::state::Route::Passthrough { addr } => {
            assert_eq!(addr, "198.18.0.9:9100".parse().unwrap())
        }
        other => panic!("expected plain TCP to the node, got {other:?}"),
    }
    // Removing one takes no claim of the other's with it.
    xds.apply(WORKLOAD_TYPE_URL, vec![], vec!["h1".into()])
        .unwrap();
    assert_eq!(store.snapshot().workloads().count(), 1);
}

#[test]
fn a_workload_names_its_owner_or_else_the_pod() {
    let store = Arc::new(StateStore::default());
    let xds = XdsState::new(store.clone());
    let mut owned = workload("web-7d9f-x2", [198, 18, 1, 1]);
    owned.workload_name = "web".into();
    let alone = workload("solo", [198, 18, 1, 2]);
    xds.apply(
        WORKLOAD_TYPE_URL,
        vec![res("a", "1", &owned), res("b", "1", &alone)],
        vec![],
    )
    .unwrap();
    let state = store.snapshot();
    assert_eq!(state.workload("web-7d9f-x2").unwrap().owner(), "web");
    assert_eq!(state.workload("solo").unwrap().owner(), "solo");
}

#[test]
fn a_bad_or_clashing_resource_is_refused_and_its_last_good_version_kept() {
    let store = Arc::new(StateStore::default());
    let xds = XdsState::new(store.clone());
    let a1 = res("a", "1", &workload("a", [198, 18, 0, 1]));
    let b1 = res("b", "1", &workload("b", [198, 18, 0, 2]));
    let e1 = res("e", "1", &workload("e", [198, 18, 0, 3]));
    xds.apply(WORKLOAD_TYPE_URL, vec![a1, b1, e1], vec![])
        .unwrap();
    assert_eq!(store.snapshot().workloads().count(), 3);

    let mut bad = workload("a", [198, 18, 0, 9]);
    bad.addresses = vec![vec![1, 2, 3]];
    // b's address, freed by the removal in the same response: applied.
    let reusing = workload("f", [198, 18, 0, 2]);
    // e's address, still e's: accepted (so the client claims it on
    // reconnect) and held back until e goes.
    let clashing = workload("c", [198, 18, 0, 3]);
    let garbage = Resource {
        name: "d".into(),
        version: "1".into(),
        body: Bytes::from_static(&[0xff, 0xff, 0xff]),
    };
    let refused = xds
        .apply(
            WORKLOAD_TYPE_URL,
            vec![
                res("a", "2", &bad),
                res("f", "1", &reusing),
                res("c", "1", &clashing),
                garbage,
            ],
            vec!["b".into()],
        )
        .unwrap_err();
    let names: Vec<&str> = refused.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "c", "d"]);
    assert!(refused[0].1.contains("addresses"), "{}", refused[0].1);
    assert!(
        refused[1].1.contains("belongs to workload e") && refused[1].1.contains("held back"),
        "{}",
        refused[1].1
    );
    assert!(refused[2].1.contains("does not decode"), "{}", refused[2].1);
    // Of the refused, only c is kept (its version held by the client).
    assert!(xds.holds_back(WORKLOAD_TYPE_URL, "c"));
    assert!(!xds.holds_back(WORKLOAD_TYPE_URL, "a"));
    assert!(!xds.holds_back(WORKLOAD_TYPE_URL, "d"));
    let state = store.snapshot();
    let a = state.workload("a").unwrap();
    assert_eq!(
        a.addresses,
        [IpAddr::from([198, 18, 0, 1])],
        "a's last good version"
    );
    assert!(state.workload("b").is_none(), "the removal applied");
    assert!(state.workload("f").is_some(), "b's address went to f");
    assert!(state.workload("c").is_none());
    assert_eq!(xds.counts(), (3, 0, 0));

    // e goes in a later response: the held-back c takes its address.
    xds.apply(WORKLOAD_TYPE_URL, vec![], vec!["e".into()])
        .unwrap();
    let state = store.snapshot();
    assert!(state.workload("e").is_none());
    assert_eq!(
        state.workload("c").unwrap().addresses,
        [IpAddr::from([198, 18, 0, 3])]
    );
}

fn service(name: &str, vip: [u8; 4]) -> pb::Service {
    pb::Service {
        name: name.into(),
        namespace: "shop".into(),
        hostname: format!("{name}.shop.svc.cluster.local"),
        addresses: vec![pb::NetworkAddress {
            address: vip.to_vec(),
            ..Default::default()
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
        }],
        ..Default::default()
    }
}

/// A service renamed with its VIP kept: the new name may come in the same
/// response as the old one's removal, or one response before it (the server
/// splits large pushes); either way the VIP ends up routed to the new service.
#[test]
fn a_renamed_service_keeps_its_vip_whatever_the_order_of_put_and_removal() {
    let vip = [198, 18, 100, 1];
    let dst = std::net::SocketAddr::from((vip, 80));
    let routed_to = |store: &StateStore| match store.snapshot().route(dst) {
        Ok(Route::Mesh { service, .. }) => service.map(|s| s.name.clone()),
        _ => None,
    };
    let endpoint = {
        let mut w = workload("cart-1", [198, 18, 0, 10]);
        w.tunnel_protocol = pb::TunnelProtocol::Hbone.into();
        for name in ["cart", "basket"] {
            w.services.insert(
                format!("shop/{name}.shop.svc.cluster.local"),
                pb::PortList::default(),
            );
        }
        w
    };
    for split in [false, true] {
        let store = Arc::new(StateStore::default());
        let xds = XdsState::new(store.clone());
        xds.apply(WORKLOAD_TYPE_URL, vec![res("w", "1", &endpoint)], vec![])
            .unwrap();
        xds.apply(
            SERVICE_TYPE_URL,
            vec![res("cart", "1", &service("cart", vip))],
            vec![],
        )
        .unwrap();
        let basket = res("basket", "1", &service("basket", vip));
        if split {
            // Refused (NACKed) but held back while cart holds the VIP.
            let refused = xds
                .apply(SERVICE_TYPE_URL, vec![basket], vec![])
                .unwrap_err();
            assert!(refused[0].1.contains("held back"), "{refused:?}");
            assert!(xds.holds_back(SERVICE_TYPE_URL, "basket"));
            assert_eq!(routed_to(&store).as_deref(), Some("cart"));
            xds.apply(SERVICE_TYPE_URL, vec![], vec!["cart".into()])
                .unwrap();
        } else {
            xds.apply(SERVICE_TYPE_URL, vec![basket], vec!["cart".into()])
                .unwrap();
        }
        assert_eq!(
            routed_to(&store).as_deref(),
            Some("basket"),
            "split {split}"
        );
        assert_eq!(xds.counts(), (1, 1, 0));
    }
}

/// A held-back resource the server removes (or replaces) is forgotten: it is
/// not applied when its claim frees later.
#[test]
fn a_held_back_resource_removed_by_the_server_never_applies() {
    let store = Arc::new(StateStore::default());
    let xds = XdsState::new(store.clone());
    let vip = [198, 18, 100, 2];
    xds.apply(
        SERVICE_TYPE_URL,
        vec![res("old", "1", &service("old", vip))],
        vec![],
    )
    .unwrap();
    xds.apply(
        SERVICE_TYPE_URL,
        vec![res("new", "1", &service("new", vip))],
        vec![],
    )
    .unwrap_err();
    xds.apply(SERVICE_TYPE_URL, vec![], vec!["new".into()])
        .unwrap();
    assert!(!xds.holds_back(SERVICE_TYPE_URL, "new"));
    xds.apply(SERVICE_TYPE_URL, vec![], vec!["old".into()])
        .unwrap();
    assert_eq!(xds.counts(), (0, 0, 0));
    assert!(store.snapshot().services().next().is_none());
}

#[test]
fn services_and_policies_convert_and_clash_on_their_keys() {
    let store = Arc::new(StateStore::default());
    let xds = XdsState::new(store.clone());
    let svc = service("cart", [198, 18, 100, 9]);
    xds.apply(SERVICE_TYPE_URL, vec![res("s1", "1", &svc)], vec![])
        .unwrap();
    // The same hostname and VIP under another name: refused and held back, s1
    // stays.
    let refused = xds
        .apply(SERVICE_TYPE_URL, vec![res("s2", "1", &svc)], vec![])
        .unwrap_err();
    assert!(
        refused[0].1.contains("belongs to service s1"),
        "{refused:?}"
    );
    assert_eq!(store.snapshot().services().count(), 1);
    assert_eq!(xds.counts(), (0, 1, 0));

    let policy = ambit_proto::security::Authorization {
        name: "deny-all".into(),
        namespace: "shop".into(),
        scope: ambit_proto::security::Scope::Namespace.into(),
        ..Default::default()
    };
    xds.apply(
        AUTHORIZATION_TYPE_URL,
        vec![res("shop/deny-all", "1", &policy)],
        vec![],
    )
    .unwrap();
    let state = store.snapshot();
    assert_eq!(state.services().count(), 1);
    assert_eq!(state.policies().len(), 1);
    xds.apply(AUTHORIZATION_TYPE_URL, vec![], vec!["shop/deny-all".into()])
        .unwrap();
    assert!(store.snapshot().policies().is_empty());
}

/// A mesh-wide policy from a namespace that is not this ztunnel's root
/// namespace would apply to nothing here: refused, naming both settings.
#[test]
fn a_global_policy_from_another_root_namespace_is_refused() {
    let store = Arc::new(StateStore::with_root_namespace(
        ProxyState::default(),
        "mesh-root".into(),
    ));
    let xds = XdsState::new(store.clone());
    let global_in = |ns: &str| ambit_proto::security::Authorization {
        name: "deny-all".into(),
        namespace: ns.into(),
        scope: ambit_proto::security::Scope::Global.into(),
        action: ambit_proto::security::Action::Deny.into(),
        ..Default::default()
    };
    let refused = xds
        .apply(
            AUTHORIZATION_TYPE_URL,
            vec![res(
                "istio-system/deny-all",
                "1",
                &global_in("istio-system"),
            )],
            vec![],
        )
        .unwrap_err();
    assert!(
        refused[0].1.contains("istio-system") && refused[0].1.contains("mesh-root"),
        "{refused:?}"
    );
    assert!(store.snapshot().policies().is_empty());
    xds.apply(
        AUTHORIZATION_TYPE_URL,
        vec![res("mesh-root/deny-all", "1", &global_in("mesh-root"))],
        vec![],
    )
    .unwrap();
    assert_eq!(store.snapshot().policies().len(), 1);
}

/// An update that moves a claim away (a service's VIP changed) frees it for a
/// held-back resource as a removal does.
#[test]
fn a_claim_moved_by_an_update_frees_it_for_a_held_back_resource() {
    let store = Arc::new(StateStore::default());
    let xds = XdsState::new(store.clone());
    let (vip, moved) = ([198, 18, 100, 3], [198, 18, 100, 4]);
    let put = |name: &str, version: &str, vip| {
        xds.apply(
            SERVICE_TYPE_URL,
            vec![res(name, version, &service(name, vip))],
            vec![],
        )
    };
    put("z-old", "1", vip).unwrap();
    put("a-new", "1", vip).unwrap_err();
    assert_eq!(xds.counts(), (0, 1, 0), "a-new held back");
    put("z-old", "2", moved).unwrap();
    assert_eq!(xds.counts(), (0, 2, 0));
    let names: Vec<String> = store
        .snapshot()
        .services()
        .map(|s| s.name.clone())
        .collect();
    assert!(names.contains(&"a-new".to_string()), "{names:?}");
}

/// A workload without a trust domain is in the mesh's (`--trust-domain`), not
/// `cluster.local`; one that names its own keeps it.
#[test]
fn a_workload_without_a_trust_domain_is_in_the_configured_one() {
    let store = Arc::new(StateStore::default().with_trust_domain("example.org"));
    let xds = XdsState::new(store.clone());
    let mut other = workload("other", [198, 18, 0, 2]);
    other.trust_domain = "other.org".into();
    xds.apply(
        WORKLOAD_TYPE_URL,
        vec![
            res("plain", "1", &workload("plain", [198, 18, 0, 1])),
            res("other", "1", &other),
        ],
        vec![],
    )
    .unwrap();
    let state = store.snapshot();
    let identity = |uid: &str| state.workload(uid).unwrap().identity().unwrap().to_string();
    assert_eq!(identity("plain"), "spiffe://example.org/ns/shop/sa/default");
    assert_eq!(identity("other"), "spiffe://other.org/ns/shop/sa/default");
}
