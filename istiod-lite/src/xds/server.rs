//! The xDS server: the handle the rest of istiod-lite holds ([`XdsServer`]: apply
//! resources, read the debug view) and the tonic service ([`AdsService`]) that
//! authenticates each delta ADS stream and starts its client task.
//!
//! Fan-out is O(clients) per batch: each client gets an `Arc` of the batch in its
//! inbox and a wake-up; its own task does the per-name work.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ambit_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ambit_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_core::drain::DrainWatcher;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::ResourceUpdate;
use super::budget::SendBudget;
use super::client::{ClientState, Limits};
use super::debounce::Debounce;
use super::debug::{ClientResourcesDebug, XdsDebug};
use super::metrics::XdsMetrics;
use super::session::{Inbound, Session};
use super::settings::{SettingsError, XdsSettings};
use super::store::{ChangeBatch, ResourceStore, lock};
use crate::auth::{AuthError, Authenticator, Caller, bearer_token};

/// Batches waiting for one client task.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    pub(crate) batches: Vec<Arc<ChangeBatch>>,
    /// Set when the inbox overflowed: the client re-examines everything; the
    /// instant is the oldest change it may be missing.
    pub(crate) resync: Option<Instant>,
}

/// What the registry keeps of one client: its state (shared with the debug view)
/// and the inbox its task drains.
#[derive(Debug)]
pub(crate) struct ClientHandle {
    pub(crate) state: std::sync::Mutex<ClientState>,
    pub(crate) inbox: std::sync::Mutex<Inbox>,
    pub(crate) wake: Notify,
    /// `ClientState::needs_removals_from`, published by the client's task after
    /// every change to its state, for the tombstone collection.
    pub(crate) removals_from: AtomicU64,
    /// The caller's node, for the bound on streams per node.
    node: String,
}

impl ClientHandle {
    /// Publishes what the state now needs of the removal log.
    pub(crate) fn publish(&self, state: &ClientState) {
        self.removals_from
            .store(state.needs_removals_from(), Ordering::Release);
    }
}

/// Shared by the handle, the service and every client task.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) store: Arc<ResourceStore>,
    pub(crate) settings: XdsSettings,
    pub(crate) metrics: XdsMetrics,
    pub(crate) budget: SendBudget,
    clients: std::sync::Mutex<HashMap<u64, Arc<ClientHandle>>>,
    next_id: AtomicU64,
    /// Flipped to `true` when the server drains: every client task ends.
    pub(crate) shutdown: watch::Sender<bool>,
}

impl Core {
    /// Hands a batch to every client (an `Arc` clone and a wake-up each), then
    /// forgets the removals every client has walked past.
    pub(crate) fn dispatch(&self, batch: Arc<ChangeBatch>) {
        let clients: Vec<Arc<ClientHandle>> = lock(&self.clients).values().cloned().collect();
        let needed = clients
            .iter()
            .map(|c| c.removals_from.load(Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX);
        self.store.drop_tombstones_before(needed);
        for client in clients {
            {
                let mut inbox = lock(&client.inbox);
                if inbox.resync.is_some() {
                    // Already resyncing: the batch is covered by it.
                } else if inbox.batches.len() >= self.settings.client_inbox {
                    let oldest = inbox.batches.iter().map(|b| b.first_change).min();
                    inbox.batches.clear();
                    inbox.resync =
                        Some(oldest.map_or(batch.first_change, |o| o.min(batch.first_change)));
                } else {
                    inbox.batches.push(batch.clone());
                }
            }
            client.wake.notify_one();
        }
    }

    /// A new client, unless its node already holds `max_streams_per_node`
    /// streams (then how many it holds): counted and added under one lock, so
    /// streams opened at the same moment cannot pass the bound together.
    pub(crate) fn register(
        &self,
        caller: Caller,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<Arc<ClientHandle>, usize> {
        let node = caller.node.clone();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let limits = Limits {
            max_names_per_type: self.settings.max_names_per_type,
            max_response_bytes: self.settings.max_response_bytes,
            max_in_flight: self.settings.max_in_flight,
        };
        let handle = Arc::new(ClientHandle {
            state: std::sync::Mutex::new(ClientState::new(id, caller, peer, limits)),
            inbox: std::sync::Mutex::new(Inbox::default()),
            wake: Notify::new(),
            removals_from: AtomicU64::new(u64::MAX),
            node: node.clone(),
        });
        let mut clients = lock(&self.clients);
        let open = clients.values().filter(|c| c.node == node).count();
        if open >= self.settings.max_streams_per_node {
            return Err(open);
        }
        clients.insert(id, handle.clone());
        drop(clients);
        self.metrics.connected_clients.inc();
        Ok(handle)
    }

    pub(crate) fn deregister(&self, id: u64) {
        if lock(&self.clients).remove(&id).is_some() {
            self.metrics.connected_clients.dec();
        }
    }

    fn handles(&self) -> Vec<Arc<ClientHandle>> {
        let mut clients: Vec<(u64, Arc<ClientHandle>)> = lock(&self.clients)
            .iter()
            .map(|(id, c)| (*id, c.clone()))
            .collect();
        clients.sort_unstable_by_key(|(id, _)| *id);
        clients.into_iter().map(|(_, c)| c).collect()
    }
}

/// The handle to the xDS server: feed it resources, read its debug view.
#[derive(Clone, Debug)]
pub struct XdsServer {
    core: Arc<Core>,
}

/// The tonic service of the delta ADS endpoint.
#[derive(Debug)]
pub struct AdsService<A> {
    core: Arc<Core>,
    authenticator: A,
}

impl XdsServer {
    /// Builds the server over `store` and starts its debouncer, which runs until
    /// `drain` signals (then every client stream ends). Must be called inside a
    /// tokio runtime.
    pub fn new<A: Authenticator>(
        store: Arc<ResourceStore>,
        settings: XdsSettings,
        authenticator: A,
        metrics: XdsMetrics,
        drain: DrainWatcher,
    ) -> Result<(Self, AggregatedDiscoveryServiceServer<AdsService<A>>), SettingsError> {
        settings.validate()?;
        let debounce = Debounce {
            quiet: settings.debounce_quiet,
            max: settings.debounce_max,
        };
        let (shutdown, _) = watch::channel(false);
        let budget = SendBudget::new(settings.push_budget_bytes, settings.max_response_bytes);
        let core = Arc::new(Core {
            store,
            budget,
            settings,
            metrics,
            clients: std::sync::Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            shutdown,
        });
        let task_core = core.clone();
        tokio::spawn(async move {
            let store = task_core.store.clone();
            tokio::select! {
                _ = drain.signaled() => {}
                _ = debounce.run(store, |batch| task_core.dispatch(batch)) => {}
            }
            tracing::info!("xDS server draining: closing client streams");
            task_core.shutdown.send_replace(true);
        });
        // A reconnecting client lists every version it holds in one request.
        let service = AggregatedDiscoveryServiceServer::new(AdsService {
            core: core.clone(),
            authenticator,
        })
        .max_decoding_message_size(mesh_core::xds::MAX_MESSAGE_SIZE);
        Ok((Self { core }, service))
    }

    #[cfg(test)]
    pub(crate) fn core(&self) -> &Core {
        &self.core
    }

    /// Opens a stream for `caller` without the network.
    #[cfg(test)]
    pub(crate) fn open_stream(
        &self,
        caller: Caller,
        inbound: Inbound,
    ) -> Result<mpsc::Receiver<Result<DeltaDiscoveryResponse, Status>>, Status> {
        open_stream(&self.core, caller, None, inbound)
    }

    /// The store the server pushes from.
    pub fn store(&self) -> &Arc<ResourceStore> {
        &self.core.store
    }

    /// Applies the translator's updates, removals last (see
    /// [`ResourceStore::apply_removals_last`]).
    pub fn apply(&self, updates: Vec<ResourceUpdate>) -> usize {
        self.core.store.apply_removals_last(updates)
    }

    /// The settings in effect.
    pub fn settings(&self) -> &XdsSettings {
        &self.core.settings
    }

    /// How many streams are connected.
    pub fn connected_clients(&self) -> usize {
        lock(&self.core.clients).len()
    }

    /// Connected clients and their per-type state.
    pub fn debug_snapshot(&self) -> XdsDebug {
        let handles = self.core.handles();
        let store = self.core.store.read();
        let clients = handles
            .iter()
            .map(|c| lock(&c.state).debug(&store))
            .collect();
        drop(store);
        XdsDebug {
            generation: self.core.store.generation(),
            released: self.core.store.released(),
            push_budget_bytes: self.core.budget.total(),
            push_budget_available: self.core.budget.available(),
            resources: self.core.store.counts().into_iter().collect(),
            clients,
        }
    }

    /// Every resource client `id` holds, with versions sent and acknowledged.
    pub fn client_resources(&self, id: u64) -> Option<ClientResourcesDebug> {
        let client = lock(&self.core.clients).get(&id).cloned()?;
        let store = self.core.store.read();
        let debug = lock(&client.state).resources_debug(&store);
        Some(debug)
    }
}

fn refusal(error: AuthError) -> Status {
    match error {
        AuthError::Unavailable(_) => Status::unavailable(error.to_string()),
        AuthError::Missing | AuthError::Invalid(_) => Status::unauthenticated(error.to_string()),
    }
}

#[tonic::async_trait]
impl<A: Authenticator> AggregatedDiscoveryService for AdsService<A> {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        let caller = match bearer_token(&request) {
            Ok(token) => self.authenticator.authenticate(token).await,
            Err(e) => Err(e),
        };
        let caller = caller.map_err(|error| {
            tracing::info!(peer = ?peer, %error, "xDS stream refused");
            refusal(error)
        })?;
        if *self.core.shutdown.borrow() {
            return Err(Status::unavailable("the xDS server is shutting down"));
        }
        let rx = open_stream(&self.core, caller, peer, Box::pin(request.into_inner()))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Registers an authenticated caller's stream and starts its task; the
/// responses come out of the returned channel.
pub(crate) fn open_stream(
    core: &Arc<Core>,
    caller: Caller,
    peer: Option<std::net::SocketAddr>,
    inbound: Inbound,
) -> Result<mpsc::Receiver<Result<DeltaDiscoveryResponse, Status>>, Status> {
    let client = core.register(caller.clone(), peer).map_err(|open| {
        tracing::warn!(peer = ?peer, node = %caller.node, open, "xDS stream refused: too many streams for the node");
        Status::resource_exhausted(format!(
            "node {} already holds {open} xDS streams, the most allowed",
            caller.node
        ))
    })?;
    let (tx, rx) = mpsc::channel(core.settings.client_queue);
    let id = lock(&client.state).id;
    tracing::info!(client = id, principal = %caller.principal, node = %caller.node, peer = ?peer, "xDS client connected");
    let session = Session {
        core: core.clone(),
        client,
        id,
        caller,
        tx,
        inbound,
    };
    tokio::spawn(session.run());
    Ok(rx)
}
