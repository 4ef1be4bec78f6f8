//! Translation: the model to the proxies' resources (workloads, services,
//! authorizations). The [`Translator`] is also the model's store: it keeps every
//! object, indexed, and turns each batch of changes into the resources whose
//! content may have changed, recomputing only what depends on what changed.
//!
//! Dependencies, which decide what one change recomputes:
//! - a pod: its workload;
//! - a service: that service, and the workloads of the pods its old or new
//!   selector matches in its namespace (or that its EndpointSlices name, when it
//!   has no selector);
//! - a namespace: the workloads and services of that namespace (enrollment and
//!   waypoint labels);
//! - an EndpointSlice of a selector-less service: the workloads of the pods it
//!   names (old and new);
//! - an AuthorizationPolicy: that authorization;
//! - a PeerAuthentication, or a pod or namespace while PeerAuthentications
//!   exist: every PeerAuthentication's authorizations (see `peer_auth`).

mod authz;
mod encode;
mod index;
mod owner;
mod peer_auth;
mod service;
mod workload;

#[cfg(test)]
mod authz_tests;
#[cfg(test)]
mod incremental_tests;
#[cfg(test)]
mod peer_auth_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod waypoint_tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ambit_proto::{AUTHORIZATION_TYPE_URL, SERVICE_TYPE_URL, WORKLOAD_TYPE_URL};

use crate::model::{Kind, Object, ObjectChange, ObjectError, ObjectKey, Report};
use crate::xds::ResourceUpdate;
use index::Store;
use service::{hostname, selector_of, selects, service_key};

pub use workload::workload_uid;

/// The origin of the reports the translator makes.
pub const REPORT_ORIGIN: &str = "translate";

/// Mesh-wide settings the translation depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslateSettings {
    /// The SPIFFE trust domain of every workload (`cluster.local`).
    pub trust_domain: String,
    /// A policy in this namespace without a selector applies mesh-wide (`istio-system`).
    pub root_namespace: String,
    /// Written into every workload's `cluster_id` (`Kubernetes`).
    pub cluster_id: String,
}

impl Default for TranslateSettings {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            cluster_id: "Kubernetes".into(),
        }
    }
}

/// `(namespace, name)` of an object whose resource must be recomputed.
type Name = (String, String);

/// What one batch of changes made stale.
#[derive(Debug, Default)]
struct Dirty {
    pods: BTreeSet<Name>,
    services: BTreeSet<Name>,
    policies: BTreeSet<Name>,
}

/// The model store and its translation to xDS resources; see the module doc.
#[derive(Debug)]
pub struct Translator {
    settings: TranslateSettings,
    store: Store,
    /// The workload uid each pod was last sent under (a uid change removes the old).
    workloads: HashMap<Name, String>,
    /// Names of the Service resources sent and not removed.
    services: HashSet<String>,
    /// Names of the Authorization resources sent and not removed.
    authorizations: HashSet<String>,
    /// The Authorizations translated from PeerAuthentications, as last sent.
    peer_auth: BTreeMap<String, bytes::Bytes>,
    /// Current translation problems, by the object they are about.
    reports: BTreeMap<ObjectKey, Vec<Report>>,
}

impl Translator {
    pub fn new(settings: TranslateSettings) -> Self {
        Self {
            settings,
            store: Store::default(),
            workloads: HashMap::new(),
            services: HashSet::new(),
            authorizations: HashSet::new(),
            peer_auth: BTreeMap::new(),
            reports: BTreeMap::new(),
        }
    }

    pub fn settings(&self) -> &TranslateSettings {
        &self.settings
    }

    /// Applies a batch of changes and returns the resources that may have changed
    /// (each at most once) and the ones removed (`body: None`). Bodies are the
    /// prost-encoded `Workload`, `Service` or `Authorization`, deterministic for
    /// equal content.
    pub fn apply(&mut self, changes: Vec<ObjectChange>) -> Vec<ResourceUpdate> {
        let mut dirty = Dirty::default();
        let mut peer_auth_inputs = false;
        for change in changes {
            let (key, old) = match change {
                ObjectChange::Upsert(object) => (object.key(), self.store.insert(object)),
                ObjectChange::Delete(key) => {
                    let old = self.store.remove(&key);
                    (key, old)
                }
            };
            mark(&self.store, &key, old.as_ref(), &mut dirty);
            peer_auth_inputs |= matches!(
                key.kind,
                Kind::PeerAuthentication | Kind::Pod | Kind::Namespace
            );
            if let Some(problem) = waypoint_only(key.kind) {
                let present = self.store.get(&key).is_some();
                let problems = present.then(|| authz::Problem {
                    field: "spec".into(),
                    problem: problem.into(),
                });
                self.set_reports(key, problems.into_iter().collect());
            }
        }
        let mut updates = Vec::new();
        for (ns, name) in &dirty.services {
            updates.extend(self.update_service(ns, name));
        }
        for (ns, name) in &dirty.pods {
            updates.extend(self.update_workload(ns, name));
        }
        for (ns, name) in &dirty.policies {
            updates.extend(self.update_authorization(ns, name));
        }
        if peer_auth_inputs {
            updates.extend(self.update_peer_authentications());
        }
        updates
    }

    /// The current translation problems, origin [`REPORT_ORIGIN`].
    pub fn reports(&self) -> Vec<Report> {
        self.reports.values().flatten().cloned().collect()
    }

    /// True when a pod of `namespace` running as `service_account` is scheduled on
    /// `node`: the CA signs that identity for that node's ztunnel only then.
    pub fn may_issue(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.store.has_identity_on(node, namespace, service_account)
    }

    /// Every object of the model, ordered by kind, namespace and name.
    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.store.iter()
    }

    pub fn object(&self, key: &ObjectKey) -> Option<&Object> {
        self.store.get(key)
    }

    /// How many workloads, services and authorizations are currently sent.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.workloads.len(),
            self.services.len(),
            self.authorizations.len() + self.peer_auth.len(),
        )
    }

    fn update_workload(&mut self, ns: &str, name: &str) -> Vec<ResourceUpdate> {
        let built = self
            .store
            .pod(ns, name)
            .and_then(|pod| workload::build(&self.store, &self.settings, pod));
        let pod = (ns.to_string(), name.to_string());
        let mut out = Vec::new();
        match built {
            Some(w) => {
                let uid = w.uid.clone();
                let previous = self.workloads.insert(pod, uid.clone());
                if let Some(old) = previous.filter(|old| *old != uid) {
                    out.push(removal(WORKLOAD_TYPE_URL, old));
                }
                out.push(ResourceUpdate {
                    type_url: WORKLOAD_TYPE_URL,
                    name: uid,
                    body: Some(encode::workload(w)),
                });
            }
            None => {
                if let Some(old) = self.workloads.remove(&pod) {
                    out.push(removal(WORKLOAD_TYPE_URL, old));
                }
            }
        }
        out
    }

    fn update_service(&mut self, ns: &str, name: &str) -> Option<ResourceUpdate> {
        let resource = service_key(ns, &hostname(ns, name));
        let built = self
            .store
            .service(ns, name)
            .and_then(|svc| service::build(&self.store, svc));
        match built {
            Some(svc) => {
                self.services.insert(resource.clone());
                Some(ResourceUpdate {
                    type_url: SERVICE_TYPE_URL,
                    name: resource,
                    body: Some(encode::service(&svc)),
                })
            }
            None => self
                .services
                .remove(&resource)
                .then(|| removal(SERVICE_TYPE_URL, resource)),
        }
    }

    /// Replaces the translation problems reported about `key` (none clears them).
    fn set_reports(&mut self, key: ObjectKey, problems: Vec<authz::Problem>) {
        if problems.is_empty() {
            self.reports.remove(&key);
            return;
        }
        let reports = problems
            .into_iter()
            .map(|p| Report {
                origin: REPORT_ORIGIN.into(),
                document: None,
                error: ObjectError {
                    kind: key.kind.api().1.into(),
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    field: p.field,
                    problem: p.problem,
                },
            })
            .collect();
        self.reports.insert(key, reports);
    }

    fn update_authorization(&mut self, ns: &str, name: &str) -> Option<ResourceUpdate> {
        let key = ObjectKey::new(Kind::AuthorizationPolicy, ns, name);
        let translated = self
            .store
            .policy(ns, name)
            .map(|p| authz::build(&self.settings, p))
            .unwrap_or_default();
        self.set_reports(key, translated.problems);
        let resource = format!("{ns}/{name}");
        match translated.authorization {
            Some(authorization) => {
                self.authorizations.insert(resource.clone());
                Some(ResourceUpdate {
                    type_url: AUTHORIZATION_TYPE_URL,
                    name: resource,
                    body: Some(encode::authorization(authorization)),
                })
            }
            None => self
                .authorizations
                .remove(&resource)
                .then(|| removal(AUTHORIZATION_TYPE_URL, resource)),
        }
    }
}

fn removal(type_url: &'static str, name: String) -> ResourceUpdate {
    ResourceUpdate {
        type_url,
        name,
        body: None,
    }
}

/// Marks what depends on the object at `key`, given what it was (`old`) and what
/// it is now (in `store`).
fn mark(store: &Store, key: &ObjectKey, old: Option<&Object>, dirty: &mut Dirty) {
    let name = || (key.namespace.clone(), key.name.clone());
    let versions = [old, store.get(key)];
    match key.kind {
        Kind::Pod => {
            dirty.pods.insert(name());
        }
        Kind::AuthorizationPolicy => {
            dirty.policies.insert(name());
        }
        Kind::Namespace => {
            let ns = &key.name;
            for pod in store.pods_in(ns) {
                dirty.pods.insert((ns.clone(), pod.meta.name.clone()));
            }
            for svc in store.services_in(ns) {
                dirty.services.insert((ns.clone(), svc.meta.name.clone()));
            }
        }
        Kind::Service => {
            dirty.services.insert(name());
            for version in versions.into_iter().flatten() {
                if let Object::Service(svc) = version {
                    mark_backends(store, svc, dirty);
                }
            }
        }
        Kind::EndpointSlice => {
            for version in versions.into_iter().flatten() {
                let Object::EndpointSlice(slice) = version else {
                    continue;
                };
                // Only selector-less services take their endpoints from slices.
                let ns = &slice.meta.namespace;
                match store.service(ns, &slice.service_name) {
                    Some(svc) if selector_of(svc).is_none() => {}
                    _ => continue,
                }
                for pod in slice.endpoints.iter().filter_map(|e| e.pod_name.as_ref()) {
                    dirty.pods.insert((ns.clone(), pod.clone()));
                }
            }
        }
        Kind::ServiceAccount
        | Kind::Gateway
        | Kind::HttpRoute
        | Kind::DestinationRule
        | Kind::PeerAuthentication => {}
    }
}

/// For the kinds only a waypoint acts on, what is reported while one is loaded:
/// Ambit has no waypoint yet, so their settings take effect nowhere.
fn waypoint_only(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::HttpRoute => Some(
            "kept, but NOT enforced: HTTPRoute rules (matches, timeouts, retries, \
             weights) are applied by a waypoint, and Ambit has no waypoint yet",
        ),
        Kind::DestinationRule => Some(
            "kept, but NOT enforced: DestinationRule traffic policy (connection \
             pool, outlier detection, load balancing) is applied by a waypoint, and \
             Ambit has no waypoint yet",
        ),
        _ => None,
    }
}

/// Marks the pods a service routes to: those its selector matches, or those its
/// EndpointSlices name when it has no selector.
fn mark_backends(store: &Store, svc: &crate::model::Service, dirty: &mut Dirty) {
    let ns = &svc.meta.namespace;
    match selector_of(svc) {
        Some(selector) => {
            for pod in store
                .pods_in(ns)
                .filter(|p| selects(selector, &p.meta.labels))
            {
                dirty.pods.insert((ns.clone(), pod.meta.name.clone()));
            }
        }
        None => {
            for slice in store.slices_of(ns, &svc.meta.name) {
                for pod in slice.endpoints.iter().filter_map(|e| e.pod_name.as_ref()) {
                    dirty.pods.insert((ns.clone(), pod.clone()));
                }
            }
        }
    }
}
