//! The delta xDS server (Envoy's `DeltaAggregatedResources`): the resources the
//! translator produced, versioned, pushed to subscribed clients after a debounce,
//! with ACK/NACK tracked per client and type.
//!
//! Flow: [`ResourceStore::apply`] records what changed; the debouncer turns quiet
//! periods into one [`ChangeBatch`]; the batch is handed to every connected client
//! (one task per stream, each with a coalescing pending set) which builds its own
//! responses from the current store contents when its stream has room.

mod budget;
mod client;
mod debounce;
mod debug;
mod entries;
mod metrics;
mod serve;
mod server;
mod session;
mod settings;
mod store;
mod walk;

#[cfg(test)]
mod order_tests;
#[cfg(test)]
mod session_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod walk_tests;

pub use debug::{
    AckDebug, ClientDebug, ClientResourcesDebug, HeldDebug, NackDebug, TypeDebug, XdsDebug,
};
pub use metrics::{TypeLabel, XdsMetrics};
pub use serve::{ServeError, ServerIo, serve};
pub use server::{AdsService, XdsServer};
pub use settings::{SettingsError, XdsSettings};
pub use store::{ChangeBatch, ResourceStore, Version, format_version, parse_version, version_of};

/// The resource types this server serves; a request for another is refused, so a
/// client cannot make the server keep state for types that do not exist.
pub(crate) const SERVED_TYPES: [&str; 3] = [
    ambit_proto::WORKLOAD_TYPE_URL,
    ambit_proto::SERVICE_TYPE_URL,
    ambit_proto::AUTHORIZATION_TYPE_URL,
];

/// One resource the translator (re)computed, or removed.
#[derive(Clone, Debug, PartialEq)]
pub struct ResourceUpdate {
    /// One of `ambit_proto::*_TYPE_URL`.
    pub type_url: &'static str,
    /// The xDS resource name (workload uid, `<ns>/<hostname>`, `<ns>/<policy>`).
    pub name: String,
    /// The encoded resource; `None` removes it.
    pub body: Option<bytes::Bytes>,
}
