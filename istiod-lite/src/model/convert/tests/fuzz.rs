//! Property test: `from_json` never panics, whatever JSON it is given. The
//! generator favours the field names and values the decoders look at, so the
//! input reaches deep into every kind rather than failing at `kind`.

use proptest::prelude::*;
use serde_json::{Map, Value};

use super::from_json;
use crate::model::Kind;

const KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "labels",
    "uid",
    "generation",
    "deletionTimestamp",
    "spec",
    "status",
    "rules",
    "from",
    "to",
    "when",
    "source",
    "operation",
    "ports",
    "notPorts",
    "port",
    "targetPort",
    "containerPort",
    "containers",
    "podIP",
    "podIPs",
    "ip",
    "conditions",
    "type",
    "clusterIP",
    "clusterIPs",
    "selector",
    "matchLabels",
    "targetRef",
    "targetRefs",
    "action",
    "provider",
    "principals",
    "namespaces",
    "ipBlocks",
    "key",
    "values",
    "notValues",
    "endpoints",
    "addresses",
    "addressType",
    "listeners",
    "protocol",
    "parentRefs",
    "host",
    "trafficPolicy",
    "gatewayClassName",
    "value",
    "kubernetes.io/service-name",
];

const TEXTS: &[&str] = &[
    "",
    "v1",
    "Pod",
    "None",
    "True",
    "Ready",
    "198.18.0.1",
    "198.18.0.0/16",
    "fd00::1",
    "80",
    "70000",
    "0",
    "-1",
    "http",
    "CUSTOM",
    "DENY",
    "ALLOW",
    "source.ip",
    "destination.port",
    "request.headers[x]",
    "FQDN",
    "IPv4",
    "Service",
    "2024-01-01T00:00:00Z",
    "a.b",
    "UPPER",
];

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(TEXTS).prop_map(str::to_owned),
        1 => "[a-zA-Z0-9./:\\[\\]-]{0,12}",
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(KEYS).prop_map(str::to_owned),
        1 => "[a-z.]{0,6}",
    ]
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-2i64..70_000).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// An object with a valid header of some kind and random everything else.
fn headed() -> impl Strategy<Value = Value> {
    (
        proptest::sample::select(Kind::ALL.to_vec()),
        json(),
        json(),
        json(),
    )
        .prop_map(|(kind, metadata, spec, status)| {
            let (api_version, kind) = kind.api();
            let mut object = Map::new();
            object.insert("apiVersion".into(), api_version.into());
            object.insert("kind".into(), kind.into());
            object.insert("metadata".into(), metadata);
            object.insert("spec".into(), spec.clone());
            object.insert("status".into(), status);
            // EndpointSlice keeps its fields at the top.
            if let Value::Object(fields) = spec {
                for (k, v) in fields {
                    object.entry(k).or_insert(v);
                }
            }
            Value::Object(object)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn never_panics_on_arbitrary_json(value in json()) {
        let _ = from_json(value);
    }

    #[test]
    fn never_panics_on_known_kinds(value in headed()) {
        if let Err(e) = from_json(value) {
            prop_assert!(!e.field.is_empty());
            prop_assert!(!e.problem.is_empty());
        }
    }
}
