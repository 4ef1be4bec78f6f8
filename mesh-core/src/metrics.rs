//! Metrics every Ambit process shares: process CPU and memory read from /proc,
//! and the Prometheus text exposition (0.0.4) that Prometheus, promtool and
//! Istio's dashboards read.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Every metric of `registry` in the Prometheus text format (0.0.4).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    openmetrics_to_prometheus(&out)
}

/// prometheus-client writes OpenMetrics, where a counter family `x` has samples
/// `x_total` and the text ends with `# EOF`. The Prometheus text format names the
/// family after its samples: rename counter families and drop the EOF marker.
pub fn openmetrics_to_prometheus(text: &str) -> String {
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
pub struct ProcessCollector;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_metrics_in_prometheus_text() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let counter = prometheus_client::metrics::counter::Counter::<u64>::default();
        registry.register("things", "Things", counter.clone());
        counter.inc();
        let text = encode(&registry);
        assert!(text.contains("# TYPE things_total counter"), "{text}");
        assert!(text.contains("things_total 1"), "{text}");
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        let (cpu, rss) = process_usage().unwrap();
        assert!(cpu >= 0.0 && rss > 1024 * 1024);
    }
}
