//! A node of the test cluster: a namespace that plays the host (where CNI plugins and
//! node agents run), its underlay address and its pod subnet.

use std::net::Ipv4Addr;

use crate::netns::netns_command;
use crate::underlay::{node_underlay_ip, pod_bridge_name, pod_subnet_cidr};

/// A node: its namespace plays the host, where CNI plugins and node agents run.
#[derive(Debug, Clone)]
pub struct Node {
    pub(crate) index: u8,
    pub(crate) netns: String,
}

impl Node {
    pub fn index(&self) -> u8 {
        self.index
    }

    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// `198.19.0.<index>`, on the node's `eth0`.
    pub fn underlay_ip(&self) -> Ipv4Addr {
        node_underlay_ip(self.index)
    }

    /// `198.18.<index>.0/24`.
    pub fn pod_subnet(&self) -> String {
        pod_subnet_cidr(self.index)
    }

    /// The pod bridge `bridge` creates in the node (gateway `198.18.<index>.1`).
    pub fn bridge_name(&self) -> String {
        pod_bridge_name(self.index)
    }

    /// `ip netns exec <node> <program>`, killed on drop.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        netns_command(&self.netns, program)
    }
}
