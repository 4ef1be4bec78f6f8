//! PeerAuthentication: what is accepted, and each refusal with its field path.

use std::collections::BTreeMap;

use super::{err, ok};
use crate::model::{MtlsMode, Object, PeerAuthentication};

const HEAD: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa, namespace: shop}\n";

fn read(text: &str) -> PeerAuthentication {
    match ok(text) {
        Object::PeerAuthentication(pa) => pa,
        other => panic!("not a PeerAuthentication: {other:?}"),
    }
}

fn spec_err(spec: &str) -> (String, String) {
    let e = err(&format!("{HEAD}spec: {spec}"));
    assert_eq!(
        (e.kind.as_str(), e.namespace.as_str(), e.name.as_str()),
        ("PeerAuthentication", "shop", "pa")
    );
    (e.field, e.problem)
}

#[test]
fn workload_policy_with_port_modes_is_read() {
    let pa = read(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: pa
  namespace: shop
  creationTimestamp: '2024-05-01T10:00:00Z'
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
    '9090': {mode: DISABLE}
    9091: {}
",
    );
    assert_eq!(pa.meta.namespace, "shop");
    assert_eq!(pa.created, Some(1_714_557_600));
    assert_eq!(
        pa.selector,
        Some(BTreeMap::from([("app".into(), "web".into())]))
    );
    assert_eq!(pa.mode, MtlsMode::Strict);
    assert_eq!(
        pa.port_level,
        BTreeMap::from([
            (8080, MtlsMode::Permissive),
            (9090, MtlsMode::Disable),
            (9091, MtlsMode::Unset),
        ])
    );
}

#[test]
fn v1beta1_is_read_and_absent_fields_are_unset() {
    let pa = read(
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: pa, namespace: shop}\n",
    );
    assert_eq!(pa.mode, MtlsMode::Unset);
    assert_eq!(pa.selector, None);
    assert_eq!(pa.created, None);
    assert!(pa.port_level.is_empty());
    let pa = read(&format!("{HEAD}spec: {{mtls: {{}}, selector: {{}}}}"));
    assert_eq!((pa.mode, pa.selector), (MtlsMode::Unset, None));
    let pa = read(&format!("{HEAD}spec: {{selector: {{matchLabels: {{}}}}}}"));
    assert_eq!(pa.selector, None, "empty matchLabels is namespace-wide");
}

#[test]
fn every_mode_is_read() {
    for (text, mode) in [
        ("UNSET", MtlsMode::Unset),
        ("PERMISSIVE", MtlsMode::Permissive),
        ("STRICT", MtlsMode::Strict),
        ("DISABLE", MtlsMode::Disable),
    ] {
        let pa = read(&format!("{HEAD}spec: {{mtls: {{mode: {text}}}}}"));
        assert_eq!(pa.mode, mode, "{text}");
    }
}

#[test]
fn an_unknown_mode_names_its_field() {
    let (field, problem) = spec_err("{mtls: {mode: strict}}");
    assert_eq!(field, "spec.mtls.mode");
    assert!(problem.contains("unknown variant"), "{problem}");
    let (field, _) =
        spec_err("{selector: {matchLabels: {app: a}}, portLevelMtls: {8080: {mode: ON}}}");
    assert_eq!(field, "spec.portLevelMtls.8080.mode");
}

#[test]
fn unknown_fields_are_refused() {
    let (field, problem) = spec_err("{mtls: {mode: STRICT}, action: DENY}");
    assert_eq!(field, "spec.action");
    assert!(problem.contains("unknown field"), "{problem}");
    let (field, _) = spec_err("{mtls: {mode: STRICT, strict: true}}");
    assert_eq!(field, "spec.mtls.strict");
}

#[test]
fn port_level_modes_need_a_selector() {
    let (field, problem) =
        spec_err("{mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}");
    assert_eq!(field, "spec.portLevelMtls");
    assert!(problem.contains("selector"), "{problem}");
}

#[test]
fn port_keys_must_be_ports() {
    for (key, want) in [
        ("0", "out of range"),
        ("70000", "out of range"),
        ("http", "not a port"),
    ] {
        let (field, problem) = spec_err(&format!(
            "{{selector: {{matchLabels: {{app: a}}}}, portLevelMtls: {{'{key}': {{mode: STRICT}}}}}}"
        ));
        assert_eq!(field, format!("spec.portLevelMtls.{key}"));
        assert!(problem.contains(want), "{key}: {problem}");
    }
}

#[test]
fn an_unserved_version_is_refused() {
    let e = err(
        "apiVersion: security.istio.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: pa}\n",
    );
    assert_eq!(e.field, "apiVersion");
    assert!(
        e.problem.contains("security.istio.io/v1beta1"),
        "{}",
        e.problem
    );
}

/// The CRD's schema refuses a mode istiod-lite would refuse (`mode: strict`) at
/// `kubectl apply`, in both served versions, at the policy and the port level.
#[test]
fn the_crd_declares_the_modes_istiod_lite_accepts() {
    const CRD: &str = include_str!("../../../../../manifests/peerauthentication-crd.yaml");
    const MODES: [&str; 4] = ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"];
    let crd: serde_json::Value = serde_yaml_ng::from_str(CRD).unwrap();
    let versions = crd["spec"]["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2);
    for version in versions {
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let modes = [
            &spec["properties"]["mtls"]["properties"]["mode"],
            &spec["properties"]["portLevelMtls"]["additionalProperties"]["properties"]["mode"],
        ];
        for mode in modes {
            assert_eq!(mode["type"], "string", "{}: {mode}", version["name"]);
            let allowed: Vec<&str> = mode["enum"]
                .as_array()
                .unwrap_or_else(|| panic!("{}: no enum in {mode}", version["name"]))
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(allowed, MODES, "{}", version["name"]);
        }
    }
    for mode in MODES {
        read(&format!(
            "{HEAD}spec: {{selector: {{matchLabels: {{app: web}}}}, mtls: {{mode: {mode}}}, \
             portLevelMtls: {{'8080': {{mode: {mode}}}}}}}"
        ));
    }
    spec_err("{mtls: {mode: strict}}");
}
