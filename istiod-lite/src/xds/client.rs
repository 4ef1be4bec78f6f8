//! One connected client's delta xDS state, free of I/O so it can be tested alone:
//! subscriptions per type URL, what the client holds, what is pending for it, and
//! its ACK/NACK history. The stream task feeds it requests and change batches and
//! asks it for the next response when the stream has room.
//!
//! A wildcard subscription is a [`Walk`] through the type's change log (constant
//! state per client); only named subscriptions keep a version per resource and a
//! set of changed names, fed by the debouncer's batches.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::ops::Bound;
use std::sync::Arc;
use std::time::SystemTime;

use ambit_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tokio::time::Instant;

use super::debug::{AckDebug, NackDebug, unix_ms};
use super::entries::{LogKey, TypeEntries};
use super::store::{ChangeBatch, Resources, Version, format_version, parse_version};
use super::walk::{Step, Walk};
use crate::auth::Caller;

mod debug_view;
mod request;

pub(crate) use request::RequestError;

/// The wildcard resource name.
const WILDCARD: &str = "*";

/// What the client holds of one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    /// The version last sent (or claimed by the client on reconnect); `None`
    /// when the client claimed a version that is not one of ours.
    sent: Option<Version>,
    /// The version the client last acknowledged.
    acked: Option<Version>,
}

/// A response not yet acknowledged.
#[derive(Debug)]
struct InFlight {
    nonce: String,
    resources: Vec<(Arc<str>, Version)>,
    /// Where the wildcard walk stood after it.
    end: Option<LogKey>,
}

#[derive(Debug, Default)]
struct TypeState {
    /// Whether the first request of the type has been seen.
    started: bool,
    /// Named subscriptions.
    names: HashSet<String>,
    /// The wildcard subscription, if any: it covers every name.
    walk: Option<Walk>,
    /// Without a wildcard subscription: what the client holds of its names.
    held: HashMap<Arc<str>, Held>,
    /// Without a wildcard subscription: names to look at in the next response.
    dirty: HashSet<Arc<str>>,
    /// A response is owed even if it carries nothing (a new subscription).
    must_respond: bool,
    /// When the oldest change behind `dirty` was applied (named subscriptions).
    push_origin: Option<Instant>,
    in_flight: VecDeque<InFlight>,
    responses_sent: u64,
    resources_sent: u64,
    acks: u64,
    nacks: u64,
    last_ack: Option<AckDebug>,
    last_nack: Option<NackDebug>,
}

impl TypeState {
    fn has_work(&self, released: u64) -> bool {
        self.must_respond
            || !self.dirty.is_empty()
            || self.walk.as_ref().is_some_and(|w| w.has_work(released))
    }

    /// Turns on the wildcard subscription: the walk starts from the beginning
    /// and skips what the client already holds.
    fn start_wildcard(
        &mut self,
        store: &Resources,
        entries: Option<&TypeEntries>,
        mut claimed: HashMap<Arc<str>, Option<Version>>,
    ) {
        claimed.extend(self.held.drain().map(|(name, held)| (name, held.sent)));
        self.held = HashMap::new();
        self.dirty = HashSet::new();
        // Late answers to the responses before are only counted.
        self.in_flight.clear();
        self.walk = Some(Walk::begin(store.generation(), claimed, entries));
    }

    /// Turns off the wildcard subscription: the client keeps its named resources
    /// (and forgets the rest itself). Each is looked at again, so what the walk
    /// still owed for it (a newer version, a removal) is sent.
    fn end_wildcard(&mut self, entries: Option<&TypeEntries>) {
        let Some(walk) = self.walk.take() else {
            return;
        };
        self.in_flight.clear();
        for name in &self.names {
            let name: Arc<str> = Arc::from(name.as_str());
            let held = match walk.holds(&name, entries) {
                Some((version, acked)) => Some(Held {
                    sent: Some(version),
                    acked: acked.then_some(version),
                }),
                // Gone from the store: a removal is owed if the client may hold it.
                None if walk.owes_removal(&name, entries) => Some(Held {
                    sent: None,
                    acked: None,
                }),
                None => None,
            };
            if let Some(held) = held {
                self.held.insert(name.clone(), held);
            }
            self.dirty.insert(name);
        }
    }

    /// The next named resources to send, up to `budget` bytes.
    fn named_step(&mut self, entries: Option<&TypeEntries>, budget: usize) -> Step {
        let mut names: Vec<Arc<str>> = self.dirty.drain().collect();
        names.sort_unstable();
        let mut step = Step::default();
        let mut used = 0;
        for name in &names {
            if step.bytes >= budget {
                break;
            }
            used += 1;
            match entries.and_then(|e| e.get(name)) {
                Some(entry) if self.names.contains(name.as_ref()) => {
                    let held = self.held.entry(name.clone()).or_insert(Held {
                        sent: None,
                        acked: None,
                    });
                    if held.sent == Some(entry.version) {
                        continue;
                    }
                    held.sent = Some(entry.version);
                    step.bytes += entry.body.len() + name.len();
                    step.sent
                        .push((name.clone(), entry.version, entry.body.clone()));
                }
                Some(_) => {}
                None => {
                    if self.held.remove(name).is_some() {
                        step.bytes += name.len();
                        step.removed.push(name.clone());
                    }
                }
            }
        }
        self.dirty.extend(names.into_iter().skip(used));
        if self.dirty.is_empty() {
            self.dirty.shrink_to(0);
        }
        step
    }
}

/// What an ACK/NACK request said, for the caller to log and count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Feedback {
    /// A subscription change only.
    None,
    Ack,
    Nack {
        nonce: String,
        message: String,
    },
}

/// A response ready to go, with what the metrics need.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) response: DeltaDiscoveryResponse,
    pub(crate) resources: usize,
    pub(crate) removed: usize,
    pub(crate) bytes: usize,
    /// Set when this response completes a push of store changes.
    pub(crate) push_origin: Option<Instant>,
}

/// Limits a client's state is built with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) max_names_per_type: usize,
    pub(crate) max_response_bytes: usize,
    pub(crate) max_in_flight: usize,
}

/// One client's protocol state.
#[derive(Debug)]
pub(crate) struct ClientState {
    pub(crate) id: u64,
    pub(crate) caller: Caller,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) node: Option<String>,
    connected_since: SystemTime,
    limits: Limits,
    types: BTreeMap<String, TypeState>,
    last_type: Option<String>,
    nonces: u64,
}

impl ClientState {
    pub(crate) fn new(id: u64, caller: Caller, peer: Option<SocketAddr>, limits: Limits) -> Self {
        Self {
            id,
            caller,
            peer,
            node: None,
            connected_since: SystemTime::now(),
            limits,
            types: BTreeMap::new(),
            last_type: None,
            nonces: 0,
        }
    }

    /// Applies one request: subscriptions, initial versions, ACK or NACK.
    pub(crate) fn handle_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        store: &Resources,
    ) -> Result<Feedback, RequestError> {
        let max_names = self.limits.max_names_per_type;
        let entries = store.get(&req.type_url);
        let started = self.types.get(&req.type_url).is_some_and(|ts| ts.started);
        request::check(&req, &self.caller, started, entries, max_names)?;
        if self.node.is_none() {
            self.node = request::node_id(&req).map(str::to_string);
        }
        let ts = self.types.entry(req.type_url.clone()).or_default();
        if !ts.started {
            ts.started = true;
            ts.must_respond = true;
            let claimed: HashMap<Arc<str>, Option<Version>> = req
                .initial_resource_versions
                .into_iter()
                .map(|(name, version)| (Arc::from(name), parse_version(&version)))
                .collect();
            if request::opens_wildcard(&req.resource_names_subscribe) {
                ts.start_wildcard(store, entries, claimed);
            } else {
                for (name, version) in claimed {
                    let held = Held {
                        sent: version,
                        acked: version,
                    };
                    ts.held.insert(name.clone(), held);
                    ts.dirty.insert(name);
                }
            }
        }
        let new_names = req
            .resource_names_subscribe
            .iter()
            .filter(|n| !ts.names.contains(n.as_str()))
            .count();
        if ts.names.len() + new_names > max_names {
            return Err(RequestError::TooManyNames {
                type_url: req.type_url,
                max: max_names,
            });
        }
        for name in req.resource_names_subscribe {
            ts.must_respond = true;
            if name == WILDCARD {
                if ts.walk.is_none() {
                    ts.start_wildcard(store, entries, HashMap::new());
                }
            } else {
                if ts.walk.is_none() {
                    ts.dirty.insert(Arc::from(name.as_str()));
                }
                ts.names.insert(name);
            }
        }
        for name in req.resource_names_unsubscribe {
            if name == WILDCARD {
                ts.end_wildcard(entries);
                let names = &ts.names;
                ts.held.retain(|held, _| names.contains(held.as_ref()));
                ts.dirty.retain(|d| names.contains(d.as_ref()));
            } else {
                ts.names.remove(&name);
                if ts.walk.is_none() {
                    // The client forgets it; no removal is sent.
                    ts.held.remove(name.as_str());
                    ts.dirty.remove(name.as_str());
                }
            }
        }
        if req.response_nonce.is_empty() {
            return Ok(Feedback::None);
        }
        let now = unix_ms(SystemTime::now());
        let flight = ts
            .in_flight
            .iter()
            .position(|f| f.nonce == req.response_nonce)
            .and_then(|i| ts.in_flight.remove(i));
        match req.error_detail {
            Some(error) => {
                ts.nacks += 1;
                if let (Some(f), Some(walk)) = (&flight, ts.walk.as_mut()) {
                    walk.answered(f.end.as_ref(), &f.resources, true);
                }
                let resources = flight
                    .map(|f| f.resources.iter().map(|(n, _)| n.to_string()).collect())
                    .unwrap_or_default();
                ts.last_nack = Some(NackDebug {
                    nonce: req.response_nonce.clone(),
                    at_unix_ms: now,
                    code: error.code,
                    message: error.message.clone(),
                    resources,
                });
                // The NACKed versions stay recorded as sent: they are not resent
                // until they change.
                Ok(Feedback::Nack {
                    nonce: req.response_nonce,
                    message: error.message,
                })
            }
            None => {
                ts.acks += 1;
                for (name, version) in flight.iter().flat_map(|f| f.resources.iter()) {
                    if let Some(held) = ts.held.get_mut(name) {
                        held.acked = Some(*version);
                    }
                }
                if let (Some(f), Some(walk)) = (&flight, ts.walk.as_mut()) {
                    walk.answered(f.end.as_ref(), &f.resources, false);
                }
                ts.last_ack = Some(AckDebug {
                    nonce: req.response_nonce,
                    at_unix_ms: now,
                });
                Ok(Feedback::Ack)
            }
        }
    }

    /// Merges a debounced batch: only names the client subscribes to or holds.
    pub(crate) fn merge_batch(&mut self, batch: &ChangeBatch) {
        for (type_url, names) in &batch.changes {
            let Some(ts) = self.types.get_mut(type_url) else {
                continue;
            };
            if ts.walk.is_some() {
                // The walk finds the changes in the log.
                continue;
            }
            let mut relevant = false;
            for name in names {
                if ts.names.contains(name.as_ref()) || ts.held.contains_key(name) {
                    ts.dirty.insert(name.clone());
                    relevant = true;
                }
            }
            if relevant {
                ts.push_origin = Some(match ts.push_origin {
                    Some(o) => o.min(batch.first_change),
                    None => batch.first_change,
                });
            }
        }
    }

    /// Re-examines every name the client subscribes to or holds (after its
    /// batches were collapsed because it fell behind).
    pub(crate) fn resync(&mut self, origin: Instant) {
        for ts in self.types.values_mut() {
            if ts.walk.is_some() {
                continue;
            }
            ts.dirty
                .extend(ts.names.iter().map(|n| Arc::from(n.as_str())));
            ts.dirty.extend(ts.held.keys().cloned());
            ts.push_origin = Some(ts.push_origin.map_or(origin, |o| o.min(origin)));
        }
    }

    /// Whether a response may be owed, with generation `released` let out.
    pub(crate) fn has_work(&self, released: u64) -> bool {
        self.types.values().any(|ts| ts.has_work(released))
    }

    /// Removal tombstones before this generation are no use to this client.
    pub(crate) fn needs_removals_from(&self) -> u64 {
        self.types
            .values()
            .filter_map(|ts| ts.walk.as_ref())
            .map(Walk::needs_removals_from)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Builds the next response from the current store contents, taking types
    /// in turn; `None` when nothing is owed.
    pub(crate) fn next_response(&mut self, store: &Resources) -> Option<Outgoing> {
        let released = store.released();
        let order: Vec<String> = match &self.last_type {
            Some(last) => self
                .types
                .range::<String, _>((Bound::Excluded(last), Bound::Unbounded))
                .chain(self.types.range::<String, _>(..=last))
                .filter(|(_, ts)| ts.has_work(released))
                .map(|(t, _)| t.clone())
                .collect(),
            None => self
                .types
                .iter()
                .filter(|(_, ts)| ts.has_work(released))
                .map(|(t, _)| t.clone())
                .collect(),
        };
        for type_url in order {
            if let Some(out) = self.response_for(&type_url, store) {
                self.last_type = Some(type_url);
                return Some(out);
            }
        }
        None
    }

    fn response_for(&mut self, type_url: &str, store: &Resources) -> Option<Outgoing> {
        let limits = self.limits;
        let ts = self.types.get_mut(type_url)?;
        let entries = store.get(type_url);
        // `more_to_come`: the response is part of the type's first sync and more
        // parts follow (the client is not synced before the last).
        let (step, push_origin, more_to_come) = match ts.walk.as_mut() {
            Some(walk) => {
                let step = walk.step(entries, store.released(), limits.max_response_bytes);
                let origin = step
                    .completed_after
                    .and_then(|after| store.first_change_after(after));
                (step, origin, !walk.initial_sync_done())
            }
            None => {
                let step = ts.named_step(entries, limits.max_response_bytes);
                let origin = if ts.dirty.is_empty() {
                    ts.push_origin.take()
                } else {
                    None
                };
                (step, origin, !ts.dirty.is_empty())
            }
        };
        if step.is_empty() && !ts.must_respond {
            return None;
        }
        // A part of the first sync is always followed by another response, even
        // an empty one (when all that was left turned out to be nothing to send):
        // the client is synced only at a part not marked `MORE_TO_COME`.
        ts.must_respond = more_to_come;
        self.nonces += 1;
        let nonce = format!("{:x}-{:x}", self.id, self.nonces);
        let resources: Vec<Resource> = step
            .sent
            .iter()
            .map(|(name, version, body)| Resource {
                version: format_version(*version),
                resource: Some(ambit_proto::Any {
                    type_url: type_url.to_string(),
                    value: body.clone(),
                }),
                name: name.to_string(),
                ..Default::default()
            })
            .collect();
        ts.in_flight.push_back(InFlight {
            nonce: nonce.clone(),
            resources: step.sent.iter().map(|(n, v, _)| (n.clone(), *v)).collect(),
            end: step.end,
        });
        while ts.in_flight.len() > limits.max_in_flight {
            ts.in_flight.pop_front();
        }
        ts.responses_sent += 1;
        ts.resources_sent += resources.len() as u64;
        let (resources_count, removed_count) = (resources.len(), step.removed.len());
        Some(Outgoing {
            response: DeltaDiscoveryResponse {
                system_version_info: if more_to_come {
                    format!("{}{}", store.generation(), mesh_core::xds::MORE_TO_COME)
                } else {
                    store.generation().to_string()
                },
                resources,
                type_url: type_url.to_string(),
                nonce,
                removed_resources: step.removed.iter().map(|n| n.to_string()).collect(),
            },
            resources: resources_count,
            removed: removed_count,
            bytes: step.bytes,
            push_origin,
        })
    }
}
