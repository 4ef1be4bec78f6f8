//! The load on a control plane: a fleet of simulated node proxies in one process,
//! each a delta xDS client on its own HTTP/2 connection over TLS (as a ztunnel
//! holds one), wildcard-subscribed to workloads, services and authorizations, and
//! ACKing every response at once.
//!
//! Each client records when its initial state was complete and, once a scenario
//! arms a [`Fleet::watch`], when each watched resource reached it, so a change can
//! be timed from the file write to the last client that ACKed it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ambit_proto::envoy::config::core::v3::Node;
use ambit_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use ambit_proto::{AUTHORIZATION_TYPE_URL, SERVICE_TYPE_URL, WORKLOAD_TYPE_URL};
use mesh_core::SpiffeId;
use mesh_core::control::{ControlError, ControlPlane, Token};
use rustls_pki_types::CertificateDer;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

/// The types every client subscribes to, in the order of the per-type counts.
pub const TYPE_URLS: [&str; 3] = [WORKLOAD_TYPE_URL, SERVICE_TYPE_URL, AUTHORIZATION_TYPE_URL];

/// A response larger than tonic's 4 MiB default is the server's right.
const MAX_MESSAGE: usize = 64 << 20;

/// Why the fleet failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{node}: {source}")]
    Control {
        node: String,
        #[source]
        source: ControlError,
    },
    #[error("{done} of {clients} clients done after {waited:?} ({what}); e.g. {example}")]
    Timeout {
        what: &'static str,
        done: usize,
        clients: usize,
        waited: Duration,
        /// The first error, or what the first client still waiting lacks.
        example: String,
    },
    #[error("{failed} clients failed, e.g. {first_error}")]
    Failed { failed: usize, first_error: String },
}

/// Where the control plane is, how to trust it, and who connects.
#[derive(Clone, Debug)]
pub struct FleetSpec {
    /// `host:port` of the delta xDS endpoint.
    pub address: String,
    /// The identity the server's certificate must carry.
    pub identity: SpiffeId,
    pub roots: Vec<CertificateDer<'static>>,
    /// `(node id, bearer token)` per client.
    pub nodes: Vec<(String, String)>,
    /// Resources per type (in [`TYPE_URLS`] order) that make the initial state.
    pub expected: [usize; 3],
    pub connect_timeout: Duration,
}

/// The resources one armed watch waits for, and when each arrived.
#[derive(Debug)]
struct Watch {
    /// `(type index, name)`; a removal of the name counts as its arrival.
    names: Arc<Vec<(usize, String)>>,
    got: Vec<Option<Instant>>,
    done: bool,
}

/// What one client has seen; shared between its task and the scenario.
#[derive(Debug, Default)]
struct Progress {
    received: [usize; 3],
    removed: usize,
    responses: u64,
    /// Resource bytes as istiod counts them: body and name of each resource,
    /// name of each removal.
    resource_bytes: u64,
    initial_at: Option<Instant>,
    watch: Option<Watch>,
    error: Option<String>,
}

#[derive(Debug)]
struct ClientShared {
    node: String,
    progress: Mutex<Progress>,
}

impl ClientShared {
    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Fleet-wide counts the scenario waits on.
#[derive(Debug, Default)]
struct Counters {
    initial: AtomicUsize,
    watched: AtomicUsize,
    failed: AtomicUsize,
    changed: Notify,
}

/// Totals over every client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub responses: u64,
    pub resources: u64,
    pub removed: u64,
    pub resource_bytes: u64,
}

/// The running clients; dropping the fleet aborts every client task.
#[derive(Debug)]
pub struct Fleet {
    clients: Vec<Arc<ClientShared>>,
    counters: Arc<Counters>,
    started: Instant,
    _tasks: JoinSet<()>,
}

impl Fleet {
    /// Starts one task and one connection per node, all at once. Must be called
    /// inside a tokio runtime.
    pub fn start(spec: FleetSpec) -> Result<Self, LoadError> {
        let counters = Arc::new(Counters::default());
        let mut tasks = JoinSet::new();
        let mut clients = Vec::with_capacity(spec.nodes.len());
        let started = Instant::now();
        for (node, token) in &spec.nodes {
            let control = ControlPlane {
                address: spec.address.clone(),
                identity: spec.identity.clone(),
                roots: spec.roots.clone(),
                token: Token::Static(token.clone()),
                connect_timeout: spec.connect_timeout,
            };
            // A channel of its own per client: one TCP + TLS + HTTP/2 connection each.
            let channel = control.channel().map_err(|source| LoadError::Control {
                node: node.clone(),
                source,
            })?;
            let xds = AggregatedDiscoveryServiceClient::with_interceptor(channel, control.auth())
                .max_decoding_message_size(MAX_MESSAGE);
            let shared = Arc::new(ClientShared {
                node: node.clone(),
                progress: Mutex::default(),
            });
            clients.push(shared.clone());
            let (counters, expected) = (counters.clone(), spec.expected);
            tasks.spawn(async move {
                let outcome = run_client(xds, &shared, &counters, expected).await;
                let message = match outcome {
                    Ok(()) => "the server ended the stream".to_string(),
                    Err(message) => message,
                };
                shared.progress().error = Some(message);
                counters.failed.fetch_add(1, Ordering::AcqRel);
                counters.changed.notify_one();
            });
        }
        Ok(Self {
            clients,
            counters,
            started,
            _tasks: tasks,
        })
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Waits until every client holds the initial state; returns, per client, the
    /// time from the fleet's start until then, sorted.
    pub async fn wait_initial(&self, timeout: Duration) -> Result<Vec<Duration>, LoadError> {
        self.wait(&self.counters.initial, "initial state", timeout)
            .await?;
        let mut times: Vec<Duration> = self
            .clients
            .iter()
            .filter_map(|c| c.progress().initial_at)
            .map(|at| at.saturating_duration_since(self.started))
            .collect();
        times.sort_unstable();
        Ok(times)
    }

    /// Arms a watch on every client for these `(type URL, name)` resources;
    /// whatever reaches a client from now on (a new version or a removal) counts.
    pub fn watch(&self, resources: &[(&str, String)]) {
        let names: Arc<Vec<(usize, String)>> = Arc::new(
            resources
                .iter()
                .filter_map(|(type_url, name)| Some((type_index(type_url)?, name.clone())))
                .collect(),
        );
        self.counters.watched.store(0, Ordering::Release);
        for client in &self.clients {
            client.progress().watch = Some(Watch {
                names: names.clone(),
                got: vec![None; names.len()],
                done: names.is_empty(),
            });
        }
    }

    /// Waits until every client has ACKed every watched resource; returns, per
    /// client, the time from `since` to the ACK of the last of them, sorted.
    pub async fn wait_watch(
        &self,
        since: Instant,
        timeout: Duration,
    ) -> Result<Vec<Duration>, LoadError> {
        self.wait(&self.counters.watched, "watched change", timeout)
            .await?;
        let mut times: Vec<Duration> = self
            .clients
            .iter()
            .filter_map(|c| {
                let progress = c.progress();
                let watch = progress.watch.as_ref()?;
                let last = watch.got.iter().copied().collect::<Option<Vec<_>>>()?;
                Some(last.into_iter().max()?.saturating_duration_since(since))
            })
            .collect();
        times.sort_unstable();
        Ok(times)
    }

    /// What every client received so far, summed.
    pub fn totals(&self) -> Totals {
        self.clients.iter().fold(Totals::default(), |mut t, c| {
            let p = c.progress();
            t.responses += p.responses;
            t.resources += p.received.iter().sum::<usize>() as u64;
            t.removed += p.removed as u64;
            t.resource_bytes += p.resource_bytes;
            t
        })
    }

    async fn wait(
        &self,
        counter: &AtomicUsize,
        what: &'static str,
        timeout: Duration,
    ) -> Result<(), LoadError> {
        let start = Instant::now();
        loop {
            let done = counter.load(Ordering::Acquire);
            if done >= self.clients.len() {
                return Ok(());
            }
            let failed = self.counters.failed.load(Ordering::Acquire);
            if failed > 0 {
                return Err(LoadError::Failed {
                    failed,
                    first_error: self.first_error(),
                });
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(LoadError::Timeout {
                    what,
                    done,
                    clients: self.clients.len(),
                    waited,
                    example: self.first_lacking(),
                });
            }
            // The clients time themselves: how soon this wakes up does not matter.
            let _ =
                tokio::time::timeout(Duration::from_millis(50), self.counters.changed.notified())
                    .await;
        }
    }

    /// What the first client that is not done lacks.
    fn first_lacking(&self) -> String {
        for c in &self.clients {
            let p = c.progress();
            if let Some(e) = &p.error {
                return format!("{}: {e}", c.node);
            }
            if p.initial_at.is_none() {
                return format!(
                    "{} holds {:?} resources of {TYPE_URLS:?}, after {} responses",
                    c.node, p.received, p.responses
                );
            }
            if let Some(w) = p.watch.as_ref().filter(|w| !w.done) {
                let missing: Vec<&String> = w
                    .names
                    .iter()
                    .zip(&w.got)
                    .filter(|(_, got)| got.is_none())
                    .map(|((_, name), _)| name)
                    .collect();
                return format!(
                    "{} has not received {missing:?} ({} responses so far)",
                    c.node, p.responses
                );
            }
        }
        "nothing".into()
    }

    fn first_error(&self) -> String {
        self.clients
            .iter()
            .find_map(|c| {
                let p = c.progress();
                p.error.as_ref().map(|e| format!("{}: {e}", c.node))
            })
            .unwrap_or_else(|| "none".into())
    }
}

fn type_index(type_url: &str) -> Option<usize> {
    TYPE_URLS.iter().position(|t| *t == type_url)
}

type Xds = AggregatedDiscoveryServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        mesh_core::control::BearerToken,
    >,
>;

/// One client's stream: subscribe to the three types, then ACK and record every
/// response until the stream ends. Returns why it ended.
async fn run_client(
    mut xds: Xds,
    shared: &ClientShared,
    counters: &Counters,
    expected: [usize; 3],
) -> Result<(), String> {
    let (tx, rx) = mpsc::channel(16);
    for type_url in TYPE_URLS {
        let subscribe = DeltaDiscoveryRequest {
            node: Some(Node {
                id: shared.node.clone(),
                ..Default::default()
            }),
            type_url: type_url.to_string(),
            resource_names_subscribe: vec!["*".to_string()],
            ..Default::default()
        };
        tx.try_send(subscribe).map_err(|e| e.to_string())?;
    }
    let mut inbound = xds
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("stream refused: {s}"))?
        .into_inner();
    while let Some(response) = inbound
        .message()
        .await
        .map_err(|s| format!("stream: {s}"))?
    {
        let ack = DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        };
        tx.send(ack)
            .await
            .map_err(|_| "the request stream closed".to_string())?;
        let acked_at = Instant::now();
        record(shared, counters, expected, &response, acked_at);
    }
    Ok(())
}

/// Counts a response and marks watched resources as arrived at `at`.
fn record(
    shared: &ClientShared,
    counters: &Counters,
    expected: [usize; 3],
    response: &DeltaDiscoveryResponse,
    at: Instant,
) {
    let Some(t) = type_index(&response.type_url) else {
        return;
    };
    let mut p = shared.progress();
    p.responses += 1;
    p.received[t] += response.resources.len();
    p.removed += response.removed_resources.len();
    let body_bytes: usize = response
        .resources
        .iter()
        .map(|r| r.name.len() + r.resource.as_ref().map_or(0, |a| a.value.len()))
        .sum();
    let removed_bytes: usize = response.removed_resources.iter().map(String::len).sum();
    p.resource_bytes += (body_bytes + removed_bytes) as u64;
    if p.initial_at.is_none()
        && p.received
            .iter()
            .zip(expected)
            .all(|(got, want)| *got >= want)
    {
        p.initial_at = Some(at);
        counters.initial.fetch_add(1, Ordering::AcqRel);
        counters.changed.notify_one();
    }
    let Some(watch) = p.watch.as_mut() else {
        return;
    };
    if watch.done {
        return;
    }
    let names = watch.names.clone();
    let arrived = response
        .resources
        .iter()
        .map(|r| r.name.as_str())
        .chain(response.removed_resources.iter().map(String::as_str));
    for name in arrived {
        for (i, (wt, wname)) in names.iter().enumerate() {
            if *wt == t && wname == name && watch.got[i].is_none() {
                watch.got[i] = Some(at);
            }
        }
    }
    if watch.got.iter().all(Option::is_some) {
        watch.done = true;
        counters.watched.fetch_add(1, Ordering::AcqRel);
        counters.changed.notify_one();
    }
}
