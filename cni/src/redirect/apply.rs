//! Runs the redirection tools inside a pod's network namespace: a thread enters
//! the namespace ([`NetNs::run`]) and the processes it starts inherit it, so
//! nothing here ever touches the node's own namespace. Each tool run has a
//! deadline ([`RedirectTools::timeout`]): a tool still running then is killed and
//! reaped, and the operation fails naming it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mesh_core::os::NetNs;

use super::{RedirectConfig, RedirectTools, ipv6, rules};

/// A failure to change or read a pod's redirection.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("could not enter the pod's network namespace: {0}")]
    Enter(#[source] std::io::Error),
    #[error("could not run `{tool}`: {source}")]
    Spawn {
        tool: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    TimedOut { command: String, timeout: Duration },
    #[error("could not turn IPv6 off in the pod: {0}")]
    Ipv6(#[from] ipv6::SysctlError),
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Installs, removes and checks the redirection in pod namespaces.
#[derive(Clone, Debug, Default)]
pub struct Redirector {
    cfg: RedirectConfig,
    tools: RedirectTools,
}

impl Redirector {
    pub fn new(cfg: RedirectConfig, tools: RedirectTools) -> Self {
        Self { cfg, tools }
    }

    pub fn config(&self) -> &RedirectConfig {
        &self.cfg
    }

    /// Installs the rules and policy routing in `ns`, replacing any earlier
    /// install, and turns IPv6 off there ([`ipv6`]). On failure whatever rules
    /// were half-installed are removed again.
    pub fn install(&self, ns: &NetNs) -> Result<(), RedirectError> {
        ns.run(|| {
            let result = self.install_here();
            if result.is_err() {
                let _ = self.remove_here();
            }
            result
        })
        .map_err(RedirectError::Enter)?
    }

    /// Removes exactly the rules and routing [`Redirector::install`] adds; absent
    /// pieces are fine. IPv6 stays off: the sandbox is going away, and turning it
    /// back on would only open the pod around the mesh meanwhile.
    pub fn remove(&self, ns: &NetNs) -> Result<(), RedirectError> {
        ns.run(|| self.remove_here())
            .map_err(RedirectError::Enter)?
    }

    /// Turns IPv6 off in `ns` (what [`Redirector::install`] also does), leaving
    /// the rules as they are: for pods enrolled by an agent that did not do it.
    pub fn disable_ipv6(&self, ns: &NetNs) -> Result<(), RedirectError> {
        ns.run(|| ipv6::disable(Path::new(ipv6::CONF)).map_err(RedirectError::from))
            .map_err(RedirectError::Enter)?
    }

    /// True when every piece of the redirection is in place in `ns`, IPv6 off
    /// included.
    pub fn is_installed(&self, ns: &NetNs) -> Result<bool, RedirectError> {
        ns.run(|| {
            if !ipv6::disabled(Path::new(ipv6::CONF))? {
                return Ok(false);
            }
            let saved = self.run(&self.tools.iptables_save, &[], None)?;
            Ok(rules::rules_present(&self.cfg, &saved)
                && rules::ip_rule_present(&self.cfg, &self.show_rules()?)
                && rules::ip_route_present(&self.show_routes()?))
        })
        .map_err(RedirectError::Enter)?
    }

    fn install_here(&self) -> Result<(), RedirectError> {
        self.remove_iptables_here()?;
        self.restore(&rules::render_install(&self.cfg))?;
        if !rules::ip_rule_present(&self.cfg, &self.show_rules()?) {
            self.ip(&rules::ip_rule_args(&self.cfg, "add"))?;
        }
        self.ip(&rules::ip_route_args(&self.cfg, "replace"))?;
        ipv6::disable(Path::new(ipv6::CONF))?;
        Ok(())
    }

    fn remove_here(&self) -> Result<(), RedirectError> {
        let iptables = self.remove_iptables_here();
        // A rule may exist more than once if someone else added ours too.
        for _ in 0..8 {
            if !rules::ip_rule_present(&self.cfg, &self.show_rules()?) {
                break;
            }
            self.ip(&rules::ip_rule_args(&self.cfg, "del"))?;
        }
        if rules::ip_route_present(&self.show_routes()?) {
            self.ip(&rules::ip_route_args(&self.cfg, "del"))?;
        }
        iptables
    }

    fn remove_iptables_here(&self) -> Result<(), RedirectError> {
        let saved = self.run(&self.tools.iptables_save, &[], None)?;
        match rules::render_removal(&saved) {
            Some(removal) => self.restore(&removal),
            None => Ok(()),
        }
    }

    fn restore(&self, input: &str) -> Result<(), RedirectError> {
        self.run(
            &self.tools.iptables_restore,
            &["-w".into(), "5".into(), "--noflush".into()],
            Some(input),
        )
        .map(drop)
    }

    fn show_rules(&self) -> Result<String, RedirectError> {
        let pref = self.cfg.rule_priority.to_string();
        self.run(
            &self.tools.ip,
            &["rule".into(), "show".into(), "pref".into(), pref],
            None,
        )
    }

    fn show_routes(&self) -> Result<String, RedirectError> {
        let table = self.cfg.route_table.to_string();
        self.run(
            &self.tools.ip,
            &["route".into(), "show".into(), "table".into(), table],
            None,
        )
    }

    fn ip(&self, args: &[String]) -> Result<(), RedirectError> {
        self.run(&self.tools.ip, args, None).map(drop)
    }

    /// Runs `tool args`, feeding `stdin`, and returns its stdout; kills the tool
    /// at the deadline.
    fn run(
        &self,
        tool: &Path,
        args: &[String],
        stdin: Option<&str>,
    ) -> Result<String, RedirectError> {
        let spawn_err = |source| RedirectError::Spawn {
            tool: tool.to_owned(),
            source,
        };
        let command = || format!("{} {}", tool.display(), args.join(" "));
        let deadline = Instant::now() + self.tools.timeout;
        let mut child = Command::new(tool)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // The input (a few KiB) fits in the pipe, so this cannot block on a
            // tool that does not read. A tool that exits early closes the pipe;
            // its status tells why.
            let _ = pipe.write_all(input.as_bytes());
        }
        // Read both pipes on their own threads, so a chatty tool never blocks on
        // a full pipe while this one waits for it. A killed tool closes them.
        let stdout = read_on_thread(child.stdout.take());
        let stderr = read_on_thread(child.stderr.take());
        let status = match wait_until(&mut child, deadline) {
            Ok(Some(status)) => status,
            Ok(None) => {
                return Err(RedirectError::TimedOut {
                    command: command(),
                    timeout: self.tools.timeout,
                });
            }
            Err(e) => return Err(spawn_err(e)),
        };
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        if !status.success() {
            return Err(RedirectError::Failed {
                command: command(),
                status,
                stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    }
}

/// Reads `pipe` to its end on a thread of its own (at most [`MAX_TOOL_OUTPUT`]).
fn read_on_thread(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(pipe) = pipe {
            let _ = pipe.take(MAX_TOOL_OUTPUT).read_to_end(&mut out);
        }
        out
    })
}

/// Largest tool output kept (an `iptables-save` of a pod is a few KiB).
const MAX_TOOL_OUTPUT: u64 = 16 * 1024 * 1024;

/// Waits for `child` until `deadline`; then kills and reaps it and returns
/// `None`. The exit is polled, from every millisecond up to every 20 ms: std has
/// no wait with a timeout, and the tools mostly finish within milliseconds.
fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            // An exit between the check and the kill leaves a zombie, which the
            // wait below reaps all the same.
            let _ = child.kill();
            child.wait()?;
            return Ok(None);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirector(timeout: Duration) -> Redirector {
        Redirector::new(
            RedirectConfig::default(),
            RedirectTools {
                timeout,
                ..RedirectTools::default()
            },
        )
    }

    #[test]
    fn a_hung_tool_is_killed_at_its_deadline_and_named() {
        let started = Instant::now();
        let err = redirector(Duration::from_millis(200))
            .run(Path::new("sleep"), &["30".into()], None)
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        assert!(matches!(err, RedirectError::TimedOut { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("`sleep 30`") && msg.contains("killed"),
            "{msg}"
        );
    }

    #[test]
    fn a_tool_in_time_gives_its_output_or_its_failure() {
        let r = redirector(Duration::from_secs(10));
        let out = r
            .run(Path::new("cat"), &[], Some("*nat\nCOMMIT\n"))
            .unwrap();
        assert_eq!(out, "*nat\nCOMMIT\n");
        let err = r
            .run(
                Path::new("sh"),
                &["-c".into(), "echo nope >&2; exit 3".into()],
                None,
            )
            .unwrap_err();
        assert!(
            matches!(&err, RedirectError::Failed { stderr, .. } if stderr == "nope"),
            "{err}"
        );
    }
}
