//! Network namespaces for tests outside the e2e harness, named
//! `ambit-<tool>-<pid>-t<start>-<n>`: the owner's pid and start time (clock ticks
//! since boot) tell a dead run's leftovers, swept at the first creation, from a live
//! process that got the same pid later. One creation at a time per process, and a
//! guard that kills what runs inside before deleting.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where `ip netns` pins named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// `ip netns add` bind-mounts `/run/netns` on itself the first time; two threads
/// doing it at once could stack mounts, so a process creates one at a time. The e2e
/// harness takes the same lock.
pub fn create_lock() -> MutexGuard<'static, ()> {
    static CREATE_LOCK: Mutex<()> = Mutex::new(());
    CREATE_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// When process `pid` started, in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`); `None` when there is no such process.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from after
    // its closing parenthesis, which is field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Whether `name` (made under `root`, `ambit-<tool>-`) belongs to a test process
/// that is gone: its pid is free, or taken by a process started at another time.
/// An older pid-only name whose pid is in use is left alone.
fn is_stale(root: &str, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(root) else {
        return false;
    };
    let mut parts = rest.split('-');
    let Some(pid) = parts.next().and_then(|p| p.parse().ok()) else {
        return false;
    };
    let then: Option<u64> = parts
        .next()
        .and_then(|p| p.strip_prefix('t'))
        .and_then(|t| t.parse().ok());
    // Only a pid that is certainly free makes the name stale: any other failure
    // to read the process (another pid namespace, a procfs mount) keeps it.
    let gone = matches!(
        std::fs::metadata(format!("/proc/{pid}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound
    );
    if gone {
        return true;
    }
    match (start_time(pid), then) {
        (Some(now), Some(then)) => now != then,
        _ => false,
    }
}

fn ip(args: &[&str]) -> Output {
    match Command::new("ip").args(args).stdin(Stdio::null()).output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run `ip {}` ({e}): install iproute2", args.join(" ")),
    }
}

/// SIGKILLs what runs in namespace `name` (never this process), then unpins it.
fn delete(name: &str) {
    let pids = ip(&["netns", "pids", name]);
    let me = std::process::id();
    for pid in String::from_utf8_lossy(&pids.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|p| u32::try_from(*p).is_ok_and(|p| p != me))
    {
        // ESRCH: it exited since the listing.
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let out = ip(&["netns", "delete", name]);
    if !out.status.success() && PathBuf::from(NETNS_DIR).join(name).exists() {
        eprintln!(
            "cannot delete test namespace {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

/// A network namespace of the test's own; dropping it (also on panic) kills what
/// runs inside and deletes it.
#[derive(Debug)]
pub struct TestNetns {
    name: String,
}

impl TestNetns {
    /// Creates `ambit-<tool>-<pid>-t<start>-<n>` with loopback up. `tool` names the
    /// tests' crate (e.g. `cnit`); the first creation for a tool in this process
    /// removes its namespaces left by test runs that died before their cleanup.
    pub fn create(tool: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        static SWEPT: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let root = format!("ambit-{tool}-");
        let me = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Without a start time of its own, the pid-only form: never swept while
        // this process lives.
        let name = match start_time(me) {
            Some(start) => format!("{root}{me}-t{start}-{n}"),
            None => format!("{root}{me}-{n}"),
        };
        let _serial = create_lock();
        let mut swept = SWEPT.lock().unwrap_or_else(|e| e.into_inner());
        if !swept.contains(&root) {
            swept.push(root.clone());
            for entry in std::fs::read_dir(NETNS_DIR).into_iter().flatten().flatten() {
                let Ok(stale) = entry.file_name().into_string() else {
                    continue;
                };
                if is_stale(&root, &stale) {
                    eprintln!("removing {stale}, left by a dead test run");
                    delete(&stale);
                }
            }
        }
        let out = ip(&["netns", "add", &name]);
        assert!(out.status.success(), "ip netns add {name}: {out:?}");
        // From here on the guard owns it, so a failure below still removes it.
        let netns = Self { name };
        let out = ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
        assert!(out.status.success(), "lo up in {}: {out:?}", netns.name);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        delete(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dead_runs_names_of_the_same_tool_are_stale() {
        let me = std::process::id();
        let started = start_time(me).unwrap();
        let root = "ambit-xt-";
        assert!(!is_stale(root, &format!("{root}{me}-t{started}-0")));
        // The same pid started at another time: a dead run's, though the pid lives.
        assert!(is_stale(root, &format!("{root}{me}-t{}-0", started + 1)));
        // Pid-only (older) names: stale only once the pid is free.
        assert!(!is_stale(root, &format!("{root}{me}-0")));
        // No such process (pid_max is at most 2^22).
        assert!(is_stale(root, &format!("{root}4294967-t5-0")));
        // Another tool's or the e2e harness's names are never this tool's.
        assert!(!is_stale(root, "ambit-e2e-4294967-t5-1-wire"));
        assert!(!is_stale(root, "ambit-xtra-4294967-t5-0"));
        assert!(!is_stale(root, "ambit-xt-notapid-0"));
    }
}
