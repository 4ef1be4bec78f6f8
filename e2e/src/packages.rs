//! What the harness needs from the system: `ip` (iproute2), `sysctl` (procps) inside
//! the node namespaces, `iptables-restore` and `iptables-save` (iptables) for the
//! node agent's in-pod redirection, `tcpdump` to watch the wire, and the standard
//! CNI plugins `loopback`, `bridge` and `host-local` in [`CNI_BIN_DIR`]. On a
//! Debian-like machine whatever is missing is installed with apt-get; elsewhere the
//! error says what to install. The cluster builder and `meshctl demo` both call
//! [`ensure`], so `cargo test` works on a fresh machine without the demo run first.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use crate::cni::CNI_BIN_DIR;

/// The programs run from `PATH`, and the package that has each.
const TOOLS: [(&str, &str); 5] = [
    ("ip", "iproute2"),
    ("sysctl", "procps"),
    ("iptables-restore", "iptables"),
    ("iptables-save", "iptables"),
    ("tcpdump", "tcpdump"),
];
/// The standard plugins the harness runs from [`CNI_BIN_DIR`].
const CNI_PLUGINS: [&str; 3] = ["loopback", "bridge", "host-local"];
const CNI_PACKAGE: &str = "containernetworking-plugins";

/// A tool the harness runs is missing and could not be installed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct PackagesError(String);

fn has_command(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

/// What a caller needs: the whole harness, or only the tools of in-pod
/// redirection (the CNI plugin's own tests: `ip`, `sysctl`, `iptables-*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    Cluster,
    Redirection,
}

impl Needs {
    fn tools(self) -> impl Iterator<Item = (&'static str, &'static str)> {
        TOOLS
            .into_iter()
            .filter(move |(tool, _)| self == Needs::Cluster || *tool != "tcpdump")
    }

    fn plugins(self) -> &'static [&'static str] {
        match self {
            Needs::Cluster => &CNI_PLUGINS,
            Needs::Redirection => &[],
        }
    }
}

/// What is missing, as `(what, package)`, each package once.
fn missing(
    needs: Needs,
    has_command: impl Fn(&str) -> bool,
    has_plugin: impl Fn(&str) -> bool,
) -> Vec<(String, &'static str)> {
    let mut out: Vec<(String, &'static str)> = Vec::new();
    for (tool, package) in needs.tools() {
        if !has_command(tool) {
            out.push((tool.to_string(), package));
        }
    }
    for plugin in needs.plugins() {
        if !has_plugin(plugin) {
            out.push((format!("{CNI_BIN_DIR}/{plugin}"), CNI_PACKAGE));
        }
    }
    out
}

/// Installs whatever is missing (Debian and derivatives, as root), or says what to
/// install. Runs once per process: every later caller (each test's cluster) gets
/// the first call's result, the same error included.
pub fn ensure() -> Result<(), PackagesError> {
    static DONE: OnceLock<Result<(), PackagesError>> = OnceLock::new();
    DONE.get_or_init(|| install_missing(Needs::Cluster)).clone()
}

/// [`ensure`] for only what `needs` names.
pub fn ensure_for(needs: Needs) -> Result<(), PackagesError> {
    if needs == Needs::Cluster {
        return ensure();
    }
    static DONE: OnceLock<Result<(), PackagesError>> = OnceLock::new();
    DONE.get_or_init(|| install_missing(needs)).clone()
}

fn install_missing(needs: Needs) -> Result<(), PackagesError> {
    let has_plugin = |name: &str| Path::new(CNI_BIN_DIR).join(name).is_file();
    let missing = missing(needs, has_command, has_plugin);
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    packages.sort_unstable();
    packages.dedup();
    let what: Vec<&str> = missing.iter().map(|(w, _)| w.as_str()).collect();
    let fail =
        |why: String| PackagesError(format!("missing {what:?} ({why}); install {packages:?}"));
    if !has_command("apt-get") {
        return Err(fail("no apt-get".into()));
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(fail("apt-get needs root".into()));
    }
    // Straight to fd 2: a test harness would capture a print of a passing test.
    let line = format!("ambit-e2e: missing {what:?}: installing {packages:?} with apt-get...\n");
    let _best_effort = std::io::stderr().lock().write_all(line.as_bytes());
    // A fresh machine (or image) has empty package lists: update before installing.
    // A fresh machine also often runs its daily apt jobs at boot: their lock is
    // waited for, and a failed update is tried again, rather than failing every
    // test of the run for a moment's contention.
    let mut tries = 0;
    while let Err(e) = apt_get(&["update", "-q"]) {
        tries += 1;
        if tries == 3 {
            return Err(fail(e));
        }
        std::thread::sleep(std::time::Duration::from_secs(5));
    }
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&packages);
    apt_get(&install).map_err(fail)?;
    let still = self::missing(needs, has_command, has_plugin);
    if !still.is_empty() {
        return Err(PackagesError(format!(
            "still missing after apt-get install {packages:?}: {still:?}"
        )));
    }
    Ok(())
}

fn apt_get(args: &[&str]) -> Result<(), String> {
    let status = Command::new("apt-get")
        .args(["-o", "DPkg::Lock::Timeout=300"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| format!("cannot run apt-get {}: {e}", args[0]))?;
    if !status.success() {
        return Err(format!("apt-get {} failed: {status}", args[0]));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_and_plugin_the_harness_runs_is_checked() {
        let all = missing(Needs::Cluster, |_| false, |_| false);
        let what: Vec<&str> = all.iter().map(|(w, _)| w.as_str()).collect();
        for needed in ["sysctl", "iptables-restore", "ip", "tcpdump"] {
            assert!(what.contains(&needed), "{what:?}");
        }
        for plugin in ["loopback", "bridge", "host-local"] {
            assert!(
                what.contains(&format!("/usr/lib/cni/{plugin}").as_str()),
                "{what:?}"
            );
        }
        assert!(all.iter().any(|(w, p)| w == "sysctl" && *p == "procps"));
        assert!(all.iter().any(|(w, p)| w == "tcpdump" && *p == "tcpdump"));
        // A plugin elsewhere (e.g. /opt/cni/bin) does not count: only the one the
        // harness runs.
        let only_loopback_missing = missing(Needs::Cluster, |_| true, |p| p != "loopback");
        assert_eq!(
            only_loopback_missing,
            vec![(format!("{CNI_BIN_DIR}/loopback"), CNI_PACKAGE)]
        );
        assert!(missing(Needs::Cluster, |_| true, |_| true).is_empty());
    }

    #[test]
    fn redirection_needs_neither_tcpdump_nor_the_plugins() {
        let all = missing(Needs::Redirection, |_| false, |_| false);
        let what: Vec<&str> = all.iter().map(|(w, _)| w.as_str()).collect();
        assert_eq!(
            what,
            ["ip", "sysctl", "iptables-restore", "iptables-save"],
            "{all:?}"
        );
    }
}
