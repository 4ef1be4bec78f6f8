//! The control plane of a meshed test cluster: istiod-lite as a real process in
//! node 1's namespace, listening on node 1's underlay address, serving two watched
//! directories: `config/`, what a test writes (as `kubectl apply` would), and
//! `pods/`, what a kubelet would report (each pod with its node, service account,
//! labels and address, plus the namespaces the harness manages).
//!
//! Every node proxy authenticates with its own node token. A test may stop the
//! process and start it again in place ([`ControlPlane::stop`],
//! [`ControlPlane::restart`]): same directories, CA, tokens and port.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::cluster::Cluster;
use crate::mesh::{MESH_WAIT, MeshError, workspace_bin};
use crate::pod::Pod;
use crate::process::NsProcess;
use crate::underlay::node_underlay_ip;

/// istiod-lite's gRPC port (xDS and CA), as Istio's.
pub const GRPC_PORT: u16 = 15012;
/// istiod-lite's debug endpoint, on node 1's loopback.
pub const DEBUG_ADDR: &str = "127.0.0.1:8080";
/// The node whose namespace runs istiod-lite.
pub const CONTROL_NODE: u8 = 1;

/// istiod-lite's metrics endpoint, on node 1's loopback.
pub const METRICS_ADDR: &str = "127.0.0.1:15014";
/// How long a stopped istiod-lite gets to exit (its drain deadline is 2 s).
const STOP_WAIT: Duration = Duration::from_secs(15);

/// A running istiod-lite and its directories.
#[derive(Debug)]
pub struct ControlPlane {
    pub process: NsProcess,
    root: PathBuf,
    config: PathBuf,
    /// Flags added after the harness's own (`--cert-ttl 30s`, ...), kept for restarts.
    extra_args: Vec<OsString>,
    /// Whether [`ControlPlane::stop`] ended the process.
    stopped: bool,
}

fn setup(what: &str, e: impl std::fmt::Display) -> MeshError {
    MeshError::Setup(format!("{what}: {e}"))
}

fn write_private(path: &Path, text: &str) -> Result<(), MeshError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).map_err(|e| setup(&path.display().to_string(), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| setup(&path.display().to_string(), e))
}

fn random_token() -> Result<String, MeshError> {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| setup("/dev/urandom", e))?;
    Ok(bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

impl ControlPlane {
    /// Creates the directories and node tokens under `root`, starts istiod-lite
    /// and waits until it serves. `config` replaces `root/config` as the
    /// directory of user YAML (the demo serves `examples/` this way).
    pub async fn start(
        cluster: &Cluster,
        root: &Path,
        nodes: u8,
        config: Option<PathBuf>,
    ) -> Result<Self, MeshError> {
        Self::start_with_args(cluster, root, nodes, config, Vec::new()).await
    }

    /// As [`ControlPlane::start`], with `extra_args` appended to istiod-lite's
    /// command line (they are kept for [`ControlPlane::restart`]).
    pub async fn start_with_args(
        cluster: &Cluster,
        root: &Path,
        nodes: u8,
        config: Option<PathBuf>,
        extra_args: Vec<OsString>,
    ) -> Result<Self, MeshError> {
        for d in ["config", "pods", "ca"] {
            std::fs::create_dir_all(root.join(d)).map_err(|e| setup(d, e))?;
        }
        let config = config.unwrap_or_else(|| root.join("config"));
        let mut tokens = String::from("# node token, one per line\n");
        for n in 1..=nodes {
            let token = random_token()?;
            writeln!(tokens, "node-{n} {token}").map_err(|e| setup("tokens", e))?;
            write_private(&root.join(format!("token-{n}")), &token)?;
        }
        write_private(&root.join("node-tokens"), &tokens)?;
        let process = spawn(cluster, root, &config, &extra_args).await?;
        Ok(Self {
            process,
            root: root.to_path_buf(),
            config,
            extra_args,
            stopped: false,
        })
    }

    /// Stops istiod-lite as an orchestrator would (SIGTERM) and waits until it
    /// exited. The directories stay for [`ControlPlane::restart`].
    pub async fn stop(&mut self) -> Result<(), MeshError> {
        if self.stopped {
            return Ok(());
        }
        self.process.terminate(STOP_WAIT).await?;
        self.stopped = true;
        Ok(())
    }

    /// Starts istiod-lite again in place (after [`ControlPlane::stop`]; stops it
    /// first otherwise): same directories, CA, node tokens, port and flags.
    pub async fn restart(&mut self, cluster: &Cluster) -> Result<(), MeshError> {
        self.stop().await?;
        self.process = spawn(cluster, &self.root, &self.config, &self.extra_args).await?;
        self.stopped = false;
        Ok(())
    }

    /// As [`ControlPlane::restart`], with these flags instead of the ones given at
    /// start (kept for later restarts).
    pub async fn restart_with_args(
        &mut self,
        cluster: &Cluster,
        extra_args: Vec<OsString>,
    ) -> Result<(), MeshError> {
        self.stop().await?;
        self.extra_args = extra_args;
        self.restart(cluster).await
    }

    /// Whether the process was stopped and not restarted.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// The flags that point node `n`'s ztunnel at this control plane.
    pub fn ztunnel_args(&self, n: u8) -> Vec<std::ffi::OsString> {
        let addr = format!("{}:{GRPC_PORT}", node_underlay_ip(CONTROL_NODE));
        vec![
            "--xds-address".into(),
            addr.clone().into(),
            "--ca-address".into(),
            addr.into(),
            "--root-cert".into(),
            self.root.join("ca").join("root-cert.pem").into(),
            "--token-file".into(),
            self.root.join(format!("token-{n}")).into(),
        ]
    }

    /// Where a test's YAML goes.
    pub fn config_dir(&self) -> PathBuf {
        self.config.clone()
    }

    fn pod_file(&self, namespace: &str, name: &str) -> PathBuf {
        self.root
            .join("pods")
            .join(format!("pod.{namespace}.{name}.yaml"))
    }

    /// Reports `pod` as a kubelet would: node, service account, labels
    /// (`app=<name>` plus the spec's), address, Ready. A pod that opted out of
    /// the mesh in its CNI args carries `istio.io/dataplane-mode=none`.
    pub fn write_pod(&self, pod: &Pod, enrolled: bool) -> Result<(), MeshError> {
        let mut labels = serde_json::Map::new();
        labels.insert("app".into(), pod.name().into());
        for (k, v) in pod.labels() {
            labels.insert(k.clone(), v.clone().into());
        }
        if !enrolled {
            labels.insert("istio.io/dataplane-mode".into(), "none".into());
        }
        let sa = pod.cni_arg("K8S_POD_SERVICE_ACCOUNT").unwrap_or("default");
        let doc = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.name(),
                "namespace": pod.namespace(),
                // The node agent names the pod by this uid too (the container id).
                "uid": pod.container_id(),
                "labels": labels,
            },
            "spec": {
                "nodeName": format!("node-{}", pod.node()),
                "serviceAccountName": sa,
                "containers": [{"name": "app", "image": "e2e-tool"}],
            },
            "status": {
                "phase": "Running",
                "podIP": pod.ip().to_string(),
                "podIPs": [{"ip": pod.ip().to_string()}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        });
        self.write_file(
            &self.pod_file(pod.namespace(), pod.name()),
            &doc.to_string(),
        )
    }

    pub fn remove_pod(&self, namespace: &str, name: &str) -> Result<(), MeshError> {
        let path = self.pod_file(namespace, name);
        std::fs::remove_file(&path).map_err(|e| setup(&path.display().to_string(), e))
    }

    /// Declares namespace `ns` in the mesh (`istio.io/dataplane-mode=ambient`),
    /// unless the test declares it itself in `config/`.
    pub fn write_ambient_namespace(&self, ns: &str) -> Result<(), MeshError> {
        let doc = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"istio.io/dataplane-mode": "ambient"}},
        });
        let path = self.root.join("pods").join(format!("namespace.{ns}.yaml"));
        self.write_file(&path, &doc.to_string())
    }

    /// Writes `config/<name>`, atomically (the source never sees half a file).
    pub fn write_config(&self, name: &str, yaml: &str) -> Result<(), MeshError> {
        self.write_file(&self.config_dir().join(name), yaml)
    }

    pub fn remove_config(&self, name: &str) -> Result<(), MeshError> {
        let path = self.config_dir().join(name);
        std::fs::remove_file(&path).map_err(|e| setup(&path.display().to_string(), e))
    }

    fn write_file(&self, path: &Path, text: &str) -> Result<(), MeshError> {
        let tmp = path.with_extension("tmp~");
        std::fs::write(&tmp, text).map_err(|e| setup(&tmp.display().to_string(), e))?;
        std::fs::rename(&tmp, path).map_err(|e| setup(&path.display().to_string(), e))
    }
}

/// Starts istiod-lite in node 1's namespace on `root`'s files and waits until it
/// serves.
async fn spawn(
    cluster: &Cluster,
    root: &Path,
    config: &Path,
    extra_args: &[OsString],
) -> Result<NsProcess, MeshError> {
    let node = cluster
        .node(CONTROL_NODE)
        .ok_or_else(|| MeshError::Setup("no node 1 for the control plane".into()))?;
    let mut cmd = node.command(workspace_bin("istiod-lite"));
    cmd.arg("--config-dir")
        .arg(config)
        .arg("--config-dir")
        .arg(root.join("pods"))
        .arg("--config-poll")
        .arg("100ms")
        .arg("--ca-dir")
        .arg(root.join("ca"))
        .arg("--node-tokens")
        .arg(root.join("node-tokens"))
        .arg("--grpc-addr")
        .arg(format!("{}:{GRPC_PORT}", node_underlay_ip(CONTROL_NODE)))
        .arg("--admin-addr")
        .arg(DEBUG_ADDR)
        .arg("--metrics-addr")
        .arg(METRICS_ADDR)
        .arg("--drain-deadline")
        .arg("2s")
        .args(extra_args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info");
    let mut process = NsProcess::spawn("istiod-lite", cmd)?;
    process
        .wait_for_line("istiod-lite serving", MESH_WAIT, |l| {
            l.contains("istiod-lite serving")
        })
        .await?;
    Ok(process)
}

impl ControlPlane {
    /// Reports `pod`'s `Ready` condition as a kubelet would when a readiness probe
    /// changes: the Pod written by [`ControlPlane::write_pod`], with only its
    /// conditions replaced. A pod that is not ready is an unhealthy endpoint.
    pub fn set_pod_ready(&self, pod: &Pod, ready: bool) -> Result<(), MeshError> {
        let path = self.pod_file(pod.namespace(), pod.name());
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| setup(&shown, e))?;
        let mut doc: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| setup(&shown, e))?;
        let status = if ready { "True" } else { "False" };
        doc["status"]["conditions"] = json!([{"type": "Ready", "status": status}]);
        self.write_file(&path, &doc.to_string())
    }
}
