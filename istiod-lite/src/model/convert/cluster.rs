//! The core Kubernetes kinds (Namespace, ServiceAccount, Pod, Service,
//! EndpointSlice): read with k8s-openapi's types, then reduced to the model.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use super::{
    Checked, Fault, NameRule, check_name, check_port, deserialize, label, parse_ip, reduce_meta,
};
use crate::model::{
    Controller, Endpoint, EndpointPort, EndpointSlice, Kind, Namespace, Pod, Service,
    ServiceAccount, ServicePort, TargetPort,
};

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

pub(super) fn namespace(value: Value) -> Checked<Namespace> {
    let ns: core::Namespace = deserialize(value, "")?;
    Ok(Namespace {
        meta: reduce_meta(Kind::Namespace, ns.metadata)?,
    })
}

pub(super) fn service_account(value: Value) -> Checked<ServiceAccount> {
    let sa: core::ServiceAccount = deserialize(value, "")?;
    Ok(ServiceAccount {
        meta: reduce_meta(Kind::ServiceAccount, sa.metadata)?,
    })
}

pub(super) fn pod(value: Value) -> Checked<Pod> {
    let pod: core::Pod = deserialize(value, "")?;
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let controller = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true))
        .map(|owner| Controller {
            kind: owner.kind.clone(),
            name: owner.name.clone(),
        });
    let meta = reduce_meta(Kind::Pod, pod.metadata)?;
    let spec = pod.spec.unwrap_or_default();
    let status = pod.status.unwrap_or_default();

    let service_account = spec
        .service_account_name
        .clone()
        .or(spec.service_account.clone())
        .filter(|sa| !sa.is_empty())
        .unwrap_or_else(|| "default".into());
    check_name(
        "spec.serviceAccountName",
        &service_account,
        NameRule::Subdomain,
    )?;

    let mut ips = Vec::new();
    match status.pod_ips.as_deref() {
        Some(list) if !list.is_empty() => {
            for (i, pod_ip) in list.iter().enumerate() {
                ips.push(parse_ip(&format!("status.podIPs[{i}].ip"), &pod_ip.ip)?);
            }
        }
        _ => {
            if let Some(ip) = status.pod_ip.as_deref().filter(|ip| !ip.is_empty()) {
                ips.push(parse_ip("status.podIP", ip)?);
            }
        }
    }

    let mut named_ports = BTreeMap::new();
    for (c, container) in spec.containers.iter().enumerate() {
        for (p, port) in container.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{c}].ports[{p}].containerPort");
            let number = check_port(&field, port.container_port.into())?;
            if let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) {
                named_ports.entry(name.to_owned()).or_insert(number);
            }
        }
    }

    // A pod whose containers have all exited serves nothing, whatever its
    // conditions last said.
    let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let ready_condition = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status == "True");
    Ok(Pod {
        meta,
        node_name: spec.node_name.clone().unwrap_or_default(),
        service_account,
        ips,
        host_network: spec.host_network.unwrap_or(false),
        ready: ready_condition.unwrap_or(true) && !terminating && !finished,
        terminal: finished,
        named_ports,
        controller,
    })
}

pub(super) fn service(value: Value) -> Checked<Service> {
    let svc: core::Service = deserialize(value, "")?;
    let meta = reduce_meta(Kind::Service, svc.metadata)?;
    let spec = svc.spec.unwrap_or_default();

    // An empty selector selects nothing, exactly like no selector (the API server
    // stores both as nil).
    let selector = spec.selector.clone().filter(|s| !s.is_empty());

    let (ips_field, written): (&str, Vec<String>) = match spec.cluster_ips.clone() {
        Some(list) if !list.is_empty() => ("spec.clusterIPs", list),
        _ => (
            "spec.clusterIP",
            spec.cluster_ip.clone().into_iter().collect(),
        ),
    };
    let mut cluster_ips = Vec::new();
    for (i, text) in written.iter().enumerate() {
        // "None" is a headless service: no VIP at all.
        if text.is_empty() || text == "None" {
            continue;
        }
        let field = if ips_field == "spec.clusterIPs" {
            format!("{ips_field}[{i}]")
        } else {
            ips_field.to_owned()
        };
        cluster_ips.push(parse_ip(&field, text)?);
    }

    let mut ports = Vec::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let number = check_port(&format!("spec.ports[{i}].port"), port.port.into())?;
        let target_field = format!("spec.ports[{i}].targetPort");
        let target_port = match &port.target_port {
            None => TargetPort::Number(number),
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(check_port(&target_field, (*n).into())?)
            }
            Some(IntOrString::String(s)) if s.is_empty() => TargetPort::Number(number),
            Some(IntOrString::String(s)) => match s.parse::<i64>() {
                // A port name must hold a letter, so digits can only mean the number.
                Ok(n) => TargetPort::Number(check_port(&target_field, n)?),
                Err(_) => TargetPort::Name(s.clone()),
            },
        };
        ports.push(ServicePort {
            name: port.name.clone().unwrap_or_default(),
            port: number,
            target_port,
            protocol: port.protocol.clone().unwrap_or_else(|| "TCP".into()),
            app_protocol: port.app_protocol.clone(),
        });
    }
    Ok(Service {
        meta,
        selector,
        cluster_ips,
        ports,
    })
}

pub(super) fn endpoint_slice(value: Value) -> Checked<EndpointSlice> {
    let slice: discovery::EndpointSlice = deserialize(value, "")?;
    let meta = reduce_meta(Kind::EndpointSlice, slice.metadata)?;
    let Some(service_name) = label(&meta.labels, SERVICE_NAME_LABEL).map(str::to_owned) else {
        return Err(Fault::new(
            super::join("metadata.labels", SERVICE_NAME_LABEL),
            "required: the name of the Service this slice belongs to",
        ));
    };
    if slice.address_type == "FQDN" {
        return Err(Fault::new(
            "addressType",
            "FQDN endpoints are not supported: the mesh routes to IP addresses",
        ));
    }

    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        let mut addresses = Vec::new();
        for (j, text) in ep.addresses.iter().enumerate() {
            addresses.push(parse_ip(&format!("endpoints[{i}].addresses[{j}]"), text)?);
        }
        let pod_name = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.clone());
        endpoints.push(Endpoint {
            addresses,
            // Kubernetes: an unknown readiness is to be read as ready.
            ready: ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            pod_name,
            node_name: ep.node_name.clone(),
        });
    }

    let mut ports = Vec::new();
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}].port");
        let Some(number) = port.port else {
            return Err(Fault::new(
                field,
                "required: a port without a number (all ports) is not supported",
            ));
        };
        ports.push(EndpointPort {
            name: port.name.clone().unwrap_or_default(),
            port: check_port(&field, number.into())?,
        });
    }
    Ok(EndpointSlice {
        meta,
        service_name,
        endpoints,
        ports,
    })
}
