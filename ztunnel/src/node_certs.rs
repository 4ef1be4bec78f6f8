//! The certificates of the identities this node serves: fetched ahead of time for
//! the workloads the state places here, and released once no workload of an
//! identity is left on the node (neither a pod handed over by the node agent nor
//! a workload of the state), so the CA is not asked to renew them forever.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::drain::DrainWatcher;
use mesh_core::{CertStore, SpiffeId};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::proxy::ProxyInputs;
use crate::state::StateStore;

/// The identities of the workloads the state places on `node`.
fn state_identities(state: &StateStore, node: &str) -> HashSet<SpiffeId> {
    state
        .snapshot()
        .workloads()
        .filter(|w| w.node == node)
        .filter_map(|w| w.identity().ok())
        .collect()
}

/// Requests, in the background, the certificate of every identity with a workload
/// on this node, as workloads appear: the node agent's hand-over of the pod then
/// finds the certificate ready. A failure is retried at the next state change and,
/// in any case, when the pod is added.
pub async fn prefetch_certificates(inputs: Arc<ProxyInputs>, drain: DrainWatcher) {
    let mut changes = inputs.state.subscribe();
    let in_flight: Arc<Mutex<HashSet<SpiffeId>>> = Arc::default();
    loop {
        for id in state_identities(&inputs.state, &inputs.config.node_name) {
            if inputs.certs.get(&id).is_some() {
                continue;
            }
            if !in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone())
            {
                continue;
            }
            let (inputs, in_flight) = (inputs.clone(), in_flight.clone());
            tokio::spawn(async move {
                match inputs.ensure_certificate(&id).await {
                    Ok(()) => tracing::info!(identity = %id, "certificate prefetched"),
                    Err(error) => {
                        tracing::warn!(identity = %id, %error, "certificate prefetch failed")
                    }
                }
                in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            });
        }
        tokio::select! {
            () = drain.signaled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

/// Removes from `certs` the certificate of every identity that has had no
/// workload on `node` for `grace`: neither one of `pods` (pod uid -> identity,
/// the node agent's pods, including those starting) nor a workload of `state`.
/// The grace spares a refetch to a pod that restarts with the same identity.
pub async fn release_certificates(
    certs: Arc<CertStore>,
    state: Arc<StateStore>,
    node: String,
    mut pods: watch::Receiver<HashMap<String, SpiffeId>>,
    grace: Duration,
    drain: DrainWatcher,
) {
    let mut state_changes = state.subscribe();
    let mut cert_events = certs.subscribe();
    // Identity held without a workload -> since when; at most one per certificate.
    let mut unused_since: HashMap<SpiffeId, Instant> = HashMap::new();
    loop {
        let mut wanted = state_identities(&state, &node);
        wanted.extend(pods.borrow_and_update().values().cloned());
        let now = Instant::now();
        let held: Vec<SpiffeId> = certs.all().iter().map(|c| c.identity().clone()).collect();
        unused_since.retain(|id, _| held.contains(id) && !wanted.contains(id));
        for id in held.into_iter().filter(|id| !wanted.contains(id)) {
            let since = *unused_since.entry(id.clone()).or_insert(now);
            if now >= since + grace {
                tracing::info!(identity = %id, "no workload of this identity left on the node; certificate released");
                certs.remove(&id);
                unused_since.remove(&id);
            }
        }
        let next = unused_since.values().min().map(|since| *since + grace);
        tokio::select! {
            () = drain.signaled() => return,
            changed = state_changes.changed() => if changed.is_err() { return },
            changed = pods.changed() => if changed.is_err() { return },
            // A certificate fetched or renewed for an identity no longer here.
            _ = cert_events.recv() => {}
            () = async { tokio::time::sleep_until(next.unwrap_or(now)).await }, if next.is_some() => {}
        }
    }
}

#[cfg(test)]
mod tests;
