//! The "why" view: the last refused connections, each with what decided it (the
//! policy and rule, or the routing failure), for `GET /debug/why` on the admin port.
//! Refusals of each pod's HBONE server before a CONNECT reaches ztunnel's handler
//! (TLS: unknown issuer, expired or wrong identity, no client certificate; HTTP/2:
//! not a CONNECT, bad authority) are read from the server's own record and merged in.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use mesh_core::hbone::{RefusalRecord, ServerStats};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// ztunnel's own refusal reasons: the `reason` label of
/// `ambit_connections_denied_total`, the why view's `reason`, and what SOCKS5
/// replies map from. (A pod's HBONE server adds its own, `RefusalKind::as_str`,
/// to both: `Metrics::count_server_refusals` and `WhyLog::watch_server`.)
pub mod reason {
    /// The destination's policy refused the caller.
    pub const POLICY: &str = "policy";
    /// The connection would loop back into ztunnel's own listener.
    pub const SELF_CALL: &str = "self_call";
    /// The destination is not a pod this listener serves.
    pub const UNKNOWN_DESTINATION: &str = "unknown_destination";
    /// The destination cannot be served as asked (not the pod's address, a port of
    /// ztunnel's, a workload without an identity).
    pub const BAD_DESTINATION: &str = "bad_destination";
    /// No route: e.g. a service without a healthy endpoint.
    pub const NO_ROUTE: &str = "no_route";
    /// The app, or a destination outside the mesh, could not be reached.
    pub const UPSTREAM_UNREACHABLE: &str = "upstream_unreachable";
    /// The destination closed before it took the client's first bytes.
    pub const UPSTREAM_RESET: &str = "upstream_reset";
    /// The destination's ztunnel refused the tunnel by policy (403).
    pub const DENIED_BY_DESTINATION: &str = "denied_by_destination";
    /// The HBONE tunnel could not be opened (dial, TLS, refusal other than 403).
    pub const HBONE_FAILED: &str = "hbone_failed";
    /// A captured connection whose original destination cannot be read (it was
    /// not redirected, or its conntrack entry is gone): nowhere to relay it.
    pub const NO_ORIGINAL_DESTINATION: &str = "no_original_destination";
    /// The pod already has `--max-connections` inbound tunnels open.
    pub const OVERLOADED: &str = "overloaded";
}

/// How many refusals are kept.
pub const WHY_CAPACITY: usize = 128;

/// One refused connection.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Refused {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// `inbound` (HBONE), `inbound_plaintext` or `outbound`.
    pub direction: &'static str,
    pub source: String,
    pub source_identity: Option<String>,
    pub destination: String,
    pub destination_workload: Option<String>,
    /// A metric label: `policy`, `unknown_destination`, `no_healthy_endpoint`, ...
    pub reason: &'static str,
    /// The deciding policy (`namespace/name`), when policy decided.
    pub policy: Option<String>,
    pub rule: Option<usize>,
    pub explanation: String,
}

impl Refused {
    pub fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A bounded log of refusals, newest last.
#[derive(Debug, Default)]
pub struct WhyLog {
    entries: Mutex<VecDeque<Refused>>,
    /// Each pod's HBONE server, by pod (`namespace/name`).
    servers: Mutex<HashMap<String, Arc<ServerStats>>>,
}

/// Whether the server decided the refusal: before ztunnel's handler saw the
/// CONNECT, or when the handler was dropped without answering (a pod removed or a
/// drain forced mid-dial). The handler's own refusals are in the log already,
/// with their policy.
fn refused_by_server(r: &RefusalRecord) -> bool {
    !r.by_handler
}

fn from_server(pod: &str, r: RefusalRecord) -> Refused {
    Refused {
        at: r
            .at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        direction: "inbound",
        source: r.peer_addr.to_string(),
        source_identity: r.peer_identity.map(|id| id.to_string()),
        destination: r.target.map_or_else(|| pod.to_string(), |t| t.to_string()),
        destination_workload: Some(pod.to_string()),
        reason: r.kind.as_str(),
        policy: None,
        rule: None,
        explanation: r.reason,
    }
}

impl WhyLog {
    pub fn record(&self, r: Refused) {
        tracing::info!(
            direction = r.direction,
            src = %r.source,
            src_identity = r.source_identity.as_deref().unwrap_or("-"),
            dst = %r.destination,
            reason = r.reason,
            policy = r.policy.as_deref().unwrap_or("-"),
            "connection refused: {}",
            r.explanation
        );
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() == WHY_CAPACITY {
            entries.pop_front();
        }
        entries.push_back(r);
    }

    /// Follows the refusals of `pod`'s HBONE server until [`WhyLog::forget_server`].
    /// A pod replaced by one of the same name (a new uid) takes the entry over.
    pub fn watch_server(&self, pod: &str, stats: Arc<ServerStats>) {
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        servers.insert(pod.to_string(), stats);
    }

    /// Stops following the server `stats` belongs to. If `pod`'s entry is another
    /// server's by now (the pod's replacement, started while this one drained),
    /// it stays.
    pub fn forget_server(&self, pod: &str, stats: &Arc<ServerStats>) {
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        if servers.get(pod).is_some_and(|s| Arc::ptr_eq(s, stats)) {
            servers.remove(pod);
        }
    }

    /// Every refusal known, oldest first: ztunnel's own and its servers'.
    pub fn entries(&self) -> Vec<Refused> {
        let mut all: Vec<Refused> = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        for (pod, stats) in servers.iter() {
            all.extend(
                stats
                    .recent_refusals()
                    .into_iter()
                    .filter(refused_by_server)
                    .map(|r| from_server(pod, r)),
            );
        }
        all.sort_by_key(|r| r.at);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn followed(log: &WhyLog, pod: &str) -> Option<Arc<ServerStats>> {
        log.servers.lock().unwrap().get(pod).cloned()
    }

    #[test]
    fn the_servers_own_refusals_show_and_the_handlers_do_not_twice() {
        use mesh_core::hbone::RefusalKind;
        let peer = "127.0.0.1:1".parse().unwrap();
        let record = |kind, by_handler| RefusalRecord {
            by_handler,
            ..RefusalRecord::new(kind, peer, None, None, String::new())
        };
        // A CONNECT its handler dropped unanswered: only the server has it.
        assert!(refused_by_server(&record(RefusalKind::Unavailable, false)));
        assert!(refused_by_server(&record(RefusalKind::BadIdentity, false)));
        // The handler's own refusals are in the log already.
        assert!(!refused_by_server(&record(RefusalKind::Unavailable, true)));
        assert!(!refused_by_server(&record(RefusalKind::Denied, true)));
    }

    #[test]
    fn a_drained_pod_forgets_only_its_own_server_not_its_replacements() {
        let log = WhyLog::default();
        let old = Arc::new(ServerStats::default());
        let new = Arc::new(ServerStats::default());
        log.watch_server("shop/cart", old.clone());
        // Replaced by a pod of the same name (new uid) while the old one drains.
        log.watch_server("shop/cart", new.clone());
        log.forget_server("shop/cart", &old);
        let kept = followed(&log, "shop/cart").expect("the replacement is still followed");
        assert!(Arc::ptr_eq(&kept, &new));
        log.forget_server("shop/cart", &new);
        assert!(followed(&log, "shop/cart").is_none());
    }
}
