//! The "why" view: the last refused connections, each with what decided it (the
//! policy and rule, or the routing failure), for `GET /debug/why` on the admin port.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

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

    pub fn entries(&self) -> Vec<Refused> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}
