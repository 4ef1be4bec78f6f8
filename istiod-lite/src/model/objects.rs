//! The typed objects of the model: each Kubernetes kind reduced to the fields the
//! mesh uses. Istio's and Gateway API's schemas keep their YAML field names.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// What every object carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Meta {
    pub name: String,
    /// Empty for cluster-scoped kinds.
    pub namespace: String,
    /// `metadata.uid`; may be empty in the directory source.
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `metadata.generation`, when the writer set it.
    pub generation: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Namespace {
    pub meta: Meta,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceAccount {
    pub meta: Meta,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub meta: Meta,
    /// `spec.nodeName`; empty while unscheduled.
    pub node_name: String,
    /// `spec.serviceAccountName`, `default` when unset.
    pub service_account: String,
    /// `status.podIPs` (or `status.podIP`); empty until the pod has a network.
    pub ips: Vec<IpAddr>,
    /// `spec.hostNetwork`: such a pod shares its node's address and is never captured.
    pub host_network: bool,
    /// The `Ready` condition (true when no condition is reported), and not terminating.
    pub ready: bool,
    /// `status.phase` is `Succeeded` or `Failed`: every container has exited for
    /// good, and the pod's address may already belong to another pod.
    pub terminal: bool,
    /// `spec.containers[*].ports[*]` by name, to resolve named target ports.
    pub named_ports: BTreeMap<String, u16>,
    /// The `metadata.ownerReferences` entry with `controller: true`, if any.
    pub controller: Option<Controller>,
}

impl Pod {
    /// Whether a node proxy may act for the pod: not host-networked (such a pod
    /// shares its node's address and is never captured, as in Istio ambient) and
    /// not finished (its address may already be another pod's).
    pub fn captured(&self) -> bool {
        !self.host_network && !self.terminal
    }
}

/// The object that controls a pod (a ReplicaSet, StatefulSet, DaemonSet, Job...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Controller {
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub meta: Meta,
    /// `spec.selector`; `None` when unset (endpoints come from EndpointSlices then).
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.clusterIPs` (or `spec.clusterIP`), without `None` (headless).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: TargetPort,
    /// `TCP` unless said otherwise; only TCP ports are meshed.
    pub protocol: String,
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointSlice {
    pub meta: Meta,
    /// The `kubernetes.io/service-name` label.
    pub service_name: String,
    pub endpoints: Vec<Endpoint>,
    pub ports: Vec<EndpointPort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready`, true when unset.
    pub ready: bool,
    /// `targetRef` when it names a Pod: its name.
    pub pod_name: Option<String>,
    pub node_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointPort {
    pub name: String,
    pub port: u16,
}

/// A Gateway API Gateway (a waypoint when `gatewayClassName: istio-waypoint`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Gateway {
    pub meta: Meta,
    pub class_name: String,
    pub listeners: Vec<GatewayListener>,
    /// `spec.addresses[*].value` that are IPs.
    pub addresses: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GatewayListener {
    pub name: String,
    pub port: u16,
    pub protocol: String,
}

/// A Gateway API HTTPRoute: carried in the model now, used by the waypoint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HttpRoute {
    pub meta: Meta,
    pub parent_refs: Vec<ParentRef>,
    /// `spec.rules`, kept as written until the waypoint translates them.
    pub rules: serde_json::Value,
}

/// A Gateway API `parentRef` / Istio `targetRef`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

/// Istio's DestinationRule: carried now, used by the waypoint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DestinationRule {
    pub meta: Meta,
    pub host: String,
    /// `spec.trafficPolicy`, kept as written until the waypoint translates it.
    pub traffic_policy: serde_json::Value,
}

/// Istio's AuthorizationPolicy (security.istio.io/v1), spec as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuthorizationPolicy {
    pub meta: Meta,
    pub spec: AuthorizationPolicySpec,
}

impl AuthorizationPolicy {
    /// Marks a policy that is evaluated and logged but never decides.
    pub const DRY_RUN_ANNOTATION: &'static str = "istio.io/dry-run";

    /// The dry-run annotation read as Istio reads it (Go's `strconv.ParseBool`);
    /// `Err` with the value when it is not one of those booleans.
    pub fn dry_run(&self) -> Result<bool, &str> {
        match self.meta.annotations.get(Self::DRY_RUN_ANNOTATION) {
            None => Ok(false),
            Some(value) => match value.as_str() {
                "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
                "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
                other => Err(other),
            },
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<ParentRef>,
    #[serde(default)]
    pub target_refs: Vec<ParentRef>,
    #[serde(default)]
    pub action: PolicyAction,
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
    /// Istio's `provider` (CUSTOM action); refused: no external authorizer here.
    #[serde(default)]
    pub provider: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PolicyAction {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRule {
    /// `None` when absent (no condition on the source); a list written empty is
    /// refused, as Istio's validation does, rather than read as "any source".
    #[serde(default)]
    pub from: Option<Vec<RuleFrom>>,
    /// As `from`: absent is no condition, empty is refused.
    #[serde(default)]
    pub to: Option<Vec<RuleTo>>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Validated CIDRs (a bare address is a /32 or /128).
    #[serde(default)]
    pub ip_blocks: Vec<Cidr>,
    #[serde(default)]
    pub not_ip_blocks: Vec<Cidr>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<Cidr>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<Cidr>,
    /// `ns/sa`, or a bare `sa` in the policy's namespace (istio/api#3340).
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Ports as strings, as in Istio's schema; each is checked to be 1-65535.
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// A CIDR written as `198.18.0.0/16` or a bare address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr(pub IpNet);

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if let Ok(net) = text.parse::<IpNet>() {
            return Ok(Cidr(net));
        }
        text.parse::<IpAddr>()
            .map(|ip| Cidr(IpNet::from(ip)))
            .map_err(|_| serde::de::Error::custom(format!("{text:?} is not an IP address or CIDR")))
    }
}
