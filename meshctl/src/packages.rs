//! What the demo needs from the system: iproute2, iptables, nsenter and the
//! standard CNI plugins. On a fresh Debian machine they are installed with apt-get.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// Directories where distributions put the standard CNI plugins.
const CNI_DIRS: [&str; 2] = ["/usr/lib/cni", "/opt/cni/bin"];

fn has_command(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

fn has_cni_plugins() -> bool {
    CNI_DIRS
        .iter()
        .any(|d| Path::new(d).join("bridge").is_file() && Path::new(d).join("host-local").is_file())
}

/// Installs whatever is missing (Debian and derivatives), or says what to install.
pub fn ensure() -> anyhow::Result<()> {
    let missing_tools: Vec<&str> = ["ip", "iptables", "nsenter"]
        .into_iter()
        .filter(|t| !has_command(t))
        .collect();
    if missing_tools.is_empty() && has_cni_plugins() {
        return Ok(());
    }
    const PACKAGES: [&str; 4] = [
        "iproute2",
        "iptables",
        "util-linux",
        "containernetworking-plugins",
    ];
    if !has_command("apt-get") {
        bail!(
            "missing {missing_tools:?} or the standard CNI plugins; install {PACKAGES:?} with your package manager"
        );
    }
    println!("installing {PACKAGES:?} with apt-get...");
    let update = Command::new("apt-get")
        .args(["update", "-q"])
        .status()
        .context("apt-get update")?;
    if !update.success() {
        bail!("apt-get update failed: {update}");
    }
    let install = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(PACKAGES)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("apt-get install")?;
    if !install.success() {
        bail!("apt-get install failed: {install}");
    }
    Ok(())
}
