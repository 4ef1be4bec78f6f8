//! One connected client's delta xDS state, free of I/O so it can be tested alone:
//! subscriptions per type URL, what the client holds, what is pending for it, and
//! its ACK/NACK history. The stream task feeds it requests and change batches and
//! asks it for the next response when the stream has room.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::ops::Bound;
use std::sync::Arc;
use std::time::SystemTime;

use ambit_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tokio::time::Instant;

use super::debug::{
    AckDebug, ClientDebug, ClientResourcesDebug, HeldDebug, NackDebug, TypeDebug, unix_ms,
};
use super::store::{ChangeBatch, Resources, Version, format_version, parse_version};
use crate::auth::Caller;

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
}

#[derive(Debug, Default)]
struct TypeState {
    /// Whether the first request of the type has been seen.
    started: bool,
    wildcard: bool,
    names: HashSet<String>,
    held: HashMap<Arc<str>, Held>,
    /// Names to look at in the next response.
    dirty: HashSet<Arc<str>>,
    /// A response is owed even if it carries nothing (a new subscription).
    must_respond: bool,
    /// When the oldest change behind `dirty` was applied.
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
    fn has_work(&self) -> bool {
        self.must_respond || !self.dirty.is_empty()
    }

    fn subscribes(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    fn mark_all(&mut self, entries: Option<&super::store::TypeEntries>) {
        if let Some(entries) = entries {
            self.dirty.extend(entries.keys().cloned());
        }
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

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("the request has no type_url")]
    NoTypeUrl,
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
        if req.type_url.is_empty() {
            return Err(RequestError::NoTypeUrl);
        }
        if self.node.is_none() {
            self.node = req
                .node
                .as_ref()
                .map(|n| n.id.clone())
                .filter(|id| !id.is_empty());
        }
        let entries = store.get(&req.type_url);
        let ts = self.types.entry(req.type_url.clone()).or_default();
        if !ts.started {
            ts.started = true;
            ts.must_respond = true;
            for (name, version) in req.initial_resource_versions {
                let name: Arc<str> = Arc::from(name);
                let version = parse_version(&version);
                ts.held.insert(
                    name.clone(),
                    Held {
                        sent: version,
                        acked: version,
                    },
                );
                ts.dirty.insert(name);
            }
            if req.resource_names_subscribe.is_empty() {
                ts.wildcard = true;
                ts.mark_all(entries);
            }
        }
        for name in req.resource_names_subscribe {
            ts.must_respond = true;
            if name == WILDCARD {
                ts.wildcard = true;
                ts.mark_all(entries);
            } else {
                ts.dirty.insert(Arc::from(name.as_str()));
                ts.names.insert(name);
            }
        }
        for name in req.resource_names_unsubscribe {
            if name == WILDCARD {
                ts.wildcard = false;
                let names = &ts.names;
                ts.held.retain(|held, _| names.contains(held.as_ref()));
                ts.dirty.retain(|d| names.contains(d.as_ref()));
            } else {
                ts.names.remove(&name);
                if !ts.wildcard {
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
            let mut relevant = false;
            for name in names {
                if ts.subscribes(name) || ts.held.contains_key(name) {
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

    /// Re-examines everything the client subscribes to or holds (after its
    /// batches were collapsed because it fell behind).
    pub(crate) fn resync(&mut self, store: &Resources, origin: Instant) {
        for (type_url, ts) in &mut self.types {
            if ts.wildcard {
                ts.mark_all(store.get(type_url));
            }
            ts.dirty
                .extend(ts.names.iter().map(|n| Arc::from(n.as_str())));
            ts.dirty.extend(ts.held.keys().cloned());
            ts.push_origin = Some(ts.push_origin.map_or(origin, |o| o.min(origin)));
        }
    }

    /// Whether a response may be owed.
    pub(crate) fn has_work(&self) -> bool {
        self.types.values().any(TypeState::has_work)
    }

    /// Builds the next response from the current store contents, taking types
    /// in turn; `None` when nothing is owed.
    pub(crate) fn next_response(&mut self, store: &Resources, generation: u64) -> Option<Outgoing> {
        let order: Vec<String> = match &self.last_type {
            Some(last) => self
                .types
                .range::<String, _>((Bound::Excluded(last), Bound::Unbounded))
                .chain(self.types.range::<String, _>(..=last))
                .filter(|(_, ts)| ts.has_work())
                .map(|(t, _)| t.clone())
                .collect(),
            None => self
                .types
                .iter()
                .filter(|(_, ts)| ts.has_work())
                .map(|(t, _)| t.clone())
                .collect(),
        };
        for type_url in order {
            if let Some(out) = self.response_for(&type_url, store, generation) {
                self.last_type = Some(type_url);
                return Some(out);
            }
        }
        None
    }

    fn response_for(
        &mut self,
        type_url: &str,
        store: &Resources,
        generation: u64,
    ) -> Option<Outgoing> {
        let limits = self.limits;
        let ts = self.types.get_mut(type_url)?;
        let entries = store.get(type_url);
        let mut names: Vec<Arc<str>> = ts.dirty.drain().collect();
        names.sort_unstable();
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        let mut sent = Vec::new();
        let mut bytes = 0usize;
        let mut used = 0;
        for name in &names {
            if bytes >= limits.max_response_bytes {
                break;
            }
            used += 1;
            match entries.and_then(|e| e.get(name)) {
                Some(entry) if ts.subscribes(name) => {
                    let held = ts.held.entry(name.clone()).or_insert(Held {
                        sent: None,
                        acked: None,
                    });
                    if held.sent == Some(entry.version) {
                        continue;
                    }
                    held.sent = Some(entry.version);
                    bytes += entry.body.len() + name.len();
                    resources.push(Resource {
                        version: format_version(entry.version),
                        resource: Some(prost_types::Any {
                            type_url: type_url.to_string(),
                            value: entry.body.to_vec(),
                        }),
                        name: name.to_string(),
                        ..Default::default()
                    });
                    sent.push((name.clone(), entry.version));
                }
                Some(_) => {}
                None => {
                    if ts.held.remove(name).is_some() {
                        bytes += name.len();
                        removed.push(name.to_string());
                    }
                }
            }
        }
        ts.dirty.extend(names.into_iter().skip(used));
        if ts.dirty.is_empty() {
            // A full sync leaves a set sized for every resource; with a thousand
            // clients that capacity is hundreds of megabytes held for nothing.
            ts.dirty.shrink_to(0);
        }
        let push_origin = if ts.dirty.is_empty() {
            ts.push_origin.take()
        } else {
            None
        };
        if resources.is_empty() && removed.is_empty() && !ts.must_respond {
            return None;
        }
        ts.must_respond = false;
        self.nonces += 1;
        let nonce = format!("{:x}-{:x}", self.id, self.nonces);
        ts.in_flight.push_back(InFlight {
            nonce: nonce.clone(),
            resources: sent,
        });
        while ts.in_flight.len() > limits.max_in_flight {
            ts.in_flight.pop_front();
        }
        ts.responses_sent += 1;
        ts.resources_sent += resources.len() as u64;
        let (resources_count, removed_count) = (resources.len(), removed.len());
        Some(Outgoing {
            response: DeltaDiscoveryResponse {
                system_version_info: generation.to_string(),
                resources,
                type_url: type_url.to_string(),
                nonce,
                removed_resources: removed,
            },
            resources: resources_count,
            removed: removed_count,
            bytes,
            push_origin,
        })
    }

    /// The summary the debug view shows.
    pub(crate) fn debug(&self) -> ClientDebug {
        ClientDebug {
            id: self.id,
            node: self.node.clone(),
            caller: self.caller.clone(),
            peer: self.peer.map(|p| p.to_string()),
            connected_since_unix_ms: unix_ms(self.connected_since),
            types: self
                .types
                .iter()
                .map(|(type_url, ts)| {
                    let mut subscribed: Vec<String> = ts.names.iter().cloned().collect();
                    subscribed.sort_unstable();
                    TypeDebug {
                        type_url: type_url.clone(),
                        wildcard: ts.wildcard,
                        subscribed,
                        held: ts.held.len(),
                        acked: ts
                            .held
                            .values()
                            .filter(|h| h.acked.is_some() && h.acked == h.sent)
                            .count(),
                        responses_sent: ts.responses_sent,
                        resources_sent: ts.resources_sent,
                        pending: ts.dirty.len(),
                        in_flight: ts.in_flight.len(),
                        acks: ts.acks,
                        nacks: ts.nacks,
                        last_ack: ts.last_ack.clone(),
                        last_nack: ts.last_nack.clone(),
                    }
                })
                .collect(),
        }
    }

    /// Every resource the client holds, with the versions sent and acknowledged.
    pub(crate) fn resources_debug(&self) -> ClientResourcesDebug {
        let types = self
            .types
            .iter()
            .map(|(type_url, ts)| {
                let held = ts
                    .held
                    .iter()
                    .map(|(name, h)| {
                        let held = HeldDebug {
                            sent: h.sent.map(format_version),
                            acked: h.acked.map(format_version),
                        };
                        (name.to_string(), held)
                    })
                    .collect();
                (type_url.clone(), held)
            })
            .collect();
        ClientResourcesDebug {
            id: self.id,
            node: self.node.clone(),
            types,
        }
    }
}
