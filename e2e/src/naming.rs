//! Unique, recognisable names for what a test creates
//! (`ambit-e2e-<pid>-t<start>-<n>`), and the sweeps that remove leftovers by name: a
//! cluster's own after its teardown, and those of earlier test runs whose process is
//! gone (killed before it could clean up). The owner's start time (in clock ticks
//! since boot, from `/proc/<pid>/stat`) tells a dead run's names from those of a
//! live process that got the same pid later. These names are never interface names
//! (those are short and live inside the namespaces), so their length is free.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Once, OnceLock};

use crate::netns::{delete_netns, list_netns};

/// Every namespace and temp dir the e2e library creates starts with this.
pub const NAME_ROOT: &str = "ambit-e2e-";

static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(1);
static STALE_SWEEP: Once = Once::new();

/// When process `pid` started, in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`); `None` when there is no such process.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields are
    // counted from after its closing parenthesis, which is field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// `ambit-e2e-<pid>-t<start>`: what every name this process creates starts with.
pub fn process_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let pid = std::process::id();
        // Without /proc the names fall back to the pid alone (the old form).
        match start_time(pid) {
            Some(start) => format!("{NAME_ROOT}{pid}-t{start}"),
            None => format!("{NAME_ROOT}{pid}"),
        }
    })
}

/// A temp dir named `ambit-e2e-<pid>-t<start>-<what>-XXXXXX`: removed when the
/// guard drops, and by a later run's sweep if this process is killed first.
pub fn temp_dir(what: &str) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("{}-{what}-", process_tag()))
        .tempdir()
}

/// `ambit-e2e-<pid>-t<start>-<n>`: unique per cluster across the threads of this
/// process (the counter), across test processes running at once (the pid) and
/// across processes that got the same pid one after the other (the start time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPrefix(String);

impl ClusterPrefix {
    /// The next unused prefix of this process.
    pub fn next() -> Self {
        let n = NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed);
        Self(format!("{}-{n}", process_tag()))
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

/// The owner encoded in a name made by this library, if it is one: its pid and,
/// unless the name has the older pid-only form, its start time.
fn owner(name: &str) -> Option<(u32, Option<u64>)> {
    let mut parts = name.strip_prefix(NAME_ROOT)?.split('-');
    let pid = parts.next()?.parse().ok()?;
    let start = parts
        .next()
        .and_then(|p| p.strip_prefix('t'))
        .and_then(|t| t.parse().ok());
    Some((pid, start))
}

/// Whether a name belongs to a test process that no longer exists: its pid is gone,
/// or now belongs to a process started at another time. A name of the older
/// pid-only form whose pid is in use is left alone.
fn is_stale(name: &str) -> bool {
    owner(name).is_some_and(|(pid, start)| match (start_time(pid), start) {
        (None, _) => true,
        (Some(now), Some(then)) => now != then,
        (Some(_), None) => false,
    })
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
    fn the_owner_is_read_back_from_names() {
        let p = ClusterPrefix::next();
        let me = std::process::id();
        let started = start_time(me);
        assert!(started.is_some(), "no start time in /proc/self/stat");
        assert_eq!(owner(&p.name("wire")), Some((me, started)));
        assert_eq!(owner("ambit-e2e-12-3-node-1"), Some((12, None)));
        assert_eq!(owner("cni-1234"), None);
        assert_eq!(owner("ambit-e2e-notapid-1"), None);
        // This process is alive, so its names are never stale.
        assert!(!is_stale(&p.name("wire")));
        let dir = temp_dir("naming").unwrap();
        let dir_name = dir.path().file_name().unwrap().to_str().unwrap();
        assert!(dir_name.starts_with(process_tag()), "{dir_name}");
        assert!(!is_stale(dir_name));
    }

    #[test]
    fn a_reused_pid_does_not_keep_a_dead_runs_names() {
        let me = std::process::id();
        let started = start_time(me).unwrap();
        // The same pid, started at another time: a dead run's leftover, even though
        // the pid is in use (by this process).
        let earlier = format!("{NAME_ROOT}{me}-t{}-3-node-1", started.wrapping_sub(1));
        assert!(is_stale(&earlier));
        assert!(!is_stale(&format!("{NAME_ROOT}{me}-t{started}-3-node-1")));
        // The older pid-only form stays conservative: a live pid keeps its names.
        assert!(!is_stale(&format!("{NAME_ROOT}{me}-3-node-1")));
        // No such process (pid_max is at most 2^22): stale in either form.
        assert!(is_stale(&format!("{NAME_ROOT}4294967-t5-1-wire")));
        assert!(is_stale(&format!("{NAME_ROOT}4294967-1-wire")));
    }
}
