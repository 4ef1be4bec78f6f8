//! What ztunnel knows of the mesh: workloads, services and policies, indexed for the
//! lookups of the data path, swapped whole when the source changes.
//!
//! Readers take an `Arc<ProxyState>` snapshot per connection, so a connection sees
//! one consistent state and a change applies to the next connection.

mod local;
mod model;
mod store;
mod xds;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mesh_core::SpiffeId;

pub use local::{LocalState, LocalStateError, digest, load_local_state, watch_local_state};
pub use model::{ModelError, PortMapping, Protocol, Service, Workload};
pub use store::StateStore;
pub use xds::{XDS_TYPES, XdsState};

use crate::policy::{Authorization, PolicySet};

/// Where an outbound connection goes.
#[derive(Clone, Debug)]
pub enum Route {
    /// A mesh workload, reached over HBONE at `addr` (pod IP, target port).
    Mesh {
        workload: Arc<Workload>,
        addr: SocketAddr,
        service: Option<Arc<Service>>,
    },
    /// A workload outside the mesh, or no workload at all: plain TCP to `addr`.
    Passthrough { addr: SocketAddr },
}

/// Why an outbound connection has nowhere to go.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("service {service} has no healthy endpoint")]
    NoHealthyEndpoint { service: String },
    #[error("service {service} has no port {port}")]
    NoServicePort { service: String, port: u16 },
}

/// One consistent view of the mesh.
#[derive(Debug, Default)]
pub struct ProxyState {
    workloads: HashMap<String, Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    services: HashMap<String, Arc<Service>>,
    by_vip: HashMap<IpAddr, Arc<Service>>,
    /// Service key -> endpoints (workload uids), sorted for stable round robin.
    endpoints: HashMap<String, Vec<Arc<Workload>>>,
    /// Service key -> round-robin turn; shared with the states before and after
    /// (see [`ProxyState::keep_round_robin`]).
    round_robin: HashMap<String, Arc<AtomicUsize>>,
    policies: PolicySet,
}

impl ProxyState {
    /// Builds the indexes. Items are expected to be validated already.
    pub fn new(
        workloads: Vec<Workload>,
        services: Vec<Service>,
        policies: Vec<Authorization>,
    ) -> Self {
        let mut state = ProxyState::default();
        for w in workloads {
            let w = Arc::new(w);
            // A hostNetwork pod's addresses are its node's, not its own.
            for ip in w.addresses.iter().filter(|_| !w.host_network) {
                state.by_ip.insert(*ip, w.clone());
            }
            for key in w.services.keys() {
                state
                    .endpoints
                    .entry(key.clone())
                    .or_default()
                    .push(w.clone());
            }
            state.workloads.insert(w.uid.clone(), w);
        }
        for eps in state.endpoints.values_mut() {
            eps.sort_by(|a, b| a.uid.cmp(&b.uid));
        }
        for s in services {
            let s = Arc::new(s);
            for vip in &s.vips {
                state.by_vip.insert(*vip, s.clone());
            }
            state.round_robin.insert(s.key(), Arc::default());
            state.services.insert(s.key(), s);
        }
        for p in policies {
            state.policies.insert(p);
        }
        state
    }

    /// Takes mesh-wide policies from `root_namespace` (see [`StateStore`]).
    fn set_root_namespace(&mut self, root_namespace: &str) {
        self.policies.set_root_namespace(root_namespace);
    }

    /// Takes over `previous`'s round-robin turns for the services both hold, so
    /// an update (any xDS response, any file change) does not send the next
    /// connections back to each service's first endpoint. The turns of services
    /// that are gone are dropped with `previous`, so they never pile up.
    fn keep_round_robin(&mut self, previous: &ProxyState) {
        for (key, turn) in &mut self.round_robin {
            if let Some(kept) = previous.round_robin.get(key) {
                *turn = kept.clone();
            }
        }
    }

    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// A workload whose owner (see [`Workload::owner`]) is `name` and that runs as
    /// `identity`, for a name a peer claims (HBONE baggage): what the peer says is
    /// only believed when it matches ztunnel's own state. A scan, so only for connections whose source address is no
    /// workload's; a name that cannot be a pod's (over 253 bytes, or not lowercase
    /// letters, digits, `-` and `.`) is refused without one.
    pub fn workload_named(&self, name: &str, identity: &SpiffeId) -> Option<&Arc<Workload>> {
        let plausible = (1..=253).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !plausible {
            return None;
        }
        self.workloads.values().find(|w| {
            w.owner() == name
                && w.namespace == identity.namespace()
                && w.service_account == identity.service_account()
                && w.trust_domain == identity.trust_domain()
        })
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    /// Where a connection to `dst` goes: a service VIP picks one of its healthy
    /// endpoints (round robin), a workload address is that workload, anything else
    /// passes through.
    pub fn route(&self, dst: SocketAddr) -> Result<Route, RouteError> {
        if let Some(svc) = self.by_vip.get(&dst.ip()) {
            return self.route_service(svc, dst.port());
        }
        match self.by_ip.get(&dst.ip()) {
            Some(w) if w.protocol == Protocol::Hbone => Ok(Route::Mesh {
                workload: w.clone(),
                addr: dst,
                service: None,
            }),
            _ => Ok(Route::Passthrough { addr: dst }),
        }
    }

    fn route_service(&self, svc: &Arc<Service>, port: u16) -> Result<Route, RouteError> {
        let key = svc.key();
        let mapping = svc
            .ports
            .iter()
            .find(|p| p.service_port == port)
            .ok_or_else(|| RouteError::NoServicePort {
                service: key.clone(),
                port,
            })?;
        // The workload's own mapping for this service wins over the service's; a
        // named target port (0 in the service) only the workload can number, so
        // only then is every endpoint's mapping looked at.
        let numbered = |w: &Workload| {
            w.services
                .get(&key)
                .and_then(|ports| ports.iter().find(|p| p.service_port == port))
                .map(|p| p.target_port)
        };
        let healthy: Vec<&Arc<Workload>> = self
            .endpoints
            .get(&key)
            .map(|eps| {
                eps.iter()
                    .filter(|w| w.healthy && (mapping.target_port != 0 || numbered(w).is_some()))
                    .collect()
            })
            .unwrap_or_default();
        if healthy.is_empty() {
            return Err(RouteError::NoHealthyEndpoint { service: key });
        }
        let turn = self
            .round_robin
            .get(&key)
            .map(|c| c.fetch_add(1, Ordering::Relaxed))
            .unwrap_or(0);
        let w = healthy[turn % healthy.len()];
        let target = numbered(w).unwrap_or(mapping.target_port);
        let ip = w.addresses[0];
        let addr = SocketAddr::new(ip, target);
        Ok(match w.protocol {
            Protocol::Hbone => Route::Mesh {
                workload: w.clone(),
                addr,
                service: Some(svc.clone()),
            },
            Protocol::None => Route::Passthrough { addr },
        })
    }
}

#[cfg(test)]
mod tests;
