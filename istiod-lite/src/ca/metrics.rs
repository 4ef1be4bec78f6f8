//! The CA's Prometheus metrics: certificates signed, and requests refused by reason.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Why a request was refused (`unauthenticated`, `csr_bad_signature`,
/// `not_on_node`...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Handles to the CA metrics; cheap to clone (shared counters).
#[derive(Clone, Debug, Default)]
pub struct CaMetrics {
    /// `istiod_ca_certificates_signed_total`.
    pub signed: Counter,
    /// `istiod_ca_certificates_refused_total{reason}`.
    pub refused: Family<ReasonLabel, Counter>,
}

impl CaMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "istiod_ca_certificates_signed",
            "Workload certificates signed by the CA",
            metrics.signed.clone(),
        );
        registry.register(
            "istiod_ca_certificates_refused",
            "Certificate requests refused by the CA, by reason",
            metrics.refused.clone(),
        );
        metrics
    }

    /// Counts one refusal.
    pub fn count_refusal(&self, reason: &str) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// How many requests were refused for `reason` so far.
    pub fn refused_count(&self, reason: &str) -> u64 {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .get()
    }
}
