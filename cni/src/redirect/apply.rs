//! Runs the redirection tools inside a pod's network namespace: a thread enters
//! the namespace ([`NetNs::run`]) and the processes it starts inherit it, so
//! nothing here ever touches the node's own namespace.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use mesh_core::os::NetNs;

use super::{RedirectConfig, RedirectTools, rules};

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
    /// install. On failure whatever was half-installed is removed again.
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

    /// Removes exactly what [`Redirector::install`] adds; absent pieces are fine.
    pub fn remove(&self, ns: &NetNs) -> Result<(), RedirectError> {
        ns.run(|| self.remove_here())
            .map_err(RedirectError::Enter)?
    }

    /// True when every piece of the redirection is in place in `ns`.
    pub fn is_installed(&self, ns: &NetNs) -> Result<bool, RedirectError> {
        ns.run(|| {
            let saved = self.run(&self.tools.iptables_save, &[], None)?;
            Ok(rules::rules_present(&saved)
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

    /// Runs `tool args`, feeding `stdin`, and returns its stdout.
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
            // A tool that exits early closes the pipe; its status tells why.
            let _ = pipe.write_all(input.as_bytes());
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            return Err(RedirectError::Failed {
                command: format!("{} {}", tool.display(), args.join(" ")),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
