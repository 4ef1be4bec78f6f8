//! The node agent's settings: each has a flag, an environment variable, a default
//! and a line of doc, here and nowhere else.

use std::path::PathBuf;
use std::time::Duration;

use crate::api::DEFAULT_AGENT_SOCKET;
use crate::redirect::{Mark, RedirectConfig, RedirectTools};

/// Default path of the zds socket ztunnel connects to.
pub const DEFAULT_ZDS_SOCKET: &str = "/var/run/ambit/ztunnel.sock";

/// Default path of the file the enrolled pods are saved to.
pub const DEFAULT_STATE_FILE: &str = "/var/run/ambit/cni-pods.json";

/// Routing tables the kernel reserves: unspec, default, main, local.
const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];

#[derive(Clone, Debug, clap::Args)]
pub struct AgentConfig {
    /// Unix stream socket the CNI plugin sends pod events to.
    #[arg(long, env = "AMBIT_CNI_AGENT_SOCKET", default_value = DEFAULT_AGENT_SOCKET)]
    pub plugin_socket: PathBuf,

    /// Unix SOCK_SEQPACKET socket ztunnel connects to (the zds protocol).
    #[arg(long, env = "AMBIT_ZDS_SOCKET", default_value = DEFAULT_ZDS_SOCKET)]
    pub zds_socket: PathBuf,

    /// File the enrolled pods are saved to, so a restarted agent still knows them
    /// and re-sends them to ztunnel (one file per agent; an unreadable or corrupt
    /// file stops the agent from starting).
    #[arg(long, env = "AMBIT_CNI_STATE_FILE", default_value = DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,

    /// Packet mark ztunnel sets on its own sockets (never redirected).
    #[arg(long, env = "AMBIT_PROXY_MARK", default_value_t = Mark(0x539))]
    pub proxy_mark: Mark,

    /// Connection mark that routes replies back to ztunnel's transparent sockets.
    #[arg(long, env = "AMBIT_CONN_MARK", default_value_t = Mark(0x111))]
    pub conn_mark: Mark,

    /// Bits of the packet mark the redirection owns.
    #[arg(long, env = "AMBIT_MARK_MASK", default_value_t = Mark(0xfff))]
    pub mark_mask: Mark,

    /// Routing table (inside each pod) for replies to ztunnel.
    #[arg(long, env = "AMBIT_ROUTE_TABLE", default_value_t = 100)]
    pub route_table: u32,

    /// Priority of the `ip rule` selecting that table.
    #[arg(long, env = "AMBIT_RULE_PRIORITY", default_value_t = 32764)]
    pub rule_priority: u32,

    /// The iptables-restore program run inside pod namespaces.
    #[arg(
        long,
        env = "AMBIT_IPTABLES_RESTORE",
        default_value = "iptables-restore"
    )]
    pub iptables_restore: PathBuf,

    /// The iptables-save program run inside pod namespaces.
    #[arg(long, env = "AMBIT_IPTABLES_SAVE", default_value = "iptables-save")]
    pub iptables_save: PathBuf,

    /// The iproute2 `ip` program run inside pod namespaces.
    #[arg(long, env = "AMBIT_IP", default_value = "ip")]
    pub ip: PathBuf,

    /// How long one run of iptables-restore, iptables-save or ip may take before
    /// it is killed and the plugin request fails (ms).
    #[arg(long, env = "AMBIT_TOOL_TIMEOUT_MS", default_value_t = 10_000)]
    pub tool_timeout_ms: u64,

    /// How long ztunnel has to ack a message before its connection is dropped (ms).
    #[arg(long, env = "AMBIT_ZDS_ACK_TIMEOUT_MS", default_value_t = 5000)]
    pub ack_timeout_ms: u64,

    /// First delay before a pod ztunnel refused is offered to it again (ms); it
    /// doubles with each refusal, up to 60 s.
    #[arg(long, env = "AMBIT_ZDS_RETRY_MS", default_value_t = 1000)]
    pub zds_retry_ms: u64,

    /// How long a new ztunnel connection has to say hello (ms).
    #[arg(long, env = "AMBIT_ZDS_HELLO_TIMEOUT_MS", default_value_t = 5000)]
    pub hello_timeout_ms: u64,

    /// How long a plugin has to send its request, and to take the reply (ms).
    #[arg(long, env = "AMBIT_PLUGIN_IO_TIMEOUT_MS", default_value_t = 5000)]
    pub plugin_io_timeout_ms: u64,

    /// Plugin connections served at once; more wait to be accepted.
    #[arg(long, env = "AMBIT_MAX_PLUGIN_CONNECTIONS", default_value_t = 32)]
    pub max_plugin_connections: usize,
}

impl AgentConfig {
    /// The defaults, with the two sockets and the state file at the given paths
    /// (tests, embedding).
    pub fn new(
        plugin_socket: impl Into<PathBuf>,
        zds_socket: impl Into<PathBuf>,
        state_file: impl Into<PathBuf>,
    ) -> Self {
        let d = RedirectConfig::default();
        let t = RedirectTools::default();
        Self {
            plugin_socket: plugin_socket.into(),
            zds_socket: zds_socket.into(),
            state_file: state_file.into(),
            proxy_mark: d.proxy_mark,
            conn_mark: d.conn_mark,
            mark_mask: d.mark_mask,
            route_table: d.route_table,
            rule_priority: d.rule_priority,
            iptables_restore: t.iptables_restore,
            iptables_save: t.iptables_save,
            ip: t.ip,
            tool_timeout_ms: t.timeout.as_millis().try_into().unwrap_or(u64::MAX),
            ack_timeout_ms: 5000,
            zds_retry_ms: 1000,
            hello_timeout_ms: 5000,
            plugin_io_timeout_ms: 5000,
            max_plugin_connections: 32,
        }
    }

    pub fn redirect(&self) -> RedirectConfig {
        RedirectConfig {
            proxy_mark: self.proxy_mark,
            conn_mark: self.conn_mark,
            mark_mask: self.mark_mask,
            route_table: self.route_table,
            rule_priority: self.rule_priority,
            ..RedirectConfig::default()
        }
    }

    pub fn tools(&self) -> RedirectTools {
        RedirectTools {
            iptables_restore: self.iptables_restore.clone(),
            iptables_save: self.iptables_save.clone(),
            ip: self.ip.clone(),
            timeout: Duration::from_millis(self.tool_timeout_ms),
        }
    }

    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }

    pub fn zds_retry(&self) -> Duration {
        Duration::from_millis(self.zds_retry_ms)
    }

    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.hello_timeout_ms)
    }

    pub fn plugin_io_timeout(&self) -> Duration {
        Duration::from_millis(self.plugin_io_timeout_ms)
    }

    /// Refuses settings that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            (self.ack_timeout_ms == 0, "--ack-timeout-ms must be over 0"),
            (self.zds_retry_ms == 0, "--zds-retry-ms must be over 0"),
            (
                self.tool_timeout_ms == 0,
                "--tool-timeout-ms must be over 0",
            ),
            (
                self.hello_timeout_ms == 0,
                "--hello-timeout-ms must be over 0",
            ),
            (
                self.plugin_io_timeout_ms == 0,
                "--plugin-io-timeout-ms must be over 0",
            ),
            (
                self.max_plugin_connections == 0,
                "--max-plugin-connections must be over 0",
            ),
            (self.mark_mask.0 == 0, "--mark-mask must not be 0"),
            // A mark of 0 under the mask is every unmarked packet: ztunnel's own
            // (proxy mark) would be all traffic, never redirected; the conn
            // mark's rule would route all of it to the local table.
            (
                self.proxy_mark.0 & self.mark_mask.0 == 0,
                "--proxy-mark must not be 0 under --mark-mask",
            ),
            (
                self.conn_mark.0 & self.mark_mask.0 == 0,
                "--conn-mark must not be 0 under --mark-mask",
            ),
            (
                RESERVED_TABLES.contains(&self.route_table),
                "--route-table must not be 0, 253, 254 or 255 (unspec, default, main, local)",
            ),
            (
                self.proxy_mark.0 & self.mark_mask.0 == self.conn_mark.0 & self.mark_mask.0,
                "--proxy-mark and --conn-mark must differ under --mark-mask",
            ),
            (
                self.plugin_socket == self.zds_socket,
                "--plugin-socket and --zds-socket must differ",
            ),
            (
                self.state_file.as_os_str().is_empty(),
                "--state-file must not be empty",
            ),
            (
                self.state_file == self.plugin_socket || self.state_file == self.zds_socket,
                "--state-file must differ from both sockets",
            ),
        ];
        match checks.into_iter().find(|(bad, _)| *bad) {
            Some((_, msg)) => Err(msg.to_owned()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentConfig,
    }

    #[test]
    fn flag_defaults_match_the_programmatic_defaults() {
        let parsed = Cli::parse_from(["agent"]).agent;
        let built = AgentConfig::new(DEFAULT_AGENT_SOCKET, DEFAULT_ZDS_SOCKET, DEFAULT_STATE_FILE);
        assert_eq!(format!("{parsed:?}"), format!("{built:?}"));
        // Persistence is on by default: a restarted agent must not forget its pods.
        assert_eq!(parsed.state_file, PathBuf::from(DEFAULT_STATE_FILE));
        assert_eq!(built.redirect(), RedirectConfig::default());
        assert_eq!(built.tools(), RedirectTools::default());
        assert!(built.validate().is_ok());
    }

    #[test]
    fn flags_override_and_bad_settings_are_named() {
        let cfg = Cli::parse_from([
            "agent",
            "--proxy-mark",
            "0x42",
            "--zds-socket",
            "/tmp/z.sock",
        ])
        .agent;
        assert_eq!(cfg.redirect().proxy_mark, Mark(0x42));
        assert_eq!(cfg.zds_socket, PathBuf::from("/tmp/z.sock"));
        let mut bad = cfg.clone();
        bad.conn_mark = Mark(0x42);
        assert!(bad.validate().unwrap_err().contains("--conn-mark"));
        let mut bad = cfg.clone();
        bad.state_file = cfg.zds_socket.clone();
        assert!(bad.validate().unwrap_err().contains("--state-file"));
        let mut bad = cfg.clone();
        bad.zds_retry_ms = 0;
        assert!(bad.validate().unwrap_err().contains("--zds-retry-ms"));
        for table in [0, 253, 254, 255] {
            let mut bad = cfg.clone();
            bad.route_table = table;
            let err = bad.validate().unwrap_err();
            assert!(err.contains("--route-table"), "{table}: {err}");
        }
        let mut good = cfg.clone();
        good.route_table = 252;
        assert!(good.validate().is_ok());
        for (mark, flag) in [(Mark(0), "--proxy-mark"), (Mark(0x1000), "--proxy-mark")] {
            let mut bad = cfg.clone();
            bad.proxy_mark = mark;
            assert!(bad.validate().unwrap_err().contains(flag), "{mark}");
        }
        for mark in [Mark(0), Mark(0x7000)] {
            let mut bad = cfg.clone();
            bad.conn_mark = mark;
            assert!(
                bad.validate().unwrap_err().contains("--conn-mark"),
                "{mark}"
            );
        }
        assert!(Cli::try_parse_from(["agent", "--proxy-mark", "zz"]).is_err());
    }
}
