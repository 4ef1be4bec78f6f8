//! JSON (from YAML or the Kubernetes API) to typed [`Object`]s, with every problem
//! reported as the field path at fault.
//!
//! `apiVersion` and `kind` pick a decoder; serde (through `serde_path_to_error`)
//! checks the shapes, and the per-kind modules check what serde cannot (names,
//! addresses, port ranges, Istio's rules). Whatever fails, the error names the
//! object as far as its metadata could be read.

mod cluster;
mod peer_auth;
mod policy;
mod traffic;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Kind, Meta, Object, ObjectError};

/// Reads one object: `apiVersion` and `kind` pick the type, then every field the
/// mesh uses is checked. Unknown kinds are an error naming the kind.
pub fn from_json(value: Value) -> Result<Object, ObjectError> {
    let Value::Object(fields) = &value else {
        return Err(ObjectError {
            kind: "?".into(),
            namespace: String::new(),
            name: String::new(),
            field: ".".into(),
            problem: format!(
                "expected an object (a mapping), found {}",
                type_name(&value)
            ),
        });
    };
    let written_kind = fields
        .get("kind")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let api_version = fields
        .get("apiVersion")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let kind = match resolve_kind(api_version.as_deref(), written_kind.as_deref()) {
        Ok(kind) => kind,
        Err(fault) => {
            let named = Kind::ALL
                .into_iter()
                .find(|k| Some(k.api().1) == written_kind.as_deref());
            let (namespace, name) = read_identity(fields, named);
            return Err(fault.into_error(written_kind.as_deref().unwrap_or("?"), namespace, name));
        }
    };
    let (namespace, name) = read_identity(fields, Some(kind));
    decode(kind, value).map_err(|fault| fault.into_error(&kind.to_string(), namespace, name))
}

/// What went wrong inside one object, before the object's identity is attached.
#[derive(Debug)]
struct Fault {
    field: String,
    problem: String,
}

impl Fault {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn into_error(self, kind: &str, namespace: String, name: String) -> ObjectError {
        ObjectError {
            kind: kind.to_owned(),
            namespace,
            name,
            field: self.field,
            problem: self.problem,
        }
    }
}

type Checked<T> = Result<T, Fault>;

/// The served versions of each kind (the current one first).
fn served_versions(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Namespace | Kind::Pod | Kind::Service | Kind::ServiceAccount => &["v1"],
        Kind::EndpointSlice => &["discovery.k8s.io/v1"],
        Kind::Gateway | Kind::HttpRoute => &[
            "gateway.networking.k8s.io/v1",
            "gateway.networking.k8s.io/v1beta1",
        ],
        Kind::AuthorizationPolicy | Kind::PeerAuthentication => {
            &["security.istio.io/v1", "security.istio.io/v1beta1"]
        }
        Kind::DestinationRule => &[
            "networking.istio.io/v1",
            "networking.istio.io/v1beta1",
            "networking.istio.io/v1alpha3",
        ],
    }
}

fn resolve_kind(api_version: Option<&str>, kind: Option<&str>) -> Checked<Kind> {
    let Some(kind) = kind else {
        return Err(Fault::new("kind", "required: a string naming the kind"));
    };
    let Some(known) = Kind::ALL.into_iter().find(|k| k.api().1 == kind) else {
        let names: Vec<&str> = Kind::ALL.iter().map(|k| k.api().1).collect();
        return Err(Fault::new(
            "kind",
            format!("unknown kind {kind:?}; known kinds: {}", names.join(", ")),
        ));
    };
    let versions = served_versions(known);
    match api_version {
        Some(v) if versions.contains(&v) => Ok(known),
        Some(v) => Err(Fault::new(
            "apiVersion",
            format!(
                "{v:?} is not a served version of {kind}; accepted: {}",
                versions.join(", ")
            ),
        )),
        None => Err(Fault::new(
            "apiVersion",
            format!("required; {kind} is {}", versions[0]),
        )),
    }
}

/// Namespace and name as far as they can be read, for naming the object in errors.
fn read_identity(fields: &serde_json::Map<String, Value>, kind: Option<Kind>) -> (String, String) {
    let meta = fields.get("metadata");
    let text = |key: &str| {
        meta.and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let name = text("name");
    let namespace = match kind {
        Some(k) if !k.is_namespaced() => String::new(),
        _ => default_namespace(text("namespace")),
    };
    (namespace, name)
}

fn default_namespace(namespace: String) -> String {
    if namespace.is_empty() {
        "default".into()
    } else {
        namespace
    }
}

fn decode(kind: Kind, value: Value) -> Checked<Object> {
    match kind {
        Kind::Namespace => cluster::namespace(value).map(Object::Namespace),
        Kind::ServiceAccount => cluster::service_account(value).map(Object::ServiceAccount),
        Kind::Pod => cluster::pod(value).map(Object::Pod),
        Kind::Service => cluster::service(value).map(Object::Service),
        Kind::EndpointSlice => cluster::endpoint_slice(value).map(Object::EndpointSlice),
        Kind::Gateway => traffic::gateway(value).map(Object::Gateway),
        Kind::HttpRoute => traffic::http_route(value).map(Object::HttpRoute),
        Kind::DestinationRule => traffic::destination_rule(value).map(Object::DestinationRule),
        Kind::AuthorizationPolicy => {
            policy::authorization_policy(value).map(Object::AuthorizationPolicy)
        }
        Kind::PeerAuthentication => {
            peer_auth::peer_authentication(value).map(Object::PeerAuthentication)
        }
    }
}

/// Deserializes `value` into `T`; a failure names the field path, prefixed by
/// `prefix` (the path of `value` inside the object, empty at the top).
fn deserialize<T: DeserializeOwned>(value: Value, prefix: &str) -> Checked<T> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let mut field = render_path(prefix, err.path());
        let problem = err.inner().to_string();
        // serde reports an unknown or missing field at its parent: name the field.
        for marker in ["unknown field `", "missing field `"] {
            if let Some(rest) = problem.strip_prefix(marker)
                && let Some(end) = rest.find('`')
            {
                let key = &rest[..end];
                if join("", key) != field && !field.ends_with(&join("x", key)[1..]) {
                    push_key(&mut field, key);
                }
            }
        }
        if field.is_empty() {
            field.push('.');
        }
        Fault::new(field, problem)
    })
}

fn render_path(prefix: &str, path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = prefix.to_owned();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => push_key(&mut out, key),
            Segment::Enum { variant } => push_key(&mut out, variant),
            Segment::Unknown => push_key(&mut out, "?"),
        }
    }
    out
}

/// Appends `key` to a field path: `.key`, or `["key"]` when it holds a dot or a
/// slash (label keys such as `kubernetes.io/service-name`).
fn push_key(path: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
    } else {
        path.push_str(&format!("[{key:?}]"));
    }
}

/// `parent.key` or `parent["key"]`.
fn join(parent: &str, key: &str) -> String {
    let mut out = parent.to_owned();
    push_key(&mut out, key);
    out
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// How strict a name check is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NameRule {
    /// RFC 1123 label: at most 63 of `a-z0-9-`, alphanumeric at both ends.
    Label,
    /// RFC 1123 subdomain: labels joined by dots, at most 253 characters.
    Subdomain,
}

fn check_name(field: &str, name: &str, rule: NameRule) -> Checked<()> {
    if name.is_empty() {
        return Err(Fault::new(field, "required"));
    }
    let ok = match rule {
        NameRule::Label => is_label(name) && name.len() <= 63,
        NameRule::Subdomain => name.len() <= 253 && name.split('.').all(is_label),
    };
    if ok {
        return Ok(());
    }
    let what = match rule {
        NameRule::Label => {
            "an RFC 1123 label (at most 63 of a-z, 0-9 and '-', starting and ending with a letter or digit)"
        }
        NameRule::Subdomain => {
            "an RFC 1123 subdomain (lower-case letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters)"
        }
    };
    Err(Fault::new(field, format!("{name:?} is not {what}")))
}

fn is_label(part: &str) -> bool {
    let bytes = part.as_bytes();
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes.iter().all(|b| edge(b) || *b == b'-')
}

/// Checks and reduces `metadata` (already deserialized) to the model's [`Meta`].
fn reduce_meta(kind: Kind, metadata: ObjectMeta) -> Checked<Meta> {
    let name = metadata.name.unwrap_or_default();
    let rule = match kind {
        Kind::Namespace | Kind::Service => NameRule::Label,
        _ => NameRule::Subdomain,
    };
    if name.is_empty() && metadata.generate_name.is_some() {
        return Err(Fault::new(
            "metadata.name",
            "required (generateName is only honoured by the API server)",
        ));
    }
    check_name("metadata.name", &name, rule)?;
    let namespace = if kind.is_namespaced() {
        let namespace = default_namespace(metadata.namespace.unwrap_or_default());
        check_name("metadata.namespace", &namespace, NameRule::Label)?;
        namespace
    } else {
        String::new()
    };
    Ok(Meta {
        name,
        namespace,
        uid: metadata.uid.unwrap_or_default(),
        labels: metadata.labels.unwrap_or_default(),
        annotations: metadata.annotations.unwrap_or_default(),
        generation: metadata.generation,
    })
}

fn parse_ip(field: &str, text: &str) -> Checked<IpAddr> {
    text.trim()
        .parse()
        .map_err(|_| Fault::new(field, format!("{text:?} is not an IP address")))
}

/// A port number from a Kubernetes `int32` field.
fn check_port(field: &str, port: i64) -> Checked<u16> {
    match u16::try_from(port) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(Fault::new(
            field,
            format!("port {port} is out of range 1-65535"),
        )),
    }
}

/// A port written as a string (Istio's `operation.ports`).
fn check_port_text(field: &str, text: &str) -> Checked<u16> {
    let port: i64 = text
        .trim()
        .parse()
        .map_err(|_| Fault::new(field, format!("{text:?} is not a port number")))?;
    check_port(field, port)
}

/// Labels as read; used by the kinds that take a label from metadata.
fn label<'a>(labels: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    labels
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The shape shared by the custom resources: metadata and a typed spec (the
/// `apiVersion` and `kind` were checked before).
#[derive(serde::Deserialize)]
struct Envelope<S> {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default = "Option::default")]
    spec: Option<S>,
}

/// The kinds an Istio `targetRef` may name, each with its API group ("" is core).
pub(super) const TARGET_KINDS: RefKinds = RefKinds {
    kinds: &[
        ("", "Service"),
        ("gateway.networking.k8s.io", "Gateway"),
        ("gateway.networking.k8s.io", "GatewayClass"),
        ("networking.istio.io", "ServiceEntry"),
    ],
    default_kind: None,
};

/// The kinds a Gateway API `parentRef` may name in a mesh (Gateway by default).
pub(super) const PARENT_KINDS: RefKinds = RefKinds {
    kinds: &[
        ("gateway.networking.k8s.io", "Gateway"),
        ("", "Service"),
        ("networking.istio.io", "ServiceEntry"),
    ],
    default_kind: Some("Gateway"),
};

/// What a reference may point at.
pub(super) struct RefKinds {
    kinds: &'static [(&'static str, &'static str)],
    default_kind: Option<&'static str>,
}

/// A `parentRef` / `targetRef` beyond what serde checks: a name, a port in range,
/// a kind it may name and, when given, that kind's group (an omitted group is the
/// kind's own, so `kind: Service` alone is the core Service).
fn check_parent_ref(field: &str, parent: &super::ParentRef, refs: &RefKinds) -> Checked<()> {
    if parent.name.is_empty() {
        return Err(Fault::new(join(field, "name"), "required"));
    }
    if parent.port == Some(0) {
        return Err(Fault::new(
            join(field, "port"),
            "port 0 is out of range 1-65535",
        ));
    }
    let names = || {
        let names: Vec<&str> = refs.kinds.iter().map(|(_, kind)| *kind).collect();
        names.join(", ")
    };
    let Some(kind) = parent.kind.as_deref().or(refs.default_kind) else {
        return Err(Fault::new(
            join(field, "kind"),
            format!("required: one of {}", names()),
        ));
    };
    let Some((group, _)) = refs.kinds.iter().find(|(_, k)| *k == kind) else {
        return Err(Fault::new(
            join(field, "kind"),
            format!(
                "`{kind}` is not a kind this reference may name: one of {}",
                names()
            ),
        ));
    };
    if let Some(given) = parent.group.as_deref() {
        let given_core = given.is_empty() || given == "core";
        if !(given == *group || (group.is_empty() && given_core)) {
            let want = if group.is_empty() {
                "\"\" (core)"
            } else {
                group
            };
            return Err(Fault::new(
                join(field, "group"),
                format!("kind {kind} is in group {want}, not `{given}`"),
            ));
        }
    }
    Ok(())
}
