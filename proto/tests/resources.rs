//! Round trips of the mesh resources through the xDS envelope (`Any` inside a
//! delta `Resource`), and a check that the exported type URLs name messages that
//! really exist in the compiled schema.

use std::collections::HashMap;

use ambit_proto::Any;
use ambit_proto::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use ambit_proto::security::{
    Action, Authorization, Clause, IpBlock, Match, Rule, Scope, StringMatch, string_match,
};
use ambit_proto::waypoint_l7::L7Config;
use ambit_proto::workload::{
    Address, GatewayAddress, LoadBalancing, NamespacedHostname, NetworkAddress, Port, PortList,
    Service, TunnelProtocol, Workload, WorkloadStatus, address, gateway_address, load_balancing,
};
use ambit_proto::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, FILE_DESCRIPTOR_SET, L7_CONFIG_TYPE_URL,
    SERVICE_TYPE_URL, WORKLOAD_TYPE_URL,
};
use prost::Message;
use prost_types::FileDescriptorSet;

fn waypoint() -> GatewayAddress {
    GatewayAddress {
        destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
            namespace: "shop".to_owned(),
            hostname: "waypoint.shop.svc.cluster.local".to_owned(),
        })),
        hbone_mtls_port: 15008,
    }
}

fn workload() -> Workload {
    let mut workload = Workload {
        uid: "cluster1//Pod/shop/reviews-1".to_owned(),
        name: "reviews-1".to_owned(),
        namespace: "shop".to_owned(),
        addresses: vec![
            vec![10, 0, 0, 7],
            std::net::Ipv6Addr::LOCALHOST.octets().to_vec(),
        ],
        service_account: "reviews".to_owned(),
        trust_domain: "cluster.local".to_owned(),
        node: "node-a".to_owned(),
        waypoint: Some(waypoint()),
        services: HashMap::from([(
            "shop/reviews.shop.svc.cluster.local".to_owned(),
            PortList {
                ports: vec![Port {
                    service_port: 80,
                    target_port: 8080,
                }],
            },
        )]),
        canonical_name: "reviews".to_owned(),
        canonical_revision: "v1".to_owned(),
        workload_name: "reviews-v1".to_owned(),
        cluster_id: "cluster1".to_owned(),
        network: "net1".to_owned(),
        ..Workload::default()
    };
    workload.set_tunnel_protocol(TunnelProtocol::Hbone);
    workload.set_status(WorkloadStatus::Unhealthy);
    workload
}

fn service() -> Service {
    let mut load_balancing = LoadBalancing::default();
    load_balancing.push_routing_preference(load_balancing::Scope::Zone);
    load_balancing.push_routing_preference(load_balancing::Scope::Node);
    load_balancing.set_mode(load_balancing::Mode::Failover);
    load_balancing.set_health_policy(load_balancing::HealthPolicy::AllowAll);
    Service {
        name: "reviews".to_owned(),
        namespace: "shop".to_owned(),
        hostname: "reviews.shop.svc.cluster.local".to_owned(),
        addresses: vec![NetworkAddress {
            network: "net1".to_owned(),
            address: vec![10, 96, 0, 12],
        }],
        ports: vec![Port {
            service_port: 80,
            target_port: 8080,
        }],
        waypoint: Some(waypoint()),
        load_balancing: Some(load_balancing),
    }
}

fn authorization() -> Authorization {
    let principal = StringMatch {
        match_type: Some(string_match::MatchType::Exact(
            "cluster.local/ns/shop/sa/frontend".to_owned(),
        )),
    };
    let namespace = StringMatch {
        match_type: Some(string_match::MatchType::Prefix("team-".to_owned())),
    };
    let matches = Match {
        principals: vec![principal],
        not_namespaces: vec![namespace],
        source_ips: vec![IpBlock {
            address: vec![10, 0, 0, 0],
            length: 8,
        }],
        not_destination_ips: vec![IpBlock {
            address: vec![0; 16],
            length: 0,
        }],
        destination_ports: vec![8080, 9090],
        not_destination_ports: vec![15000],
        ..Match::default()
    };
    let mut authorization = Authorization {
        name: "allow-frontend".to_owned(),
        namespace: "shop".to_owned(),
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![matches],
            }],
        }],
        dry_run: true,
        selector: HashMap::from([("app".to_owned(), "reviews".to_owned())]),
        ..Authorization::default()
    };
    authorization.set_scope(Scope::WorkloadSelector);
    authorization.set_action(Action::Deny);
    authorization
}

/// Packs `message` the way istiod-lite sends it and unpacks it the way a proxy
/// reads it, through the encoded bytes of a whole delta response.
fn through_xds<M: Message + Default>(type_url: &str, name: &str, message: &M) -> M {
    let response = DeltaDiscoveryResponse {
        type_url: type_url.to_owned(),
        nonce: "1".to_owned(),
        resources: vec![Resource {
            name: name.to_owned(),
            version: "v1".to_owned(),
            resource: Some(Any {
                type_url: type_url.to_owned(),
                value: message.encode_to_vec().into(),
            }),
            ..Resource::default()
        }],
        ..DeltaDiscoveryResponse::default()
    };
    let wire = response.encode_to_vec();
    let mut decoded = DeltaDiscoveryResponse::decode(wire.as_slice()).expect("response decodes");
    assert_eq!(decoded.type_url, type_url);
    let resource = decoded.resources.pop().expect("one resource");
    assert_eq!(resource.name, name);
    let any = resource.resource.expect("resource body");
    assert_eq!(any.type_url, type_url);
    M::decode(&any.value[..]).expect("resource decodes")
}

#[test]
fn workload_round_trips_through_any() {
    let workload = workload();
    let decoded = through_xds(WORKLOAD_TYPE_URL, &workload.uid, &workload);
    assert_eq!(decoded, workload);
    assert_eq!(decoded.tunnel_protocol(), TunnelProtocol::Hbone);
    assert_eq!(decoded.status(), WorkloadStatus::Unhealthy);
}

#[test]
fn service_round_trips_through_any() {
    let service = service();
    let decoded = through_xds(
        SERVICE_TYPE_URL,
        "shop/reviews.shop.svc.cluster.local",
        &service,
    );
    assert_eq!(decoded, service);
    let load_balancing = decoded.load_balancing.unwrap();
    let preference: Vec<_> = load_balancing.routing_preference().collect();
    assert_eq!(
        preference,
        [load_balancing::Scope::Zone, load_balancing::Scope::Node]
    );
}

#[test]
fn authorization_round_trips_through_any() {
    let authorization = authorization();
    let decoded = through_xds(
        AUTHORIZATION_TYPE_URL,
        "shop/allow-frontend",
        &authorization,
    );
    assert_eq!(decoded, authorization);
    assert_eq!(decoded.scope(), Scope::WorkloadSelector);
    assert_eq!(decoded.action(), Action::Deny);
}

#[test]
fn address_and_l7_config_round_trip_through_any() {
    let address = Address {
        r#type: Some(address::Type::Service(service())),
    };
    assert_eq!(
        through_xds(ADDRESS_TYPE_URL, "shop/reviews", &address),
        address
    );
    let l7 = L7Config {
        name: "waypoint".to_owned(),
        namespace: "shop".to_owned(),
    };
    assert_eq!(through_xds(L7_CONFIG_TYPE_URL, "shop/waypoint", &l7), l7);
}

#[test]
fn type_urls_name_compiled_messages() {
    let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
    let mut full_names = Vec::new();
    for file in &set.file {
        for message in &file.message_type {
            full_names.push(format!("{}.{}", file.package(), message.name()));
        }
    }
    for url in [
        WORKLOAD_TYPE_URL,
        SERVICE_TYPE_URL,
        ADDRESS_TYPE_URL,
        AUTHORIZATION_TYPE_URL,
        L7_CONFIG_TYPE_URL,
    ] {
        let name = url.strip_prefix("type.googleapis.com/").unwrap();
        assert!(
            full_names.iter().any(|n| n == name),
            "{url} names no compiled message"
        );
    }
}
