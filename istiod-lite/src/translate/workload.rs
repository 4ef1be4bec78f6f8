//! A pod to its `Workload`: enrollment (`istio.io/dataplane-mode`), identity,
//! addresses, the services that select it with their port mapping, and its
//! waypoint (`istio.io/use-waypoint`).

use std::collections::{BTreeMap, HashMap};

use ambit_proto::workload as pb;

use super::TranslateSettings;
use super::index::Store;
use super::service::{
    hostname, ip_bytes, is_meshed_port, selector_of, selects, service_key, waypoint_of,
};
use crate::model::{EndpointPort, Pod, Service, TargetPort};

/// The enrollment label, on a namespace or a pod.
pub(super) const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// The workload uid the control plane and the node agent agree on: the pod's
/// `metadata.uid` when set (always, in Kubernetes), else `<namespace>/<name>` (the
/// directory source may leave uids out). The node agent must report the same
/// string as the pod's uid, or ztunnel will not match its pod to the workload.
pub fn workload_uid(pod: &Pod) -> String {
    if pod.meta.uid.is_empty() {
        format!("{}/{}", pod.meta.namespace, pod.meta.name)
    } else {
        pod.meta.uid.clone()
    }
}

/// Whether the pod is captured by the mesh: it or its namespace says `ambient`,
/// the pod does not say `none`, and it does not share its node's network.
pub(super) fn enrolled(pod: &Pod, namespace_labels: Option<&BTreeMap<String, String>>) -> bool {
    if pod.host_network {
        return false;
    }
    match pod.meta.labels.get(DATAPLANE_MODE).map(String::as_str) {
        Some("none") => false,
        Some("ambient") => true,
        _ => namespace_labels
            .and_then(|l| l.get(DATAPLANE_MODE))
            .is_some_and(|mode| mode == "ambient"),
    }
}

/// The first label present among `keys`.
fn first_label<'a>(labels: &'a BTreeMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| labels.get(*k))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The pod's workload, or `None` while it has no address. As in Istio, a finished
/// pod (`Succeeded`/`Failed`) has none: its IP goes back to the pool and may
/// already be another pod's, which ztunnel's by-address index would refuse as a
/// clash. A hostNetwork pod's addresses are its node's: its workload says so
/// (`host_network`), so that it serves as a service endpoint without claiming
/// the node's address.
pub(super) fn build(
    store: &Store,
    settings: &TranslateSettings,
    pod: &Pod,
) -> Option<pb::Workload> {
    if pod.ips.is_empty() || pod.terminal {
        return None;
    }
    let ns = &pod.meta.namespace;
    let ns_labels = store.namespace(ns).map(|n| &n.meta.labels);
    let in_mesh = enrolled(pod, ns_labels);
    let labels = &pod.meta.labels;
    let canonical_name = first_label(
        labels,
        &[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ],
    )
    .unwrap_or(&pod.meta.name);
    let canonical_revision = first_label(
        labels,
        &[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ],
    )
    .unwrap_or("latest");
    let protocol = if in_mesh {
        pb::TunnelProtocol::Hbone
    } else {
        pb::TunnelProtocol::None
    };
    let status = if pod.ready {
        pb::WorkloadStatus::Healthy
    } else {
        pb::WorkloadStatus::Unhealthy
    };
    Some(pb::Workload {
        uid: workload_uid(pod),
        name: pod.meta.name.clone(),
        workload_name: super::owner::workload_name(pod),
        host_network: pod.host_network,
        namespace: ns.clone(),
        addresses: pod.ips.iter().map(ip_bytes).collect(),
        service_account: pod.service_account.clone(),
        trust_domain: settings.trust_domain.clone(),
        node: pod.node_name.clone(),
        tunnel_protocol: protocol.into(),
        // A waypoint only serves captured pods: a pod outside the mesh cannot tell
        // waypoint traffic from any other.
        waypoint: in_mesh
            .then(|| waypoint_of(labels, ns, ns_labels))
            .flatten(),
        services: services_of(store, pod),
        status: status.into(),
        canonical_name: canonical_name.to_string(),
        canonical_revision: canonical_revision.to_string(),
        cluster_id: settings.cluster_id.clone(),
        network: String::new(),
        labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    })
}

/// The services of the pod's namespace that route to it, keyed
/// `<namespace>/<hostname>`: those whose selector matches its labels, and
/// selector-less ones whose EndpointSlices name it. Services without a VIP are
/// left out: ztunnel only knows services it can address.
fn services_of(store: &Store, pod: &Pod) -> HashMap<String, pb::PortList> {
    let ns = &pod.meta.namespace;
    let mut services = HashMap::new();
    for svc in store.services_in(ns) {
        if svc.cluster_ips.is_empty() {
            continue;
        }
        let ports = match selector_of(svc) {
            Some(selector) if selects(selector, &pod.meta.labels) => ports_for(svc, pod, &[]),
            Some(_) => continue,
            None => {
                let slice = store.slices_of(ns, &svc.meta.name).find(|s| {
                    s.endpoints
                        .iter()
                        .any(|e| e.pod_name.as_deref() == Some(pod.meta.name.as_str()))
                });
                match slice {
                    Some(slice) => ports_for(svc, pod, &slice.ports),
                    None => continue,
                }
            }
        };
        let key = service_key(ns, &hostname(ns, &svc.meta.name));
        services.insert(key, pb::PortList { ports });
    }
    services
}

/// The service's TCP ports mapped onto this pod. The target is, in order: the
/// EndpointSlice port of the same name (selector-less services), the numeric
/// target port, the pod's container port of that name; a port that resolves to
/// nothing is left out (Kubernetes gives it no endpoint either).
fn ports_for(svc: &Service, pod: &Pod, slice_ports: &[EndpointPort]) -> Vec<pb::Port> {
    svc.ports
        .iter()
        .filter(|p| is_meshed_port(p))
        .filter_map(|p| {
            let from_slice = slice_ports
                .iter()
                .find(|sp| sp.name == p.name && sp.port != 0)
                .map(|sp| sp.port);
            let target = match from_slice {
                Some(port) => port,
                None => match &p.target_port {
                    TargetPort::Number(0) => p.port,
                    TargetPort::Number(n) => *n,
                    TargetPort::Name(name) => *pod.named_ports.get(name)?,
                },
            };
            (target != 0).then_some(pb::Port {
                service_port: p.port.into(),
                target_port: target.into(),
            })
        })
        .collect()
}
