//! Runs CNI plugin chains exactly as a container runtime does (CNI spec 1.0.0): each
//! plugin is executed with `CNI_*` in its environment and its config on stdin, from
//! inside the node's namespace; ADD runs the chain in order passing `prevResult`
//! along, DEL runs it in reverse with the cached ADD result as `prevResult`.

use std::ffi::OsString;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::netns::{describe, netns_std_command};

/// The spec version this runner speaks; `containernetworking-plugins` 1.1.1 supports it.
pub const CNI_VERSION: &str = "1.0.0";
/// Where Debian's `containernetworking-plugins` installs the standard plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// A plugin that takes longer than this is killed and reported as hung.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A failed plugin invocation.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("CNI plugin {} not found (install the `containernetworking-plugins` package)", .0.display())]
    NotFound(PathBuf),
    #[error("CNI plugin config for {plugin} must be a JSON object")]
    ConfigNotObject { plugin: String },
    #[error("cannot run CNI plugin {plugin}: {source}")]
    Spawn {
        plugin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI {command} of {plugin} failed: code {code}: {msg} {details}")]
    Plugin {
        plugin: String,
        command: &'static str,
        code: u64,
        msg: String,
        details: String,
    },
    #[error("CNI {command} of {plugin} failed ({status}): {output}")]
    Failed {
        plugin: String,
        command: &'static str,
        status: String,
        output: String,
    },
    #[error("CNI {command} of {plugin} hung for {timeout:?} and was killed")]
    Hung {
        plugin: String,
        command: &'static str,
        timeout: Duration,
    },
    #[error("CNI {command} of {plugin} returned an unusable result: {reason}")]
    BadResult {
        plugin: String,
        command: &'static str,
        reason: String,
    },
}

/// One plugin of a chain: the executable and its config, without the `name`,
/// `cniVersion` and `prevResult` keys the runner adds (a `type` is added too when
/// missing, from the file name).
#[derive(Debug, Clone)]
pub struct CniPlugin {
    path: PathBuf,
    config: Value,
}

impl CniPlugin {
    pub fn new(path: impl Into<PathBuf>, config: Value) -> Self {
        Self {
            path: path.into(),
            config,
        }
    }

    /// A standard plugin from [`CNI_BIN_DIR`], e.g. `standard("bridge", json!({..}))`.
    pub fn standard(type_name: &str, config: Value) -> Self {
        Self::new(Path::new(CNI_BIN_DIR).join(type_name), config)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &Value {
        &self.config
    }

    /// This plugin as node `node` runs it: every `{node}` in the config's strings
    /// becomes the node's index (e.g. a per-node agent socket path).
    pub fn for_node(&self, node: u8) -> Self {
        fn fill(v: &Value, node: &str) -> Value {
            match v {
                Value::String(s) => Value::String(s.replace("{node}", node)),
                Value::Array(a) => Value::Array(a.iter().map(|x| fill(x, node)).collect()),
                Value::Object(o) => {
                    Value::Object(o.iter().map(|(k, x)| (k.clone(), fill(x, node))).collect())
                }
                other => other.clone(),
            }
        }
        Self {
            path: self.path.clone(),
            config: fill(&self.config, &node.to_string()),
        }
    }

    fn label(&self) -> String {
        self.path.display().to_string()
    }

    /// Fails early, with the package to install, when the executable is missing.
    pub fn check_installed(&self) -> Result<(), CniError> {
        if self.path.is_file() {
            Ok(())
        } else {
            Err(CniError::NotFound(self.path.clone()))
        }
    }

    /// The config the plugin sees on stdin.
    fn stdin_config(&self, network: &str, prev: Option<&Value>) -> Result<Value, CniError> {
        let mut conf: Map<String, Value> =
            self.config
                .as_object()
                .cloned()
                .ok_or_else(|| CniError::ConfigNotObject {
                    plugin: self.label(),
                })?;
        conf.insert("cniVersion".into(), json!(CNI_VERSION));
        conf.insert("name".into(), json!(network));
        if !conf.contains_key("type") {
            let file = self.path.file_name().map(|f| f.to_string_lossy());
            conf.insert("type".into(), json!(file.unwrap_or_default()));
        }
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        Ok(Value::Object(conf))
    }
}

/// Where and for whom a chain runs: the container-runtime side of a CNI call.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The namespace the plugins execute in: the node's, as a runtime runs on the node.
    pub runner_netns: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`: the pod's namespace path.
    pub netns_path: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS` (`K=V;K=V`), e.g. the pod's name and namespace as kubelet passes them.
    pub args: String,
}

/// A named network (`name` in the config) and its plugins, in ADD order.
#[derive(Debug, Clone)]
pub struct CniChain {
    network: String,
    plugins: Vec<CniPlugin>,
}

impl CniChain {
    pub fn new(network: impl Into<String>) -> Self {
        Self {
            network: network.into(),
            plugins: Vec::new(),
        }
    }

    /// The runtime's own loopback network (containerd calls it on `lo` before the pod
    /// network): the standard `loopback` plugin brings `lo` up in the pod.
    pub fn loopback() -> Self {
        Self::new("cni-loopback").with(CniPlugin::standard("loopback", json!({})))
    }

    /// Appends a plugin after the ones already there.
    pub fn with(mut self, plugin: CniPlugin) -> Self {
        self.plugins.push(plugin);
        self
    }

    pub fn network(&self) -> &str {
        &self.network
    }

    pub fn plugins(&self) -> &[CniPlugin] {
        &self.plugins
    }

    pub fn check_installed(&self) -> Result<(), CniError> {
        self.plugins.iter().try_for_each(CniPlugin::check_installed)
    }

    /// ADD through the chain; returns the last plugin's result. On a failure the
    /// plugins already run are undone with DEL, as the spec asks of a runtime.
    pub fn add(&self, inv: &Invocation) -> Result<CniResult, CniError> {
        let mut prev: Option<Value> = None;
        for plugin in &self.plugins {
            let conf = plugin.stdin_config(&self.network, prev.as_ref())?;
            match invoke(plugin, "ADD", inv, &conf) {
                Ok(result) => prev = Some(result),
                Err(e) => {
                    // Best effort: the ADD error is the one worth reporting.
                    let _undone = self.del(inv, prev.as_ref());
                    return Err(e);
                }
            }
        }
        let raw = prev.unwrap_or_else(|| json!({ "cniVersion": CNI_VERSION }));
        CniResult::parse(raw).map_err(|reason| CniError::BadResult {
            plugin: self.network.clone(),
            command: "ADD",
            reason,
        })
    }

    /// DEL through the chain in reverse; every plugin runs even if one fails, and the
    /// first error is returned.
    pub fn del(&self, inv: &Invocation, cached: Option<&Value>) -> Result<(), CniError> {
        let mut first_error = None;
        for plugin in self.plugins.iter().rev() {
            let outcome = plugin
                .stdin_config(&self.network, cached)
                .and_then(|conf| invoke(plugin, "DEL", inv, &conf));
            if let Err(e) = outcome {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Executes one plugin and returns what it printed (`{}` for a silent DEL).
fn invoke(
    plugin: &CniPlugin,
    command: &'static str,
    inv: &Invocation,
    conf: &Value,
) -> Result<Value, CniError> {
    invoke_within(plugin, command, inv, conf, PLUGIN_TIMEOUT)
}

/// [`invoke`], killing the plugin (and what it started) after `timeout`.
fn invoke_within(
    plugin: &CniPlugin,
    command: &'static str,
    inv: &Invocation,
    conf: &Value,
    timeout: Duration,
) -> Result<Value, CniError> {
    let label = plugin.label();
    let mut cni_path = OsString::from(CNI_BIN_DIR);
    if let Some(dir) = plugin
        .path
        .parent()
        .filter(|d| *d != Path::new(CNI_BIN_DIR))
    {
        cni_path.push(":");
        cni_path.push(dir);
    }
    let mut cmd: Command = netns_std_command(&inv.runner_netns, &plugin.path);
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &inv.container_id)
        .env("CNI_NETNS", &inv.netns_path)
        .env("CNI_IFNAME", &inv.ifname)
        .env("CNI_ARGS", &inv.args)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_err = |source| CniError::Spawn {
        plugin: label.clone(),
        source,
    };
    let command_line = describe(&cmd);
    // A group of its own: a plugin runs its IPAM plugin as a child, which holds the
    // stdout pipe too, so a hung plugin is killed with everything it started.
    let mut child = cmd.process_group(0).spawn().map_err(spawn_err)?;
    let group = i32::try_from(child.id()).ok().map(Pid::from_raw);
    let kill_group = || {
        if let Some(group) = group {
            let _already_gone = killpg(group, Signal::SIGKILL);
        }
    };
    if let Some(mut stdin) = child.stdin.take()
        && let Err(e) = stdin.write_all(conf.to_string().as_bytes())
    {
        // The plugin exited (or closed stdin) before reading its config: never
        // leave it running or unreaped.
        kill_group();
        let _reaped = child.wait();
        return Err(spawn_err(e));
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _receiver_gone = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(timeout) {
        Ok(out) => out.map_err(spawn_err)?,
        Err(_) => {
            // Killing the group closes every holder of the pipes, so the waiter
            // thread reads EOF, reaps the plugin and ends.
            kill_group();
            return Err(CniError::Hung {
                plugin: label,
                command,
                timeout,
            });
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // The spec's error object, when the plugin printed one.
        if let Ok(err) = serde_json::from_str::<PluginError>(&stdout) {
            return Err(CniError::Plugin {
                plugin: label,
                command,
                code: err.code,
                msg: err.msg,
                details: err.details,
            });
        }
        return Err(CniError::Failed {
            plugin: label,
            command,
            status: output.status.to_string(),
            output: format!(
                "{command_line}: stdout {:?}, stderr {:?}",
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    if stdout.trim().is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_str(&stdout).map_err(|e| CniError::BadResult {
        plugin: label,
        command,
        reason: format!("{e}: {stdout}"),
    })
}

#[derive(Debug, Deserialize)]
struct PluginError {
    code: u64,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

/// A chain's ADD result: the raw JSON (cached for DEL and for chained plugins) and
/// the pod's IPv4 address on its sandbox interface.
#[derive(Debug, Clone)]
pub struct CniResult {
    raw: Value,
    ip: Option<Ipv4Addr>,
}

#[derive(Debug, Deserialize)]
struct ResultView {
    #[serde(default)]
    interfaces: Vec<InterfaceView>,
    #[serde(default)]
    ips: Vec<IpView>,
}

#[derive(Debug, Deserialize)]
struct InterfaceView {
    #[serde(default)]
    sandbox: Option<String>,
}

#[derive(Debug, Deserialize)]
struct IpView {
    #[serde(default)]
    interface: Option<usize>,
    address: String,
}

impl CniResult {
    /// Reads the result; the IP is the first IPv4 on an interface inside the sandbox
    /// (falling back to the first IPv4 when the result names no interfaces).
    pub fn parse(raw: Value) -> Result<Self, String> {
        let view: ResultView = serde_json::from_value(raw.clone()).map_err(|e| e.to_string())?;
        let in_sandbox = |ip: &IpView| match ip.interface {
            Some(i) => view
                .interfaces
                .get(i)
                .is_some_and(|iface| iface.sandbox.as_deref().is_some_and(|s| !s.is_empty())),
            None => view.interfaces.is_empty(),
        };
        let v4 = |ip: &IpView| {
            let addr = ip.address.split('/').next().unwrap_or_default();
            addr.parse::<Ipv4Addr>().ok()
        };
        let ip = view
            .ips
            .iter()
            .filter(|ip| in_sandbox(ip))
            .find_map(v4)
            .or_else(|| view.ips.iter().find_map(v4));
        Ok(Self { raw, ip })
    }

    pub fn raw(&self) -> &Value {
        &self.raw
    }

    /// The pod's IPv4 address, if the chain assigned one.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.ip
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_ip_is_the_sandbox_interface_address() {
        let raw = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "ambit-br1", "mac": "02:00:00:00:00:01"},
                {"name": "veth1", "mac": "02:00:00:00:00:02"},
                {"name": "eth0", "mac": "02:00:00:00:00:03", "sandbox": "/run/netns/p"}
            ],
            "ips": [
                {"interface": 0, "address": "198.18.1.1/24"},
                {"interface": 2, "address": "198.18.1.2/24", "gateway": "198.18.1.1"}
            ]
        });
        let result = CniResult::parse(raw).unwrap();
        assert_eq!(result.ipv4(), Some(Ipv4Addr::new(198, 18, 1, 2)));
    }

    #[test]
    fn runner_adds_name_version_and_prev_result() {
        let plugin = CniPlugin::new("/opt/x/ambit-cni", json!({"mode": "test"}));
        let prev = json!({"cniVersion": CNI_VERSION, "ips": []});
        let conf = plugin.stdin_config("net", Some(&prev)).unwrap();
        assert_eq!(conf["name"], "net");
        assert_eq!(conf["cniVersion"], CNI_VERSION);
        assert_eq!(conf["type"], "ambit-cni");
        assert_eq!(conf["mode"], "test");
        assert_eq!(conf["prevResult"], prev);
        assert!(
            CniPlugin::new("/x", json!([1]))
                .stdin_config("n", None)
                .is_err()
        );
    }
}

#[cfg(test)]
mod hang_tests {
    use super::*;
    use nix::sys::signal::kill;

    use crate::naming::ClusterPrefix;
    use crate::netns::Netns;

    /// Whether `pid` is gone (or a zombie nobody reaped yet: it runs no more).
    fn is_dead(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit(')')
                    .next()
                    .is_some_and(|s| s.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    }

    #[test]
    fn a_hung_plugin_is_killed_with_the_children_that_hold_its_pipe() {
        if !crate::require_root("a_hung_plugin_is_killed_with_the_children_that_hold_its_pipe") {
            return;
        }
        let dir = crate::naming::temp_dir("cni-hang").unwrap();
        let child_pid = dir.path().join("child.pid");
        let script = dir.path().join("hang");
        // Like bridge running host-local: a child that inherits the stdout pipe.
        let text = format!(
            "#!/bin/sh\nsleep 600 &\necho $! > {}\nexec sleep 600\n",
            child_pid.display()
        );
        // Written by a child process: were this process to hold the file open for
        // writing, a fork by a parallel test could make exec fail with ETXTBSY.
        let written = Command::new("sh")
            .args([
                "-c",
                "printf '%s' \"$1\" > \"$2\" && chmod 755 \"$2\"",
                "sh",
            ])
            .arg(&text)
            .arg(&script)
            .status()
            .unwrap();
        assert!(written.success());
        let netns = Netns::create(&ClusterPrefix::next().name("cni-hang")).unwrap();
        let plugin = CniPlugin::new(&script, json!({}));
        let inv = Invocation {
            runner_netns: netns.name().to_owned(),
            container_id: "hang".into(),
            netns_path: netns.path(),
            ifname: "eth0".into(),
            args: String::new(),
        };
        let conf = plugin.stdin_config("net", None).unwrap();
        // The budget covers `ip netns exec`, the shell's start and the pid file's
        // write on a loaded machine, before the plugin hangs.
        let outcome = invoke_within(&plugin, "ADD", &inv, &conf, Duration::from_secs(10));
        assert!(matches!(outcome, Err(CniError::Hung { .. })), "{outcome:?}");
        let pid: u32 = std::fs::read_to_string(&child_pid)
            .unwrap_or_else(|e| {
                panic!(
                    "the plugin was killed before it wrote its child's pid to {} ({e}): \
                     the 10 s budget did not cover its start",
                    child_pid.display()
                )
            })
            .trim()
            .parse()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !is_dead(pid) {
            if std::time::Instant::now() > deadline {
                let _cleanup = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                panic!("the plugin's child {pid} outlived the plugin's kill");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
