//! A server's refusal records say who decided: the handler (which keeps its own
//! record, with its reasons) or the server (a CONNECT its handler dropped
//! unanswered included), so that a node's "why" view shows each refusal once.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod support;

use mesh_core::hbone::{
    ConnectError, ConnectHandler, HboneConfig, InboundConnect, Refusal, RefusalKind, StatusCode,
};
use support::*;

/// Refuses every CONNECT itself.
#[derive(Clone, Debug)]
struct Refuses;

impl ConnectHandler for Refuses {
    async fn handle(&self, connect: InboundConnect) {
        connect.refuse(
            RefusalKind::Denied,
            Refusal::new(StatusCode::FORBIDDEN, "denied"),
        );
    }
}

/// Drops every CONNECT unanswered, as a handler cut short does (a pod removed,
/// a drain forced, while it dialled).
#[derive(Clone, Debug)]
struct Drops;

impl ConnectHandler for Drops {
    async fn handle(&self, connect: InboundConnect) {
        drop(connect);
    }
}

async fn last_record<H: ConnectHandler>(handler: H) -> mesh_core::hbone::RefusalRecord {
    let mesh = Mesh::new();
    let server = Server::start(
        mesh.server_store.clone(),
        &mesh.server_id,
        handler,
        HboneConfig::default(),
    )
    .await;
    let pool = mesh.pool(HboneConfig::default());
    match pool.connect(mesh.key(&server), request()).await {
        Err(ConnectError::Refused { .. }) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    server.stats.recent_refusals().pop().unwrap()
}

#[tokio::test]
async fn a_handlers_refusal_is_marked_as_the_handlers() {
    let record = last_record(Refuses).await;
    assert_eq!(record.kind, RefusalKind::Denied);
    assert!(record.by_handler);
}

#[tokio::test]
async fn a_connect_dropped_unanswered_is_the_servers_own_refusal() {
    let record = last_record(Drops).await;
    assert_eq!(record.kind, RefusalKind::Unavailable);
    assert!(!record.by_handler, "{record:?}");
}
