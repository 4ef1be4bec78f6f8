//! ztunnel's Prometheus metrics, Istio names where one exists, served as text on
//! 15020: TCP connections and bytes by source and destination, refusals by reason,
//! open connections, certificates and their expiry, process CPU and memory.

use std::sync::Arc;
use std::time::SystemTime;

use mesh_core::CertStore;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
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
            "Bytes sent by the source to the destination",
            m.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes the source received from the destination",
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
        registry.register_collector(Box::new(ProcessCollector));
        registry.register_collector(Box::new(CertCollector { certs }));
        Self { registry, ..m }
    }

    /// Every metric in the Prometheus text format (0.0.4), what Prometheus, promtool
    /// and Istio's dashboards read.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        openmetrics_to_prometheus(&out)
    }

    pub fn deny(&self, reason: &str) {
        self.denied
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }
}

/// prometheus-client writes OpenMetrics, where a counter family `x` has samples
/// `x_total` and the text ends with `# EOF`. The Prometheus text format names the
/// family after its samples: rename counter families and drop the EOF marker.
fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Process CPU seconds and resident memory, read from /proc at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        if let Some((cpu, rss)) = process_usage() {
            let cpu = ConstCounter::new(cpu);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, seconds",
                None,
                cpu.metric_type(),
            )?)?;
            let rss = ConstGauge::new(rss as i64);
            rss.encode(encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size, bytes",
                None,
                rss.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// (CPU seconds, resident bytes) of this process.
pub fn process_usage() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let rss_pages: u64 = fields.get(21)?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()??
        .max(1) as f64;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()??
        .max(1) as u64;
    Some(((utime + stime) / ticks, rss_pages * page))
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
        let (cpu, rss) = process_usage().unwrap();
        assert!(cpu >= 0.0 && rss > 1024 * 1024);
    }
}
