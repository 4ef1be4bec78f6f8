//! What the xDS client reports about itself, for admin pages and readiness:
//! whether the stream is up, the last failure, and per resource type how many
//! resources are held and the last ACK and NACK.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

/// The last response of a type that was refused, in whole or in part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nack {
    pub at: SystemTime,
    pub nonce: String,
    /// The `error_detail` sent: every refused resource and why.
    pub message: String,
}

/// One resource type's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TypeStatus {
    /// Resources accepted and held now.
    pub resources: usize,
    /// Nonce and time of the last response accepted in full.
    pub last_ack: Option<(String, SystemTime)>,
    pub last_nack: Option<Nack>,
    /// Responses received on any stream.
    pub responses: u64,
}

/// A point-in-time view of the client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XdsSnapshot {
    /// `host:port` of the control plane.
    pub address: String,
    pub connected: bool,
    /// Why the last stream ended or failed to start.
    pub last_error: Option<String>,
    /// Consecutive failed attempts since the last stable stream.
    pub failures: u32,
    /// The delay chosen after the last failure.
    pub retry_in: Option<Duration>,
    /// Streams opened since start.
    pub streams: u64,
    /// True once every subscribed type has had a response.
    pub synced: bool,
    /// Keyed by type URL.
    pub types: BTreeMap<String, TypeStatus>,
}

/// The client's status, readable at any time and watchable for changes.
#[derive(Clone, Debug)]
pub struct XdsStatus {
    tx: Arc<watch::Sender<XdsSnapshot>>,
}

impl XdsStatus {
    pub(crate) fn new(address: String, types: &[&'static str]) -> Self {
        let snapshot = XdsSnapshot {
            address,
            types: types
                .iter()
                .map(|t| (t.to_string(), TypeStatus::default()))
                .collect(),
            ..XdsSnapshot::default()
        };
        Self {
            tx: Arc::new(watch::channel(snapshot).0),
        }
    }

    /// The current status.
    pub fn snapshot(&self) -> XdsSnapshot {
        self.tx.borrow().clone()
    }

    /// Resolves on each change (tests wait on it instead of sleeping).
    pub fn subscribe(&self) -> watch::Receiver<XdsSnapshot> {
        self.tx.subscribe()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut XdsSnapshot)) {
        self.tx.send_modify(f);
    }

    pub(crate) fn update_type(&self, type_url: &str, f: impl FnOnce(&mut TypeStatus)) {
        self.tx
            .send_modify(|s| f(s.types.entry(type_url.to_string()).or_default()));
    }
}
