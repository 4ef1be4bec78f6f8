//! What the demo needs from the system, exactly what the e2e harness runs: `ip`
//! (iproute2), `sysctl` (procps) inside the node namespaces, `iptables-restore` and
//! `iptables-save` (iptables) for the node agent's in-pod redirection, and the
//! standard CNI plugins `loopback`, `bridge` and `host-local` in the directory the
//! harness runs them from. On a Debian-like machine whatever is missing is
//! installed with apt-get; elsewhere the error says what to install.

use std::path::Path;
use std::process::Command;

use ambit_e2e::cni::CNI_BIN_DIR;
use anyhow::{Context, bail};

/// The programs run from `PATH`, and the package that has each.
const TOOLS: [(&str, &str); 4] = [
    ("ip", "iproute2"),
    ("sysctl", "procps"),
    ("iptables-restore", "iptables"),
    ("iptables-save", "iptables"),
];
/// The standard plugins the harness runs from [`CNI_BIN_DIR`].
const CNI_PLUGINS: [&str; 3] = ["loopback", "bridge", "host-local"];
const CNI_PACKAGE: &str = "containernetworking-plugins";

fn has_command(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

/// What is missing, as `(what, package)`, each package once.
fn missing(
    has_command: impl Fn(&str) -> bool,
    has_plugin: impl Fn(&str) -> bool,
) -> Vec<(String, &'static str)> {
    let mut out: Vec<(String, &'static str)> = Vec::new();
    for (tool, package) in TOOLS {
        if !has_command(tool) {
            out.push((tool.to_string(), package));
        }
    }
    for plugin in CNI_PLUGINS {
        if !has_plugin(plugin) {
            out.push((format!("{CNI_BIN_DIR}/{plugin}"), CNI_PACKAGE));
        }
    }
    out
}

/// Installs whatever is missing (Debian and derivatives), or says what to install.
pub fn ensure() -> anyhow::Result<()> {
    let has_plugin = |name: &str| Path::new(CNI_BIN_DIR).join(name).is_file();
    let missing = missing(has_command, has_plugin);
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    packages.sort_unstable();
    packages.dedup();
    let what: Vec<&str> = missing.iter().map(|(w, _)| w.as_str()).collect();
    if !has_command("apt-get") {
        bail!("missing {what:?}; install {packages:?} with your package manager");
    }
    println!("missing {what:?}: installing {packages:?} with apt-get...");
    let update = Command::new("apt-get")
        .args(["update", "-q"])
        .status()
        .context("apt-get update")?;
    if !update.success() {
        bail!("apt-get update failed: {update}");
    }
    let install = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("apt-get install")?;
    if !install.success() {
        bail!("apt-get install failed: {install}");
    }
    let still = self::missing(has_command, has_plugin);
    if !still.is_empty() {
        bail!("still missing after apt-get install: {still:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_and_plugin_the_harness_runs_is_checked() {
        let all = missing(|_| false, |_| false);
        let what: Vec<&str> = all.iter().map(|(w, _)| w.as_str()).collect();
        for needed in ["sysctl", "iptables-restore", "ip"] {
            assert!(what.contains(&needed), "{what:?}");
        }
        for plugin in ["loopback", "bridge", "host-local"] {
            assert!(
                what.contains(&format!("/usr/lib/cni/{plugin}").as_str()),
                "{what:?}"
            );
        }
        assert!(all.iter().any(|(w, p)| w == "sysctl" && *p == "procps"));
        // A plugin elsewhere (e.g. /opt/cni/bin) does not count: only the one the
        // harness runs.
        let only_loopback_missing = missing(|_| true, |p| p != "loopback");
        assert_eq!(
            only_loopback_missing,
            vec![(format!("{CNI_BIN_DIR}/loopback"), CNI_PACKAGE)]
        );
        assert!(missing(|_| true, |_| true).is_empty());
    }
}
