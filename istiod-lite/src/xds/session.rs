//! One delta ADS stream: a task that reads the client's requests, takes the
//! change batches handed to it, and writes responses when the bounded outgoing
//! channel has room. Changes that arrive while the client is slow coalesce in its
//! pending set, so a slow client costs memory bounded by the resources it
//! subscribes to and never holds up anyone else.

use std::pin::Pin;
use std::sync::Arc;

use ambit_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;
use tokio_stream::{Stream, StreamExt as _};
use tonic::Status;

use super::budget::{self, Unanswered};
use super::client::Feedback;
use super::metrics::XdsMetrics;
use super::server::{ClientHandle, Core};
use super::store::lock;
use crate::auth::Caller;

/// Everything one stream's task owns.
pub(crate) struct Session {
    pub(crate) core: Arc<Core>,
    pub(crate) client: Arc<ClientHandle>,
    pub(crate) id: u64,
    pub(crate) caller: Caller,
    pub(crate) tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    pub(crate) inbound: Inbound,
}

/// The client's requests: the gRPC stream (an in-memory one in tests).
pub(crate) type Inbound = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryRequest, Status>> + Send>>;

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("caller", &self.caller)
            .finish_non_exhaustive()
    }
}

/// Room in the push budget for one response, once granted.
type Reservation = dyn Future<Output = Option<OwnedSemaphorePermit>> + Send;

/// Removes the client from the registry however its task ends.
struct Registered {
    core: Arc<Core>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.core.deregister(self.id);
    }
}

impl Session {
    pub(crate) async fn run(self) {
        let Session {
            core,
            client,
            id,
            caller,
            tx,
            mut inbound,
        } = self;
        let _registered = Registered {
            core: core.clone(),
            id,
        };
        let mut shutdown = core.shutdown.subscribe();
        let mut unanswered = Unanswered::default();
        // Waiting for room in the push budget; kept across turns of the loop so
        // the client keeps its place in the budget's queue.
        let mut reserving: Option<Pin<Box<Reservation>>> = None;
        let reason = loop {
            let has_work = lock(&client.state).has_work(core.store.released());
            if !has_work {
                unanswered.drop_spare();
            }
            if has_work && unanswered.len() < core.settings.client_queue {
                // Budget the client's answers freed goes first, even instead of
                // a place in the queue: waiting there while holding a spare
                // could wait for the spare itself.
                if let Some(spare) = unanswered.take_spare(core.budget.per_response) {
                    reserving = Some(Box::pin(std::future::ready(Some(spare))));
                } else if reserving.is_none() {
                    reserving = Some(Box::pin(core.budget.acquire()));
                }
            }
            let expiry = unanswered.next_expiry(core.settings.push_budget_hold);
            let answer_by = unanswered
                .oldest()
                .map(|sent| sent + core.settings.answer_timeout);
            tokio::select! {
                biased;
                // The guard `wait_for` returns is not `Send`: drop it in the branch.
                _ = async { shutdown.wait_for(|draining| *draining).await.is_ok() } => break "server draining".to_string(),
                _ = client.wake.notified() => take_inbox(&client),
                message = inbound.next() => match message {
                    Some(Ok(request)) => {
                        if let Err(status) = handle_request(&core, &client, &caller, request, &mut unanswered) {
                            let _ = tx.try_send(Err(status.clone()));
                            break format!("bad request: {}", status.message());
                        }
                    }
                    None => break "client closed the stream".to_string(),
                    Some(Err(status)) => break format!("stream error: {}", status.message()),
                },
                // Closed, it reconnects with the versions it holds; open, it would
                // hold its walk's place (and every tombstone after it) for good.
                _ = tokio::time::sleep_until(answer_by.unwrap_or_else(Instant::now)), if answer_by.is_some() => {
                    let reason = format!(
                        "no answer (ACK or NACK) to a response for {:?}",
                        core.settings.answer_timeout
                    );
                    let _ = tx.try_send(Err(Status::deadline_exceeded(reason.clone())));
                    break reason;
                },
                _ = tokio::time::sleep_until(expiry.unwrap_or_else(Instant::now)), if expiry.is_some() => {
                    unanswered.expire(core.settings.push_budget_hold);
                },
                budget = async { reserving.as_mut().expect("guarded").await }, if reserving.is_some() => {
                    reserving = None;
                    let Some(budget) = budget else {
                        break "push budget closed".to_string();
                    };
                    // Room is there unless the client answered responses still in
                    // the queue, unread (their nonces are easy to guess), and
                    // stopped reading: then the wait ends with the drain, or when
                    // the queue has not moved for `answer_timeout`.
                    let timeout = core.settings.answer_timeout;
                    let permit = tokio::select! {
                        biased;
                        _ = async { shutdown.wait_for(|draining| *draining).await.is_ok() } => break "server draining".to_string(),
                        permit = tokio::time::timeout(timeout, tx.reserve()) => permit,
                    };
                    let permit = match permit {
                        Ok(Ok(permit)) => permit,
                        Ok(Err(_)) => break "client went away".to_string(),
                        Err(_) => break format!("the client read no response for {timeout:?}"),
                    };
                    send_next(&core, &client, permit, budget, &mut unanswered);
                },
            }
        };
        tracing::info!(client = id, node = %caller.node, principal = %caller.principal, %reason, "xDS client disconnected");
    }
}

/// Merges the batches handed to this client into its pending set.
fn take_inbox(client: &ClientHandle) {
    let (batches, resync) = {
        let mut inbox = lock(&client.inbox);
        (std::mem::take(&mut inbox.batches), inbox.resync.take())
    };
    if batches.is_empty() && resync.is_none() {
        return;
    }
    let mut state = lock(&client.state);
    for batch in &batches {
        state.merge_batch(batch);
    }
    if let Some(origin) = resync {
        state.resync(origin);
    }
}

fn handle_request(
    core: &Core,
    client: &ClientHandle,
    caller: &Caller,
    request: DeltaDiscoveryRequest,
    unanswered: &mut Unanswered,
) -> Result<(), Status> {
    let type_url = request.type_url.clone();
    if !request.response_nonce.is_empty() {
        unanswered.answered(&type_url, &request.response_nonce);
    }
    let feedback = {
        let store = core.store.read();
        let mut state = lock(&client.state);
        let feedback = state
            .handle_request(request, &store)
            .map_err(|e| e.status())?;
        client.publish(&state);
        (feedback, state.id)
    };
    if let (Feedback::Nack { nonce, message }, id) = feedback {
        core.metrics
            .nacks
            .get_or_create(&XdsMetrics::label(&type_url))
            .inc();
        tracing::warn!(
            client = id,
            node = %caller.node,
            principal = %caller.principal,
            type_url = %type_url,
            nonce = %nonce,
            error = %message,
            "xDS NACK: the client refused a response"
        );
    }
    Ok(())
}

/// Builds the client's next response from the current store contents and sends it.
fn send_next(
    core: &Core,
    client: &ClientHandle,
    permit: mpsc::Permit<'_, Result<DeltaDiscoveryResponse, Status>>,
    budget: OwnedSemaphorePermit,
    unanswered: &mut Unanswered,
) {
    let outgoing = {
        let store = core.store.read();
        let mut state = lock(&client.state);
        let out = state.next_response(&store);
        client.publish(&state);
        out
    };
    let Some(out) = outgoing else {
        return;
    };
    let label = XdsMetrics::label(&out.response.type_url);
    let metrics = &core.metrics;
    metrics
        .resources_sent
        .get_or_create(&label)
        .inc_by(out.resources as u64);
    metrics
        .bytes_sent
        .get_or_create(&label)
        .inc_by(out.bytes as u64);
    if let Some(origin) = out.push_origin {
        metrics.pushes.get_or_create(&label).inc();
        metrics.push_latency.observe(origin.elapsed().as_secs_f64());
    }
    tracing::debug!(
        type_url = %out.response.type_url,
        nonce = %out.response.nonce,
        resources = out.resources,
        removed = out.removed,
        "xDS response"
    );
    unanswered.push(
        &out.response.type_url,
        &out.response.nonce,
        budget::keep(budget, out.bytes),
    );
    permit.send(Ok(out.response));
}
