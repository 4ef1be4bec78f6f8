//! One proxied connection's bookkeeping: metrics at open and close, byte counts
//! while it runs (the admin view lists live connections), and one access-log event
//! when it ends.

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
    stats: Arc<CopyStats>,
    started: u64,
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
                bytes_sent: c.stats.a_to_b(),
                bytes_received: c.stats.b_to_a(),
                started: c.started,
                info: ConnInfo::clone(&c.info),
            })
            .collect()
    }
}

/// Held for a connection's life; counts it open, and closed when dropped.
pub struct ConnGuard {
    id: u64,
    info: Arc<ConnInfo>,
    stats: Arc<CopyStats>,
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
        let stats = Arc::new(CopyStats::default());
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        table.live.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            LiveConn {
                info: info.clone(),
                stats: stats.clone(),
                started,
            },
        );
        Self {
            id,
            info,
            stats,
            metrics,
            table,
            started: Instant::now(),
            end: "closed",
        }
    }

    /// Counts bytes source -> destination as `a_to_b`, back as `b_to_a`.
    pub fn stats(&self) -> &CopyStats {
        &self.stats
    }

    /// How the connection ended, for the access log (default `closed`).
    pub fn set_end(&mut self, end: &'static str) {
        self.end = end;
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let (sent, received) = (self.stats.a_to_b(), self.stats.b_to_a());
        let l = &self.info.labels;
        self.metrics.sent_bytes.get_or_create(l).inc_by(sent);
        self.metrics
            .received_bytes
            .get_or_create(l)
            .inc_by(received);
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
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = self.started.elapsed().as_millis() as u64,
            end = self.end,
            "connection complete"
        );
    }
}
