//! Istio's `PeerAuthentication`: the spec is read with unknown fields refused,
//! then checked as Istio's validation does (port-level modes need a selector,
//! ports are 1-65535).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::{Checked, Envelope, Fault, check_port_text, deserialize, join, reduce_meta};
use crate::model::{Kind, MtlsMode, PeerAuthentication, WorkloadSelector};

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    selector: Option<WorkloadSelector>,
    #[serde(default)]
    mtls: Option<Mtls>,
    /// Keys are ports, written as strings in JSON (numbers in YAML).
    #[serde(default)]
    port_level_mtls: Option<BTreeMap<String, Option<Mtls>>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Mtls {
    #[serde(default)]
    mode: Option<MtlsMode>,
}

fn mode_of(mtls: Option<Mtls>) -> MtlsMode {
    mtls.and_then(|m| m.mode).unwrap_or_default()
}

pub(super) fn peer_authentication(value: Value) -> Checked<PeerAuthentication> {
    let envelope: Envelope<Spec> = deserialize(value, "")?;
    let created = envelope
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second());
    let meta = reduce_meta(Kind::PeerAuthentication, envelope.metadata)?;
    let spec = envelope.spec.unwrap_or_default();
    let selector = spec
        .selector
        .map(|s| s.match_labels)
        .filter(|labels| !labels.is_empty());
    let mut port_level = BTreeMap::new();
    let ports = spec.port_level_mtls.unwrap_or_default();
    if !ports.is_empty() && selector.is_none() {
        return Err(Fault::new(
            "spec.portLevelMtls",
            "only allowed with a workload selector (spec.selector.matchLabels), as in Istio: \
             a mesh or namespace policy must not have port-level mTLS",
        ));
    }
    for (key, mtls) in ports {
        let port = check_port_text(&join("spec.portLevelMtls", &key), &key)?;
        port_level.insert(port, mode_of(mtls));
    }
    Ok(PeerAuthentication {
        meta,
        created,
        selector,
        mode: mode_of(spec.mtls),
        port_level,
    })
}
