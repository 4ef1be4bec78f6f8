//! The order a client receives one translation's changes in: what a change adds
//! reaches a client before what it removes, whatever the response cuts, so a
//! policy replaced by others is never withdrawn before all of them are in place.

use std::collections::BTreeMap;

use ambit_proto::AUTHORIZATION_TYPE_URL;
use ambit_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;

use super::client::ClientState;
use super::tests::{client, req};
use super::*;
use crate::model::{Meta, MtlsMode, Namespace, Object, ObjectChange, PeerAuthentication};
use crate::translate::{TranslateSettings, Translator};

const GLOBAL: &str = "istio-system/istio_converted_static_strict";

fn namespace_policy(ns: &str, mode: MtlsMode) -> ObjectChange {
    ObjectChange::Upsert(Object::PeerAuthentication(PeerAuthentication {
        meta: Meta {
            name: "default".into(),
            namespace: ns.into(),
            ..Meta::default()
        },
        created: None,
        selector: None,
        mode,
        port_level: BTreeMap::new(),
    }))
}

fn namespace(name: &str) -> ObjectChange {
    ObjectChange::Upsert(Object::Namespace(Namespace {
        meta: Meta {
            name: name.into(),
            ..Meta::default()
        },
    }))
}

fn authorization_request() -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: AUTHORIZATION_TYPE_URL.into(),
        ..req(&[])
    }
}

/// Releases what is pending and returns every response the client is then owed,
/// each acknowledged as it arrives: (names sent, names removed) per response.
fn push(c: &mut ClientState, store: &ResourceStore) -> Vec<(Vec<String>, Vec<String>)> {
    if let Some(batch) = store.take_pending() {
        c.merge_batch(&batch);
    }
    let mut out = Vec::new();
    while let Some(o) = c.next_response(&store.read()) {
        let r = o.response;
        out.push((
            r.resources.iter().map(|r| r.name.clone()).collect(),
            r.removed_resources.clone(),
        ));
        let mut ack = authorization_request();
        ack.response_nonce = r.nonce;
        c.handle_request(ack, &store.read()).unwrap();
    }
    out
}

#[test]
fn a_global_policy_is_withdrawn_only_after_every_namespace_policy_replacing_it() {
    let mut t = Translator::new(TranslateSettings::default());
    let store = ResourceStore::new();
    // Names after "istio-system": in one generation the GLOBAL removal would
    // come first.
    let namespaces: Vec<String> = (0..400).map(|i| format!("ns-{i:03}")).collect();
    let mut changes: Vec<_> = namespaces.iter().map(|n| namespace(n)).collect();
    changes.push(namespace_policy("istio-system", MtlsMode::Strict));
    store.apply_removals_last(t.apply(changes));

    let mut c = client(XdsSettings::default().max_response_bytes);
    c.handle_request(authorization_request(), &store.read())
        .unwrap();
    let sync = push(&mut c, &store);
    let synced: Vec<&String> = sync.iter().flat_map(|(sent, _)| sent).collect();
    assert_eq!(synced, [GLOBAL]);

    // One namespace PERMISSIVE: the mesh is no longer STRICT as a whole, and
    // the GLOBAL policy gives way to one policy per other namespace.
    store.apply_removals_last(t.apply(vec![namespace_policy("ns-200", MtlsMode::Permissive)]));
    let responses = push(&mut c, &store);
    assert!(responses.len() > 1, "the change spans several responses");
    let removed_in = responses
        .iter()
        .position(|(_, removed)| removed.iter().any(|n| n == GLOBAL))
        .expect("the GLOBAL policy is withdrawn");
    let added_before: Vec<&String> = responses[..=removed_in]
        .iter()
        .flat_map(|(sent, _)| sent)
        .collect();
    for ns in namespaces.iter().filter(|ns| *ns != "ns-200") {
        let name = format!("{ns}/istio_converted_namespace_strict");
        assert!(
            added_before.contains(&&name),
            "{name} not yet sent when the GLOBAL policy was withdrawn"
        );
    }
}

#[test]
fn removals_go_one_generation_after_puts_and_the_last_update_of_a_name_wins() {
    use super::tests::{T, del, put};
    let store = ResourceStore::new();
    store.apply(vec![put("a", "1"), put("b", "1"), put("c", "1")]);
    let changed = store.apply_removals_last(vec![
        del("a"),
        put("a", "2"),
        put("b", "2"),
        del("b"),
        del("c"),
        put("d", "1"),
    ]);
    assert_eq!(changed, 4);
    assert_eq!(store.generation(), 3, "puts at 2, removals at 3");
    assert!(store.get(T, "a").is_some() && store.get(T, "d").is_some());
    assert!(store.get(T, "b").is_none() && store.get(T, "c").is_none());
    let log = store.read();
    let order: Vec<(u64, String)> = log
        .get(T)
        .unwrap()
        .after(None)
        .map(|(k, _)| (k.0, k.1.to_string()))
        .collect();
    assert_eq!(
        order,
        [
            (2, "a".into()),
            (2, "d".into()),
            (3, "b".into()),
            (3, "c".into())
        ]
    );
}
