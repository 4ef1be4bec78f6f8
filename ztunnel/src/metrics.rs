//! ztunnel's Prometheus metrics, Istio names where one exists, served as text on
//! 15020: TCP connections and bytes by source and destination, refusals by reason,
//! open connections, certificates and their expiry, process CPU and memory.

use std::sync::Arc;
use std::time::SystemTime;

use mesh_core::CertStore;
use mesh_core::hbone::ServerStats;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// Who talked to whom, as Istio labels its TCP metrics.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// `source` on the client's ztunnel, `destination` on the server's.
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

/// Every metric ztunnel exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub sent_bytes: Family<ConnLabels, Counter>,
    pub received_bytes: Family<ConnLabels, Counter>,
    pub denied: Family<ReasonLabels, Counter>,
    pub open_connections: Family<DirectionLabels, Gauge>,
}

impl Metrics {
    pub fn new(certs: Arc<CertStore>) -> Self {
        let mut registry = Registry::default();
        let m = Self {
            opened: Family::default(),
            closed: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            denied: Family::default(),
            open_connections: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes the destination sent back to the source (the response, as Istio counts them)",
            m.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes the source sent to the destination (the request, as Istio counts them)",
            m.received_bytes.clone(),
        );
        registry.register(
            "ambit_connections_denied",
            "Connections refused, by reason",
            m.denied.clone(),
        );
        registry.register(
            "ambit_open_connections",
            "Connections open now, by direction",
            m.open_connections.clone(),
        );
        registry.register_collector(Box::new(mesh_core::metrics::ProcessCollector));
        registry.register_collector(Box::new(CertCollector { certs }));
        Self { registry, ..m }
    }

    /// Every metric in the Prometheus text format (0.0.4), what Prometheus, promtool
    /// and Istio's dashboards read.
    pub fn encode(&self) -> String {
        mesh_core::metrics::encode(&self.registry)
    }

    pub fn deny(&self, reason: &str) {
        self.denied
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts the refusals a pod's HBONE server decides before ztunnel's handler
    /// sees a CONNECT (TLS, HTTP/2, a malformed CONNECT, draining) in
    /// `ambit_connections_denied_total`, by `RefusalKind::as_str`: a fixed set of
    /// values, none of them one of ztunnel's own (`why::reason`).
    pub fn count_server_refusals(&self, stats: &ServerStats) {
        let denied = self.denied.clone();
        stats.on_refusal(Box::new(move |kind| {
            denied
                .get_or_create(&ReasonLabels {
                    reason: kind.as_str().to_string(),
                })
                .inc();
        }));
    }
}

/// Certificates held and when each expires.
#[derive(Debug)]
struct CertCollector {
    certs: Arc<CertStore>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

impl prometheus_client::collector::Collector for CertCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let certs = self.certs.all();
        let count = ConstGauge::new(certs.len() as i64);
        count.encode(encoder.encode_descriptor(
            "ambit_certificates",
            "Workload certificates held",
            None,
            count.metric_type(),
        )?)?;
        let mut expiry = encoder.encode_descriptor(
            "ambit_certificate_expiry_seconds",
            "When each certificate expires, seconds since the Unix epoch",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for c in certs {
            let secs = c
                .not_after()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let labels = IdentityLabels {
                identity: c.identity().to_string(),
            };
            ConstGauge::new(secs).encode(expiry.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_istio_names_process_and_certificates() {
        let ca = mesh_core::testing::TestCa::new();
        let id = mesh_core::testing::spiffe("shop", "cart");
        let m = Metrics::new(ca.store_for(&[&id]));
        let labels = ConnLabels {
            reporter: "destination",
            source_workload: "frontend".into(),
            ..Default::default()
        };
        m.opened.get_or_create(&labels).inc();
        m.sent_bytes.get_or_create(&labels).inc_by(42);
        m.deny("policy");
        let text = m.encode();
        assert!(text.contains("istio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"frontend\""), "{text}");
        assert!(text.contains("} 42"), "{text}");
        assert!(
            text.contains("ambit_connections_denied_total{reason=\"policy\"} 1"),
            "{text}"
        );
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(text.contains("ambit_certificates 1"), "{text}");
        assert!(text.contains("ambit_certificate_expiry_seconds{identity=\"spiffe://cluster.local/ns/shop/sa/cart\"}"), "{text}");
        assert!(
            text.contains("# TYPE istio_tcp_connections_opened_total counter"),
            "{text}"
        );
        assert!(text.contains("# TYPE ambit_certificates gauge"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }
}
