//! A Kubernetes Service to its `Service` resource (hostname, VIPs, TCP ports,
//! waypoint), plus the selector and waypoint rules workloads share with it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ambit_proto::workload as pb;

use super::index::Store;
use crate::model::{Service, ServicePort, TargetPort};

/// The cluster's DNS suffix for services. Hostnames are fixed to it, as the
/// waypoint and ztunnel expect `<name>.<namespace>.svc.cluster.local`.
pub(super) const DOMAIN_SUFFIX: &str = "svc.cluster.local";

/// Sends traffic to a namespace, service or pod through the named waypoint.
pub(super) const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// The namespace of the waypoint named by [`USE_WAYPOINT`] (default: the object's).
pub(super) const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// Carried by a waypoint's own pods and Service: they never route through a waypoint.
const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";
/// The HBONE port of every waypoint.
const WAYPOINT_HBONE_PORT: u32 = 15008;

/// `<name>.<namespace>.svc.cluster.local`.
pub(super) fn hostname(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}.{DOMAIN_SUFFIX}")
}

/// `<namespace>/<hostname>`: the Service resource's name and its key in
/// `Workload.services`.
pub(super) fn service_key(namespace: &str, hostname: &str) -> String {
    format!("{namespace}/{hostname}")
}

/// The service's label selector; `None` when it has none (or an empty one, which
/// the API server stores as none): its endpoints then come from EndpointSlices.
pub(super) fn selector_of(svc: &Service) -> Option<&BTreeMap<String, String>> {
    svc.selector.as_ref().filter(|s| !s.is_empty())
}

/// True when `labels` carry every pair of `selector`.
pub(super) fn selects(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Only TCP ports are meshed.
pub(super) fn is_meshed_port(port: &ServicePort) -> bool {
    port.port != 0 && (port.protocol.is_empty() || port.protocol.eq_ignore_ascii_case("TCP"))
}

/// The waypoint an object's traffic must cross: its own `istio.io/use-waypoint`
/// label, else its namespace's; `none` (or an empty value) on the object turns
/// the namespace's off. A waypoint's own pods and Service never get one (that
/// would loop).
pub(super) fn waypoint_of(
    labels: &BTreeMap<String, String>,
    namespace: &str,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Option<pb::GatewayAddress> {
    if labels.contains_key(GATEWAY_NAME) {
        return None;
    }
    let (source, source_namespace) = if labels.contains_key(USE_WAYPOINT) {
        (labels, namespace)
    } else {
        (
            namespace_labels.filter(|l| l.contains_key(USE_WAYPOINT))?,
            namespace,
        )
    };
    let name = source
        .get(USE_WAYPOINT)
        .filter(|n| !n.is_empty() && *n != "none")?;
    let waypoint_ns = source
        .get(USE_WAYPOINT_NAMESPACE)
        .filter(|n| !n.is_empty())
        .map_or(source_namespace, String::as_str);
    Some(pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Hostname(
            pb::NamespacedHostname {
                namespace: waypoint_ns.to_string(),
                hostname: hostname(waypoint_ns, name),
            },
        )),
        hbone_mtls_port: WAYPOINT_HBONE_PORT,
    })
}

/// The network-order bytes of an address (4 or 16).
pub(super) fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The Service resource, or `None` for a service without a VIP (headless):
/// ztunnel only routes to addresses, and refuses a service without one.
///
/// A named target port cannot be resolved at the service level (each pod may
/// number it differently): it is 0 here (as in Istio) and the real port travels
/// in each workload's `services` entry; a pod without that named port has no
/// entry for it and ztunnel sends it none of that port's traffic.
pub(super) fn build(store: &Store, svc: &Service) -> Option<pb::Service> {
    if svc.cluster_ips.is_empty() {
        return None;
    }
    let ns = &svc.meta.namespace;
    let ports = svc
        .ports
        .iter()
        .filter(|p| is_meshed_port(p))
        .map(|p| pb::Port {
            service_port: p.port.into(),
            target_port: match p.target_port {
                TargetPort::Number(0) => p.port.into(),
                TargetPort::Number(n) => n.into(),
                TargetPort::Name(_) => 0,
            },
        })
        .collect();
    let ns_labels = store.namespace(ns).map(|n| &n.meta.labels);
    Some(pb::Service {
        name: svc.meta.name.clone(),
        namespace: ns.clone(),
        hostname: hostname(ns, &svc.meta.name),
        addresses: svc
            .cluster_ips
            .iter()
            .map(|ip| pb::NetworkAddress {
                network: String::new(),
                address: ip_bytes(ip),
            })
            .collect(),
        ports,
        waypoint: waypoint_of(&svc.meta.labels, ns, ns_labels),
        load_balancing: None,
    })
}
