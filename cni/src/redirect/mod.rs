//! In-pod redirection: the iptables rules and policy routing the agent installs
//! inside a pod's network namespace so its TCP goes through ztunnel, and their
//! exact removal; IPv6, which the rules do not cover, is turned off there
//! ([`ipv6`]). [`rules`] renders and parses the text; [`Redirector`] runs the
//! tools inside the namespace.

mod apply;
pub mod ipv6;
pub mod rules;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use apply::{RedirectError, Redirector};

/// A packet or connection mark, shown and parsed in hex (`0x539`); decimal is
/// accepted too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark(pub u32);

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl FromStr for Mark {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        mesh_core::settings::parse_mark(s).map(Mark)
    }
}

/// What the rules say: marks, routing table and ztunnel's ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectConfig {
    /// The mark ztunnel sets on its own sockets: their packets are never redirected.
    pub proxy_mark: Mark,
    /// The connection mark that routes replies back to ztunnel's transparent sockets.
    pub conn_mark: Mark,
    /// The bits of the packet mark the rules own.
    pub mark_mask: Mark,
    /// Routing table holding the `local` route for marked replies.
    pub route_table: u32,
    /// Priority of the `ip rule` selecting that table.
    pub rule_priority: u32,
    /// ztunnel's outbound capture port.
    pub outbound_port: u16,
    /// ztunnel's inbound plaintext capture port.
    pub inbound_port: u16,
    /// ztunnel's inbound HBONE port (never redirected).
    pub hbone_port: u16,
}

impl Default for RedirectConfig {
    fn default() -> Self {
        Self {
            proxy_mark: Mark(0x539),
            conn_mark: Mark(0x111),
            mark_mask: Mark(0xfff),
            route_table: 100,
            rule_priority: 32764,
            outbound_port: 15001,
            inbound_port: 15006,
            hbone_port: 15008,
        }
    }
}

/// The programs run inside pod namespaces (Debian's `iptables` is iptables-nft;
/// either backend works in a pod's own namespace), and how long one run may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectTools {
    pub iptables_restore: PathBuf,
    pub iptables_save: PathBuf,
    pub ip: PathBuf,
    /// A tool still running after this is killed and its operation fails. Above
    /// the 5 s `iptables-restore -w` waits for the xtables lock.
    pub timeout: Duration,
}

impl Default for RedirectTools {
    fn default() -> Self {
        Self {
            iptables_restore: "iptables-restore".into(),
            iptables_save: "iptables-save".into(),
            ip: "ip".into(),
            timeout: Duration::from_secs(10),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_parse_hex_and_decimal_and_show_hex() {
        assert_eq!("0x539".parse::<Mark>().unwrap(), Mark(0x539));
        assert_eq!("1337".parse::<Mark>().unwrap(), Mark(0x539));
        assert_eq!(Mark(0x539).to_string(), "0x539");
        let err = "0xzz".parse::<Mark>().unwrap_err();
        assert!(err.contains("0xzz"), "{err}");
    }
}
