//! What ztunnel hears and what it answers: the snapshot a connection gets when it
//! attaches, the answers taken back into the pods' [`Handoff`]s, and the
//! re-offers of refused pods. Messages are queued under the table's lock, in its
//! order; their answers are awaited with it released and taken back under it
//! only if they are still current (same connection, same enrollment).

use std::sync::Arc;
use std::time::Duration;

use mesh_core::drain::DrainWatcher;
use mesh_core::os::NetNs;
use tokio::time::Instant;

use super::{Enroller, State};
use crate::agent::handoff::Handoff;
use crate::agent::ztunnel_conn::{ExchangeError, Pending, SnapshotPod, ZtunnelHandle};
use crate::zds;

/// How telling ztunnel went.
pub(super) enum Delivery {
    Acked,
    NotConnected,
    /// The connection broke; the pod is sent again when ztunnel reconnects.
    Broken(String),
    Refused(String),
}

/// Waits for the answer to a queued message; `None` is a message that could not
/// be queued (no ztunnel connected).
pub(super) async fn delivered(pending: Option<Pending>) -> Delivery {
    let Some(pending) = pending else {
        return Delivery::NotConnected;
    };
    match pending.answer().await {
        Ok(()) => Delivery::Acked,
        Err(ExchangeError::Refused(reason)) => Delivery::Refused(reason),
        Err(ExchangeError::Broken(reason)) => Delivery::Broken(reason),
    }
}

impl State {
    /// Queues `msg` to the active connection, behind what the table's order put
    /// there before; `None` when none is connected. A connection whose queue
    /// cannot take it is let go of: the next one's snapshot carries every pod.
    pub(super) fn queue(&mut self, msg: Vec<u8>, netns: Option<Arc<NetNs>>) -> Option<Pending> {
        let handle = self.ztunnel.as_ref()?;
        match handle.queue(msg, netns) {
            Ok(pending) => Some(pending),
            Err(e) => {
                tracing::warn!(
                    conn = handle.id,
                    "letting go of the ztunnel connection: {e}"
                );
                self.ztunnel = None;
                None
            }
        }
    }

    /// Takes connection `conn`'s answer about enrollment `generation` of pod
    /// `uid` into its handoff. An answer from a connection a newer one replaced
    /// (whose snapshot answers for every pod), or about an enrollment since
    /// replaced, is stale and left out; false then.
    pub(super) fn record(
        &mut self,
        uid: &str,
        generation: u64,
        conn: u64,
        handoff: Handoff,
    ) -> bool {
        if conn != self.latest_conn {
            return false;
        }
        match self.pods.get_mut(uid) {
            Some(pod) if pod.generation == generation => {
                pod.handoff = handoff;
                true
            }
            _ => false,
        }
    }
}

impl Enroller {
    /// A new ztunnel connection: queues every known pod, then `SnapshotSent`,
    /// and makes it the active connection (the previous one is let go of once
    /// its queue is sent). Returns how many pods the snapshot holds.
    pub(crate) async fn attach(&self, handle: ZtunnelHandle) -> Result<usize, ExchangeError> {
        let mut state = self.state.lock().await;
        let pods: Vec<SnapshotPod> = state
            .pods
            .iter_mut()
            .map(|(uid, pod)| {
                // Its answer to this snapshot is what counts from now on.
                pod.handoff = Handoff::Waiting;
                SnapshotPod {
                    uid: uid.clone(),
                    generation: pod.generation,
                    msg: zds::encode_add(&pod.pod),
                    netns: pod.netns.clone(),
                }
            })
            .collect();
        let count = pods.len();
        handle.queue_snapshot(pods)?;
        state.latest_conn = handle.id;
        if let Some(old) = state.ztunnel.replace(handle) {
            tracing::info!(
                old = old.id,
                "letting go of the previous ztunnel connection"
            );
        }
        Ok(count)
    }

    /// Connection `conn` is gone: nothing more is queued to it.
    pub(crate) async fn detach(&self, conn: u64) {
        let mut state = self.state.lock().await;
        if state.ztunnel.as_ref().is_some_and(|z| z.id == conn) {
            state.ztunnel = None;
        }
    }

    /// ztunnel's answer about one pod of connection `conn`'s snapshot.
    pub(crate) async fn snapshot_answer(
        &self,
        conn: u64,
        uid: &str,
        generation: u64,
        result: Result<(), ExchangeError>,
    ) {
        let handoff = match result {
            Ok(()) => Handoff::Acked,
            Err(ExchangeError::Refused(reason)) => {
                tracing::warn!(%uid, "ztunnel refused the pod in its snapshot (it is offered again): {reason}");
                Handoff::refused(reason, 1, self.retry_first, Instant::now())
            }
            Err(ExchangeError::Broken(_)) => Handoff::Waiting,
        };
        let refused = handoff.retry_at().is_some();
        let recorded = self
            .state
            .lock()
            .await
            .record(uid, generation, conn, handoff);
        if recorded && refused {
            self.refused.notify_one();
        }
    }

    /// Offers the pods ztunnel refused again, each when its backoff is over,
    /// until the drain starts. A new snapshot offers every pod anyway.
    pub(crate) async fn reoffer_refused(&self, drain: DrainWatcher) {
        loop {
            let next = {
                let state = self.state.lock().await;
                state
                    .pods
                    .values()
                    .filter_map(|p| p.handoff.retry_at())
                    .min()
            };
            // Far enough to mean "until woken".
            let next = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = drain.signaled() => return,
                () = self.refused.notified() => continue,
                () = tokio::time::sleep_until(next) => {}
            }
            tokio::select! {
                _ = drain.signaled() => return,
                () = self.reoffer_due() => {}
            }
        }
    }

    /// Offers the refused pods whose backoff is over, one at a time: each is
    /// queued under the table's lock and its answer awaited without it.
    async fn reoffer_due(&self) {
        loop {
            let (uid, generation, attempts, pending) = {
                let mut state = self.state.lock().await;
                let now = Instant::now();
                let Some((uid, pod)) = state
                    .pods
                    .iter()
                    .find(|(_, p)| p.handoff.retry_at().is_some_and(|at| at <= now))
                else {
                    return;
                };
                let (uid, generation) = (uid.clone(), pod.generation);
                let attempts = pod.handoff.attempts();
                let (msg, netns) = (zds::encode_add(&pod.pod), pod.netns.clone());
                let Some(pending) = state.queue(msg, Some(netns)) else {
                    // The next ztunnel connection's snapshot offers it.
                    if let Some(pod) = state.pods.get_mut(&uid) {
                        pod.handoff = Handoff::Waiting;
                    }
                    return;
                };
                (uid, generation, attempts, pending)
            };
            let conn = pending.conn;
            let handoff = match pending.answer().await {
                Ok(()) => {
                    tracing::info!(%uid, attempts, "ztunnel took the pod it had refused");
                    Handoff::Acked
                }
                Err(ExchangeError::Refused(reason)) => {
                    tracing::warn!(%uid, attempts = attempts + 1, "ztunnel refused the pod again: {reason}");
                    Handoff::refused(reason, attempts + 1, self.retry_first, Instant::now())
                }
                // The next ztunnel connection's snapshot offers it.
                Err(ExchangeError::Broken(_)) => Handoff::Waiting,
            };
            let broken = handoff == Handoff::Waiting;
            self.state
                .lock()
                .await
                .record(&uid, generation, conn, handoff);
            if broken {
                return;
            }
        }
    }
}
