//! Named network namespaces (`ip netns`), the way a container runtime pins them under
//! `/run/netns`: create, run `ip` and `sysctl` inside, kill what runs there, delete.
//! A [`Netns`] is a guard: dropping it kills its processes and deletes it.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where `ip netns` pins named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// A command that failed to start or exited non-zero.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// A named network namespace owned by a test. Dropping it removes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    deleted: bool,
}

impl Netns {
    /// Creates `/run/netns/<name>` and brings its loopback up.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        {
            // One at a time, with the other crates' test namespaces: a first `ip
            // netns add` bind-mounts /run/netns, and two at once could stack mounts.
            let _serial = mesh_core::testing::netns::create_lock();
            run("ip", ["netns", "add", name])?;
        }
        // From here on the guard owns it, so an error below still removes it.
        let netns = Self {
            name: name.to_owned(),
            deleted: false,
        };
        netns.ip(["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, what CNI calls `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// Runs `ip -n <name> <args>` and returns its stdout.
    pub fn ip<I, S>(&self, args: I) -> Result<String, NetnsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> = vec!["-n".into(), self.name.clone().into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        run("ip", all)
    }

    /// Sets a sysctl inside the namespace (`ip netns exec <name> sysctl -w k=v`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        let setting = format!("{key}={value}");
        run(
            "ip",
            ["netns", "exec", &self.name, "sysctl", "-q", "-w", &setting],
        )?;
        Ok(())
    }

    /// A blocking command that runs `program` inside the namespace.
    pub fn std_command(&self, program: impl AsRef<OsStr>) -> Command {
        netns_std_command(&self.name, program)
    }

    /// Kills everything in the namespace and deletes it. Idempotent.
    pub fn delete(&mut self) -> Result<(), NetnsError> {
        if self.deleted {
            return Ok(());
        }
        self.deleted = true;
        delete_netns(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!("ambit-e2e teardown: {e}");
        }
    }
}

/// `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// The names pinned under `/run/netns` (all of them, not only this test's).
pub fn list_netns() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// SIGKILLs every process whose network namespace is `name`, and returns how many.
/// Only processes *inside* the namespace are touched, never this test process.
pub fn kill_netns_processes(name: &str) -> Result<usize, NetnsError> {
    let out = run("ip", ["netns", "pids", name])?;
    let me = std::process::id();
    let mut killed = 0;
    for pid in out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
        if pid == me {
            continue;
        }
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        // ESRCH means it already exited between listing and killing: fine.
        if kill(Pid::from_raw(raw), Signal::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    Ok(killed)
}

/// Kills what runs in the namespace and unpins it; a missing namespace is not an error.
pub fn delete_netns(name: &str) -> Result<(), NetnsError> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    let killed = kill_netns_processes(name);
    let deleted = run("ip", ["netns", "delete", name]).map(drop);
    if !netns_path(name).exists() {
        return Ok(());
    }
    killed.and(deleted)
}

/// A blocking `ip netns exec <name> <program>` command.
pub fn netns_std_command(name: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", name]).arg(program);
    cmd
}

/// An async `ip netns exec <name> <program>` command, killed when dropped.
///
/// `ip netns exec` execs the program, so the child's pid is the program's own.
pub fn netns_command(name: &str, program: impl AsRef<OsStr>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::from(netns_std_command(name, program));
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// Runs a command to completion and returns its stdout, or an error with its stderr.
pub(crate) fn run<I, S>(program: &str, args: I) -> Result<String, NetnsError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    let command = describe(&cmd);
    let out = cmd.output().map_err(|source| NetnsError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(NetnsError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `program arg1 arg2`, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}
