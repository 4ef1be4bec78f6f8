//! The workloads and services ztunnel routes to, as Rust types: read from the local
//! state file (serde) or converted from the xDS resources (`ambit_proto::workload`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ambit_proto::workload as pb;
use mesh_core::SpiffeId;
use serde::{Deserialize, Serialize};

/// Why a workload or service was refused, naming the item and the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name}: field {field}: {problem}")]
pub struct ModelError {
    pub kind: &'static str,
    pub name: String,
    pub field: &'static str,
    pub problem: String,
}

impl ModelError {
    fn new(
        kind: &'static str,
        name: &str,
        field: &'static str,
        problem: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            name: name.to_string(),
            field,
            problem: problem.into(),
        }
    }
}

/// How traffic reaches a workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// Plain TCP: the workload is outside the mesh.
    None,
    /// HBONE to the workload's node proxy on 15008.
    #[default]
    Hbone,
}

/// A service port and the workload port it maps to. In a [`Service`], target
/// port 0 means a named port that each endpoint numbers itself (its `services`
/// entry): an endpoint without a mapping for that port does not serve it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortMapping {
    pub service_port: u16,
    pub target_port: u16,
}

/// One pod (or VM) in the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    #[serde(default = "default_sa")]
    pub service_account: String,
    /// Empty in the source means the mesh's (`--trust-domain`): filled in by
    /// [`Workload::with_trust_domain`] before validation.
    #[serde(default)]
    pub trust_domain: String,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub protocol: Protocol,
    /// Services selecting this workload, keyed `<namespace>/<hostname>`.
    #[serde(default)]
    pub services: BTreeMap<String, Vec<PortMapping>>,
    #[serde(default = "default_true")]
    pub healthy: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub canonical_name: String,
    #[serde(default)]
    pub canonical_revision: String,
    /// The workload that owns the pod (a Deployment, StatefulSet, ...: Istio's
    /// `workload_name`); empty means the pod stands alone. See [`Workload::owner`].
    #[serde(default)]
    pub workload_name: String,
    /// The pod shares its node's network: a service endpoint (never captured),
    /// but not indexed by address, which is its node's and other pods' too.
    #[serde(default)]
    pub host_network: bool,
}

fn default_sa() -> String {
    "default".into()
}

fn default_true() -> bool {
    true
}

impl Workload {
    /// The name of the workload that owns the pod, or the pod's own name: what
    /// the `source_workload` and `destination_workload` labels hold (one series
    /// per Deployment, not per pod, as Istio's).
    pub fn owner(&self) -> &str {
        if self.workload_name.is_empty() {
            &self.name
        } else {
            &self.workload_name
        }
    }

    /// Puts the workload in `trust_domain` if its source gave it none.
    pub fn with_trust_domain(mut self, trust_domain: &str) -> Self {
        if self.trust_domain.is_empty() {
            self.trust_domain = trust_domain.to_string();
        }
        self
    }

    /// The workload's SPIFFE identity.
    pub fn identity(&self) -> Result<SpiffeId, ModelError> {
        SpiffeId::new(&self.trust_domain, &self.namespace, &self.service_account)
            .map_err(|e| ModelError::new("workload", &self.uid, "serviceAccount", e.to_string()))
    }

    /// Checks what serde cannot: identity parts, addresses, ports.
    pub fn validate(&self) -> Result<(), ModelError> {
        let err =
            |field, problem: &str| Err(ModelError::new("workload", &self.uid, field, problem));
        if self.uid.is_empty() {
            return Err(ModelError::new(
                "workload",
                &self.name,
                "uid",
                "must not be empty",
            ));
        }
        if self.name.is_empty() {
            return err("name", "must not be empty");
        }
        if self.addresses.is_empty() {
            return err("addresses", "a workload needs at least one address");
        }
        self.identity()?;
        for (key, ports) in &self.services {
            if key
                .split_once('/')
                .is_none_or(|(ns, host)| ns.is_empty() || host.is_empty())
            {
                return err("services", "keys are <namespace>/<hostname>");
            }
            if ports
                .iter()
                .any(|p| p.service_port == 0 || p.target_port == 0)
            {
                return err("services", "ports must not be 0");
            }
        }
        Ok(())
    }
}

/// A Kubernetes Service: virtual IPs and ports in front of the workloads it selects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<PortMapping>,
}

impl Service {
    /// The key workloads use to name this service: `<namespace>/<hostname>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let name = format!("{}/{}", self.namespace, self.name);
        let err = |field, problem: &str| Err(ModelError::new("service", &name, field, problem));
        if self.name.is_empty() || self.namespace.is_empty() {
            return err("name", "name and namespace must not be empty");
        }
        if self.hostname.is_empty() {
            return err("hostname", "must not be empty");
        }
        if self.vips.is_empty() {
            return err("vips", "a service needs at least one VIP");
        }
        if self.ports.iter().any(|p| p.service_port == 0) {
            return err("ports", "service ports must not be 0");
        }
        Ok(())
    }
}

fn ip_of(
    kind: &'static str,
    name: &str,
    field: &'static str,
    b: &[u8],
) -> Result<IpAddr, ModelError> {
    match b.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(b).unwrap_or_default())),
        16 => Ok(IpAddr::from(<[u8; 16]>::try_from(b).unwrap_or_default())),
        n => Err(ModelError::new(
            kind,
            name,
            field,
            format!("address of {n} bytes, want 4 or 16"),
        )),
    }
}

fn port_of(kind: &'static str, name: &str, field: &'static str, p: u32) -> Result<u16, ModelError> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ModelError::new(kind, name, field, format!("port {p} is not 1-65535")))
}

/// `ports` as mappings; a target port of 0 only where `named_targets` (a
/// service's named port).
fn ports_of(
    kind: &'static str,
    name: &str,
    field: &'static str,
    ports: &[pb::Port],
    named_targets: bool,
) -> Result<Vec<PortMapping>, ModelError> {
    ports
        .iter()
        .map(|p| {
            Ok(PortMapping {
                service_port: port_of(kind, name, field, p.service_port)?,
                target_port: match p.target_port {
                    0 if named_targets => 0,
                    target => port_of(kind, name, field, target)?,
                },
            })
        })
        .collect()
}

impl Workload {
    /// Converts an xDS workload; one without a trust domain is in
    /// `trust_domain` (the mesh's, `--trust-domain`).
    pub fn from_proto(w: pb::Workload, trust_domain: &str) -> Result<Self, ModelError> {
        let kind = "workload";
        let addresses = w
            .addresses
            .iter()
            .map(|a| ip_of(kind, &w.uid, "addresses", a))
            .collect::<Result<_, _>>()?;
        let protocol = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
            Ok(pb::TunnelProtocol::None) => Protocol::None,
            Ok(pb::TunnelProtocol::Hbone) => Protocol::Hbone,
            Err(_) => {
                return Err(ModelError::new(
                    kind,
                    &w.uid,
                    "tunnelProtocol",
                    format!("unknown value {}", w.tunnel_protocol),
                ));
            }
        };
        let healthy = match pb::WorkloadStatus::try_from(w.status) {
            Ok(pb::WorkloadStatus::Healthy) => true,
            Ok(pb::WorkloadStatus::Unhealthy) => false,
            Err(_) => {
                return Err(ModelError::new(
                    kind,
                    &w.uid,
                    "status",
                    format!("unknown value {}", w.status),
                ));
            }
        };
        let services = w
            .services
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.clone(),
                    ports_of(kind, &w.uid, "services", &v.ports, false)?,
                ))
            })
            .collect::<Result<_, ModelError>>()?;
        let workload = Workload {
            trust_domain: if w.trust_domain.is_empty() {
                trust_domain.to_string()
            } else {
                w.trust_domain
            },
            service_account: if w.service_account.is_empty() {
                default_sa()
            } else {
                w.service_account
            },
            uid: w.uid,
            name: w.name,
            namespace: w.namespace,
            addresses,
            node: w.node,
            protocol,
            services,
            healthy,
            labels: w.labels.into_iter().collect(),
            canonical_name: w.canonical_name,
            canonical_revision: w.canonical_revision,
            workload_name: w.workload_name,
            host_network: w.host_network,
        };
        workload.validate()?;
        Ok(workload)
    }
}

impl TryFrom<pb::Service> for Service {
    type Error = ModelError;

    fn try_from(s: pb::Service) -> Result<Self, ModelError> {
        let name = format!("{}/{}", s.namespace, s.name);
        let vips = s
            .addresses
            .iter()
            .map(|a| ip_of("service", &name, "addresses", &a.address))
            .collect::<Result<_, _>>()?;
        let service = Service {
            ports: ports_of("service", &name, "ports", &s.ports, true)?,
            name: s.name,
            namespace: s.namespace,
            hostname: s.hostname,
            vips,
        };
        service.validate()?;
        Ok(service)
    }
}
