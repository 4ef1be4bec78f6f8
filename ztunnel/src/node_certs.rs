//! The certificates of the identities this node serves. One task keeps the store in
//! line with the identities that have a workload here (the node agent's pods,
//! including those starting, and the workloads the state places on this node):
//! - a missing certificate is fetched, and fetched again with backoff (100 ms
//!   doubling to 60 s) while it is missing (a new pod's first fetch refused
//!   because the control plane has not seen the pod yet, one dropped at expiry
//!   after its renewals failed): a running pod is never left without one for
//!   long. This is the only retry loop without an end; a pod's start (2 s) and
//!   a connection that comes before the certificate (3 s) also ask the CA, for
//!   a bounded time only (`await_certificate`);
//! - the certificate of an identity with no workload left is released after a
//!   grace (a pod restarting with it finds it ready), so the CA is not asked to
//!   renew it forever.
//!
//! The state's workloads are fetched ahead of their pods only with a control plane
//! (`prefetch`): the node agent's hand-over then finds the certificate ready.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::backoff::BackoffConfig;
use mesh_core::drain::DrainWatcher;
use mesh_core::{CertError, CertStore, CertificateSource, SpiffeId};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::state::{Protocol, StateStore};

/// Certificate requests in flight at once.
const MAX_FETCHES: usize = 8;
/// Waits after failed fetches of a missing certificate: 100 ms doubling per
/// failure to 60 s (no jitter: one node's asks are few). Short at first: a new
/// pod's first asks are refused until the control plane has seen it, usually for
/// well under a second.
const RETRY: BackoffConfig = BackoffConfig {
    min: Duration::from_millis(100),
    max: Duration::from_secs(60),
    stable_after: Duration::ZERO,
};

/// The identities of the mesh workloads the state places on `node`. A
/// hostNetwork pod (the CA never issues to one: it shares its node's address)
/// and a pod outside the mesh (plain TCP) get none ahead of time: asking would
/// be refused forever, or hold a key for a pod this node never serves through
/// the mesh. A pod the node agent hands over still gets its own (`pods`).
fn state_identities(state: &StateStore, node: &str) -> HashSet<SpiffeId> {
    state
        .snapshot()
        .workloads()
        .filter(|w| w.node == node && !w.host_network && w.protocol == Protocol::Hbone)
        .filter_map(|w| w.identity().ok())
        .collect()
}

/// What [`keep_node_certificates`] works from.
pub struct NodeCertificates<S> {
    pub certs: Arc<CertStore>,
    pub ca: Arc<S>,
    pub state: Arc<StateStore>,
    pub node: String,
    /// Pod uid -> identity: the node agent's pods, including those starting.
    pub pods: watch::Receiver<HashMap<String, SpiffeId>>,
    /// Fetch the state's workloads' identities before their pods come.
    pub prefetch: bool,
    /// How long an identity with no workload here keeps its certificate.
    pub grace: Duration,
}

impl<S> std::fmt::Debug for NodeCertificates<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCertificates")
            .field("node", &self.node)
            .field("prefetch", &self.prefetch)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

/// A failed fetch of a missing certificate: how many in a row, and when next.
struct Retry {
    failures: u32,
    at: Instant,
}

/// Keeps the node's certificates (see the module doc) until drained.
pub async fn keep_node_certificates<S: CertificateSource>(
    mut node: NodeCertificates<S>,
    drain: DrainWatcher,
) {
    let mut state_changes = node.state.subscribe();
    let mut cert_events = node.certs.subscribe();
    // Identity held without a workload -> since when.
    let mut unused_since: HashMap<SpiffeId, Instant> = HashMap::new();
    let mut retries: HashMap<SpiffeId, Retry> = HashMap::new();
    let mut fetching: JoinSet<Result<(), CertError>> = JoinSet::new();
    let mut in_flight: HashMap<tokio::task::Id, SpiffeId> = HashMap::new();
    loop {
        let in_state = state_identities(&node.state, &node.node);
        let of_pods: HashSet<SpiffeId> = node.pods.borrow_and_update().values().cloned().collect();
        let now = Instant::now();

        // Release what no workload here needs any more. A pod or a state change
        // since the snapshot above is looked at first: it may want one of them.
        let held = node.certs.all();
        let wanted = |id: &SpiffeId| in_state.contains(id) || of_pods.contains(id);
        unused_since.retain(|id, _| held.iter().any(|c| c.identity() == id) && !wanted(id));
        if !node.pods.has_changed().unwrap_or(false)
            && !state_changes.has_changed().unwrap_or(false)
        {
            for cert in held.iter().filter(|c| !wanted(c.identity())) {
                let id = cert.identity();
                let since = *unused_since.entry(id.clone()).or_insert(now);
                // Only the certificate judged here: never one fetched since.
                if now >= since + node.grace && node.certs.remove_if_current(cert) {
                    tracing::info!(identity = %id, "no workload of this identity left on the node; certificate released");
                    unused_since.remove(id);
                }
            }
        }

        // Fetch what a workload here needs and the store lacks.
        let to_fetch =
            |id: &SpiffeId| of_pods.contains(id) || (node.prefetch && in_state.contains(id));
        retries.retain(|id, _| to_fetch(id));
        let missing: HashSet<&SpiffeId> = of_pods
            .iter()
            .chain(in_state.iter().filter(|_| node.prefetch))
            .filter(|id| node.certs.get(id).is_none() && !in_flight.values().any(|f| f == *id))
            .collect();
        for id in missing {
            if fetching.len() >= MAX_FETCHES {
                break;
            }
            if retries.get(id).is_some_and(|r| r.at > now) {
                continue;
            }
            let (certs, ca, asked) = (node.certs.clone(), node.ca.clone(), id.clone());
            let task = fetching.spawn(async move { certs.fetch(&*ca, &asked).await.map(drop) });
            in_flight.insert(task.id(), id.clone());
        }

        let next_release = unused_since.values().min().map(|since| *since + node.grace);
        let next_retry = retries
            .iter()
            .filter(|(id, _)| !in_flight.values().any(|f| f == *id))
            .map(|(_, r)| r.at)
            .min();
        let next = [next_release, next_retry].into_iter().flatten().min();
        tokio::select! {
            () = drain.signaled() => return,
            changed = state_changes.changed() => if changed.is_err() { return },
            changed = node.pods.changed() => if changed.is_err() { return },
            // A certificate fetched, renewed or dropped.
            _ = cert_events.recv() => {}
            Some(done) = fetching.join_next_with_id() => {
                let (task, outcome) = match done {
                    Ok((task, outcome)) => (task, outcome),
                    Err(e) => (e.id(), Err(CertError::Ca(format!("fetch task failed: {e}")))),
                };
                let Some(id) = in_flight.remove(&task) else { continue };
                match outcome {
                    Ok(()) => {
                        tracing::info!(identity = %id, "certificate fetched for a workload on this node");
                        retries.remove(&id);
                    }
                    Err(error) => {
                        let failures = retries.get(&id).map_or(0, |r| r.failures) + 1;
                        let wait = RETRY.nominal(failures - 1);
                        tracing::warn!(identity = %id, %error, failures, retry_in = ?wait, "certificate fetch for a workload on this node failed");
                        retries.insert(id, Retry { failures, at: Instant::now() + wait });
                    }
                }
            }
            () = async { tokio::time::sleep_until(next.unwrap_or(now)).await }, if next.is_some() => {}
        }
    }
}

#[cfg(test)]
mod tests;
