//! Pods of the test cluster: what a test asks for ([`PodSpec`]) and what it gets
//! back ([`Pod`]: its namespace and the address CNI gave it).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::cluster::ClusterError;
use crate::cni::CniResult;
use crate::netns::{netns_command, netns_path};

/// Longest pod name accepted (it ends up in namespace names and `CNI_CONTAINERID`).
const MAX_POD_NAME: usize = 40;

/// What a test asks for: a pod name (unique in the cluster), its node and its
/// Kubernetes namespace (passed to plugins in `CNI_ARGS`, default `default`).
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub(crate) name: String,
    pub(crate) node: u8,
    pub(crate) namespace: String,
    pub(crate) cni_args: Vec<(String, String)>,
    pub(crate) labels: Vec<(String, String)>,
}

impl PodSpec {
    pub fn new(name: impl Into<String>, node: u8) -> Self {
        Self {
            name: name.into(),
            node,
            namespace: "default".to_owned(),
            cni_args: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// A label on the pod object the control plane reads (`app=<name>` is implied).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// An extra `K=V` for `CNI_ARGS` (e.g. `K8S_POD_SERVICE_ACCOUNT`).
    pub fn cni_arg(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.cni_args.push((key.into(), value.into()));
        self
    }
}

/// A running pod: its namespace and the address CNI gave it.
#[derive(Debug, Clone)]
pub struct Pod {
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) node: u8,
    pub(crate) netns: String,
    pub(crate) container_id: String,
    pub(crate) ip: Ipv4Addr,
    pub(crate) cni_result: CniResult,
    pub(crate) cni_args: Vec<(String, String)>,
    pub(crate) labels: Vec<(String, String)>,
}

impl Pod {
    /// The labels asked for in the spec.
    pub fn labels(&self) -> &[(String, String)] {
        &self.labels
    }

    /// The value of an extra `CNI_ARGS` key the pod was created with.
    pub fn cni_arg(&self, key: &str) -> Option<&str> {
        self.cni_args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn node(&self) -> u8 {
        self.node
    }

    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The chain's final ADD result (what chained plugins got as `prevResult`).
    pub fn cni_result(&self) -> &CniResult {
        &self.cni_result
    }

    /// `ip netns exec <pod> <program>`, killed on drop.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        netns_command(&self.netns, program)
    }
}

impl PodSpec {
    /// Both names end up in namespace names, `CNI_CONTAINERID` and `CNI_ARGS`
    /// (`K=V;K=V`), so only DNS-label characters are accepted.
    pub(crate) fn validate(&self) -> Result<(), ClusterError> {
        check_name("pod name", &self.name)?;
        check_name("pod namespace", &self.namespace)
    }
}

fn check_name(what: &str, name: &str) -> Result<(), ClusterError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_POD_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ClusterError::Invalid(format!(
            "{what} {name:?} must be 1..={MAX_POD_NAME} of [a-z0-9-]"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_are_checked() {
        let valid = |name: &str| PodSpec::new(name, 1).validate().is_ok();
        assert!(valid("client-1"));
        assert!(!valid(""));
        assert!(!valid("Caps"));
        assert!(!valid("a/b"));
        assert!(!valid(&"x".repeat(MAX_POD_NAME + 1)));
        assert!(
            PodSpec::new("a", 1)
                .namespace("x;K8S_POD_NAME=b")
                .validate()
                .is_err()
        );
    }
}
