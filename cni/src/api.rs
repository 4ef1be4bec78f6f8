//! The plugin <-> node agent protocol: over a Unix stream socket, one JSON request
//! per connection (the plugin writes it and shuts its write side), one JSON reply
//! (the agent writes it and closes). Both sides refuse messages over
//! [`MAX_MESSAGE`] bytes.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest request or reply either side accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Default path of the agent's plugin socket.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/ambit/cni-agent.sock";

/// A pod as the plugin hands it to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    /// The pod's UID (`K8S_POD_UID`, else the container id): the key of the pod.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The runtime's container (sandbox) id: a DEL must name it to remove the pod.
    pub container_id: String,
    /// Path of the pod's network namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    /// The pod's addresses, from the previous plugin's result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// What the plugin asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum AgentRequest {
    /// Enroll a pod: redirect its traffic and hand it to ztunnel.
    Add { pod: Pod },
    /// Un-enroll a pod. Unknown pods are fine; `netns`, when given, lets the agent
    /// clean rules left in a namespace it no longer knows (e.g. after a restart).
    /// `container_id` (the sandbox, `CNI_CONTAINERID`) and `netns`, when given,
    /// must match the enrolled sandbox: a late DEL of a sandbox the pod's newer
    /// one replaced is a DEL of something unknown, and leaves the pod alone.
    Del {
        uid: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        container_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<PathBuf>,
    },
    /// Is the pod enrolled and its redirection in place?
    Check { uid: String },
    /// Every enrolled pod (for operators and tests).
    List,
}

/// Why a request failed, so the plugin can choose a CNI error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FailureKind {
    /// The request could not be read or made no sense.
    BadRequest,
    /// The pod is not enrolled.
    UnknownPod,
    /// The pod's network namespace could not be used.
    Netns,
    /// Installing or verifying the redirection failed.
    Rules,
    /// ztunnel refused the pod; retrying later may help.
    Ztunnel,
    /// Anything else inside the agent.
    Internal,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "camelCase")]
pub enum AgentReply {
    Ok {
        /// A note for logs, e.g. that ztunnel is not connected yet.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
        /// The pods, for [`AgentRequest::List`].
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pods: Vec<Pod>,
    },
    Failed {
        kind: FailureKind,
        message: String,
    },
}

impl AgentReply {
    pub fn ok() -> Self {
        Self::Ok {
            detail: None,
            pods: Vec::new(),
        }
    }

    pub fn ok_with(detail: impl Into<String>) -> Self {
        Self::Ok {
            detail: Some(detail.into()),
            pods: Vec::new(),
        }
    }

    pub fn failed(kind: FailureKind, message: impl Into<String>) -> Self {
        Self::Failed {
            kind,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Pod {
        Pod {
            uid: "u-1".into(),
            name: "web-0".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            container_id: "c0ffee".into(),
            netns: "/run/netns/p1".into(),
            ips: vec![
                "198.18.0.5".parse().unwrap(),
                "2001:db8::5".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn requests_round_trip_with_their_op_tag() {
        for req in [
            AgentRequest::Add { pod: pod() },
            AgentRequest::Del {
                uid: "u-1".into(),
                container_id: None,
                netns: None,
            },
            AgentRequest::Del {
                uid: "u-1".into(),
                container_id: Some("c0ffee".into()),
                netns: Some("/run/netns/p1".into()),
            },
            AgentRequest::Check { uid: "u-1".into() },
            AgentRequest::List,
        ] {
            let text = serde_json::to_string(&req).unwrap();
            assert_eq!(serde_json::from_str::<AgentRequest>(&text).unwrap(), req);
        }
        let add = serde_json::to_value(AgentRequest::Add { pod: pod() }).unwrap();
        assert_eq!(add["op"], "add");
        assert_eq!(add["pod"]["serviceAccount"], "web");
        assert_eq!(add["pod"]["ips"][0], "198.18.0.5");
    }

    #[test]
    fn replies_round_trip_and_unknown_ops_are_refused() {
        for reply in [
            AgentReply::ok(),
            AgentReply::ok_with("queued"),
            AgentReply::failed(FailureKind::UnknownPod, "no such pod"),
        ] {
            let text = serde_json::to_string(&reply).unwrap();
            assert_eq!(serde_json::from_str::<AgentReply>(&text).unwrap(), reply);
        }
        assert_eq!(
            serde_json::to_string(&AgentReply::ok()).unwrap(),
            r#"{"status":"ok"}"#
        );
        assert!(serde_json::from_str::<AgentRequest>(r#"{"op":"explode"}"#).is_err());
        // A DEL from an older plugin, without the sandbox id, still decodes.
        assert_eq!(
            serde_json::from_str::<AgentRequest>(r#"{"op":"del","uid":"u-1"}"#).unwrap(),
            AgentRequest::Del {
                uid: "u-1".into(),
                container_id: None,
                netns: None
            }
        );
    }
}
