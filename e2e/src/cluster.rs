//! The test cluster: a wire namespace, a namespace per node joined by the underlay,
//! and a namespace per pod wired by the CNI chain (standard `bridge` + `host-local`,
//! then any plugins the test appends, e.g. `ambit-cni`). Dropping the [`Cluster`]
//! tears everything down, also while a panicking test unwinds.

use std::path::Path;

use serde_json::json;
use tempfile::TempDir;

use crate::cni::{CniChain, CniError, CniPlugin, Invocation};
use crate::naming::{ClusterPrefix, sweep_prefix, sweep_stale_once};
use crate::netns::{Netns, NetnsError, kill_netns_processes};
use crate::node::Node;
use crate::pod::{Pod, PodSpec};
use crate::underlay::{MAX_NODES, Wire, pod_bridge_name, pod_subnet_cidr, route_pod_subnet};

/// The CNI network name, the same on every node as in a real cluster.
pub const NETWORK_NAME: &str = "ambit";
/// The pod's interface, as kubelet names it.
pub const POD_IFNAME: &str = "eth0";

/// Building, changing or tearing down the cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Cni(#[from] CniError),
    #[error("cannot create the cluster's temp dir: {0}")]
    TempDir(#[source] std::io::Error),
    #[error("invalid cluster request: {0}")]
    Invalid(String),
    #[error("CNI gave pod {pod} no IPv4 address: {result}")]
    NoPodIp { pod: String, result: String },
    #[error(transparent)]
    Packages(#[from] crate::packages::PackagesError),
    #[error("teardown left problems: {}", .0.join("; "))]
    Teardown(Vec<String>),
}

/// Describes a cluster before it exists.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    nodes: u8,
    chained: Vec<CniPlugin>,
}

impl ClusterBuilder {
    /// Number of nodes, 1..=254 (default 1), numbered from 1.
    pub fn nodes(mut self, nodes: u8) -> Self {
        self.nodes = nodes;
        self
    }

    /// Appends a plugin to every node's chain, after `bridge` and any added before.
    pub fn chain_plugin(mut self, plugin: CniPlugin) -> Self {
        self.chained.push(plugin);
        self
    }

    /// Creates the namespaces and the underlay. Blocking (it runs `ip`): fine from
    /// sync and async tests alike, and the same blocking calls let `Drop` tear down.
    pub fn build(self) -> Result<Cluster, ClusterError> {
        if self.nodes == 0 || self.nodes > MAX_NODES {
            return Err(ClusterError::Invalid(format!(
                "nodes must be 1..={MAX_NODES}, got {}",
                self.nodes
            )));
        }
        sweep_stale_once();
        // Without root nothing below works, and apt-get cannot install either.
        if nix::unistd::geteuid().is_root() {
            crate::packages::ensure()?;
        }
        CniChain::loopback().check_installed()?;
        bridge_plugin(1, Path::new("/")).check_installed()?;
        self.chained
            .iter()
            .try_for_each(CniPlugin::check_installed)?;

        let prefix = ClusterPrefix::next();
        let state_dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()
            .map_err(ClusterError::TempDir)?;
        // From here on, an early return drops the half-built cluster, which tears
        // down whatever was created.
        let mut cluster = Cluster {
            wire: Some(Wire::create(&prefix.name("wire"))?),
            prefix,
            state_dir: Some(state_dir),
            chained: self.chained,
            nodes: Vec::new(),
            pods: Vec::new(),
            torn_down: false,
        };
        for index in 1..=self.nodes {
            cluster.add_node(index)?;
        }
        for from in &cluster.nodes {
            for to in cluster
                .nodes
                .iter()
                .filter(|to| to.node.index != from.node.index)
            {
                route_pod_subnet(&from.netns, to.node.index)?;
            }
        }
        Ok(cluster)
    }
}

#[derive(Debug)]
struct NodeSlot {
    node: Node,
    netns: Netns,
}

#[derive(Debug)]
struct PodSlot {
    pod: Pod,
    netns: Netns,
    chain: CniChain,
    invocation: Invocation,
}

/// A cluster of namespaces. All names start with [`Cluster::prefix`].
#[derive(Debug)]
pub struct Cluster {
    prefix: ClusterPrefix,
    /// Per-node CNI state (host-local's `dataDir`), like each node's `/var/lib/cni`.
    state_dir: Option<TempDir>,
    chained: Vec<CniPlugin>,
    wire: Option<Wire>,
    nodes: Vec<NodeSlot>,
    pods: Vec<PodSlot>,
    torn_down: bool,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            nodes: 1,
            chained: Vec::new(),
        }
    }

    /// `ambit-e2e-<pid>-<n>`: every namespace and temp dir of this cluster starts
    /// with it followed by `-`.
    pub fn prefix(&self) -> &ClusterPrefix {
        &self.prefix
    }

    /// The cluster's temp dir (per-node CNI state lives under `node-<n>/`).
    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_ref().map(TempDir::path)
    }

    pub fn node(&self, index: u8) -> Option<&Node> {
        self.nodes
            .iter()
            .map(|s| &s.node)
            .find(|n| n.index == index)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().map(|s| &s.node)
    }

    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().map(|s| &s.pod).find(|p| p.name == name)
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter().map(|s| &s.pod)
    }

    /// The namespace the wire bridge lives in.
    pub fn wire_netns_name(&self) -> Option<&str> {
        self.wire.as_ref().map(|w| w.netns().name())
    }

    fn add_node(&mut self, index: u8) -> Result<(), ClusterError> {
        let netns = Netns::create(&self.prefix.name(&format!("node-{index}")))?;
        let node = Node {
            index,
            netns: netns.name().to_owned(),
        };
        // Push first so the node is torn down even if a step below fails.
        self.nodes.push(NodeSlot { node, netns });
        let netns = &self.nodes[self.nodes.len() - 1].netns;
        netns.sysctl("net.ipv4.ip_forward", "1")?;
        if let Some(wire) = &self.wire {
            wire.attach(netns, index)?;
        }
        Ok(())
    }

    /// The chain a pod on `node` goes through: `bridge` then the chained plugins.
    fn chain_for(&self, node: u8) -> Result<CniChain, ClusterError> {
        let state = self
            .state_dir()
            .ok_or_else(|| ClusterError::Invalid("cluster already torn down".into()))?
            .join(format!("node-{node}"));
        let chain = CniChain::new(NETWORK_NAME).with(bridge_plugin(node, &state));
        Ok(self
            .chained
            .iter()
            .map(|p| p.for_node(node))
            .fold(chain, CniChain::with))
    }

    /// Creates the pod's namespace and runs CNI ADD for it, as kubelet and the
    /// container runtime do for a pod sandbox.
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<Pod, ClusterError> {
        spec.validate()?;
        let node = self.node(spec.node).cloned().ok_or_else(|| {
            ClusterError::Invalid(format!(
                "pod {}: node {} does not exist (cluster has {})",
                spec.name,
                spec.node,
                self.nodes.len()
            ))
        })?;
        if self.pod(&spec.name).is_some() {
            return Err(ClusterError::Invalid(format!(
                "pod {} already exists",
                spec.name
            )));
        }
        let chain = self.chain_for(node.index)?;
        let netns = Netns::create(&self.prefix.name(&format!("pod-{}", spec.name)))?;
        let container_id = self.prefix.name(&spec.name);
        let invocation = Invocation {
            runner_netns: node.netns.clone(),
            container_id: container_id.clone(),
            netns_path: netns.path(),
            ifname: POD_IFNAME.to_owned(),
            args: spec.cni_args.iter().fold(
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
                    spec.namespace, spec.name, container_id
                ),
                |args, (k, v)| format!("{args};{k}={v}"),
            ),
        };
        let loopback = loopback_invocation(&invocation);
        CniChain::loopback().add(&loopback)?;
        // On an error below, `netns` drops and takes the pod's interfaces with it.
        let result = match chain.add(&invocation) {
            Ok(result) => result,
            Err(e) => {
                let _undone = CniChain::loopback().del(&loopback, None);
                return Err(e.into());
            }
        };
        let Some(ip) = result.ipv4() else {
            let _undone = chain.del(&invocation, Some(result.raw()));
            return Err(ClusterError::NoPodIp {
                pod: spec.name,
                result: result.raw().to_string(),
            });
        };
        let pod = Pod {
            name: spec.name,
            namespace: spec.namespace,
            node: node.index,
            netns: netns.name().to_owned(),
            container_id,
            ip,
            cni_result: result,
            cni_args: spec.cni_args,
            labels: spec.labels,
        };
        self.pods.push(PodSlot {
            pod: pod.clone(),
            netns,
            chain,
            invocation,
        });
        Ok(pod)
    }

    /// Stops the pod's processes, runs CNI DEL (chain in reverse) and removes its
    /// namespace.
    pub fn delete_pod(&mut self, name: &str) -> Result<(), ClusterError> {
        let at = self
            .pods
            .iter()
            .position(|s| s.pod.name == name)
            .ok_or_else(|| ClusterError::Invalid(format!("no pod named {name}")))?;
        let problems = remove_pod(self.pods.remove(at));
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ClusterError::Teardown(problems))
        }
    }

    /// Tears the cluster down now and reports every problem (dropping it does the
    /// same but can only print them).
    pub fn shutdown(mut self) -> Result<(), ClusterError> {
        let problems = self.teardown();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ClusterError::Teardown(problems))
        }
    }

    /// Kill every process, DEL every pod (newest first), delete pod, node and wire
    /// namespaces, remove the temp dir, then sweep anything left under the prefix.
    fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut problems = Vec::new();
        // Processes first: nothing may keep a pod's namespace alive after deletion.
        let names = self
            .pods
            .iter()
            .map(|s| s.netns.name())
            .chain(self.nodes.iter().map(|s| s.netns.name()))
            .chain(self.wire.iter().map(|w| w.netns().name()));
        for name in names {
            if let Err(e) = kill_netns_processes(name) {
                problems.push(e.to_string());
            }
        }
        while let Some(slot) = self.pods.pop() {
            problems.extend(remove_pod(slot));
        }
        while let Some(mut slot) = self.nodes.pop() {
            if let Err(e) = slot.netns.delete() {
                problems.push(e.to_string());
            }
        }
        if let Some(mut wire) = self.wire.take()
            && let Err(e) = wire.netns_mut().delete()
        {
            problems.push(e.to_string());
        }
        if let Some(dir) = self.state_dir.take()
            && let Err(e) = dir.close()
        {
            problems.push(format!("removing the cluster's temp dir: {e}"));
        }
        let leftovers = sweep_prefix(&self.prefix);
        if !leftovers.is_empty() {
            problems.push(format!("swept leftover namespaces: {leftovers:?}"));
        }
        problems
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for problem in self.teardown() {
            eprintln!("ambit-e2e teardown of {}: {problem}", self.prefix);
        }
    }
}

/// DEL through the pod's chain and loopback, then delete its namespace.
fn remove_pod(mut slot: PodSlot) -> Vec<String> {
    let mut problems = Vec::new();
    let name = slot.netns.name().to_owned();
    if let Err(e) = kill_netns_processes(&name) {
        problems.push(e.to_string());
    }
    let cached = slot.pod.cni_result.raw();
    if let Err(e) = slot.chain.del(&slot.invocation, Some(cached)) {
        problems.push(format!("pod {}: {e}", slot.pod.name));
    }
    let loopback = loopback_invocation(&slot.invocation);
    if let Err(e) = CniChain::loopback().del(&loopback, None) {
        problems.push(format!("pod {}: {e}", slot.pod.name));
    }
    if let Err(e) = slot.netns.delete() {
        problems.push(e.to_string());
    }
    problems
}

/// The same sandbox, on `lo`.
fn loopback_invocation(pod: &Invocation) -> Invocation {
    Invocation {
        ifname: "lo".to_owned(),
        ..pod.clone()
    }
}

/// The standard `bridge` plugin for node `node`: a per-node bridge that is the pods'
/// gateway, no masquerade (so pods see each other's real addresses), `host-local`
/// IPAM on the node's subnet with its state under `state`.
fn bridge_plugin(node: u8, state: &Path) -> CniPlugin {
    CniPlugin::standard(
        "bridge",
        json!({
            "type": "bridge",
            "bridge": pod_bridge_name(node),
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "subnet": pod_subnet_cidr(node),
                // Without routes host-local gives only the connected /24: pods could
                // not reach other nodes. The node has no way out of the cluster.
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": state.join("ipam"),
            },
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_config_is_per_node_and_never_masquerades() {
        let plugin = bridge_plugin(2, Path::new("/tmp/s/node-2"));
        let conf = plugin.config();
        assert_eq!(conf["bridge"], "ambit-br2");
        assert_eq!(conf["ipMasq"], false);
        assert_eq!(conf["isGateway"], true);
        assert_eq!(conf["ipam"]["subnet"], "198.18.2.0/24");
        assert_eq!(conf["ipam"]["dataDir"], "/tmp/s/node-2/ipam");
    }
}
