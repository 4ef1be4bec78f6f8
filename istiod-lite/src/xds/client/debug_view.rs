//! What the debug view shows of one client: its subscriptions, what it holds and
//! acknowledged, its last NACK.

use std::collections::BTreeMap;

use super::super::debug::{ClientDebug, ClientResourcesDebug, HeldDebug, TypeDebug, unix_ms};
use super::super::store::{Resources, format_version};
use super::ClientState;

impl ClientState {
    /// The summary the debug view shows.
    pub(crate) fn debug(&self, store: &Resources) -> ClientDebug {
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
                    let entries = store.get(type_url);
                    let named_acked = ts
                        .held
                        .values()
                        .filter(|h| h.acked.is_some() && h.acked == h.sent)
                        .count();
                    let (held, acked, walking) = match &ts.walk {
                        Some(walk) => (
                            walk.held(entries),
                            walk.acked(entries),
                            walk.pending(entries, store.released()),
                        ),
                        None => (ts.held.len(), named_acked, 0),
                    };
                    TypeDebug {
                        type_url: type_url.clone(),
                        wildcard: ts.walk.is_some(),
                        subscribed,
                        held,
                        acked,
                        responses_sent: ts.responses_sent,
                        resources_sent: ts.resources_sent,
                        pending: ts.dirty.len() + walking,
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
    pub(crate) fn resources_debug(&self, store: &Resources) -> ClientResourcesDebug {
        let types = self
            .types
            .iter()
            .map(|(type_url, ts)| {
                let mut held: BTreeMap<String, HeldDebug> = ts
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
                if let Some(walk) = &ts.walk {
                    for (name, version, acked) in walk.holdings(store.get(type_url)) {
                        let version = version.map(format_version);
                        let acked = if acked { version.clone() } else { None };
                        held.insert(
                            name.to_string(),
                            HeldDebug {
                                sent: version,
                                acked,
                            },
                        );
                    }
                }
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
