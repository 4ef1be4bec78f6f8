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
        let mut refused = Vec::new();
        let mut changed = !removed.is_empty();
        for r in updated {
            let outcome = match type_url {
                WORKLOAD_TYPE_URL => held.put_workload(&r),
                SERVICE_TYPE_URL => held.put_service(&r),
                AUTHORIZATION_TYPE_URL => held.put_policy(&r, self.store.root_namespace()),
                other => Err(format!("ztunnel does not use {other}")),
            };
            match outcome {
                Ok(()) => changed = true,
                Err(error) => refused.push((r.name, error)),
            }
        }
        for name in &removed {
            match type_url {
                WORKLOAD_TYPE_URL => held.remove_workload(name),
                SERVICE_TYPE_URL => held.remove_service(name),
                AUTHORIZATION_TYPE_URL => held.remove_policy(name),
                _ => {}
            }
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
    fn put_workload(&mut self, r: &Resource) -> Result<(), String> {
        let w = Workload::try_from(decode::<ambit_proto::workload::Workload>(r)?)
            .map_err(|e| e.to_string())?;
        if let Some(owner) = clash(&self.uids, &w.uid, &r.name) {
            return Err(format!("uid {} belongs to workload {owner}", w.uid));
        }
        // A hostNetwork pod shares its node's addresses: it claims none.
        let claimed: &[std::net::IpAddr] = if w.host_network { &[] } else { &w.addresses };
        for ip in claimed {
            if let Some(owner) = clash(&self.ips, ip, &r.name) {
                return Err(format!("address {ip} belongs to workload {owner}"));
            }
            if let Some(owner) = self.vips.get(ip) {
                return Err(format!("address {ip} is a VIP of service {owner}"));
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

    fn put_service(&mut self, r: &Resource) -> Result<(), String> {
        let s = Service::try_from(decode::<ambit_proto::workload::Service>(r)?)
            .map_err(|e| e.to_string())?;
        let key = s.key();
        if let Some(owner) = clash(&self.service_keys, &key, &r.name) {
            return Err(format!("hostname {key} belongs to service {owner}"));
        }
        for vip in &s.vips {
            if let Some(owner) = clash(&self.vips, vip, &r.name) {
                return Err(format!("VIP {vip} belongs to service {owner}"));
            }
            if let Some(owner) = self.ips.get(vip) {
                return Err(format!("VIP {vip} is an address of workload {owner}"));
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

    fn put_policy(&mut self, r: &Resource, root_namespace: &str) -> Result<(), String> {
        let p = Authorization::try_from(decode::<ambit_proto::security::Authorization>(r)?)
            .map_err(|e| e.to_string())?;
        p.validate().map_err(|e| e.to_string())?;
        // The control plane made it mesh-wide from its root namespace: one that is
        // not ours means the two disagree on --root-namespace, and the policy
        // would apply to nothing here (a mesh-wide DENY failing open). Refused
        // (NACK) so the control plane shows it.
        if p.scope == crate::policy::Scope::Global && p.namespace != root_namespace {
            return Err(format!(
                "mesh-wide (GLOBAL) policy {} comes from namespace {}, but this ztunnel's --root-namespace is {root_namespace}: set the same root namespace on ztunnel and istiod-lite",
                p.key(),
                p.namespace
            ));
        }
        let key = p.key();
        if let Some(owner) = clash(&self.policy_keys, &key, &r.name) {
            return Err(format!("policy {key} is also resource {owner}"));
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
mod tests {
    use super::*;
    use ambit_proto::workload as pb;
    use bytes::Bytes;

    fn workload(uid: &str, ip: [u8; 4]) -> pb::Workload {
        pb::Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "shop".into(),
            addresses: vec![ip.to_vec()],
            ..Default::default()
        }
    }

    fn res(name: &str, version: &str, m: &impl Message) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            body: Bytes::from(m.encode_to_vec()),
        }
    }

    /// hostNetwork pods share their node's address: each is accepted, none is
    /// found by that address, and a service picks them as plain-TCP endpoints.
    #[test]
    fn host_network_pods_share_the_node_address_and_serve_services() {
        let store = Arc::new(StateStore::default());
        let xds = XdsState::new(store.clone());
        let node = [198, 18, 0, 9];
        let host = |uid: &str| {
            let mut w = workload(uid, node);
            w.host_network = true;
            w.services = [(
                "shop/agent.shop.svc.cluster.local".to_string(),
                pb::PortList { ports: vec![] },
            )]
            .into();
            w
        };
        let svc = pb::Service {
            name: "agent".into(),
            namespace: "shop".into(),
            hostname: "agent.shop.svc.cluster.local".into(),
            addresses: vec![pb::NetworkAddress {
                address: vec![198, 18, 100, 9],
                ..Default::default()
            }],
            ports: vec![pb::Port {
                service_port: 80,
                target_port: 9100,
            }],
            ..Default::default()
        };
        xds.apply(
            WORKLOAD_TYPE_URL,
            vec![res("h1", "1", &host("h1")), res("h2", "1", &host("h2"))],
            vec![],
        )
        .unwrap();
        xds.apply(
            SERVICE_TYPE_URL,
            vec![res("shop/agent.shop.svc.cluster.local", "1", &svc)],
            vec![],
        )
        .unwrap();
        let state = store.snapshot();
        assert_eq!(state.workloads().count(), 2);
        assert!(state.workload_by_ip(node.into()).is_none());
        let to_vip = "198.18.100.9:80".parse().unwrap();
        match state.route(to_vip).unwrap() {
            crate::state::Route::Passthrough { addr } => {
                assert_eq!(addr, "198.18.0.9:9100".parse().unwrap())
            }
            other => panic!("expected plain TCP to the node, got {other:?}"),
        }
        // Removing one takes no claim of the other's with it.
        xds.apply(WORKLOAD_TYPE_URL, vec![], vec!["h1".into()])
            .unwrap();
        assert_eq!(store.snapshot().workloads().count(), 1);
    }

    #[test]
    fn a_workload_names_its_owner_or_else_the_pod() {
        let store = Arc::new(StateStore::default());
        let xds = XdsState::new(store.clone());
        let mut owned = workload("web-7d9f-x2", [198, 18, 1, 1]);
        owned.workload_name = "web".into();
        let alone = workload("solo", [198, 18, 1, 2]);
        xds.apply(
            WORKLOAD_TYPE_URL,
            vec![res("a", "1", &owned), res("b", "1", &alone)],
            vec![],
        )
        .unwrap();
        let state = store.snapshot();
        assert_eq!(state.workload("web-7d9f-x2").unwrap().owner(), "web");
        assert_eq!(state.workload("solo").unwrap().owner(), "solo");
    }

    #[test]
    fn a_bad_or_clashing_resource_is_refused_and_its_last_good_version_kept() {
        let store = Arc::new(StateStore::default());
        let xds = XdsState::new(store.clone());
        let a1 = res("a", "1", &workload("a", [10, 0, 0, 1]));
        let b1 = res("b", "1", &workload("b", [10, 0, 0, 2]));
        xds.apply(WORKLOAD_TYPE_URL, vec![a1, b1], vec![]).unwrap();
        assert_eq!(store.snapshot().workloads().count(), 2);

        let mut bad = workload("a", [10, 0, 0, 9]);
        bad.addresses = vec![vec![1, 2, 3]];
        let clashing = workload("c", [10, 0, 0, 2]);
        let garbage = Resource {
            name: "d".into(),
            version: "1".into(),
            body: Bytes::from_static(&[0xff, 0xff, 0xff]),
        };
        let refused = xds
            .apply(
                WORKLOAD_TYPE_URL,
                vec![res("a", "2", &bad), res("c", "1", &clashing), garbage],
                vec!["b".into()],
            )
            .unwrap_err();
        let names: Vec<&str> = refused.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "c", "d"]);
        assert!(refused[0].1.contains("addresses"), "{}", refused[0].1);
        assert!(
            refused[1].1.contains("belongs to workload b"),
            "{}",
            refused[1].1
        );
        assert!(refused[2].1.contains("does not decode"), "{}", refused[2].1);
        let state = store.snapshot();
        let a = state.workload("a").unwrap();
        assert_eq!(
            a.addresses,
            [IpAddr::from([10, 0, 0, 1])],
            "a's last good version"
        );
        assert!(state.workload("b").is_none(), "the removal applied");
        assert_eq!(xds.counts(), (1, 0, 0));

        // b is gone, so its address is free again.
        xds.apply(WORKLOAD_TYPE_URL, vec![res("c", "2", &clashing)], vec![])
            .unwrap();
        assert!(store.snapshot().workload("c").is_some());
    }

    #[test]
    fn services_and_policies_convert_and_clash_on_their_keys() {
        let store = Arc::new(StateStore::default());
        let xds = XdsState::new(store.clone());
        let svc = pb::Service {
            name: "cart".into(),
            namespace: "shop".into(),
            hostname: "cart.shop.svc.cluster.local".into(),
            addresses: vec![pb::NetworkAddress {
                address: vec![10, 96, 0, 1],
                ..Default::default()
            }],
            ports: vec![pb::Port {
                service_port: 80,
                target_port: 8080,
            }],
            ..Default::default()
        };
        xds.apply(SERVICE_TYPE_URL, vec![res("s1", "1", &svc)], vec![])
            .unwrap();
        let refused = xds
            .apply(SERVICE_TYPE_URL, vec![res("s2", "1", &svc)], vec![])
            .unwrap_err();
        assert!(
            refused[0].1.contains("belongs to service s1"),
            "{refused:?}"
        );

        let policy = ambit_proto::security::Authorization {
            name: "deny-all".into(),
            namespace: "shop".into(),
            scope: ambit_proto::security::Scope::Namespace.into(),
            ..Default::default()
        };
        xds.apply(
            AUTHORIZATION_TYPE_URL,
            vec![res("shop/deny-all", "1", &policy)],
            vec![],
        )
        .unwrap();
        let state = store.snapshot();
        assert_eq!(state.services().count(), 1);
        assert_eq!(state.policies().len(), 1);
        xds.apply(AUTHORIZATION_TYPE_URL, vec![], vec!["shop/deny-all".into()])
            .unwrap();
        assert!(store.snapshot().policies().is_empty());
    }

    /// A mesh-wide policy from a namespace that is not this ztunnel's root
    /// namespace would apply to nothing here: refused, naming both settings.
    #[test]
    fn a_global_policy_from_another_root_namespace_is_refused() {
        let store = Arc::new(StateStore::with_root_namespace(
            ProxyState::default(),
            "mesh-root".into(),
        ));
        let xds = XdsState::new(store.clone());
        let global_in = |ns: &str| ambit_proto::security::Authorization {
            name: "deny-all".into(),
            namespace: ns.into(),
            scope: ambit_proto::security::Scope::Global.into(),
            action: ambit_proto::security::Action::Deny.into(),
            ..Default::default()
        };
        let refused = xds
            .apply(
                AUTHORIZATION_TYPE_URL,
                vec![res(
                    "istio-system/deny-all",
                    "1",
                    &global_in("istio-system"),
                )],
                vec![],
            )
            .unwrap_err();
        assert!(
            refused[0].1.contains("istio-system") && refused[0].1.contains("mesh-root"),
            "{refused:?}"
        );
        assert!(store.snapshot().policies().is_empty());
        xds.apply(
            AUTHORIZATION_TYPE_URL,
            vec![res("mesh-root/deny-all", "1", &global_in("mesh-root"))],
            vec![],
        )
        .unwrap();
        assert_eq!(store.snapshot().policies().len(), 1);
    }
}
