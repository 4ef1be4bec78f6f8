//! What the cni integration tests share: the root gate, network namespaces that
//! clean up after themselves, an in-process node agent, a test-side ztunnel on the
//! zds socket, and running the plugin binary as a runtime would.
#![allow(dead_code, clippy::unwrap_used)]

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use ambit_cni::agent::{Agent, AgentConfig};
use ambit_cni::zds;
use ambit_proto::zds::node_agent_message::Payload;
use mesh_core::drain::DrainTrigger;
use mesh_core::os::SeqPacket;

/// Upper bound on any wait for an event; reaching it fails the test.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// True when running as root, with the tools the tests run inside their namespaces
/// (`ip`, `sysctl`, `iptables`: installed by the e2e harness's check, once per
/// process). Without root: a panic under CI=true, else a loud skip.
pub fn have_root(test: &str) -> bool {
    if !mesh_core::testing::require_root(test) {
        return false;
    }
    if let Err(e) = ambit_e2e::packages::ensure_for(ambit_e2e::packages::Needs::Redirection) {
        panic!("{test}: {e}");
    }
    true
}

/// Waits until `done` holds, checking every 10 ms; fails after [`EVENT_TIMEOUT`].
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {EVENT_TIMEOUT:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A network namespace of the test's own; dropping it (even on panic) kills what
/// runs inside and deletes it.
pub struct TestNetns {
    pub name: String,
    _guard: mesh_core::testing::netns::TestNetns,
}

impl TestNetns {
    pub fn new() -> Self {
        let guard = mesh_core::testing::netns::TestNetns::create("cnit");
        Self {
            name: guard.name().to_owned(),
            _guard: guard,
        }
    }

    pub fn path(&self) -> PathBuf {
        self._guard.path()
    }

    /// Runs a command inside the namespace; its stdout, which must succeed.
    pub fn exec(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?} in {}: {out:?}", self.name);
        String::from_utf8(out.stdout).unwrap()
    }

    /// Gives the namespace an interface, as a pod has: a veth pair with both
    /// ends inside it, up (so the kernel gives each an fe80:: address), and lo
    /// up. Duplicate address detection and router solicitations are off first,
    /// so nothing is sent for the addresses. Goes with the namespace.
    pub fn add_veth_pair(&self, name: &str, peer: &str) {
        for setting in ["dad_transmits", "router_solicitations"] {
            self.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.default.{setting}=0"),
            ]);
        }
        self.exec(&[
            "ip", "link", "add", name, "type", "veth", "peer", "name", peer,
        ]);
        for dev in [name, peer, "lo"] {
            self.exec(&["ip", "link", "set", dev, "up"]);
        }
    }

    /// `net.ipv6.conf.<iface>.disable_ipv6` inside the namespace.
    pub fn ipv6_disabled(&self, iface: &str) -> String {
        let path = format!("/proc/sys/net/ipv6/conf/{iface}/disable_ipv6");
        self.exec(&["cat", &path]).trim().to_owned()
    }

    pub fn inode(&self) -> u64 {
        mesh_core::os::NetNs::open(self.path())
            .unwrap()
            .inode()
            .unwrap()
    }
}

/// The node agent, in-process, on sockets in a temp dir.
pub struct TestAgent {
    pub plugin_socket: PathBuf,
    pub zds_socket: PathBuf,
    trigger: DrainTrigger,
    task: tokio::task::JoinHandle<()>,
    _dir: Option<tempfile::TempDir>,
}

impl TestAgent {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut agent = Self::start_in(dir.path());
        agent._dir = Some(dir);
        agent
    }

    /// An agent with its sockets and its pod state file in `dir`, which the caller
    /// keeps (so a second agent started in it is a restart).
    pub fn start_in(dir: &Path) -> Self {
        Self::start_with(Self::config_in(dir))
    }

    /// The test agents' config: everything in `dir`, otherwise the defaults.
    pub fn config_in(dir: &Path) -> AgentConfig {
        let mut config = AgentConfig::new(
            dir.join("cni-agent.sock"),
            dir.join("ztunnel.sock"),
            dir.join("state/pods.json"),
        );
        config.ack_timeout_ms = 10_000;
        config
    }

    /// An agent with `config`, whose files the caller keeps.
    pub fn start_with(config: AgentConfig) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("ambit_cni=debug")
            .with_test_writer()
            .try_init();
        let plugin_socket = config.plugin_socket.clone();
        let zds_socket = config.zds_socket.clone();
        let agent = Agent::bind(config).unwrap();
        let (trigger, watcher) = mesh_core::drain::channel();
        let task = tokio::spawn(agent.run(watcher));
        Self {
            plugin_socket,
            zds_socket,
            trigger,
            task,
            _dir: None,
        }
    }

    /// Shuts the agent down gracefully and waits until it has stopped.
    pub async fn stop(self) {
        self.trigger.drain(EVENT_TIMEOUT).await;
        self.task.await.unwrap();
    }
}

/// The test playing ztunnel on the zds socket.
pub struct FakeZtunnel {
    sock: SeqPacket,
}

impl FakeZtunnel {
    pub async fn connect(path: &Path) -> Self {
        Self {
            sock: SeqPacket::connect(path).await.unwrap(),
        }
    }

    /// Connects, says hello and acks the snapshot; returns the pods it held.
    pub async fn attach(path: &Path) -> (Self, Vec<(String, OwnedFd)>) {
        let zt = Self::connect(path).await;
        zt.send_raw(&zds::encode_hello(1)).await;
        let mut pods = Vec::new();
        loop {
            match zt.recv().await {
                (Payload::Add(add), Some(fd)) => pods.push((add.uid, fd)),
                (Payload::SnapshotSent(_), None) => break,
                other => panic!("unexpected in the snapshot: {other:?}"),
            }
            zt.ack("").await;
        }
        zt.ack("").await;
        (zt, pods)
    }

    pub async fn send_raw(&self, bytes: &[u8]) {
        self.sock.send(bytes, None).await.unwrap();
    }

    pub async fn ack(&self, error: &str) {
        self.send_raw(&zds::encode_ack(error)).await;
    }

    /// The next message from the agent, waiting at most [`EVENT_TIMEOUT`].
    pub async fn recv(&self) -> (Payload, Option<OwnedFd>) {
        let (bytes, fd) = tokio::time::timeout(EVENT_TIMEOUT, self.sock.recv())
            .await
            .expect("no message from the agent")
            .unwrap();
        assert!(
            !bytes.is_empty() || fd.is_some(),
            "the agent closed the connection"
        );
        (zds::decode_node_agent(&bytes).unwrap(), fd)
    }

    /// Waits until the agent closes this connection.
    pub async fn expect_closed(&self) {
        loop {
            let got = tokio::time::timeout(EVENT_TIMEOUT, self.sock.recv())
                .await
                .expect("the agent kept the connection open");
            match got {
                Ok((bytes, None)) if bytes.is_empty() => return,
                Ok(_) => continue,
                Err(_) => return,
            }
        }
    }
}

/// The CNI config a runtime would pass to our plugin, chained after `bridge`.
pub fn net_conf(agent_socket: &Path, ip: &str) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "ambit-test",
        "type": "ambit-cni",
        "nodeAgentSocket": agent_socket,
        "timeoutSeconds": 30,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/x"}],
            "ips": [{"address": format!("{ip}/24"), "gateway": "198.18.0.1", "interface": 0}],
            "dns": {}
        }
    })
    .to_string()
}

/// Runs the plugin binary with the runtime's environment and `stdin`.
pub fn run_plugin(command: &str, netns: &Path, cni_args: &str, stdin: &str) -> Output {
    run_plugin_for("c0ffee", command, netns, cni_args, stdin)
}

/// [`run_plugin`] for the sandbox (`CNI_CONTAINERID`) `sandbox`.
pub fn run_plugin_for(
    sandbox: &str,
    command: &str,
    netns: &Path,
    cni_args: &str,
    stdin: &str,
) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ambit-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", sandbox)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", cni_args)
        .env("CNI_PATH", "/opt/cni/bin")
        .env("AMBIT_CNI_LOG", "debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// [`run_plugin`] on a blocking thread, so the test can play ztunnel meanwhile.
pub fn spawn_plugin(
    command: &str,
    netns: &Path,
    cni_args: &str,
    stdin: &str,
) -> tokio::task::JoinHandle<Output> {
    spawn_plugin_for("c0ffee", command, netns, cni_args, stdin)
}

/// [`run_plugin_for`] on a blocking thread.
pub fn spawn_plugin_for(
    sandbox: &str,
    command: &str,
    netns: &Path,
    cni_args: &str,
    stdin: &str,
) -> tokio::task::JoinHandle<Output> {
    let (sandbox, command, netns, cni_args, stdin) = (
        sandbox.to_owned(),
        command.to_owned(),
        netns.to_owned(),
        cni_args.to_owned(),
        stdin.to_owned(),
    );
    tokio::task::spawn_blocking(move || {
        run_plugin_for(&sandbox, &command, &netns, &cni_args, &stdin)
    })
}

pub fn pod_args(name: &str, uid: &str) -> String {
    format!(
        "K8S_POD_NAME={name};K8S_POD_NAMESPACE=shop;K8S_POD_UID={uid};K8S_POD_SERVICE_ACCOUNT=web"
    )
}

/// Asserts the plugin succeeded; its stdout.
pub fn success(out: &Output) -> String {
    assert!(
        out.status.success(),
        "plugin failed: stdout {} stderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}
