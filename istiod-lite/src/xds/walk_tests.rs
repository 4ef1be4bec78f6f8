//! Unit tests of a wildcard client's walk through the change log: releases,
//! removals and their tombstones, reconnects, NACKs and the switch to and from
//! named subscriptions.

use std::collections::HashMap;

use ambit_proto::google::rpc;

use super::client::{ClientState, Feedback};
use super::tests::{T, client, del, drain_responses, names, put, req};
use super::*;

fn ack(c: &mut ClientState, store: &ResourceStore, resp: &DeltaDiscoveryResponseRef, nack: bool) {
    let mut r = req(&[]);
    r.response_nonce = resp.nonce.clone();
    if nack {
        r.error_detail = Some(rpc::Status {
            code: 3,
            message: "refused".into(),
            details: vec![],
        });
    }
    let feedback = c.handle_request(r, &store.read()).unwrap();
    assert_eq!(matches!(feedback, Feedback::Nack { .. }), nack);
}

type DeltaDiscoveryResponseRef = ambit_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;

fn type_debug(c: &ClientState, store: &ResourceStore) -> TypeDebug {
    c.debug(&store.read()).types.remove(0)
}

#[test]
fn a_synced_client_gets_changes_only_once_they_are_released() {
    let store = ResourceStore::new();
    store.apply(vec![put("a", "1"), put("b", "1")]);
    let mut c = client(1 << 20);
    c.handle_request(req(&[]), &store.read()).unwrap();
    let r = drain_responses(&mut c, &store);
    assert_eq!(names(&r[0]), ["a", "b"]);
    ack(&mut c, &store, &r[0], false);
    let t = type_debug(&c, &store);
    assert_eq!((t.held, t.acked, t.pending), (2, 2, 0));

    // Applied but not released by the debouncer: nothing yet.
    store.apply(vec![put("b", "2"), put("c", "1")]);
    assert!(!c.has_work(store.released()));
    assert!(drain_responses(&mut c, &store).is_empty());
    assert_eq!(type_debug(&c, &store).pending, 0);

    let batch = store.take_pending().unwrap();
    assert!(c.has_work(store.released()));
    assert_eq!(type_debug(&c, &store).pending, 2);
    c.merge_batch(&batch);
    let out = c.next_response(&store.read()).unwrap();
    assert_eq!(names(&out.response), ["b", "c"]);
    assert_eq!(
        out.push_origin,
        Some(batch.first_change),
        "a push of released changes"
    );
    assert!(c.next_response(&store.read()).is_none());
    let t = type_debug(&c, &store);
    assert_eq!(
        (t.held, t.acked, t.in_flight),
        (3, 1, 1),
        "b and c not yet acked"
    );
    ack(&mut c, &store, &out.response, false);
    assert_eq!(type_debug(&c, &store).acked, 3);
}

#[test]
fn a_resource_changed_during_a_split_sync_is_sent_once_at_its_latest_version() {
    let store = ResourceStore::new();
    let big = "x".repeat(100);
    store.apply((0..6).map(|i| put(&format!("r{i}"), &big)).collect());
    let mut c = client(250);
    c.handle_request(req(&[]), &store.read()).unwrap();
    let first = c.next_response(&store.read()).unwrap();
    assert_eq!(names(&first.response), ["r0", "r1", "r2"]);
    assert_eq!(first.push_origin, None, "the initial sync is no push");

    // r1 (already sent) and r4 (not yet) change before the rest goes out.
    store.apply(vec![put("r1", "new"), put("r4", "new")]);
    store.take_pending().unwrap();
    let rest = drain_responses(&mut c, &store);
    let mut sent: Vec<String> = rest.iter().flat_map(names).collect();
    sent.sort();
    assert_eq!(sent, ["r1", "r3", "r4", "r5"], "each once");
    let r4 = rest
        .iter()
        .flat_map(|r| r.resources.iter())
        .find(|r| r.name == "r4")
        .unwrap();
    assert_eq!(r4.version, format_version(version_of(b"new")));
}

#[test]
fn removals_reach_holders_and_their_tombstones_go_once_everyone_passed() {
    let store = ResourceStore::new();
    store.apply(vec![put("a", "1"), put("b", "1"), put("gone", "1")]);
    store.apply(vec![del("gone")]);
    store.take_pending().unwrap();
    let mut c = client(1 << 20);
    c.handle_request(req(&[]), &store.read()).unwrap();
    let r = drain_responses(&mut c, &store);
    assert_eq!(r.len(), 1);
    assert!(
        r[0].removed_resources.is_empty(),
        "a new client hears of no removal from before it came"
    );

    store.apply(vec![del("a")]);
    store.take_pending().unwrap();
    assert_eq!(
        store.drop_tombstones_before(c.needs_removals_from()),
        1,
        "the client has not heard of the removal of a yet"
    );
    let r = drain_responses(&mut c, &store);
    assert_eq!(r[0].removed_resources, ["a"]);
    assert_eq!(type_debug(&c, &store).held, 1);
    // Past it: the tombstone goes with the next collection after the client
    // moved to a later generation.
    store.apply(vec![put("b", "2")]);
    store.take_pending().unwrap();
    drain_responses(&mut c, &store);
    assert_eq!(store.drop_tombstones_before(c.needs_removals_from()), 0);
}

#[test]
fn a_reconnect_with_versions_skips_what_is_held_and_removes_what_is_gone() {
    let store = ResourceStore::new();
    store.apply(vec![
        put("same", "1"),
        put("changed", "new"),
        put("later", "1"),
    ]);
    let mut first = req(&[]);
    first.initial_resource_versions = HashMap::from([
        ("same".into(), format_version(version_of(b"1"))),
        ("changed".into(), format_version(version_of(b"old"))),
        ("later".into(), format_version(version_of(b"1"))),
        ("gone".into(), format_version(version_of(b"x"))),
        ("not-ours".into(), "?".into()),
    ]);
    let mut c = client(1 << 20);
    c.handle_request(first, &store.read()).unwrap();
    let t = type_debug(&c, &store);
    assert_eq!(t.held, 3, "claimed and present: same, changed, later");
    let r = drain_responses(&mut c, &store);
    assert_eq!(r.len(), 1);
    assert_eq!(names(&r[0]), ["changed"]);
    let mut removed = r[0].removed_resources.clone();
    removed.sort();
    assert_eq!(removed, ["gone", "not-ours"]);
    let t = type_debug(&c, &store);
    assert_eq!((t.held, t.pending), (3, 0));
}

#[test]
fn a_refused_resource_is_not_acked_until_a_new_version_is() {
    let store = ResourceStore::new();
    store.apply(vec![put("a", "1"), put("b", "1")]);
    let mut c = client(1 << 20);
    c.handle_request(req(&[]), &store.read()).unwrap();
    let r = drain_responses(&mut c, &store);
    ack(&mut c, &store, &r[0], false);

    store.apply(vec![put("a", "bad")]);
    store.take_pending().unwrap();
    let r = drain_responses(&mut c, &store);
    ack(&mut c, &store, &r[0], true);
    let t = type_debug(&c, &store);
    assert_eq!((t.held, t.acked, t.nacks), (2, 1, 1));
    let view = c.resources_debug(&store.read());
    assert_eq!(view.types[T]["a"].acked, None);
    assert_eq!(
        view.types[T]["b"].acked,
        Some(format_version(version_of(b"1")))
    );
    assert!(drain_responses(&mut c, &store).is_empty(), "not resent");

    store.apply(vec![put("a", "fixed")]);
    store.take_pending().unwrap();
    let r = drain_responses(&mut c, &store);
    assert_eq!(names(&r[0]), ["a"]);
    ack(&mut c, &store, &r[0], false);
    assert_eq!(type_debug(&c, &store).acked, 2);
}

#[test]
fn switching_between_wildcard_and_names_keeps_what_the_client_holds() {
    let store = ResourceStore::new();
    store.apply(vec![put("a", "1"), put("b", "1")]);
    let mut c = client(1 << 20);
    c.handle_request(req(&["a"]), &store.read()).unwrap();
    assert_eq!(names(&drain_responses(&mut c, &store)[0]), ["a"]);

    // Wildcard on: only b is new to the client.
    c.handle_request(req(&["*"]), &store.read()).unwrap();
    let r = drain_responses(&mut c, &store);
    assert_eq!(names(&r[0]), ["b"]);
    assert!(type_debug(&c, &store).wildcard);

    // Wildcard off: the client keeps a; changes to b no longer reach it.
    let mut off = req(&[]);
    off.resource_names_unsubscribe = vec!["*".into()];
    c.handle_request(off, &store.read()).unwrap();
    assert!(drain_responses(&mut c, &store).is_empty());
    let t = type_debug(&c, &store);
    assert_eq!((t.wildcard, t.held), (false, 1));
    store.apply(vec![put("b", "2")]);
    c.merge_batch(&store.take_pending().unwrap());
    assert!(drain_responses(&mut c, &store).is_empty());
    store.apply(vec![put("a", "2")]);
    c.merge_batch(&store.take_pending().unwrap());
    assert_eq!(names(&drain_responses(&mut c, &store)[0]), ["a"]);
}

/// A reconnect claims a name the store no longer has, and the name comes back
/// before the walk owed its removal: one response must not both send and remove
/// it (the client applies the resource, then the removal, and loses it).
#[test]
fn a_claimed_name_created_again_is_sent_not_removed() {
    let store = ResourceStore::new();
    let mut first = req(&[]);
    first.initial_resource_versions =
        HashMap::from([("x".into(), format_version(version_of(b"old")))]);
    let mut c = client(1 << 20);
    c.handle_request(first, &store.read()).unwrap();
    store.apply(vec![put("x", "new")]);
    store.take_pending().unwrap();
    let r = drain_responses(&mut c, &store);
    let removed: Vec<&String> = r.iter().flat_map(|r| &r.removed_resources).collect();
    assert_eq!(r.iter().flat_map(names).collect::<Vec<_>>(), ["x"]);
    assert!(removed.is_empty(), "{r:?}");
    let t = type_debug(&c, &store);
    assert_eq!((t.held, t.pending), (1, 0));
}

/// The wildcard subscription is dropped while the walk still owes the removal
/// of a name the client keeps by name: the named subscription sends it.
#[test]
fn dropping_the_wildcard_keeps_the_removals_it_owed() {
    let store = ResourceStore::new();
    store.apply(vec![put("x", "1"), put("y", "1")]);
    let mut c = client(1 << 20);
    c.handle_request(req(&["*", "x"]), &store.read()).unwrap();
    assert_eq!(names(&drain_responses(&mut c, &store)[0]), ["x", "y"]);

    store.apply(vec![del("x")]);
    let mut off = req(&[]);
    off.resource_names_unsubscribe = vec!["*".into()];
    c.handle_request(off, &store.read()).unwrap();
    c.merge_batch(&store.take_pending().unwrap());
    let r = drain_responses(&mut c, &store);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].removed_resources, ["x"]);
    assert_eq!(type_debug(&c, &store).held, 0);

    // Nor is it lost once released and merged before the switch.
    let mut c = client(1 << 20);
    store.apply(vec![put("x", "2")]);
    store.take_pending().unwrap();
    c.handle_request(req(&["*", "x"]), &store.read()).unwrap();
    drain_responses(&mut c, &store);
    store.apply(vec![del("x")]);
    c.merge_batch(&store.take_pending().unwrap());
    let mut off = req(&[]);
    off.resource_names_unsubscribe = vec!["*".into()];
    c.handle_request(off, &store.read()).unwrap();
    let r = drain_responses(&mut c, &store);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].removed_resources, ["x"]);
}
