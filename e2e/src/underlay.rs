//! The cluster's address plan and its underlay: a bridge in a dedicated "wire"
//! namespace, one veth per node (`eth0` in the node, 198.19.0.N/24), and routes that
//! send node i's traffic for node j's pod subnet (198.18.j.0/24) to node j.
//! Everything lives inside namespaces the test created; the root namespace is untouched.

use std::net::Ipv4Addr;

use crate::netns::{Netns, NetnsError};

/// Nodes are numbered 1..=MAX_NODES: the number is the last octet of the underlay
/// address and the third octet of the pod subnet.
pub const MAX_NODES: u8 = 254;
/// Prefix length of the underlay network and of every pod subnet.
pub const PREFIX_LEN: u8 = 24;
/// The node's interface towards the wire.
pub const NODE_UPLINK: &str = "eth0";
/// The bridge inside the wire namespace.
pub const WIRE_BRIDGE: &str = "wire0";

/// Node `n`'s underlay address, 198.19.0.n.
pub fn node_underlay_ip(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, node)
}

/// Node `n`'s pod subnet network address, 198.18.n.0 (a /24).
pub fn pod_subnet(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, node, 0)
}

/// Node `n`'s pod subnet in CIDR form, `198.18.n.0/24`.
pub fn pod_subnet_cidr(node: u8) -> String {
    format!("{}/{PREFIX_LEN}", pod_subnet(node))
}

/// The name of node `n`'s pod bridge, inside the node namespace (so it needs no
/// test prefix to be unique).
pub fn pod_bridge_name(node: u8) -> String {
    format!("ambit-br{node}")
}

/// The wire namespace: an L2 segment joining the nodes.
#[derive(Debug)]
pub struct Wire {
    netns: Netns,
}

impl Wire {
    /// Creates the wire namespace and its bridge.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        let netns = Netns::create(name)?;
        netns.ip(["link", "add", WIRE_BRIDGE, "type", "bridge"])?;
        netns.ip(["link", "set", WIRE_BRIDGE, "up"])?;
        Ok(Self { netns })
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub(crate) fn netns_mut(&mut self) -> &mut Netns {
        &mut self.netns
    }

    /// Plugs node `index` into the wire: a veth pair created inside the wire
    /// namespace with its peer moved straight into the node, so it never shows up in
    /// the root namespace.
    pub fn attach(&self, node: &Netns, index: u8) -> Result<(), NetnsError> {
        let port = format!("n{index}");
        self.netns.ip([
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            NODE_UPLINK,
            "netns",
            node.name(),
        ])?;
        self.netns
            .ip(["link", "set", &port, "master", WIRE_BRIDGE, "up"])?;
        let addr = format!("{}/{PREFIX_LEN}", node_underlay_ip(index));
        node.ip(["addr", "add", &addr, "dev", NODE_UPLINK])?;
        node.ip(["link", "set", NODE_UPLINK, "up"])?;
        Ok(())
    }
}

/// In node `from`, routes node `to`'s pod subnet via `to`'s underlay address.
pub fn route_pod_subnet(from: &Netns, to: u8) -> Result<(), NetnsError> {
    let dst = pod_subnet_cidr(to);
    let via = node_underlay_ip(to).to_string();
    from.ip(["route", "add", &dst, "via", &via, "dev", NODE_UPLINK])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_plan_stays_in_the_benchmarking_range() {
        let bench: u32 = u32::from(Ipv4Addr::new(198, 18, 0, 0));
        let in_range = |ip: Ipv4Addr| u32::from(ip) & 0xfffe_0000 == bench;
        for n in [1, 2, MAX_NODES] {
            assert!(in_range(node_underlay_ip(n)));
            assert!(in_range(pod_subnet(n)));
        }
        assert_eq!(pod_subnet_cidr(3), "198.18.3.0/24");
        assert!(pod_bridge_name(MAX_NODES).len() <= 15);
    }
}
