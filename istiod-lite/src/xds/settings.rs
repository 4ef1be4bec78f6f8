//! The xDS server's settings: every knob with its name, default and meaning, and
//! the check that refuses a bad value at start with the setting's name.

use std::time::Duration;

/// How the xDS server debounces and bounds its pushes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct XdsSettings {
    /// `debounce_quiet`: a push waits until no change arrived for this long
    /// (default 100 ms).
    pub debounce_quiet: Duration,
    /// `debounce_max`: ... but never longer than this after the first pending
    /// change (default 1 s).
    pub debounce_max: Duration,
    /// `client_queue`: responses sent to one client and not yet answered (ACK or
    /// NACK) (default 4); the next waits for an answer. Changes meanwhile
    /// coalesce in the client's pending state.
    pub client_queue: usize,
    /// `max_response_bytes`: a response stops taking resources once it carries
    /// this many bytes (default 32 KiB); the rest follows in the next response.
    /// One resource larger than this is still sent, alone. Each stream keeps an
    /// encode buffer the size of its largest response: this bounds it per client.
    pub max_response_bytes: usize,
    /// `push_budget_bytes`: response bytes sent and not yet answered, across all
    /// clients (default 8 MiB). A response reserves `max_response_bytes` of it
    /// before it is built and keeps its own size until its client answers.
    pub push_budget_bytes: usize,
    /// `push_budget_hold`: how long an unanswered response keeps its share of
    /// the push budget (default 10 s); the client still gets nothing more until
    /// it answers.
    pub push_budget_hold: Duration,
    /// `answer_timeout`: a stream whose oldest unanswered response is this old
    /// is closed (default 60 s, six times `push_budget_hold`), as is one whose
    /// queue of responses has not moved for this long. A client that
    /// stops answering otherwise keeps one of its node's streams and holds back
    /// the collection of removal tombstones for good; closed, it reconnects
    /// with the versions it holds and gets only what changed.
    pub answer_timeout: Duration,
    /// `max_in_flight`: unacknowledged responses remembered per client and type
    /// (default 16); older ones are forgotten, and their late ACK is only counted.
    pub max_in_flight: usize,
    /// `client_inbox`: change batches waiting for a client task before they are
    /// collapsed into a full resync of that client (default 32).
    pub client_inbox: usize,
    /// `max_streams_per_node`: xDS streams one node's credential may hold open
    /// at once (default 4: a ztunnel holds one, two while it restarts); more are
    /// refused with RESOURCE_EXHAUSTED.
    pub max_streams_per_node: usize,
    /// `max_names_per_type`: resource names one stream may subscribe to by name,
    /// or claim to hold when it reconnects, per type (default 65,536); a request
    /// that would hold more is refused. A wildcard stream's reconnect may claim
    /// every resource the server has, and this many names more that it does not
    /// (removals owed to the client).
    pub max_names_per_type: usize,
}

impl Default for XdsSettings {
    fn default() -> Self {
        Self {
            debounce_quiet: Duration::from_millis(100),
            debounce_max: Duration::from_secs(1),
            client_queue: 4,
            max_response_bytes: 32 << 10,
            push_budget_bytes: 8 << 20,
            push_budget_hold: Duration::from_secs(10),
            answer_timeout: Duration::from_secs(60),
            max_in_flight: 16,
            client_inbox: 32,
            max_streams_per_node: 4,
            max_names_per_type: 1 << 16,
        }
    }
}

/// A setting with a value the server cannot run with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("xDS setting `{name}`: {reason}")]
pub struct SettingsError {
    pub name: &'static str,
    pub reason: &'static str,
}

impl XdsSettings {
    /// Refuses values the server cannot run with, naming the setting.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let refuse = |name, reason| Err(SettingsError { name, reason });
        if self.debounce_max < self.debounce_quiet {
            return refuse("debounce_max", "must not be shorter than debounce_quiet");
        }
        if self.client_queue == 0 {
            return refuse("client_queue", "must be at least 1");
        }
        if self.max_response_bytes == 0 {
            return refuse("max_response_bytes", "must be at least 1");
        }
        if self.push_budget_bytes < self.max_response_bytes {
            return refuse("push_budget_bytes", "must hold at least max_response_bytes");
        }
        if self.answer_timeout.is_zero() {
            return refuse("answer_timeout", "must be longer than zero");
        }
        if self.max_in_flight == 0 {
            return refuse("max_in_flight", "must be at least 1");
        }
        if self.client_inbox == 0 {
            return refuse("client_inbox", "must be at least 1");
        }
        if self.max_streams_per_node == 0 {
            return refuse("max_streams_per_node", "must be at least 1");
        }
        if self.max_names_per_type == 0 {
            return refuse("max_names_per_type", "must be at least 1");
        }
        Ok(())
    }
}
