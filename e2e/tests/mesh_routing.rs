//! Routing through ztunnel on real network namespaces: a service VIP balanced over
//! its healthy endpoints on two nodes, plain TCP to and from pods outside the mesh
//! (under L4 policy on the inbound side), and a pod leaving the mesh through CNI DEL.
//! istiod-lite is the only source of state: Services, policies and pod readiness
//! are Kubernetes objects, and tests wait until every ztunnel's config dump shows
//! them.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use ambit_e2e::{
    EchoServer, EchoTool, MeshCluster, NodeMesh, Pod, PodSpec, ProcessError, require_root,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// The service VIP: in 198.18.0.0/15, outside the pod (198.18.<node>.0/24) and
/// underlay (198.19.0.0/24) ranges.
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 10);
const NS: &str = "shop";
const HOSTNAME: &str = "cart.shop.svc.cluster.local";
const ADMIN: &str = "127.0.0.1:15000";
/// Bound on any single awaited event (a log line, a state applied, peers counted).
const EVENT_WAIT: Duration = Duration::from_secs(30);

fn echo() -> EchoTool {
    EchoTool::new(env!("CARGO_BIN_EXE_e2e-tool"))
}

/// The service key endpoints list under `services:`.
fn service_key() -> String {
    format!("{NS}/{HOSTNAME}")
}

/// The Service `cart`: VIP port 80 to port 8080 of the pods labelled `tier=cart`.
fn service_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: cart, namespace: {NS}}}\nspec:\n  clusterIP: {VIP}\n  selector: {{tier: cart}}\n  ports: [{{name: tcp, port: 80, targetPort: 8080}}]\n"
    )
}

/// The workloads of a config dump by name.
fn dump_workload<'a>(dump: &'a Value, name: &str) -> Option<&'a Value> {
    dump["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["name"] == name)
}

fn dump_policy_names(dump: &Value) -> Vec<String> {
    dump["policies"]["policies"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| {
                    Some(format!(
                        "{}/{}",
                        p["namespace"].as_str()?,
                        p["name"].as_str()?
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `work` while reading every ztunnel's log (a line per connection, hundreds
/// of them, would otherwise pile up in the harness), and fails the test at once
/// if a ztunnel exits meanwhile.
async fn draining_logs<T>(nodes: &mut [NodeMesh], work: impl Future<Output = T>) -> T {
    type Drain<'a> = Pin<Box<dyn Future<Output = Result<String, ProcessError>> + Send + 'a>>;
    let mut drains: Vec<Drain<'_>> = nodes
        .iter_mut()
        .map(|n| {
            Box::pin(n.ztunnel.wait_for_line(
                "the end of its log",
                Duration::from_secs(3600),
                |_| false,
            )) as Drain<'_>
        })
        .collect();
    let ended = std::future::poll_fn(|cx| {
        for (i, drain) in drains.iter_mut().enumerate() {
            if let Poll::Ready(r) = drain.as_mut().poll(cx) {
                return Poll::Ready((i, r));
            }
        }
        Poll::Pending
    });
    tokio::select! {
        out = work => out,
        (i, r) = ended => panic!("ztunnel {} stopped while the test ran: {r:?}", i + 1),
    }
}

/// `count` connections from `client` to `addr`, at most `parallel` at once, each
/// checking its echo; the first failure ends it.
async fn connect_many(
    client: &Pod,
    addr: SocketAddr,
    count: usize,
    parallel: usize,
    tag: &str,
) -> Result<(), String> {
    type Outcome = Result<Result<(), String>, tokio::task::JoinError>;
    let flatten = |r: Outcome| r.map_err(|e| e.to_string()).and_then(|r| r);
    let mut set = JoinSet::new();
    for i in 0..count {
        if set.len() == parallel {
            // On an error the set drops, aborting the rest (their clients are killed).
            flatten(set.join_next().await.unwrap())?;
        }
        let client = client.clone();
        let msg = format!("{tag}-{i}");
        set.spawn(async move {
            let reply = echo()
                .connect(&client, addr, &msg)
                .await
                .map_err(|e| format!("connection {msg}: {e}"))?;
            if reply.trim() == msg {
                Ok(())
            } else {
                Err(format!("connection {msg}: reply {reply:?}"))
            }
        });
    }
    while let Some(r) = set.join_next().await {
        flatten(r)?;
    }
    Ok(())
}

/// Moves each server into a task that reports every accepted connection as
/// (server index, peer) on the returned channel.
fn report_peers(
    servers: Vec<EchoServer>,
) -> (mpsc::UnboundedReceiver<(usize, SocketAddr)>, JoinSet<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    for (i, mut server) in servers.into_iter().enumerate() {
        let tx = tx.clone();
        tasks.spawn(async move {
            while let Ok(peer) = server.next_peer(Duration::from_secs(3600)).await {
                if tx.send((i, peer)).is_err() {
                    return;
                }
            }
        });
    }
    (rx, tasks)
}

/// Takes exactly `n` connection reports and counts them per server, checking each
/// came from `client_ip`.
async fn count_peers(
    rx: &mut mpsc::UnboundedReceiver<(usize, SocketAddr)>,
    servers: usize,
    n: usize,
    client_ip: Ipv4Addr,
) -> Vec<usize> {
    let mut counts = vec![0; servers];
    let deadline = tokio::time::Instant::now() + EVENT_WAIT;
    for got in 0..n {
        let (i, peer) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("only {got} of {n} connections reached a server: {counts:?}")
            })
            .unwrap_or_else(|| panic!("every echo server ended after {got} of {n} connections"));
        assert_eq!(
            peer.ip(),
            IpAddr::V4(client_ip),
            "an endpoint saw {peer}, not the client"
        );
        counts[i] += 1;
    }
    counts
}

fn assert_near(counts: &[usize], expected: usize, names: &[&str]) {
    for (count, name) in counts.iter().zip(names) {
        let diff = count.abs_diff(expected);
        assert!(
            diff * 5 <= expected,
            "{name} got {count} connections, want {expected} +-20% (all: {counts:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_vip_balances_over_healthy_endpoints_on_two_nodes() {
    if !require_root("service_vip_balances_over_healthy_endpoints_on_two_nodes") {
        return;
    }
    let mut mesh = MeshCluster::start(2).await.unwrap();
    let client = mesh
        .add_pod(PodSpec::new("client", 1).namespace(NS))
        .await
        .unwrap();
    let mut endpoints = Vec::new();
    for (name, node) in [("ep-a", 1), ("ep-b", 1), ("ep-c", 2)] {
        let pod = mesh
            .add_pod(PodSpec::new(name, node).namespace(NS).label("tier", "cart"))
            .await
            .unwrap();
        endpoints.push(pod);
    }
    let names: Vec<&str> = endpoints.iter().map(Pod::name).collect();
    let healthy_is = |dump: &Value, name: &str, healthy: bool| {
        dump_workload(dump, name).is_some_and(|w| w["healthy"] == healthy)
    };
    let in_service = |dump: &Value, name: &str| {
        dump_workload(dump, name).is_some_and(|w| w["services"].get(service_key()).is_some())
    };

    mesh.write_config("cart.yaml", &service_yaml()).unwrap();
    mesh.wait_for_dump("the service and its 3 endpoints", |d| {
        d["services"].as_array().is_some_and(|s| {
            s.len() == 1 && s[0]["hostname"] == HOSTNAME && s[0]["vips"][0] == VIP.to_string()
        }) && d["workloads"].as_array().is_some_and(|w| w.len() == 4)
            && names
                .iter()
                .all(|n| healthy_is(d, n, true) && in_service(d, n))
            && !in_service(d, "client")
    })
    .await
    .unwrap();

    let mut servers = Vec::new();
    for ep in &endpoints {
        servers.push(echo().serve(ep, 8080).await.unwrap());
    }
    let (mut peers, peer_tasks) = report_peers(servers);
    let vip = SocketAddr::from((VIP, 80));

    let started = Instant::now();
    draining_logs(&mut mesh.nodes, connect_many(&client, vip, 300, 4, "lb"))
        .await
        .unwrap();
    let counts = count_peers(&mut peers, endpoints.len(), 300, client.ip()).await;
    eprintln!(
        "300 connections to the VIP in {:?}: {counts:?}",
        started.elapsed()
    );
    assert_near(&counts, 100, &names);

    // ep-b turns unhealthy: it gets no new connection, the other two share them.
    // (Its readiness probe fails: the kubelet reports Ready=False.)
    mesh.set_pod_ready("ep-b", false).unwrap();
    mesh.wait_for_dump("ep-b unhealthy", |d| {
        healthy_is(d, "ep-b", false) && healthy_is(d, "ep-a", true) && healthy_is(d, "ep-c", true)
    })
    .await
    .unwrap();
    draining_logs(
        &mut mesh.nodes,
        connect_many(&client, vip, 60, 4, "unhealthy"),
    )
    .await
    .unwrap();
    let counts = count_peers(&mut peers, endpoints.len(), 60, client.ip()).await;
    assert_eq!(counts[1], 0, "unhealthy ep-b got connections: {counts:?}");
    assert_near(&[counts[0], counts[2]], 30, &["ep-a", "ep-c"]);
    drop(peer_tasks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_to_and_from_pods_outside_the_mesh_under_policy() {
    if !require_root("plain_tcp_to_and_from_pods_outside_the_mesh_under_policy") {
        return;
    }
    let mut mesh = MeshCluster::start(2).await.unwrap();
    let client = mesh
        .add_pod(PodSpec::new("client", 1).namespace(NS))
        .await
        .unwrap();
    let server = mesh
        .add_pod(PodSpec::new("server", 2).namespace(NS))
        .await
        .unwrap();
    let plain_server = mesh
        .add_pod(
            PodSpec::new("plain-server", 2)
                .namespace("legacy")
                .cni_arg("AMBIT_ENROLL", "false"),
        )
        .await
        .unwrap();
    let plain_client = mesh
        .add_pod(
            PodSpec::new("plain-client", 1)
                .namespace("legacy")
                .cni_arg("AMBIT_ENROLL", "false"),
        )
        .await
        .unwrap();

    // Meshed client -> pod outside the mesh: passthrough in plain TCP, from the
    // client's own address.
    let mut plain_srv = echo().serve(&plain_server, 8080).await.unwrap();
    let reply = echo()
        .connect(&client, plain_srv.addr(), "marker-out-9c1d")
        .await
        .unwrap();
    assert_eq!(reply.trim(), "marker-out-9c1d");
    let peer = plain_srv.next_peer(EVENT_WAIT).await.unwrap();
    assert_eq!(
        peer.ip(),
        IpAddr::V4(client.ip()),
        "outside server saw {peer}"
    );
    let plain_ip = plain_server.ip().to_string();
    mesh.nodes[0]
        .ztunnel
        .wait_for_line("node 1 outbound passthrough access log", EVENT_WAIT, |l| {
            l.contains("connection complete") && l.contains("outbound") && l.contains(&plain_ip)
        })
        .await
        .unwrap();

    // Client outside the mesh -> meshed pod: captured by the pod's 15006.
    let mut srv = echo().serve(&server, 8080).await.unwrap();
    let reply = echo()
        .connect(&plain_client, srv.addr(), "marker-in-5e2b")
        .await
        .unwrap();
    assert_eq!(reply.trim(), "marker-in-5e2b");
    let peer = srv.next_peer(EVENT_WAIT).await.unwrap();
    assert_eq!(
        peer.ip(),
        IpAddr::V4(plain_client.ip()),
        "meshed server saw {peer}"
    );
    let outside_ip = plain_client.ip().to_string();
    mesh.nodes[1]
        .ztunnel
        .wait_for_line("node 2 inbound plaintext access log", EVENT_WAIT, |l| {
            l.contains("connection complete")
                && l.contains("inbound_plaintext")
                && l.contains(&outside_ip)
        })
        .await
        .unwrap();

    // A DENY policy for the server's namespace matching the outside client's address.
    let policy = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-outside, namespace: {NS}}}\nspec:\n  action: DENY\n  rules:\n    - from:\n        - source: {{ipBlocks: [\"{outside_ip}/32\"]}}\n"
    );
    mesh.write_config("deny-outside.yaml", &policy).unwrap();
    let policy_key = format!("{NS}/deny-outside");
    mesh.wait_for_dump("the DENY policy", |d| {
        dump_policy_names(d).contains(&policy_key)
    })
    .await
    .unwrap();

    // Refused on 15006 with a reset, as outbound refuses.
    ambit_e2e::checks::assert_reset_sending(
        &echo(),
        &plain_client,
        srv.addr(),
        "marker-denied-3a7f",
    )
    .await;
    let why = mesh.fetch(2, ADMIN, "/debug/why?format=text").unwrap();
    assert!(
        why.lines().any(|l| l.contains("inbound_plaintext")
            && l.contains(&outside_ip)
            && l.contains(&format!("DENY policy {policy_key}"))),
        "/debug/why does not explain the refusal:\n{why}"
    );

    // The policy matches the outside address only: the meshed client still gets in,
    // and it is the next (so the first since the denial) connection the server sees.
    let reply = echo()
        .connect(&client, srv.addr(), "marker-still-8b40")
        .await
        .unwrap();
    assert_eq!(reply.trim(), "marker-still-8b40");
    let peer = srv.next_peer(EVENT_WAIT).await.unwrap();
    assert_eq!(
        peer.ip(),
        IpAddr::V4(client.ip()),
        "after the denial the server saw {peer}"
    );

    // Connections made to ztunnel's own listeners, not redirected to them, are
    // refused instead of being proxied back into the same listener again and again:
    // from inside a meshed pod to its outbound port, from outside to a meshed pod's
    // inbound port.
    ambit_e2e::checks::assert_reset(&echo(), &client, SocketAddr::from(([127, 0, 0, 1], 15001)))
        .await;
    let direct = SocketAddr::from((server.ip(), 15006));
    ambit_e2e::checks::assert_reset_sending(&echo(), &plain_client, direct, "marker-self-7c1d")
        .await;
    // Nor is an outside client let into the pod's outbound listener through 15006.
    let outbound_port = SocketAddr::from((server.ip(), 15001));
    ambit_e2e::checks::assert_reset(&echo(), &plain_client, outbound_port).await;
    for (node, what) in [(1, "outbound"), (2, "inbound")] {
        let why = mesh.fetch(node, ADMIN, "/debug/why?format=text").unwrap();
        let itself = format!("is this {what} listener itself");
        assert!(
            why.lines().any(|l| l.contains(&itself)),
            "node {node}'s /debug/why has no {itself:?}:\n{why}"
        );
    }
    let why = mesh.fetch(2, ADMIN, "/debug/why?format=text").unwrap();
    assert!(
        why.lines()
            .any(|l| l.contains("port 15001 of pod") && l.contains("is ztunnel's own")),
        "node 2's /debug/why does not explain the refused 15001:\n{why}"
    );
    // Both ztunnels still serve.
    ambit_e2e::checks::assert_echo(&echo(), &client, srv.addr(), "marker-after-self-2e9a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_deleted_through_cni_leaves_its_node_serving_the_others() {
    if !require_root("pod_deleted_through_cni_leaves_its_node_serving_the_others") {
        return;
    }
    let mut mesh = MeshCluster::start(1).await.unwrap();
    let a = mesh
        .add_pod(PodSpec::new("alpha", 1).namespace(NS))
        .await
        .unwrap();
    let b = mesh
        .add_pod(PodSpec::new("beta", 1).namespace(NS))
        .await
        .unwrap();
    let victim = mesh
        .add_pod(PodSpec::new("victim", 1).namespace(NS))
        .await
        .unwrap();

    let mut srv_a = echo().serve(&a, 8080).await.unwrap();
    let mut srv_b = echo().serve(&b, 8080).await.unwrap();
    let mut srv_victim = echo().serve(&victim, 8080).await.unwrap();
    // Before: the victim is in the mesh and reachable.
    let reply = echo()
        .connect(&a, srv_victim.addr(), "before-delete")
        .await
        .unwrap();
    assert_eq!(reply.trim(), "before-delete");
    let peer = srv_victim.next_peer(EVENT_WAIT).await.unwrap();
    assert_eq!(peer.ip(), IpAddr::V4(a.ip()));

    mesh.delete_pod("victim").await.unwrap();
    let line = mesh.nodes[0]
        .ztunnel
        .wait_for_line("the victim's pod proxy stopped", EVENT_WAIT, |l| {
            l.contains("pod proxy stopped") && l.contains("victim")
        })
        .await
        .unwrap();
    eprintln!("ztunnel: {line}");

    // After: the pods left on the node still talk, both ways, with their addresses.
    for (from, to, srv) in [(&a, &b, &mut srv_b), (&b, &a, &mut srv_a)] {
        let msg = format!("after-delete {} -> {}", from.name(), to.name());
        let reply = echo().connect(from, srv.addr(), &msg).await.unwrap();
        assert_eq!(reply.trim(), msg);
        let peer = srv.next_peer(EVENT_WAIT).await.unwrap();
        assert_eq!(peer.ip(), IpAddr::V4(from.ip()), "{} saw {peer}", to.name());
    }
}
