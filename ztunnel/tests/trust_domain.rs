//! `--trust-domain`: a workload of the local state file without `trustDomain` is
//! in the configured trust domain, at start and in each file the watcher applies
//! (it was `cluster.local` whatever the flag said, so every HBONE connection to
//! it failed verification).
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::time::Duration;

use clap::Parser;
use ztunnel::app::App;
use ztunnel::config::Config;

fn workload(uid: &str, ip: &str) -> String {
    format!(
        "  - {{uid: {uid}, name: {uid}, namespace: shop, serviceAccount: cart, addresses: [\"{ip}\"]}}\n"
    )
}

#[tokio::test]
async fn local_workloads_without_a_trust_domain_are_in_the_configured_one() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.yaml");
    std::fs::write(
        &state,
        format!("workloads:\n{}", workload("cart-1", "127.53.0.11")),
    )
    .unwrap();
    let config = Config::try_parse_from([
        "ztunnel",
        "--trust-domain",
        "example.org",
        "--local-state",
        state.to_str().unwrap(),
        "--local-state-poll",
        "20ms",
        "--admin-addr",
        "127.53.0.1:0",
        "--metrics-addr",
        "127.53.0.1:0",
        "--readiness-addr",
        "127.53.0.1:0",
    ])
    .unwrap();
    let app = App::start(config).await.unwrap();
    let identity = |uid: &str| {
        let state = app.inputs.state.snapshot();
        state
            .workload(uid)
            .map(|w| w.identity().unwrap().to_string())
    };
    assert_eq!(
        identity("cart-1").as_deref(),
        Some("spiffe://example.org/ns/shop/sa/cart")
    );

    // A change the watcher applies: the same.
    let mut versions = app.inputs.state.subscribe();
    std::fs::write(
        &state,
        format!(
            "workloads:\n{}{}",
            workload("cart-1", "127.53.0.11"),
            workload("cart-2", "127.53.0.12")
        ),
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while identity("cart-2").is_none() {
            versions.changed().await.unwrap();
        }
    })
    .await
    .expect("the watcher never applied the change");
    assert_eq!(
        identity("cart-2").as_deref(),
        Some("spiffe://example.org/ns/shop/sa/cart")
    );
    app.shutdown().await;
}
