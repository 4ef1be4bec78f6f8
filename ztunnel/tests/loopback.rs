//! ztunnel end to end on loopback, in one process: two pods (listeners bound to
//! their own 127.x addresses), HBONE between them with real mTLS, L4 policy at the
//! destination, SOCKS5 as the explicit outbound entry, metrics and the why view.
//! The in-pod capture (iptables in pod namespaces) is covered by the e2e suite;
//! here the pods share ztunnel's namespace. Refusals by a pod's inbound side are
//! in `inbound_refusals.rs`.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{http_get, ip, metric, socks5, start, start_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshed_client_reaches_the_server_over_hbone_and_metrics_match() {
    let mut f = start(41).await;
    let proxy = f.app.socks5_addr.unwrap();
    let (code, mut s) = socks5(proxy, ip(41, 2), f.app_addr).await;
    assert_eq!(code, 0, "SOCKS5 refused");
    let msg = b"hello cart, from frontend";
    s.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, msg);
    // While the connection is open, a scrape already counts its bytes.
    let (_, text) = http_get(f.app.metrics_addr, "/metrics").await;
    for reporter in ["reporter=\"source\"", "reporter=\"destination\""] {
        for name in [
            "istio_tcp_sent_bytes_total",
            "istio_tcp_received_bytes_total",
        ] {
            assert_eq!(
                metric(&text, name, &[reporter]),
                Some(msg.len() as f64),
                "{name} {reporter} of the open connection:\n{text}"
            );
        }
    }
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let seen = f.app_seen.recv().await.unwrap();
    if nix::unistd::Uid::effective().is_root() {
        // Delivered with the caller's own address (IP_TRANSPARENT).
        assert_eq!(seen.ip(), ip(41, 2));
    }

    // Both sides' metrics, exactly: one connection, the bytes both ways.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (_, text) = http_get(f.app.metrics_addr, "/metrics").await;
        let closed = metric(
            &text,
            "istio_tcp_connections_closed_total",
            &["reporter=\"destination\""],
        );
        let closed_src = metric(
            &text,
            "istio_tcp_connections_closed_total",
            &["reporter=\"source\""],
        );
        if closed == Some(1.0) && closed_src == Some(1.0) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections never closed:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let dst = [
        "reporter=\"destination\"",
        "source_principal=\"spiffe://cluster.local/ns/shop/sa/frontend\"",
        "destination_principal=\"spiffe://cluster.local/ns/shop/sa/cart\"",
        "source_workload=\"frontend-1\"",
    ];
    assert_eq!(
        metric(&text, "istio_tcp_connections_opened_total", &dst),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "istio_tcp_sent_bytes_total", &dst),
        Some(msg.len() as f64),
        "{text}"
    );
    assert_eq!(
        metric(&text, "istio_tcp_received_bytes_total", &dst),
        Some(msg.len() as f64),
        "{text}"
    );
    let src = ["reporter=\"source\"", "destination_workload=\"cart-1\""];
    assert_eq!(
        metric(&text, "istio_tcp_sent_bytes_total", &src),
        Some(msg.len() as f64),
        "{text}"
    );
    assert!(
        text.contains(
            "ambit_certificate_expiry_seconds{identity=\"spiffe://cluster.local/ns/shop/sa/cart\"}"
        ),
        "{text}"
    );

    promtool_accepts(&text);

    // The admin dump shows the state and certificates, without keys.
    let (status, dump) = http_get(f.app.admin_addr, "/config_dump").await;
    assert_eq!(status, 200);
    assert!(
        dump.contains("\"uid\": \"cart-1\"") && dump.contains("no-elsewhere"),
        "{dump}"
    );
    assert!(
        dump.contains("spiffe://cluster.local/ns/shop/sa/frontend"),
        "{dump}"
    );
    assert!(!dump.contains("PRIVATE KEY"));
    assert_eq!(
        http_get(f.app.readiness_addr, "/healthz/ready").await.0,
        200
    );
    f.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_client_is_refused_counted_and_explained() {
    let f = start(42).await;
    let proxy = f.app.socks5_addr.unwrap();
    let (code, _s) = socks5(proxy, ip(42, 4), f.app_addr).await;
    assert_eq!(code, 2, "expected 'not allowed by ruleset'");
    let (_, text) = http_get(f.app.metrics_addr, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "ambit_connections_denied_total",
            &["reason=\"policy\""]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "ambit_connections_denied_total",
            &["reason=\"denied_by_destination\""]
        ),
        Some(1.0),
        "{text}"
    );
    let (status, why) = http_get(f.app.admin_addr, "/debug/why?format=text").await;
    assert_eq!(status, 200);
    assert!(
        why.contains("denied by DENY policy shop/no-elsewhere rule 0"),
        "{why}"
    );
    assert!(
        why.contains("spiffe://cluster.local/ns/elsewhere/sa/scraper"),
        "{why}"
    );
    // A destination outside the mesh that refuses: "host unreachable", not "not
    // allowed", so the caller can tell a policy from a dead peer.
    let closed = std::net::TcpListener::bind(SocketAddr::new(ip(42, 9), 0))
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, _s) = socks5(proxy, ip(42, 2), closed).await;
    assert_eq!(code, 4, "expected 'host unreachable'");
    f.app.shutdown().await;
}

/// `promtool check metrics` (Debian package `prometheus`) must accept the exposition.
/// CI installs it; elsewhere a missing promtool skips this check loudly.
fn promtool_accepts(text: &str) {
    let promtool = std::env::var("AMBIT_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must have promtool: {e}"
            );
            mesh_core::testing::say_skipped(&format!("promtool check ({promtool}: {e})"));
            return;
        }
    };
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool refused the metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_traffic_without_a_failed_connection() {
    let mut f = start_with(44, &["--cert-ttl", "2s"]).await;
    let proxy = f.app.socks5_addr.unwrap();
    let cart = mesh_core::SpiffeId::new("cluster.local", "shop", "cart").unwrap();
    let first = f.app.inputs.certs.get(&cart).unwrap().not_after();
    let mut rotations = f.app.inputs.certs.subscribe();
    let mut seen_rotations = 0;
    let mut n = 0;
    // Keep connecting until cart's certificate has rotated three times.
    while seen_rotations < 3 {
        n += 1;
        let (code, mut s) = socks5(proxy, ip(44, 2), f.app_addr).await;
        assert_eq!(code, 0, "connection {n} refused");
        let msg = format!("request {n}");
        s.write_all(msg.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, msg.as_bytes(), "connection {n}");
        f.app_seen.recv().await.unwrap();
        while let Ok(ev) = rotations.try_recv() {
            if ev == mesh_core::CertEvent::Updated(cart.clone()) {
                seen_rotations += 1;
            }
        }
        assert!(n < 10_000, "no rotation happened");
    }
    assert!(f.app.inputs.certs.get(&cart).unwrap().not_after() > first);
    f.app.shutdown().await;
}

/// Shutdown drains the pods and the rest (SOCKS5 here) at once, within the one
/// deadline (2 s in these tests), not one deadline after the other; says it
/// forced what did not finish; and takes no pod once it has begun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_everything_within_one_deadline_and_takes_no_new_pod() {
    let f = start(48).await;
    // A connection that never ends by itself: through SOCKS5 (the process's
    // drain) and into cart's HBONE server (the pod's drain).
    let (code, mut held) = socks5(f.app.socks5_addr.unwrap(), ip(48, 2), f.app_addr).await;
    assert_eq!(code, 0);
    held.write_all(b"hello").await.unwrap();
    let mut echoed = [0u8; 5];
    held.read_exact(&mut echoed).await.unwrap();

    let app = f.app.clone();
    let started = std::time::Instant::now();
    let shutdown = tokio::spawn(async move { app.shutdown().await });
    // Once shutdown has taken the pods, a new one is refused.
    let late = ztunnel::proxy::Pod {
        uid: "late-1".into(),
        name: "late-1".into(),
        namespace: "shop".into(),
        service_account: "late".into(),
    };
    let ports = ztunnel::proxy::PodPorts {
        outbound: SocketAddr::new(ip(48, 5), 15001),
        inbound_plaintext: SocketAddr::new(ip(48, 5), 15006),
        hbone: SocketAddr::new(ip(48, 5), 15008),
    };
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match f.app.add_pod(late.clone(), None, ports).await {
            Err(e) => {
                assert!(e.to_string().contains("shutting down"), "{e}");
                break;
            }
            // Before shutdown took the pods: the pod is drained with them.
            Ok(_) => assert!(std::time::Instant::now() < give_up),
        }
        tokio::task::yield_now().await;
    }
    let outcome = shutdown.await.unwrap();
    let took = started.elapsed();
    assert_eq!(outcome, mesh_core::drain::DrainOutcome::Forced);
    // Bounded, not hung: the 2 s deadline plus room for a loaded CI machine.
    assert!(
        took < Duration::from_secs(2 + 8),
        "shutdown took {took:?} with a 2 s deadline"
    );
    assert!(f.app.pod_uids().await.is_empty());
}

/// Once the node's last workload of an identity is gone (here a pod the state
/// does not know), its certificate goes after `--cert-release-grace`: it leaves
/// the metrics and the config dump, and the CA is not asked to renew it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_of_an_identity_goes_with_its_last_pod() {
    let f = start_with(49, &["--cert-release-grace", "200ms"]).await;
    let batch = ztunnel::proxy::Pod {
        uid: "batch-1".into(),
        name: "batch-1".into(),
        namespace: "shop".into(),
        service_account: "batch".into(),
    };
    let ports = ztunnel::proxy::PodPorts {
        outbound: SocketAddr::new(ip(49, 5), 15001),
        inbound_plaintext: SocketAddr::new(ip(49, 5), 15006),
        hbone: SocketAddr::new(ip(49, 5), 15008),
    };
    f.app.add_pod(batch, None, ports).await.unwrap();
    let line =
        "ambit_certificate_expiry_seconds{identity=\"spiffe://cluster.local/ns/shop/sa/batch\"}";
    let (_, text) = http_get(f.app.metrics_addr, "/metrics").await;
    assert!(text.contains(line), "{text}");
    let held = metric(&text, "ambit_certificates", &[]).unwrap();
    // Past the grace, the pod's certificate is kept while it runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, text) = http_get(f.app.metrics_addr, "/metrics").await;
    assert!(text.contains(line), "{text}");

    assert!(f.app.remove_pod("batch-1").await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (_, text) = http_get(f.app.metrics_addr, "/metrics").await;
        if !text.contains(line) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never released:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        metric(&text, "ambit_certificates", &[]),
        Some(held - 1.0),
        "{text}"
    );
    let (_, dump) = http_get(f.app.admin_addr, "/config_dump").await;
    assert!(
        !dump.contains("spiffe://cluster.local/ns/shop/sa/batch"),
        "{dump}"
    );
    // cart's pod still runs: its certificate stays.
    assert!(
        dump.contains("spiffe://cluster.local/ns/shop/sa/cart"),
        "{dump}"
    );
    f.app.shutdown().await;
}

/// A SOCKS5 caller that stalls mid-handshake is cut off after the handshake
/// timeout (the HBONE server's, 10 s), which gives its connection slot back; the
/// listener keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_socks5_handshake_is_cut_off() {
    let f = start(50).await;
    let proxy = f.app.socks5_addr.unwrap();
    let mut stalled = tokio::net::TcpStream::connect(proxy).await.unwrap();
    // A greeting cut short: the methods it announces never come.
    stalled.write_all(&[5, 1]).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(30), stalled.read(&mut buf))
        .await
        .expect("a stalled handshake was never cut off");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "cut off before the timeout: {:?}",
        started.elapsed()
    );
    let (code, s) = socks5(proxy, ip(50, 2), f.app_addr).await;
    assert_eq!(code, 0);
    drop(s);
    assert_eq!(
        f.app.shutdown().await,
        mesh_core::drain::DrainOutcome::Graceful
    );
}
