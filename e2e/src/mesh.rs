//! A meshed cluster: the namespace cluster with Ambit's CNI plugin chained after
//! `bridge`, and on every node a node agent and a ztunnel, all real processes in the
//! node's namespace. State and certificates come from istiod-lite
//! ([`MeshCluster::start`], see [`crate::control_plane`]) or, in the local mode of
//! the ztunnel issue, from a state file and a CA root on disk
//! ([`MeshCluster::start_local`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use mesh_core::ca::LocalCa;
use serde_json::json;

pub use crate::build::{cancel_build, workspace_bin};
use crate::cluster::{Cluster, ClusterError};
use crate::cni::CniPlugin;
use crate::control_plane::ControlPlane;
use crate::pod::{Pod, PodSpec};
use crate::process::{NsProcess, ProcessError};

/// How long a mesh process gets to come up.
pub const MESH_WAIT: Duration = Duration::from_secs(30);

/// Names a program (with its arguments, split at whitespace) that every ztunnel
/// runs under, such as a profiler: `benches/code-order.sh` runs ztunnel under
/// callgrind this way to learn which functions start-up and the data path run.
pub const ZTUNNEL_WRAPPER_ENV: &str = "AMBIT_E2E_ZTUNNEL_WRAPPER";

/// The command line of [`ZTUNNEL_WRAPPER_ENV`], when set and not empty.
pub fn ztunnel_wrapper() -> Option<Vec<String>> {
    let wrapper = std::env::var(ZTUNNEL_WRAPPER_ENV).ok()?;
    let words: Vec<String> = wrapper.split_whitespace().map(str::to_owned).collect();
    (!words.is_empty()).then_some(words)
}

/// Why the mesh did not come up.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("{0}")]
    Setup(String),
    #[error("teardown left problems: {}", .0.join("; "))]
    Teardown(Vec<String>),
}

/// One node's mesh processes.
#[derive(Debug)]
pub struct NodeMesh {
    pub agent: NsProcess,
    pub ztunnel: NsProcess,
}

/// The cluster, its mesh processes and the files they share.
#[derive(Debug)]
pub struct MeshCluster {
    // Processes go before the cluster so they die before their namespaces do.
    pub nodes: Vec<NodeMesh>,
    /// istiod-lite, unless the cluster runs in the local mode.
    pub control: Option<ControlPlane>,
    pub cluster: Cluster,
    /// Namespaces a test declares itself in `config/` (the harness leaves them be).
    own_namespaces: BTreeSet<String>,
    declared_namespaces: BTreeSet<String>,
    dir: tempfile::TempDir,
}

impl MeshCluster {
    /// `nodes` nodes, each with a node agent and a ztunnel, and istiod-lite (in
    /// node 1's namespace) as the only source of state and certificates.
    pub async fn start(nodes: u8) -> Result<Self, MeshError> {
        Self::start_mode(nodes, Some((None, Vec::new()))).await
    }

    /// As [`MeshCluster::start`], with istiod-lite serving the user YAML of
    /// `config` (watched: edits apply live).
    pub async fn start_with_config(nodes: u8, config: PathBuf) -> Result<Self, MeshError> {
        Self::start_mode(nodes, Some((Some(config), Vec::new()))).await
    }

    /// The local mode: every ztunnel reads one state file and signs with a CA
    /// root on disk; no control plane.
    pub async fn start_local(nodes: u8) -> Result<Self, MeshError> {
        Self::start_mode(nodes, None).await
    }

    /// `control`: `None` for the local mode, else the user YAML directory (a
    /// fresh one when `None`) and extra istiod-lite flags.
    pub(crate) async fn start_mode(
        nodes: u8,
        control: Option<(Option<PathBuf>, Vec<std::ffi::OsString>)>,
    ) -> Result<Self, MeshError> {
        // Named so that a later run sweeps it if this one is killed.
        let dir = crate::naming::temp_dir("mesh")
            .map_err(|e| MeshError::Setup(format!("temp dir: {e}")))?;
        let ca = LocalCa::generate("ambit-e2e-root", Duration::from_secs(24 * 3600))
            .map_err(|e| MeshError::Setup(e.to_string()))?;
        let write = |name: &str, text: &str, mode: u32| -> Result<(), MeshError> {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.path().join(name);
            std::fs::write(&path, text).map_err(|e| MeshError::Setup(format!("{name}: {e}")))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| MeshError::Setup(format!("{name}: {e}")))
        };
        write("root-cert.pem", ca.root_pem(), 0o644)?;
        write("root-key.pem", &ca.root_key_pem(), 0o600)?;
        write("state.yaml", "", 0o644)?;
        let plugin = CniPlugin::new(
            workspace_bin("ambit-cni"),
            json!({ "nodeAgentSocket": dir.path().join("agent-{node}.sock") }),
        );
        let cluster = Cluster::builder()
            .nodes(nodes)
            .chain_plugin(plugin)
            .build()?;
        let control = match control {
            Some((config, args)) => {
                let root = dir.path().join("control");
                Some(ControlPlane::start_with_args(&cluster, &root, nodes, config, args).await?)
            }
            None => None,
        };
        let mut mesh = Self {
            nodes: Vec::new(),
            control,
            cluster,
            own_namespaces: BTreeSet::new(),
            declared_namespaces: BTreeSet::new(),
            dir,
        };
        for n in 1..=nodes {
            let node = mesh.start_node(n).await?;
            mesh.nodes.push(node);
        }
        Ok(mesh)
    }

    /// Tears the mesh down now and reports every problem (dropping it does the same
    /// but can only print them): the node agents, ztunnels and istiod-lite first,
    /// then the cluster's pods and namespaces, then the shared files (CA key, node
    /// tokens, sockets).
    pub async fn shutdown(self) -> Result<(), MeshError> {
        let Self {
            nodes,
            control,
            cluster,
            dir,
            ..
        } = self;
        let mut problems = Vec::new();
        for mut node in nodes {
            for process in [&mut node.ztunnel, &mut node.agent] {
                if let Err(e) = process.stop().await {
                    problems.push(e.to_string());
                }
            }
        }
        if let Some(mut control) = control
            && let Err(e) = control.process.stop().await
        {
            problems.push(e.to_string());
        }
        match cluster.shutdown() {
            Ok(()) => {}
            Err(ClusterError::Teardown(found)) => problems.extend(found),
            Err(e) => problems.push(e.to_string()),
        }
        if let Err(e) = dir.close() {
            problems.push(format!("removing the mesh's temp dir: {e}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(MeshError::Teardown(problems))
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn start_node(&self, n: u8) -> Result<NodeMesh, MeshError> {
        let node = self
            .cluster
            .node(n)
            .ok_or_else(|| MeshError::Setup(format!("no node {n}")))?;
        let mut agent_cmd = node.command(workspace_bin("ambit-cni"));
        agent_cmd
            .arg("agent")
            .arg("--plugin-socket")
            .arg(self.path(&format!("agent-{n}.sock")))
            .arg("--zds-socket")
            .arg(self.path(&format!("zds-{n}.sock")))
            // Each node's agent has its own state (the default path is the host's).
            .arg("--state-file")
            .arg(self.path(&format!("agent-{n}-pods.json")))
            .env("NO_COLOR", "1");
        let agent = NsProcess::spawn(format!("node agent {n}"), agent_cmd)?;
        let mut zt_cmd = match ztunnel_wrapper() {
            Some(wrapper) => {
                let mut cmd = node.command(&wrapper[0]);
                cmd.args(&wrapper[1..]).arg(workspace_bin("ztunnel"));
                cmd
            }
            None => node.command(workspace_bin("ztunnel")),
        };
        zt_cmd.arg("--node-name").arg(format!("node-{n}"));
        match &self.control {
            Some(control) => {
                zt_cmd.args(control.ztunnel_args(n));
            }
            None => {
                zt_cmd
                    .arg("--local-state")
                    .arg(self.path("state.yaml"))
                    .arg("--ca-cert")
                    .arg(self.path("root-cert.pem"))
                    .arg("--ca-key")
                    .arg(self.path("root-key.pem"));
            }
        }
        zt_cmd
            .arg("--node-agent-socket")
            .arg(self.path(&format!("zds-{n}.sock")))
            .arg("--drain-deadline")
            .arg("2s")
            .env("NO_COLOR", "1")
            // The debug line of each applied xDS update carries the time the new
            // state took effect: tests measure how fast config reaches ztunnel by
            // it, not by probes whose start-up time would count too.
            .env("RUST_LOG", "info,ztunnel::state::xds=debug");
        let mut ztunnel = NsProcess::spawn(format!("ztunnel {n}"), zt_cmd)?;
        ztunnel
            .wait_for_line("ztunnel serving", MESH_WAIT, |l| {
                l.contains("ztunnel serving")
            })
            .await?;
        ztunnel
            .wait_for_line("connected to the node agent", MESH_WAIT, |l| {
                l.contains("connected to the node agent")
            })
            .await?;
        Ok(NodeMesh { agent, ztunnel })
    }

    /// Adds a pod through the CNI chain and, unless it opted out of the mesh
    /// (`AMBIT_ENROLL=false`), waits until its node's ztunnel serves it. With the
    /// control plane, the pod is also reported to istiod-lite (its namespace
    /// declared in the mesh unless the test owns it) and every ztunnel has its
    /// workload before this returns.
    pub async fn add_pod(&mut self, spec: PodSpec) -> Result<Pod, MeshError> {
        let pod = self.cluster.add_pod(spec)?;
        let enrolled = enrolled(&pod);
        if let Some(control) = &self.control {
            let ns = pod.namespace().to_string();
            if !self.own_namespaces.contains(&ns) && self.declared_namespaces.insert(ns.clone()) {
                control.write_ambient_namespace(&ns)?;
            }
            control.write_pod(&pod, enrolled)?;
        }
        if enrolled {
            let want = format!("pod proxy started pod={}/{}", pod.namespace(), pod.name());
            let zt = &mut self.nodes[usize::from(pod.node()) - 1].ztunnel;
            zt.wait_for_line(&want, MESH_WAIT, |l| l.contains(&want))
                .await?;
        }
        if self.control.is_some() {
            let uid = pod.container_id().to_string();
            self.wait_for_dump(&format!("workload {uid}"), |dump| {
                dump["workloads"]
                    .as_array()
                    .is_some_and(|ws| ws.iter().any(|w| w["uid"] == uid.as_str()))
            })
            .await?;
        }
        Ok(pod)
    }

    /// Deletes a pod through the CNI chain and, with the control plane, from
    /// istiod-lite's view, waiting until no ztunnel has its workload.
    pub async fn delete_pod(&mut self, name: &str) -> Result<(), MeshError> {
        let pod = self
            .cluster
            .pod(name)
            .cloned()
            .ok_or_else(|| MeshError::Setup(format!("no pod {name}")))?;
        self.cluster.delete_pod(name)?;
        if let Some(control) = &self.control {
            control.remove_pod(pod.namespace(), pod.name())?;
            let uid = pod.container_id().to_string();
            self.wait_for_dump(&format!("workload {uid} removed"), |dump| {
                dump["workloads"]
                    .as_array()
                    .is_some_and(|ws| ws.iter().all(|w| w["uid"] != uid.as_str()))
            })
            .await?;
        }
        Ok(())
    }

    /// The test declares namespace `ns` itself (in `config/`): the harness will
    /// not declare it when a pod is added there.
    pub fn own_namespace(&mut self, ns: &str) {
        self.own_namespaces.insert(ns.to_string());
    }

    /// Reports pod `name` ready or not to istiod-lite (its `Ready` condition); a
    /// pod that is not ready is an unhealthy endpoint. Returns once written: wait
    /// for the effect with [`MeshCluster::wait_for_dump`].
    pub fn set_pod_ready(&self, name: &str, ready: bool) -> Result<(), MeshError> {
        let pod = self
            .cluster
            .pod(name)
            .ok_or_else(|| MeshError::Setup(format!("no pod {name}")))?;
        self.control()?.set_pod_ready(pod, ready)
    }

    /// The control plane; an error in the local mode.
    pub fn control(&self) -> Result<&ControlPlane, MeshError> {
        self.control
            .as_ref()
            .ok_or_else(|| MeshError::Setup("this cluster runs without a control plane".into()))
    }

    /// Writes `config/<name>` for istiod-lite (as `kubectl apply` would).
    pub fn write_config(&self, name: &str, yaml: &str) -> Result<(), MeshError> {
        self.control()?.write_config(name, yaml)
    }

    /// Writes the state file: one workload per pod (its uid is the container id,
    /// as the plugin reports it), plus `extra` YAML appended at the top level; then
    /// waits until every ztunnel applied it.
    pub async fn write_state(&mut self, services_and_policies: &str) -> Result<(), MeshError> {
        let mut out = String::from("workloads:\n");
        for pod in self.cluster.pods().filter(|p| enrolled(p)) {
            let labels: BTreeMap<&str, &str> = [("app", pod.name())].into();
            out.push_str(&format!(
                "  - {{uid: \"{uid}\", name: \"{name}\", namespace: \"{ns}\", serviceAccount: \"{sa}\", node: node-{node}, addresses: [\"{ip}\"], labels: {labels}}}\n",
                uid = pod.container_id(),
                sa = pod.cni_arg("K8S_POD_SERVICE_ACCOUNT").unwrap_or("default"),
                name = pod.name(),
                ns = pod.namespace(),
                node = pod.node(),
                ip = pod.ip(),
                labels = serde_json::to_string(&labels).unwrap_or_default(),
            ));
        }
        out.push_str(services_and_policies);
        let want = format!("digest={:016x}", ztunnel::state::digest(out.as_bytes()));
        self.write_raw_state(&out)?;
        for node in &mut self.nodes {
            node.ztunnel
                .wait_for_line("local state applied", MESH_WAIT, |l| {
                    l.contains("local state applied") && l.contains(&want)
                })
                .await?;
        }
        Ok(())
    }
}

/// Whether a pod is in the mesh (it did not opt out with `AMBIT_ENROLL=false`).
pub fn enrolled(pod: &Pod) -> bool {
    pod.cni_arg("AMBIT_ENROLL") != Some("false")
}

impl MeshCluster {
    /// Replaces the state file with `yaml` as given (bad input tests). Written
    /// beside it and renamed into place: ztunnel's poller never reads a truncated
    /// file, which would parse as a valid empty state.
    pub fn write_raw_state(&self, yaml: &str) -> Result<(), MeshError> {
        let tmp = self.path("state.yaml.tmp~");
        std::fs::write(&tmp, yaml)
            .and_then(|()| std::fs::rename(&tmp, self.path("state.yaml")))
            .map_err(|e| MeshError::Setup(format!("state.yaml: {e}")))
    }
}
