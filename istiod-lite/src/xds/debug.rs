//! The xDS server's debug view: who is connected, what each client subscribes to,
//! holds, has pending, and its last ACK and NACK. Serializable for the admin page.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::auth::Caller;

/// Milliseconds since the Unix epoch (0 for a clock before it).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The whole server.
#[derive(Clone, Debug, Serialize)]
pub struct XdsDebug {
    /// The store generation (`system_version_info` of the next response).
    pub generation: u64,
    /// The newest generation the debouncer released: clients are pushed up to it.
    pub released: u64,
    /// Response bytes that may be unanswered across all clients, and how many of
    /// them are free now.
    pub push_budget_bytes: usize,
    pub push_budget_available: usize,
    /// Resource count per type URL.
    pub resources: BTreeMap<String, usize>,
    pub clients: Vec<ClientDebug>,
}

/// One connected client.
#[derive(Clone, Debug, Serialize)]
pub struct ClientDebug {
    /// Unique per stream for the life of the server.
    pub id: u64,
    /// `node.id` of the client's first request: the node of its credential
    /// (`caller.node`), as a request naming another node ends the stream.
    pub node: Option<String>,
    /// Who the bearer token says it is.
    pub caller: Caller,
    pub peer: Option<String>,
    pub connected_since_unix_ms: u64,
    pub types: Vec<TypeDebug>,
}

/// One client's state for one type URL.
#[derive(Clone, Debug, Serialize)]
pub struct TypeDebug {
    pub type_url: String,
    pub wildcard: bool,
    /// Named subscriptions.
    pub subscribed: Vec<String>,
    /// Resources the client holds.
    pub held: usize,
    /// Of those, how many it acknowledged at the version last sent.
    pub acked: usize,
    pub responses_sent: u64,
    pub resources_sent: u64,
    /// Changed names waiting to be sent (coalesced).
    pub pending: usize,
    /// Responses sent and not yet acknowledged.
    pub in_flight: usize,
    pub acks: u64,
    pub nacks: u64,
    pub last_ack: Option<AckDebug>,
    pub last_nack: Option<NackDebug>,
}

/// An acknowledged response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AckDebug {
    pub nonce: String,
    pub at_unix_ms: u64,
}

/// A refused response: what the client said and what it refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NackDebug {
    pub nonce: String,
    pub at_unix_ms: u64,
    /// `error_detail.code` (a gRPC status code).
    pub code: i32,
    pub message: String,
    /// Names the refused response carried (empty if it is no longer remembered).
    pub resources: Vec<String>,
}

/// Every resource one client holds.
#[derive(Clone, Debug, Serialize)]
pub struct ClientResourcesDebug {
    pub id: u64,
    pub node: Option<String>,
    /// Type URL -> name -> versions.
    pub types: BTreeMap<String, BTreeMap<String, HeldDebug>>,
}

/// The versions of one resource a client holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeldDebug {
    /// Last sent (or claimed on reconnect); `None` if the claim was not ours.
    pub sent: Option<String>,
    pub acked: Option<String>,
}
