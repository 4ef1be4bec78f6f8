//! The data plane's delta xDS client: one bidirectional `DeltaAggregatedResources`
//! stream to the control plane, a wildcard subscription per resource type, every
//! response ACKed or NACKed, and reconnects that resume from the versions held.
//!
//! What the resources mean is the caller's business: a [`Handler`] receives each
//! response's raw resources and says which it refused.

mod client;
mod status;
#[cfg(feature = "testing")]
pub mod testing;

use std::sync::Arc;

use bytes::Bytes;

pub use crate::backoff::{Backoff, BackoffConfig};
pub use ambit_proto::envoy::config::core::v3::Node;
pub use client::{XdsClient, XdsError};
pub use status::{Nack, TypeStatus, XdsSnapshot, XdsStatus};

/// Ends the `system_version_info` of a response of a type's first sync that
/// more responses of the type follow (a server splits a large first sync into
/// responses of bounded size). A type is synced at its first response without
/// it, so a server that never splits needs to send nothing special.
pub const MORE_TO_COME: &str = " partial";

/// The largest message either end of the stream takes: a response, or a
/// reconnecting client's request listing every version it holds.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// One resource of a response, still encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    pub name: String,
    pub version: String,
    /// The protobuf encoding of the resource (the `Any`'s value).
    pub body: Bytes,
}

/// A resource refused by a handler: its name and why.
pub type Refusal = (String, String);

/// Applies the resources of each response.
pub trait Handler: Send + Sync + 'static {
    /// Called once per response of `type_url`: `updated` resources are new or
    /// changed, `removed` names are gone. A partial apply is allowed: apply what
    /// can be applied, keep the last good version of the rest, and return the
    /// refused names with the reason; the response is then NACKed naming them.
    fn apply(
        &self,
        type_url: &str,
        updated: Vec<Resource>,
        removed: Vec<String>,
    ) -> Result<(), Vec<Refusal>>;

    /// Whether the handler, having refused `name` (so the response is NACKed
    /// naming it), still keeps it to apply later (held back until what it
    /// claims is free). Its version then counts as held: a reconnect claims it,
    /// so the server sends its removal if it went meanwhile. Asked right after
    /// `apply`, for each refused resource.
    fn holds_back(&self, type_url: &str, name: &str) -> bool {
        let _ = (type_url, name);
        false
    }
}

impl<T: Handler> Handler for Arc<T> {
    fn apply(
        &self,
        type_url: &str,
        updated: Vec<Resource>,
        removed: Vec<String>,
    ) -> Result<(), Vec<Refusal>> {
        self.as_ref().apply(type_url, updated, removed)
    }

    fn holds_back(&self, type_url: &str, name: &str) -> bool {
        self.as_ref().holds_back(type_url, name)
    }
}
