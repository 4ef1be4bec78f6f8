//! Unique, recognisable names for what a test creates (`ambit-e2e-<pid>-<n>`), and
//! the sweeps that remove leftovers by name: a cluster's own after its teardown, and
//! those of earlier test runs whose process is gone (killed before it could clean up).

use std::path::Path;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::netns::{delete_netns, list_netns};

/// Every namespace and temp dir the e2e library creates starts with this.
pub const NAME_ROOT: &str = "ambit-e2e-";

static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(1);
static STALE_SWEEP: Once = Once::new();

/// `ambit-e2e-<pid>-<n>`: unique per cluster across the threads of this process
/// (the counter) and across test processes running at once (the pid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPrefix(String);

impl ClusterPrefix {
    /// The next unused prefix of this process.
    pub fn next() -> Self {
        let n = NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed);
        Self(format!("{NAME_ROOT}{}-{n}", std::process::id()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `<prefix>-<suffix>`.
    pub fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.0)
    }

    /// Whether `name` was made by [`ClusterPrefix::name`] (the `-` keeps `…-1` from
    /// claiming `…-12`'s names).
    pub fn owns(&self, name: &str) -> bool {
        name.strip_prefix(self.0.as_str())
            .is_some_and(|rest| rest.starts_with('-'))
    }
}

impl std::fmt::Display for ClusterPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The pid encoded in a name made by this library, if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_ROOT)?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

/// Whether a name belongs to a test process that no longer exists. A pid reused by
/// an unrelated process makes this false: the sweep then leaves the name alone.
fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Deletes every namespace this cluster prefix owns; returns the names it removed.
pub fn sweep_prefix(prefix: &ClusterPrefix) -> Vec<String> {
    sweep_netns(|name| prefix.owns(name))
}

/// Once per process: removes namespaces and temp dirs left by earlier e2e runs whose
/// process has died. Names of live processes are never touched.
pub fn sweep_stale_once() {
    STALE_SWEEP.call_once(|| {
        let removed = sweep_stale();
        if !removed.is_empty() {
            eprintln!("ambit-e2e: removed leftovers of dead test runs: {removed:?}");
        }
    });
}

/// Removes namespaces and temp dirs of dead e2e runs; returns what it removed.
pub fn sweep_stale() -> Vec<String> {
    let mut removed = sweep_netns(is_stale);
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for entry in entries.filter_map(Result::ok) {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if is_stale(&name) && std::fs::remove_dir_all(entry.path()).is_ok() {
                removed.push(entry.path().display().to_string());
            }
        }
    }
    removed
}

fn sweep_netns(matches: impl Fn(&str) -> bool) -> Vec<String> {
    let mut removed = Vec::new();
    for name in list_netns().into_iter().filter(|n| matches(n)) {
        match delete_netns(&name) {
            Ok(()) => removed.push(name),
            Err(e) => eprintln!("ambit-e2e sweep: {e}"),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_unique_and_own_only_their_names() {
        let a = ClusterPrefix::next();
        let b = ClusterPrefix::next();
        assert_ne!(a, b);
        assert!(a.owns(&a.name("node-1")));
        assert!(!a.owns(&b.name("node-1")));
        assert!(!a.owns(a.as_str()));
        // `…-1` must not claim `…-12-x`.
        let one = ClusterPrefix(format!("{NAME_ROOT}7-1"));
        assert!(!one.owns(&format!("{NAME_ROOT}7-12-wire")));
    }

    #[test]
    fn owner_pid_is_read_back_from_names() {
        let p = ClusterPrefix::next();
        assert_eq!(owner_pid(&p.name("wire")), Some(std::process::id()));
        assert_eq!(owner_pid("cni-1234"), None);
        assert_eq!(owner_pid("ambit-e2e-notapid-1"), None);
        // This process is alive, so its names are never stale.
        assert!(!is_stale(&p.name("wire")));
    }
}
