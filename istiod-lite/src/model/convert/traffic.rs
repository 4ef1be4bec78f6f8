//! The traffic kinds carried for the waypoint: Gateway API `Gateway` and
//! `HTTPRoute`, and Istio's `DestinationRule`.

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_json::Value;

use super::{
    Checked, Envelope, Fault, NameRule, PARENT_KINDS, check_name, check_parent_ref, check_port,
    deserialize, parse_ip, reduce_meta,
};
use crate::model::{DestinationRule, Gateway, GatewayListener, HttpRoute, Kind, ParentRef};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GatewaySpec {
    gateway_class_name: String,
    #[serde(default)]
    listeners: Vec<ListenerSpec>,
    #[serde(default)]
    addresses: Vec<AddressSpec>,
}

#[derive(Deserialize)]
struct ListenerSpec {
    name: String,
    port: i64,
    protocol: String,
}

#[derive(Deserialize)]
struct AddressSpec {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    value: String,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpRouteSpec {
    #[serde(default)]
    parent_refs: Vec<ParentRef>,
    #[serde(default)]
    rules: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DestinationRuleSpec {
    host: String,
    #[serde(default)]
    traffic_policy: Option<Value>,
}

pub(super) fn gateway(value: Value) -> Checked<Gateway> {
    let envelope: Envelope<GatewaySpec> = deserialize(value, "")?;
    let meta = reduce_meta(Kind::Gateway, envelope.metadata)?;
    let Some(spec) = envelope.spec else {
        return Err(Fault::new("spec", "required"));
    };
    if spec.gateway_class_name.is_empty() {
        return Err(Fault::new("spec.gatewayClassName", "required"));
    }
    if spec.listeners.is_empty() {
        return Err(Fault::new(
            "spec.listeners",
            "at least one listener is required",
        ));
    }
    let mut names = BTreeSet::new();
    let mut listeners = Vec::new();
    for (i, listener) in spec.listeners.into_iter().enumerate() {
        let field = format!("spec.listeners[{i}]");
        check_name(
            &format!("{field}.name"),
            &listener.name,
            NameRule::Subdomain,
        )?;
        if !names.insert(listener.name.clone()) {
            return Err(Fault::new(
                format!("{field}.name"),
                format!("listener name {:?} is used twice", listener.name),
            ));
        }
        let port = check_port(&format!("{field}.port"), listener.port)?;
        if listener.protocol.is_empty() {
            return Err(Fault::new(format!("{field}.protocol"), "required"));
        }
        listeners.push(GatewayListener {
            name: listener.name,
            port,
            protocol: listener.protocol,
        });
    }
    let mut addresses = Vec::new();
    for (i, address) in spec.addresses.iter().enumerate() {
        // Hostnames and implementation-specific names are not addresses the mesh
        // can route to; they stay in the object but not in `addresses`.
        if matches!(address.kind.as_deref(), None | Some("IPAddress")) {
            addresses.push(parse_ip(
                &format!("spec.addresses[{i}].value"),
                &address.value,
            )?);
        }
    }
    Ok(Gateway {
        meta,
        class_name: spec.gateway_class_name,
        listeners,
        addresses,
    })
}

pub(super) fn http_route(value: Value) -> Checked<HttpRoute> {
    let envelope: Envelope<HttpRouteSpec> = deserialize(value, "")?;
    let meta = reduce_meta(Kind::HttpRoute, envelope.metadata)?;
    let spec = envelope.spec.unwrap_or_default();
    for (i, parent) in spec.parent_refs.iter().enumerate() {
        check_parent_ref(&format!("spec.parentRefs[{i}]"), parent, &PARENT_KINDS)?;
    }
    let rules = match spec.rules {
        None | Some(Value::Null) => Value::Array(Vec::new()),
        Some(rules @ Value::Array(_)) => rules,
        Some(other) => {
            return Err(Fault::new(
                "spec.rules",
                format!("expected a list, found {}", super::type_name(&other)),
            ));
        }
    };
    Ok(HttpRoute {
        meta,
        parent_refs: spec.parent_refs,
        rules,
    })
}

pub(super) fn destination_rule(value: Value) -> Checked<DestinationRule> {
    let envelope: Envelope<DestinationRuleSpec> = deserialize(value, "")?;
    let meta = reduce_meta(Kind::DestinationRule, envelope.metadata)?;
    let Some(spec) = envelope.spec else {
        return Err(Fault::new("spec", "required"));
    };
    if spec.host.trim().is_empty() {
        return Err(Fault::new("spec.host", "required"));
    }
    let traffic_policy = match spec.traffic_policy {
        None => Value::Null,
        Some(policy @ (Value::Null | Value::Object(_))) => policy,
        Some(other) => {
            return Err(Fault::new(
                "spec.trafficPolicy",
                format!("expected an object, found {}", super::type_name(&other)),
            ));
        }
    };
    Ok(DestinationRule {
        meta,
        host: spec.host,
        traffic_policy,
    })
}
