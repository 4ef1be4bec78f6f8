//! The zds messages (node agent <-> ztunnel, `ambit.zds.v1`): encoding what the
//! agent sends and decoding what ztunnel answers, refusing anything else. The
//! ztunnel-side helpers exist for tests that play ztunnel.

use ambit_proto::zds::{
    Ack, AddWorkload, DelWorkload, NodeAgentMessage, SnapshotSent, WorkloadInfo, ZdsHello,
    ZtunnelMessage, node_agent_message, ztunnel_message,
};
use prost::Message;

use crate::api::Pod;

/// The protocol version this agent speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// A zds message that could not be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ZdsError {
    #[error("undecodable zds message ({len} bytes): {reason}")]
    Decode { len: usize, reason: String },
    #[error("zds message without a payload")]
    Empty,
    #[error("unsupported zds protocol version {0} (this agent speaks {PROTOCOL_VERSION})")]
    Version(u32),
}

/// What ztunnel can say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZtunnelEvent {
    Hello {
        version: u32,
    },
    /// The answer to the last message; an empty `error` means done.
    Ack {
        error: String,
    },
}

/// `AddWorkload` for `pod` (its netns fd travels beside it).
pub fn encode_add(pod: &Pod) -> Vec<u8> {
    encode_agent(node_agent_message::Payload::Add(AddWorkload {
        uid: pod.uid.clone(),
        info: Some(WorkloadInfo {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
        }),
    }))
}

pub fn encode_del(uid: &str) -> Vec<u8> {
    encode_agent(node_agent_message::Payload::Del(DelWorkload {
        uid: uid.to_owned(),
    }))
}

pub fn encode_snapshot_sent() -> Vec<u8> {
    encode_agent(node_agent_message::Payload::SnapshotSent(SnapshotSent {}))
}

fn encode_agent(payload: node_agent_message::Payload) -> Vec<u8> {
    NodeAgentMessage {
        payload: Some(payload),
    }
    .encode_to_vec()
}

/// Decodes a message from ztunnel. A hello of another version is refused.
pub fn decode_ztunnel(bytes: &[u8]) -> Result<ZtunnelEvent, ZdsError> {
    let msg = ZtunnelMessage::decode(bytes).map_err(|e| ZdsError::Decode {
        len: bytes.len(),
        reason: e.to_string(),
    })?;
    match msg.payload.ok_or(ZdsError::Empty)? {
        ztunnel_message::Payload::Hello(ZdsHello { version }) if version == PROTOCOL_VERSION => {
            Ok(ZtunnelEvent::Hello { version })
        }
        ztunnel_message::Payload::Hello(ZdsHello { version }) => Err(ZdsError::Version(version)),
        ztunnel_message::Payload::Ack(Ack { error }) => Ok(ZtunnelEvent::Ack { error }),
    }
}

/// ztunnel side: the hello.
pub fn encode_hello(version: u32) -> Vec<u8> {
    ZtunnelMessage {
        payload: Some(ztunnel_message::Payload::Hello(ZdsHello { version })),
    }
    .encode_to_vec()
}

/// ztunnel side: an ack (`error` empty for success).
pub fn encode_ack(error: &str) -> Vec<u8> {
    ZtunnelMessage {
        payload: Some(ztunnel_message::Payload::Ack(Ack {
            error: error.to_owned(),
        })),
    }
    .encode_to_vec()
}

/// ztunnel side: decodes what the agent sent.
pub fn decode_node_agent(bytes: &[u8]) -> Result<node_agent_message::Payload, ZdsError> {
    NodeAgentMessage::decode(bytes)
        .map_err(|e| ZdsError::Decode {
            len: bytes.len(),
            reason: e.to_string(),
        })?
        .payload
        .ok_or(ZdsError::Empty)
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
            ips: vec![],
        }
    }

    #[test]
    fn agent_messages_decode_as_sent() {
        match decode_node_agent(&encode_add(&pod())).unwrap() {
            node_agent_message::Payload::Add(add) => {
                assert_eq!(add.uid, "u-1");
                let info = add.info.unwrap();
                assert_eq!(
                    (info.name.as_str(), info.namespace.as_str()),
                    ("web-0", "shop")
                );
                assert_eq!(info.service_account, "web");
            }
            other => panic!("expected add, got {other:?}"),
        }
        assert_eq!(
            decode_node_agent(&encode_del("u-1")).unwrap(),
            node_agent_message::Payload::Del(DelWorkload { uid: "u-1".into() })
        );
        assert_eq!(
            decode_node_agent(&encode_snapshot_sent()).unwrap(),
            node_agent_message::Payload::SnapshotSent(SnapshotSent {})
        );
    }

    #[test]
    fn ztunnel_messages_decode_and_bad_ones_are_refused() {
        assert_eq!(
            decode_ztunnel(&encode_hello(1)).unwrap(),
            ZtunnelEvent::Hello { version: 1 }
        );
        assert_eq!(
            decode_ztunnel(&encode_ack("")).unwrap(),
            ZtunnelEvent::Ack {
                error: String::new()
            }
        );
        assert_eq!(
            decode_ztunnel(&encode_ack("no room")).unwrap(),
            ZtunnelEvent::Ack {
                error: "no room".into()
            }
        );
        assert_eq!(decode_ztunnel(&encode_hello(2)), Err(ZdsError::Version(2)));
        // An empty packet is a message with no payload.
        assert_eq!(decode_ztunnel(&[]), Err(ZdsError::Empty));
        assert!(matches!(
            decode_ztunnel(b"\xff\xff\xff garbage"),
            Err(ZdsError::Decode { len: 11, .. })
        ));
    }
}
