//! A pod change cut short by shutdown keeps the old proxy's drain: the node
//! agent's session is dropped at shutdown in the middle of an add or remove; the
//! old proxy it was retiring is gone from the pods by then, so its drain must
//! already be among those shutdown waits for, or its connections are cut.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::task::Poll;

use mesh_core::drain::DrainOutcome;
use mesh_core::hbone::ConnectRequest;
use support::{ip, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel::proxy::{Pod, PodPorts};

// One thread: nothing but this test polls the add, so it stops exactly where
// the session is dropped (retiring the old proxy, awaiting its listeners).
#[tokio::test(flavor = "current_thread")]
async fn shutdown_waits_for_a_pod_retired_by_an_add_it_cut_short() {
    let f = start(53).await; // --drain-deadline 2s
    let (pool, cart) = f.frontend_client(53).await;
    let mut tunnel = pool
        .connect(cart, ConnectRequest::new(f.app_addr))
        .await
        .unwrap();
    tunnel.write_all(b"ping").await.unwrap();
    let mut back = [0; 4];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");

    // cart re-sent with other ports: its old proxy (holding the tunnel) is retired.
    let pod = Pod {
        uid: "cart-1".into(),
        name: "cart-1".into(),
        namespace: "shop".into(),
        service_account: "cart".into(),
    };
    let at = |port| SocketAddr::new(ip(53, 3), port);
    let ports = PodPorts {
        outbound: at(15011),
        inbound_plaintext: at(15016),
        hbone: at(15018),
    };
    let mut add = Box::pin(f.app.add_pod(pod, None, ports));
    let polled = std::future::poll_fn(|cx| Poll::Ready(add.as_mut().poll(cx))).await;
    assert!(
        polled.is_pending(),
        "the add waits for the old listeners to close"
    );
    // Shutdown drops the session, and the add with it.
    drop(add);
    assert!(
        f.app.pod_uids().await.is_empty(),
        "the old proxy is retired"
    );

    // The tunnel stays open: shutdown waits for it until the drain deadline.
    assert_eq!(f.app.shutdown().await, DrainOutcome::Forced);
}
