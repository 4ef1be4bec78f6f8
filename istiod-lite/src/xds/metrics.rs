//! The xDS server's Prometheus metrics: pushes, push latency, connected clients,
//! NACKs, resources and bytes sent.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The resource type a sample is about.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub type_url: String,
}

/// Handles to the xDS metrics; cheap to clone (shared counters).
#[derive(Clone, Debug)]
pub struct XdsMetrics {
    /// `istiod_xds_pushes_total{type_url}`: responses sent because the store changed.
    pub pushes: Family<TypeLabel, Counter>,
    /// `istiod_xds_push_latency_seconds`: from a store change to the response
    /// carrying it handed to the client's stream.
    pub push_latency: Histogram,
    /// `istiod_xds_connected_clients`.
    pub connected_clients: Gauge,
    /// `istiod_xds_nacks_total{type_url}`.
    pub nacks: Family<TypeLabel, Counter>,
    /// `istiod_xds_resources_sent_total{type_url}`.
    pub resources_sent: Family<TypeLabel, Counter>,
    /// `istiod_xds_sent_bytes_total{type_url}`: resource bytes sent.
    pub bytes_sent: Family<TypeLabel, Counter>,
}

impl XdsMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::unregistered();
        registry.register(
            "istiod_xds_pushes",
            "xDS responses sent because resources changed",
            metrics.pushes.clone(),
        );
        registry.register(
            "istiod_xds_push_latency_seconds",
            "Time from a resource change to the response carrying it being sent",
            metrics.push_latency.clone(),
        );
        registry.register(
            "istiod_xds_connected_clients",
            "Connected delta xDS streams",
            metrics.connected_clients.clone(),
        );
        registry.register(
            "istiod_xds_nacks",
            "xDS responses refused by clients",
            metrics.nacks.clone(),
        );
        registry.register(
            "istiod_xds_resources_sent",
            "Resources sent in xDS responses",
            metrics.resources_sent.clone(),
        );
        registry.register(
            "istiod_xds_sent_bytes",
            "Resource bytes sent in xDS responses",
            metrics.bytes_sent.clone(),
        );
        metrics
    }

    /// Metrics that are not exported (tests, tools).
    pub fn unregistered() -> Self {
        Self {
            pushes: Family::default(),
            // 1 ms .. ~16 s.
            push_latency: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            connected_clients: Gauge::default(),
            nacks: Family::default(),
            resources_sent: Family::default(),
            bytes_sent: Family::default(),
        }
    }

    pub(crate) fn label(type_url: &str) -> TypeLabel {
        TypeLabel {
            type_url: type_url.to_string(),
        }
    }
}
