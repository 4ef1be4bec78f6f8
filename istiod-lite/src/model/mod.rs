//! The mesh model: the Kubernetes objects istiod-lite reads, reduced to what the
//! mesh uses, with one error type that names where a bad object came from.
//!
//! Both config sources (the watched directory and the Kubernetes API) turn what
//! they read into JSON and call [`from_json`]; everything downstream sees only the
//! typed [`Object`]s of this module.

mod convert;
mod objects;
mod peer_auth;

use std::fmt;

pub use convert::from_json;
pub use objects::*;
pub use peer_auth::*;

/// The kinds istiod-lite reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    ServiceAccount,
    EndpointSlice,
    Gateway,
    HttpRoute,
    AuthorizationPolicy,
    PeerAuthentication,
    DestinationRule,
}

impl Kind {
    /// Every kind, in the order a source should load them (namespaces first).
    pub const ALL: [Kind; 10] = [
        Kind::Namespace,
        Kind::ServiceAccount,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Gateway,
        Kind::HttpRoute,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::DestinationRule,
    ];

    /// `(apiVersion, kind)` as written in YAML.
    pub fn api(self) -> (&'static str, &'static str) {
        match self {
            Kind::Namespace => ("v1", "Namespace"),
            Kind::Pod => ("v1", "Pod"),
            Kind::Service => ("v1", "Service"),
            Kind::ServiceAccount => ("v1", "ServiceAccount"),
            Kind::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSlice"),
            Kind::Gateway => ("gateway.networking.k8s.io/v1", "Gateway"),
            Kind::HttpRoute => ("gateway.networking.k8s.io/v1", "HTTPRoute"),
            Kind::AuthorizationPolicy => ("security.istio.io/v1", "AuthorizationPolicy"),
            Kind::PeerAuthentication => ("security.istio.io/v1", "PeerAuthentication"),
            Kind::DestinationRule => ("networking.istio.io/v1", "DestinationRule"),
        }
    }

    /// Cluster-scoped kinds have an empty namespace in their key.
    pub fn is_namespaced(self) -> bool {
        self != Kind::Namespace
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.api().1)
    }
}

/// Names one object: kind, namespace (empty when cluster-scoped) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One object of a known kind, validated.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    ServiceAccount(ServiceAccount),
    EndpointSlice(EndpointSlice),
    Gateway(Gateway),
    HttpRoute(HttpRoute),
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
    DestinationRule(DestinationRule),
}

impl Object {
    pub fn meta(&self) -> &Meta {
        match self {
            Object::Namespace(o) => &o.meta,
            Object::Pod(o) => &o.meta,
            Object::Service(o) => &o.meta,
            Object::ServiceAccount(o) => &o.meta,
            Object::EndpointSlice(o) => &o.meta,
            Object::Gateway(o) => &o.meta,
            Object::HttpRoute(o) => &o.meta,
            Object::AuthorizationPolicy(o) => &o.meta,
            Object::PeerAuthentication(o) => &o.meta,
            Object::DestinationRule(o) => &o.meta,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::ServiceAccount(_) => Kind::ServiceAccount,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Gateway(_) => Kind::Gateway,
            Object::HttpRoute(_) => Kind::HttpRoute,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
            Object::DestinationRule(_) => Kind::DestinationRule,
        }
    }

    pub fn key(&self) -> ObjectKey {
        let meta = self.meta();
        ObjectKey::new(self.kind(), meta.namespace.clone(), meta.name.clone())
    }
}

/// Why an object was refused: what it is (as far as it could be read), the field
/// at fault as a path (`spec.rules[0].from[1].source.ipBlocks[2]`), and the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[error("{kind} {}{name}: field {field}: {problem}", if namespace.is_empty() { String::new() } else { format!("{namespace}/") })]
pub struct ObjectError {
    /// The kind as written (`"Pod"`), or `"?"` when even that could not be read.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub field: String,
    pub problem: String,
}

/// What a source tells the model.
// Upserts are the common case and move into the model as they are; boxing them
// would cost an allocation per object for the rare, small Delete.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum ObjectChange {
    /// Added or changed.
    Upsert(Object),
    Delete(ObjectKey),
}

/// A problem a source found, kept until the same origin reports again: `origin`
/// is the file path (directory source) or `kube:<Kind>` (Kubernetes source).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub origin: String,
    /// 1-based index of the YAML document in the file, when there is one.
    pub document: Option<usize>,
    pub error: ObjectError,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.document {
            Some(d) => write!(f, "{} (document {d}): {}", self.origin, self.error),
            None => write!(f, "{}: {}", self.origin, self.error),
        }
    }
}

/// What flows from a source to the model: changes, and the current problems of
/// one origin (replacing what that origin reported before; empty clears them).
#[derive(Clone, Debug)]
pub enum SourceEvent {
    Changes(Vec<ObjectChange>),
    Reports {
        origin: String,
        reports: Vec<Report>,
    },
    /// The source has delivered everything it had at start (or after a relist).
    Synced,
}
