//! State from istiod-lite over delta xDS: the handler that decodes and converts
//! each workload, service and authorization resource, refuses (per resource) what
//! does not convert or clashes with what is held, keeping that resource's last
//! good version, and swaps a rebuilt [`ProxyState`] into the store after each
//! response.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ambit_proto::{AUTHORIZATION_TYPE_URL, SERVICE_TYPE_URL, WORKLOAD_TYPE_URL};
use mesh_core::xds::{Handler, Refusal, Resource};
use prost::Message;

use super::{ProxyState, Service, StateStore, Workload};
use crate::policy::Authorization;

/// The resource types ztunnel subscribes to.
pub const XDS_TYPES: [&str; 3] = [WORKLOAD_TYPE_URL, SERVICE_TYPE_URL, AUTHORIZATION_TYPE_URL];

/// The converted resources held, by xDS resource name, with the indexes that
/// catch clashes between resources (one uid, address or VIP claimed twice).
#[derive(Debug, Default)]
struct Held {
    workloads: HashMap<String, Workload>,
    services: HashMap<String, Service>,
    policies: HashMap<String, Authorization>,
    /// Workload uid -> resource name.
    uids: HashMap<String, String>,
    /// Workload address -> resource name.
    ips: HashMap<IpAddr, String>,
    /// Service key -> resource name.
    service_keys: HashMap<String, String>,
    /// Service VIP -> resource name.
    vips: HashMap<IpAddr, String>,
    /// Policy key -> resource name.
    policy_keys: HashMap<String, String>,
    /// Resources held back only because another resource still claims their
    /// uid, address, VIP, hostname or key, by (type URL, name): refused (the
    /// NACK shows the clash) but kept, their versions held by the client
    /// (`holds_back`), so a reconnect claims them and the server sends their
    /// removal if they went; applied as soon as a change frees the claim. A
    /// response may carry a new claimant before the removal of the old one (a
    /// renamed service keeping its VIP, a new pod reusing an address). At most
    /// one per resource the server sent; a removal or a new version of the name
    /// replaces it.
    parked: HashMap<(String, String), Resource>,
}

/// Why a resource was not applied.
enum PutError {
    /// Malformed, or not for ztunnel: refused for good.
    Invalid(String),
    /// Another resource claims what it claims: parked until that one goes.
    Clash(String),
}

impl From<String> for PutError {
    fn from(error: String) -> Self {
        PutError::Invalid(error)
    }
}

/// Applies xDS responses to a [`StateStore`].
#[derive(Debug)]
pub struct XdsState {
    store: Arc<StateStore>,
    held: Mutex<Held>,
}

impl XdsState {
    pub fn new(store: Arc<StateStore>) -> Self {
        Self {
            store,
            held: Mutex::new(Held::default()),
        }
    }

    /// Resources held now: (workloads, services, policies).
    pub fn counts(&self) -> (usize, usize, usize) {
        let held = self.lock();
        (
            held.workloads.len(),
            held.services.len(),
            held.policies.len(),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // A panic while holding the lock leaves whole entries only.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Handler for XdsState {
    fn apply(
        &self,
        type_url: &str,
        updated: Vec<Resource>,
        removed: Vec<String>,
    ) -> Result<(), Vec<Refusal>> {
        let mut held = self.lock();
        let store = &*self.store;
        let mut refused = Vec::new();
        let mut changed = !removed.is_empty();
        // Removals first: they may free what this response's updates claim.
        for name in &removed {
            held.remove(type_url, name);
        }
        for r in updated {
            let key = (type_url.to_string(), r.name.clone());
            held.parked.remove(&key);
            match held.put(type_url, &r, store) {
                Ok(()) => changed = true,
                Err(PutError::Invalid(error)) => refused.push((r.name, error)),
                Err(PutError::Clash(error)) => {
                    // NACKed, so the control plane shows it, and held back: the
                    // client still records its version (`holds_back`), so a
                    // reconnect claims it and the server sends its removal if it
                    // went meanwhile.
                    refused.push((
                        r.name.clone(),
                        format!("{error}; held back until that one is removed"),
                    ));
                    held.parked.insert(key, r);
                }
            }
        }
        // Any change (a removal, an address or VIP moved by an update) may free
        // what a held-back resource claims.
        if changed && !held.parked.is_empty() {
            held.unpark(store);
        }
        if changed {
            self.store.replace(held.build());
            tracing::debug!(
                type_url,
                workloads = held.workloads.len(),
                services = held.services.len(),
                policies = held.policies.len(),
                refused = refused.len(),
                "xDS state applied"
            );
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(refused)
        }
    }

    fn holds_back(&self, type_url: &str, name: &str) -> bool {
        self.lock()
            .parked
            .contains_key(&(type_url.to_string(), name.to_string()))
    }
}

fn decode<M: Message + Default>(r: &Resource) -> Result<M, String> {
    M::decode(r.body.clone()).map_err(|e| format!("does not decode: {e}"))
}

/// The owner of `key` in `index`, if it is another resource than `name`.
fn clash<'a, K: std::hash::Hash + Eq>(
    index: &'a HashMap<K, String>,
    key: &K,
    name: &str,
) -> Option<&'a str> {
    index
        .get(key)
        .map(String::as_str)
        .filter(|owner| *owner != name)
}

impl Held {
    /// Converts and holds `r`; `store` gives the mesh's trust domain and root
    /// namespace.
    fn put(&mut self, type_url: &str, r: &Resource, store: &StateStore) -> Result<(), PutError> {
        match type_url {
            WORKLOAD_TYPE_URL => self.put_workload(r, store.trust_domain()),
            SERVICE_TYPE_URL => self.put_service(r),
            AUTHORIZATION_TYPE_URL => self.put_policy(r, store.root_namespace()),
            other => Err(PutError::Invalid(format!("ztunnel does not use {other}"))),
        }
    }

    /// Removes `name` of `type_url`, applied or held back.
    fn remove(&mut self, type_url: &str, name: &str) {
        self.parked
            .remove(&(type_url.to_string(), name.to_string()));
        match type_url {
            WORKLOAD_TYPE_URL => self.remove_workload(name),
            SERVICE_TYPE_URL => self.remove_service(name),
            AUTHORIZATION_TYPE_URL => self.remove_policy(name),
            _ => {}
        }
    }

    /// Applies the parked resources whose claims are free now (one freed may
    /// free another).
    fn unpark(&mut self, store: &StateStore) {
        loop {
            let parked: Vec<(String, String)> = self.parked.keys().cloned().collect();
            let mut progress = false;
            for key in parked {
                let Some(r) = self.parked.remove(&key) else {
                    continue;
                };
                match self.put(&key.0, &r, store) {
                    Ok(()) => {
                        tracing::info!(type_url = %key.0, name = %r.name, "held-back xDS resource applied: what it claims is free now");
                        progress = true;
                    }
                    Err(PutError::Clash(_)) => {
                        self.parked.insert(key, r);
                    }
                    Err(PutError::Invalid(_)) => {}
                }
            }
            if !progress {
                return;
            }
        }
    }

    fn put_workload(&mut self, r: &Resource, trust_domain: &str) -> Result<(), PutError> {
        let w = Workload::from_proto(decode::<ambit_proto::workload::Workload>(r)?, trust_domain)
            .map_err(|e| e.to_string())?;
        if let Some(owner) = clash(&self.uids, &w.uid, &r.name) {
            return Err(PutError::Clash(format!(
                "uid {} belongs to workload {owner}",
                w.uid
            )));
        }
        // A hostNetwork pod shares its node's addresses: it claims none.
        let claimed: &[std::net::IpAddr] = if w.host_network { &[] } else { &w.addresses };
        for ip in claimed {
            if let Some(owner) = clash(&self.ips, ip, &r.name) {
                return Err(PutError::Clash(format!(
                    "address {ip} belongs to workload {owner}"
                )));
            }
            if let Some(owner) = self.vips.get(ip) {
                return Err(PutError::Clash(format!(
                    "address {ip} is a VIP of service {owner}"
                )));
            }
        }
        self.remove_workload(&r.name);
        self.uids.insert(w.uid.clone(), r.name.clone());
        for ip in claimed {
            self.ips.insert(*ip, r.name.clone());
        }
        self.workloads.insert(r.name.clone(), w);
        Ok(())
    }

    fn remove_workload(&mut self, name: &str) {
        if let Some(old) = self.workloads.remove(name) {
            self.uids.remove(&old.uid);
            for ip in &old.addresses {
                // Only its own claims (a hostNetwork pod made none).
                if self.ips.get(ip).is_some_and(|owner| owner == name) {
                    self.ips.remove(ip);
                }
            }
        }
    }

    fn put_service(&mut self, r: &Resource) -> Result<(), PutError> {
        let s = Service::try_from(decode::<ambit_proto::workload::Service>(r)?)
            .map_err(|e| e.to_string())?;
        let key = s.key();
        if let Some(owner) = clash(&self.service_keys, &key, &r.name) {
            return Err(PutError::Clash(format!(
                "hostname {key} belongs to service {owner}"
            )));
        }
        for vip in &s.vips {
            if let Some(owner) = clash(&self.vips, vip, &r.name) {
                return Err(PutError::Clash(format!(
                    "VIP {vip} belongs to service {owner}"
                )));
            }
            if let Some(owner) = self.ips.get(vip) {
                return Err(PutError::Clash(format!(
                    "VIP {vip} is an address of workload {owner}"
                )));
            }
        }
        self.remove_service(&r.name);
        self.service_keys.insert(key, r.name.clone());
        for vip in &s.vips {
            self.vips.insert(*vip, r.name.clone());
        }
        self.services.insert(r.name.clone(), s);
        Ok(())
    }

    fn remove_service(&mut self, name: &str) {
        if let Some(old) = self.services.remove(name) {
            self.service_keys.remove(&old.key());
            for vip in &old.vips {
                self.vips.remove(vip);
            }
        }
    }

    fn put_policy(&mut self, r: &Resource, root_namespace: &str) -> Result<(), PutError> {
        let p = Authorization::try_from(decode::<ambit_proto::security::Authorization>(r)?)
            .map_err(|e| e.to_string())?;
        p.validate().map_err(|e| e.to_string())?;
        // The control plane made it mesh-wide from its root namespace: one that is
        // not ours means the two disagree on --root-namespace, and the policy
        // would apply to nothing here (a mesh-wide DENY failing open). Refused
        // (NACK) so the control plane shows it.
        if p.scope == crate::policy::Scope::Global && p.namespace != root_namespace {
            return Err(PutError::Invalid(format!(
                "mesh-wide (GLOBAL) policy {} comes from namespace {}, but this ztunnel's --root-namespace is {root_namespace}: set the same root namespace on ztunnel and istiod-lite",
                p.key(),
                p.namespace
            )));
        }
        let key = p.key();
        if let Some(owner) = clash(&self.policy_keys, &key, &r.name) {
            return Err(PutError::Clash(format!(
                "policy {key} is also resource {owner}"
            )));
        }
        self.remove_policy(&r.name);
        self.policy_keys.insert(key, r.name.clone());
        self.policies.insert(r.name.clone(), p);
        Ok(())
    }

    fn remove_policy(&mut self, name: &str) {
        if let Some(old) = self.policies.remove(name) {
            self.policy_keys.remove(&old.key());
        }
    }

    /// The state of everything held. Items are cloned into the new state's
    /// indexes; for 10k workloads that is a few milliseconds per response.
    fn build(&self) -> ProxyState {
        ProxyState::new(
            self.workloads.values().cloned().collect(),
            self.services.values().cloned().collect(),
            self.policies.values().cloned().collect(),
        )
    }
}

#[cfg(test)]
#[path = "xds_tests.rs"]
mod tests;
