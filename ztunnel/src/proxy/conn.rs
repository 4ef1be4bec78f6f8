//! One proxied connection's bookkeeping: metrics at open and close, byte counts
//! while it runs (the admin view lists live connections, and each scrape of the
//! metrics takes in the bytes live connections moved since the last), and one
//! access-log event when it ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mesh_core::copy::CopyStats;
use serde::Serialize;

use crate::metrics::{ConnLabels, DirectionLabels, Metrics};

/// The connections open now, for the admin config dump.
#[derive(Debug, Default)]
pub struct ConnTable {
    next: AtomicU64,
    live: Mutex<HashMap<u64, LiveConn>>,
}

#[derive(Clone, Debug)]
struct LiveConn {
    /// Shared with the connection's guard: no copy of the labels per connection.
    info: Arc<ConnInfo>,
    bytes: Arc<ByteCounts>,
    started: u64,
}

/// A connection's byte counts, and how much of them the metrics have.
#[derive(Debug, Default)]
struct ByteCounts {
    copied: CopyStats,
    // Request and response bytes already in the counters. Raised with `fetch_max`,
    // so a scrape and the close racing each add only what they raised it by.
    reported: [AtomicU64; 2],
}

impl ByteCounts {
    /// Adds what moved since the last report to the byte counters. Istio's meaning,
    /// which its dashboards assume: "received" is what the source sent (the
    /// request), "sent" what came back (the response).
    fn report(&self, metrics: &Metrics, labels: &ConnLabels) -> (u64, u64) {
        let (request, response) = (self.copied.a_to_b(), self.copied.b_to_a());
        let families = [&metrics.received_bytes, &metrics.sent_bytes];
        for ((now, reported), family) in [request, response]
            .into_iter()
            .zip(&self.reported)
            .zip(families)
        {
            let before = reported.fetch_max(now, Ordering::AcqRel);
            if now > before {
                family.get_or_create(labels).inc_by(now - before);
            }
        }
        (request, response)
    }
}

/// What a connection is, in the access log and the admin view.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnInfo {
    pub direction: &'static str,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    #[serde(skip)]
    pub labels: ConnLabels,
}

/// A live connection as the admin endpoint shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnView {
    #[serde(flatten)]
    pub info: ConnInfo,
    pub source_principal: String,
    pub destination_principal: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub started: u64,
}

impl ConnTable {
    pub fn snapshot(&self) -> Vec<ConnView> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.values()
            .map(|c| ConnView {
                source_principal: c.info.labels.source_principal.clone(),
                destination_principal: c.info.labels.destination_principal.clone(),
                bytes_sent: c.bytes.copied.a_to_b(),
                bytes_received: c.bytes.copied.b_to_a(),
                started: c.started,
                info: ConnInfo::clone(&c.info),
            })
            .collect()
    }

    /// Brings the byte counters up to date with the live connections, so that a
    /// connection that stays open for days shows its traffic as it flows, not all
    /// at its end. Called before each scrape.
    pub fn report_bytes(&self, metrics: &Metrics) {
        // Counted outside the table's lock, which every connection's open and close
        // take.
        let live: Vec<LiveConn> = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for c in live {
            c.bytes.report(metrics, &c.info.labels);
        }
    }
}

/// The access log's `end` of a connection ztunnel cut before it finished.
pub const END_CUT: &str = "cut";

/// Held for a connection's life; counts it open, and closed when dropped.
pub struct ConnGuard {
    id: u64,
    info: Arc<ConnInfo>,
    bytes: Arc<ByteCounts>,
    metrics: Arc<Metrics>,
    table: Arc<ConnTable>,
    started: Instant,
    end: &'static str,
}

impl ConnGuard {
    pub fn open(info: ConnInfo, metrics: Arc<Metrics>, table: Arc<ConnTable>) -> Self {
        metrics.opened.get_or_create(&info.labels).inc();
        metrics
            .open_connections
            .get_or_create(&DirectionLabels {
                direction: info.direction,
            })
            .inc();
        let id = table.next.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(info);
        let bytes = Arc::new(ByteCounts::default());
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        table.live.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            LiveConn {
                info: info.clone(),
                bytes: bytes.clone(),
                started,
            },
        );
        Self {
            id,
            info,
            bytes,
            metrics,
            table,
            started: Instant::now(),
            end: END_CUT,
        }
    }

    /// Counts bytes source -> destination as `a_to_b`, back as `b_to_a`.
    pub fn stats(&self) -> &CopyStats {
        &self.bytes.copied
    }

    /// How the connection ended, for the access log. Until set it is
    /// [`END_CUT`]: a guard dropped without it (its task dropped at a drain
    /// deadline, or on a pod's removal) was cut by ztunnel.
    pub fn set_end(&mut self, end: &'static str) {
        self.end = end;
    }

    /// Notes how the splice ended: `closed` when both sides finished, `error`
    /// when one failed.
    pub fn spliced<T, E>(&mut self, outcome: &Result<T, E>) {
        self.end = if outcome.is_ok() { "closed" } else { "error" };
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let l = &self.info.labels;
        let (request, response) = self.bytes.report(&self.metrics, l);
        self.metrics.closed.get_or_create(l).inc();
        self.metrics
            .open_connections
            .get_or_create(&DirectionLabels {
                direction: self.info.direction,
            })
            .dec();
        self.table
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        tracing::info!(
            target: "access",
            direction = self.info.direction,
            src = %self.info.source,
            dst = %self.info.destination,
            src_identity = %l.source_principal,
            dst_identity = %l.destination_principal,
            src_workload = %l.source_workload,
            dst_workload = %l.destination_workload,
            bytes_sent = request,
            bytes_received = response,
            duration_ms = self.started.elapsed().as_millis() as u64,
            end = self.end,
            "connection complete"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    fn metric(text: &str, name: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(name) && l.contains("reporter=\"source\""))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// An outbound connection, as its source's ztunnel reports it.
    fn outbound_info() -> ConnInfo {
        ConnInfo {
            direction: "outbound",
            source: "198.18.0.1:40000".parse().unwrap(),
            destination: "198.18.0.2:8080".parse().unwrap(),
            labels: ConnLabels {
                reporter: "source",
                ..Default::default()
            },
        }
    }

    #[tokio::test]
    async fn received_bytes_are_the_request_and_sent_bytes_the_response() {
        let ca = mesh_core::testing::TestCa::new();
        let metrics = Arc::new(Metrics::new(ca.store_for(&[])));
        let info = outbound_info();
        let guard = ConnGuard::open(info, metrics.clone(), Arc::new(ConnTable::default()));
        let (mut client, mut a) = duplex(1024);
        let (mut b, mut server) = duplex(1024);
        let peer = tokio::spawn(async move {
            let mut request = Vec::new();
            server.read_to_end(&mut request).await.unwrap();
            server.write_all(b"ok!").await.unwrap();
            server.shutdown().await.unwrap();
            request
        });
        client.write_all(b"0123456789").await.unwrap();
        client.shutdown().await.unwrap();
        mesh_core::copy::copy_bidirectional(&mut a, &mut b, guard.stats())
            .await
            .unwrap();
        let mut response = Vec::new();
        client.read_to_end(&mut response).await.unwrap();
        assert_eq!(peer.await.unwrap(), b"0123456789");
        assert_eq!(response, b"ok!");
        drop(guard);
        let text = metrics.encode();
        assert_eq!(metric(&text, "istio_tcp_received_bytes_total"), 10.0);
        assert_eq!(metric(&text, "istio_tcp_sent_bytes_total"), 3.0);
    }

    /// The access log tells a connection ztunnel cut (its task dropped at a
    /// drain deadline, or with its pod) from one whose sides finished.
    #[test]
    fn a_connection_dropped_mid_splice_is_logged_as_cut() {
        use futures_util::FutureExt;
        #[derive(Clone, Default)]
        struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let ca = mesh_core::testing::TestCa::new();
        let metrics = Arc::new(Metrics::new(ca.store_for(&[])));
        let table = Arc::new(ConnTable::default());
        let splice = |finish: bool| {
            let (metrics, table) = (metrics.clone(), table.clone());
            async move {
                let mut guard = ConnGuard::open(outbound_info(), metrics, table);
                let (mut client, mut a) = duplex(64);
                let (mut b, mut server) = duplex(64);
                if finish {
                    client.shutdown().await.unwrap();
                    server.shutdown().await.unwrap();
                }
                let copied =
                    mesh_core::copy::copy_bidirectional(&mut a, &mut b, guard.stats()).await;
                guard.spliced(&copied);
            }
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // Polled once, then dropped while both sides are still open.
            assert!(splice(false).now_or_never().is_none());
            splice(true).await;
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let ends: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("connection complete"))
            .filter_map(|l| l.rsplit(" end=").next())
            .map(|end| end.trim().trim_matches('"'))
            .collect();
        assert_eq!(ends, [END_CUT, "closed"], "{text}");
    }

    #[test]
    fn live_bytes_reach_the_counters_at_each_scrape_and_only_once() {
        let ca = mesh_core::testing::TestCa::new();
        let metrics = Arc::new(Metrics::new(ca.store_for(&[])));
        let table = Arc::new(ConnTable::default());
        let info = outbound_info();
        let received = |m: &Metrics| metric(&m.encode(), "istio_tcp_received_bytes_total");
        let guard = ConnGuard::open(info, metrics.clone(), table.clone());
        guard.stats().count_a_to_b(10);
        table.report_bytes(&metrics);
        assert_eq!(
            received(&metrics),
            10.0,
            "open connection's bytes not reported"
        );
        table.report_bytes(&metrics);
        assert_eq!(received(&metrics), 10.0, "reported twice");
        guard.stats().count_a_to_b(5);
        table.report_bytes(&metrics);
        assert_eq!(received(&metrics), 15.0);
        guard.stats().count_a_to_b(1);
        drop(guard);
        assert_eq!(
            received(&metrics),
            16.0,
            "the close added more than was left"
        );
        table.report_bytes(&metrics);
        assert_eq!(received(&metrics), 16.0);
    }
}
