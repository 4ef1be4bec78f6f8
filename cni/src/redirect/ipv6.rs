//! IPv6 in an enrolled pod is turned off, not redirected: the rules are IPv4
//! only, and every up interface gets an fe80:: address, so a neighbour could
//! otherwise reach the pod's `[::]` listeners around the mesh and its policy.
//! Fail closed: `disable_ipv6 = 1` on every interface but loopback (whose ::1
//! stays for the pod's own use) and on `default`, for interfaces made later.
//! Called on a thread inside the pod's namespace, where `/proc/sys/net` is that
//! namespace's.

use std::io;
use std::path::{Path, PathBuf};

/// The calling thread's namespace's per-interface IPv6 settings.
pub const CONF: &str = "/proc/sys/net/ipv6/conf";

/// A setting that could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct SysctlError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// The `disable_ipv6` settings under `conf` that must be 1: `default` first, then
/// every interface but `lo` (`all` is left too: writing it reaches `lo`).
/// `None` when the kernel has no IPv6 (no `conf`).
fn targets(conf: &Path) -> Result<Option<Vec<PathBuf>>, SysctlError> {
    let err = |source| SysctlError {
        path: conf.to_owned(),
        source,
    };
    let entries = match std::fs::read_dir(conf) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let mut interfaces = Vec::new();
    for entry in entries {
        let name = entry.map_err(err)?.file_name();
        if name != "all" && name != "lo" && name != "default" {
            interfaces.push(conf.join(name).join("disable_ipv6"));
        }
    }
    interfaces.sort();
    let mut all = vec![conf.join("default").join("disable_ipv6")];
    all.extend(interfaces);
    Ok(Some(all))
}

/// Turns IPv6 off on every interface of the namespace but loopback, and for the
/// interfaces made later (`default` is written before the interfaces are
/// listed, so none slips between). Nothing to do without IPv6 in the kernel.
pub fn disable(conf: &Path) -> Result<(), SysctlError> {
    let default = conf.join("default").join("disable_ipv6");
    match std::fs::write(&default, "1") {
        Err(e) if e.kind() == io::ErrorKind::NotFound && !conf.exists() => return Ok(()),
        Err(source) => {
            return Err(SysctlError {
                path: default,
                source,
            });
        }
        Ok(()) => {}
    }
    for path in targets(conf)?.unwrap_or_default() {
        std::fs::write(&path, "1").map_err(|source| SysctlError { path, source })?;
    }
    Ok(())
}

/// True when IPv6 is off wherever [`disable`] turns it off (or absent from the
/// kernel).
pub fn disabled(conf: &Path) -> Result<bool, SysctlError> {
    for path in targets(conf)?.unwrap_or_default() {
        let value = std::fs::read_to_string(&path).map_err(|source| SysctlError {
            path: path.clone(),
            source,
        })?;
        if value.trim() != "1" {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for `/proc/sys/net/ipv6/conf` with these interfaces, all on.
    fn conf_with(dir: &Path, names: &[&str]) -> PathBuf {
        let conf = dir.join("conf");
        for name in names {
            std::fs::create_dir_all(conf.join(name)).unwrap();
            std::fs::write(conf.join(name).join("disable_ipv6"), "0\n").unwrap();
        }
        conf
    }

    fn value(conf: &Path, name: &str) -> String {
        std::fs::read_to_string(conf.join(name).join("disable_ipv6"))
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn every_interface_but_loopback_and_the_default_are_turned_off() {
        let dir = tempfile::tempdir().unwrap();
        let conf = conf_with(dir.path(), &["all", "default", "lo", "eth0", "net1"]);
        assert!(!disabled(&conf).unwrap());
        disable(&conf).unwrap();
        for name in ["default", "eth0", "net1"] {
            assert_eq!(value(&conf, name), "1", "{name}");
        }
        // Loopback keeps ::1, and `all` would reach it.
        assert_eq!(value(&conf, "lo"), "0");
        assert_eq!(value(&conf, "all"), "0");
        assert!(disabled(&conf).unwrap());

        // Turned on again behind our back: no longer disabled.
        std::fs::write(conf.join("net1").join("disable_ipv6"), "0").unwrap();
        assert!(!disabled(&conf).unwrap());
    }

    #[test]
    fn a_kernel_without_ipv6_needs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("no-ipv6");
        disable(&conf).unwrap();
        assert!(disabled(&conf).unwrap());
    }
}
