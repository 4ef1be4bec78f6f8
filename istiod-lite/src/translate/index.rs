//! The translator's object store and the indexes that keep one change cheap: objects
//! ordered by key (so a kind's objects in one namespace are one range), EndpointSlices
//! by the service they name, and pod identities by node (for the CA).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::model::{
    AuthorizationPolicy, EndpointSlice, Kind, Namespace, Object, ObjectKey, Pod, Service,
};

/// Every object of the model, with secondary indexes kept in step on each insert
/// and removal.
///
/// The map is ordered by [`ObjectKey`] (kind, namespace, name), which makes it its
/// own "by kind and namespace" index: the pods or services of one namespace are a
/// contiguous range, found in `O(log n)` without scanning other namespaces.
#[derive(Debug, Default)]
pub(super) struct Store {
    objects: BTreeMap<ObjectKey, Object>,
    indexes: Indexes,
}

/// The secondary indexes, apart from the map so both can be borrowed at once.
#[derive(Debug, Default)]
struct Indexes {
    /// EndpointSlice names by `(namespace, kubernetes.io/service-name)`.
    slices_by_service: HashMap<(String, String), BTreeSet<String>>,
    /// Pods that may hold a mesh identity ([`may_hold_identity`]) per node, counted
    /// by `(namespace, service account)`.
    identities_by_node: HashMap<String, HashMap<(String, String), usize>>,
}

impl Store {
    pub(super) fn get(&self, key: &ObjectKey) -> Option<&Object> {
        self.objects.get(key)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Object> {
        self.objects.values()
    }

    /// Adds or replaces an object; returns the one it replaced.
    pub(super) fn insert(&mut self, object: Object) -> Option<Object> {
        let key = object.key();
        // The old entries go first: old and new may share index keys.
        let old = self.remove(&key);
        self.indexes.update(&object, true);
        self.objects.insert(key, object);
        old
    }

    pub(super) fn remove(&mut self, key: &ObjectKey) -> Option<Object> {
        let old = self.objects.remove(key)?;
        self.indexes.update(&old, false);
        Some(old)
    }

    /// Every object of one kind, in namespace and name order.
    pub(super) fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Object> {
        self.objects
            .range(ObjectKey::new(kind, "", "")..)
            .take_while(move |(k, _)| k.kind == kind)
            .map(|(_, o)| o)
    }

    /// The objects of one kind in one namespace, in name order.
    fn in_namespace<'a>(
        &'a self,
        kind: Kind,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a Object> + 'a {
        self.objects
            .range(ObjectKey::new(kind, namespace, "")..)
            .take_while(move |(k, _)| k.kind == kind && k.namespace == namespace)
            .map(|(_, o)| o)
    }

    pub(super) fn namespace(&self, name: &str) -> Option<&Namespace> {
        match self.get(&ObjectKey::new(Kind::Namespace, "", name)) {
            Some(Object::Namespace(ns)) => Some(ns),
            _ => None,
        }
    }

    pub(super) fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        match self.get(&ObjectKey::new(Kind::Pod, namespace, name)) {
            Some(Object::Pod(pod)) => Some(pod),
            _ => None,
        }
    }

    pub(super) fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        match self.get(&ObjectKey::new(Kind::Service, namespace, name)) {
            Some(Object::Service(svc)) => Some(svc),
            _ => None,
        }
    }

    pub(super) fn policy(&self, namespace: &str, name: &str) -> Option<&AuthorizationPolicy> {
        match self.get(&ObjectKey::new(Kind::AuthorizationPolicy, namespace, name)) {
            Some(Object::AuthorizationPolicy(p)) => Some(p),
            _ => None,
        }
    }

    pub(super) fn pods_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.in_namespace(Kind::Pod, namespace)
            .filter_map(|o| match o {
                Object::Pod(p) => Some(p),
                _ => None,
            })
    }

    pub(super) fn services_in<'a>(
        &'a self,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a Service> + 'a {
        self.in_namespace(Kind::Service, namespace)
            .filter_map(|o| match o {
                Object::Service(s) => Some(s),
                _ => None,
            })
    }

    /// The EndpointSlices that name `service` in `namespace`.
    pub(super) fn slices_of<'a>(
        &'a self,
        namespace: &'a str,
        service: &str,
    ) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.indexes
            .slices_by_service
            .get(&(namespace.to_string(), service.to_string()))
            .into_iter()
            .flatten()
            .filter_map(move |name| {
                match self.get(&ObjectKey::new(
                    Kind::EndpointSlice,
                    namespace,
                    name.as_str(),
                )) {
                    Some(Object::EndpointSlice(s)) => Some(s),
                    _ => None,
                }
            })
    }

    /// True when a pod of `namespace` running as `service_account` is on `node`.
    pub(super) fn has_identity_on(
        &self,
        node: &str,
        namespace: &str,
        service_account: &str,
    ) -> bool {
        self.indexes
            .identities_by_node
            .get(node)
            .is_some_and(|ids| {
                ids.contains_key(&(namespace.to_string(), service_account.to_string()))
            })
    }

    /// Number of stored objects (for tests and the debug view).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.objects.len()
    }
}

/// Whether the node's ztunnel may need a certificate for this pod: it is scheduled,
/// still running (a finished pod serves nothing, and its node may run no other pod
/// of that account), and captured (a hostNetwork pod never is, as in Istio ambient,
/// so its node proxy never acts for it).
fn may_hold_identity(pod: &Pod) -> bool {
    !pod.node_name.is_empty() && pod.captured()
}

impl Indexes {
    /// Adds (`add`) or withdraws one object's entries.
    fn update(&mut self, object: &Object, add: bool) {
        match object {
            Object::EndpointSlice(slice) => {
                let by = (slice.meta.namespace.clone(), slice.service_name.clone());
                if add {
                    let names = self.slices_by_service.entry(by).or_default();
                    names.insert(slice.meta.name.clone());
                } else if let Some(names) = self.slices_by_service.get_mut(&by) {
                    names.remove(&slice.meta.name);
                    if names.is_empty() {
                        self.slices_by_service.remove(&by);
                    }
                }
            }
            Object::Pod(pod) if may_hold_identity(pod) => {
                let identity = (pod.meta.namespace.clone(), pod.service_account.clone());
                if add {
                    let node = self
                        .identities_by_node
                        .entry(pod.node_name.clone())
                        .or_default();
                    *node.entry(identity).or_default() += 1;
                } else if let Some(node) = self.identities_by_node.get_mut(&pod.node_name) {
                    if let Some(count) = node.get_mut(&identity) {
                        *count = count.saturating_sub(1);
                        if *count == 0 {
                            node.remove(&identity);
                        }
                    }
                    if node.is_empty() {
                        self.identities_by_node.remove(&pod.node_name);
                    }
                }
            }
            _ => {}
        }
    }
}
