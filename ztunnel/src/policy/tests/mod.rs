//! Unit tests for the policy module, with small builders shared by the files.
//!
//! Policies in tests are mostly written in YAML, the form a user writes, so the
//! tables double as examples of the Istio-like syntax.

mod convert;
mod decision;
mod eval;
mod props;
mod serde_forms;
mod set;

use std::collections::BTreeMap;
use std::net::IpAddr;

use mesh_core::SpiffeId;

use super::{Authorization, Connection, Destination, PolicySet};

/// Parses one policy written in YAML and checks it as a loader would.
fn yaml(policy: &str) -> Authorization {
    let parsed: Authorization = serde_yaml_ng::from_str(policy)
        .unwrap_or_else(|e| panic!("bad test policy: {e}\n{policy}"));
    parsed.validate().expect("test policy validates");
    parsed
}

/// A set holding `policies`, with the default root namespace.
fn set_of(policies: &[&str]) -> PolicySet {
    let mut set = PolicySet::default();
    for p in policies {
        set.insert(yaml(p));
    }
    set
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    mesh_core::testing::spiffe(ns, sa)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn conn<'a>(src: Option<&'a SpiffeId>, src_ip: &str, dst_ip: &str, port: u16) -> Connection<'a> {
    Connection {
        src_identity: src,
        src_ip: ip(src_ip),
        dst_ip: ip(dst_ip),
        dst_port: port,
    }
}

fn dst<'a>(namespace: &'a str, labels: &'a BTreeMap<String, String>) -> Destination<'a> {
    Destination { namespace, labels }
}
