//! Tests of the state model: routing (VIP round robin, health, port mapping,
//! passthrough) and the local state file (errors that name path, item and field;
//! the watcher keeping the last good state).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

const FILE: &str = r#"
workloads:
  - uid: cart-1
    name: cart-1
    namespace: shop
    serviceAccount: cart
    node: node-1
    addresses: ["198.18.1.10"]
    services:
      shop/cart.shop.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]
  - uid: cart-2
    name: cart-2
    namespace: shop
    serviceAccount: cart
    node: node-1
    addresses: ["198.18.1.11"]
    services:
      shop/cart.shop.svc.cluster.local: [{servicePort: 80, targetPort: 9090}]
  - uid: cart-3
    name: cart-3
    namespace: shop
    serviceAccount: cart
    node: node-2
    addresses: ["198.18.2.10"]
    services:
      shop/cart.shop.svc.cluster.local: []
  - uid: legacy
    name: legacy
    namespace: old
    protocol: NONE
    addresses: ["198.18.2.50"]
services:
  - name: cart
    namespace: shop
    hostname: cart.shop.svc.cluster.local
    vips: ["198.18.100.1"]
    ports: [{servicePort: 80, targetPort: 8000}]
"#;

fn state(text: &str) -> ProxyState {
    LocalState::parse(std::path::Path::new("state.yaml"), text)
        .unwrap()
        .into_state()
}

#[test]
fn a_vip_spreads_round_robin_over_healthy_endpoints_with_their_ports() {
    let s = state(FILE);
    let mut seen: HashMap<std::net::SocketAddr, usize> = HashMap::new();
    for _ in 0..300 {
        match s.route("198.18.100.1:80".parse().unwrap()).unwrap() {
            Route::Mesh { addr, service, .. } => {
                assert_eq!(service.unwrap().name, "cart");
                *seen.entry(addr).or_default() += 1;
            }
            other => panic!("expected a mesh route, got {other:?}"),
        }
    }
    // Each endpoint's own mapping wins; cart-3 has none, so the service's applies.
    let want: HashMap<std::net::SocketAddr, usize> = [
        ("198.18.1.10:8080".parse().unwrap(), 100),
        ("198.18.1.11:9090".parse().unwrap(), 100),
        ("198.18.2.10:8000".parse().unwrap(), 100),
    ]
    .into();
    assert_eq!(seen, want);
}

/// A named target port (0 in the service): only the endpoints that number it
/// get its traffic, each on its own port; an endpoint without it gets none
/// (Kubernetes gives it no endpoint for that port), not the service port.
#[test]
fn a_named_target_port_goes_only_to_endpoints_that_number_it() {
    let s = state(&FILE.replace("targetPort: 8000", "targetPort: 0"));
    let mut seen: HashMap<std::net::SocketAddr, usize> = HashMap::new();
    for _ in 0..200 {
        match s.route("198.18.100.1:80".parse().unwrap()).unwrap() {
            Route::Mesh { addr, .. } => *seen.entry(addr).or_default() += 1,
            other => panic!("expected a mesh route, got {other:?}"),
        }
    }
    let want: HashMap<std::net::SocketAddr, usize> = [
        ("198.18.1.10:8080".parse().unwrap(), 100),
        ("198.18.1.11:9090".parse().unwrap(), 100),
    ]
    .into();
    assert_eq!(seen, want);
    // No endpoint numbers it: an error, not a guess.
    let none = FILE
        .replace("targetPort: 8000", "targetPort: 0")
        .replace("[{servicePort: 80, targetPort: 8080}]", "[]")
        .replace("[{servicePort: 80, targetPort: 9090}]", "[]");
    assert!(matches!(
        state(&none).route("198.18.100.1:80".parse().unwrap()),
        Err(RouteError::NoHealthyEndpoint { .. })
    ));
}

#[test]
fn round_robin_goes_on_across_state_updates_and_forgets_gone_services() {
    let store = StateStore::new(state(FILE));
    let pick = || match store.snapshot().route("198.18.100.1:80".parse().unwrap()) {
        Ok(Route::Mesh { workload, .. }) => workload.uid.clone(),
        other => panic!("expected a mesh route, got {other:?}"),
    };
    assert_eq!(pick(), "cart-1");
    assert_eq!(pick(), "cart-2");
    // Any update (an xDS response, a file change) rebuilds the whole state.
    store.replace(state(FILE));
    assert_eq!(pick(), "cart-3", "the third pick is the third endpoint");
    assert_eq!(pick(), "cart-1");

    // A service that goes away takes its turn with it: none is kept for it.
    let no_services = FILE.split("\nservices:").next().unwrap();
    store.replace(state(no_services));
    assert!(store.snapshot().round_robin.is_empty());
    store.replace(state(FILE));
    assert_eq!(pick(), "cart-1", "a service that comes back starts over");
}

#[test]
fn an_unhealthy_endpoint_gets_nothing_and_none_healthy_is_an_error() {
    let s = state(&FILE.replace(
        "    node: node-2\n",
        "    node: node-2\n    healthy: false\n",
    ));
    for _ in 0..20 {
        let Route::Mesh { workload, .. } = s.route("198.18.100.1:80".parse().unwrap()).unwrap()
        else {
            panic!("mesh route expected")
        };
        assert_ne!(workload.uid, "cart-3");
    }
    let all_down = FILE.replace(
        "    serviceAccount: cart\n",
        "    serviceAccount: cart\n    healthy: false\n",
    );
    assert_eq!(
        state(&all_down)
            .route("198.18.100.1:80".parse().unwrap())
            .unwrap_err(),
        RouteError::NoHealthyEndpoint {
            service: "shop/cart.shop.svc.cluster.local".into()
        }
    );
    assert!(matches!(
        state(FILE).route("198.18.100.1:81".parse().unwrap()),
        Err(RouteError::NoServicePort { port: 81, .. })
    ));
}

#[test]
fn workload_addresses_route_to_themselves_and_the_rest_passes_through() {
    let s = state(FILE);
    let Route::Mesh {
        workload,
        addr,
        service,
    } = s.route("198.18.1.10:5000".parse().unwrap()).unwrap()
    else {
        panic!("mesh route expected")
    };
    assert_eq!(
        (workload.uid.as_str(), addr.port(), service.is_none()),
        ("cart-1", 5000, true)
    );
    assert!(matches!(
        s.route("198.18.2.50:80".parse().unwrap()).unwrap(),
        Route::Passthrough { .. }
    ));
    assert!(matches!(
        s.route("198.18.9.9:80".parse().unwrap()).unwrap(),
        Route::Passthrough { .. }
    ));
    assert_eq!(
        s.workload_by_ip("198.18.1.11".parse().unwrap())
            .unwrap()
            .identity()
            .unwrap()
            .to_string(),
        "spiffe://cluster.local/ns/shop/sa/cart"
    );
}

/// Whether a connection from shop/frontend to `workload` is allowed by `state`.
fn allowed(state: &ProxyState, workload: &str) -> bool {
    let w = state.workload(workload).expect("workload held");
    let fe = mesh_core::testing::spiffe("shop", "frontend");
    let dst = crate::policy::Destination {
        namespace: &w.namespace,
        labels: &w.labels,
    };
    let conn = crate::policy::Connection {
        src_identity: Some(&fe),
        src_ip: "198.18.1.1".parse().unwrap(),
        dst_ip: w.addresses[0],
        dst_port: 5432,
    };
    state.policies().evaluate(&dst, &conn).allowed
}

#[test]
fn a_root_namespace_selector_policy_applies_in_every_namespace_from_file_and_xds() {
    use crate::state::XdsState;
    use ambit_proto::security as sec;
    use ambit_proto::workload as pb;
    use mesh_core::xds::{Handler, Resource};
    use prost::Message;

    let file = r#"
workloads:
  - {uid: db, name: db, namespace: shop, addresses: ["198.18.1.20"], labels: {app: db}}
  - {uid: web, name: web, namespace: shop, addresses: ["198.18.1.21"], labels: {app: web}}
policies:
  - {name: lock-dbs, namespace: istio-system, scope: WORKLOAD_SELECTOR, action: DENY,
     selector: {app: db}, rules: [{}]}
"#;
    let local = state(file);
    assert!(
        !allowed(&local, "db"),
        "file: the root selector denies shop/db"
    );
    assert!(allowed(&local, "web"), "file: other labels pass");

    // The same through xDS, as istiod-lite translates such a policy.
    let store = Arc::new(StateStore::default());
    let xds = XdsState::new(store.clone());
    let res = |name: &str, body: Vec<u8>| Resource {
        name: name.into(),
        version: "1".into(),
        body: body.into(),
    };
    let workloads = [("db", [198, 18, 1, 20]), ("web", [198, 18, 1, 21])]
        .map(|(uid, ip)| {
            let w = pb::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "shop".into(),
                addresses: vec![ip.to_vec()],
                labels: [("app".to_string(), uid.to_string())].into(),
                ..Default::default()
            };
            res(uid, w.encode_to_vec())
        })
        .to_vec();
    xds.apply(ambit_proto::WORKLOAD_TYPE_URL, workloads, vec![])
        .unwrap();
    let policy = sec::Authorization {
        name: "lock-dbs".into(),
        namespace: "istio-system".into(),
        scope: sec::Scope::WorkloadSelector.into(),
        action: sec::Action::Deny.into(),
        rules: vec![sec::Rule { clauses: vec![] }],
        selector: [("app".to_string(), "db".to_string())].into(),
        ..Default::default()
    };
    xds.apply(
        ambit_proto::AUTHORIZATION_TYPE_URL,
        vec![res("istio-system/lock-dbs", policy.encode_to_vec())],
        vec![],
    )
    .unwrap();
    let from_xds = store.snapshot();
    assert!(
        !allowed(&from_xds, "db"),
        "xDS: the root selector denies shop/db"
    );
    assert!(allowed(&from_xds, "web"), "xDS: other labels pass");
}

/// `--trust-domain`: a workload without `trustDomain` (or with an empty one) is
/// in the configured trust domain; one that names its own keeps it.
#[test]
fn a_workload_without_a_trust_domain_is_in_the_configured_one() {
    let text = "workloads:\n  - {uid: a, name: a, namespace: x, addresses: [\"198.18.0.1\"]}\n  - {uid: b, name: b, namespace: x, trustDomain: \"\", addresses: [\"198.18.0.2\"]}\n  - {uid: c, name: c, namespace: x, trustDomain: other.org, addresses: [\"198.18.0.3\"]}\n";
    let state = LocalState::parse_in(std::path::Path::new("s.yaml"), text, "example.org")
        .unwrap()
        .into_state();
    let identity = |uid: &str| state.workload(uid).unwrap().identity().unwrap().to_string();
    assert_eq!(identity("a"), "spiffe://example.org/ns/x/sa/default");
    assert_eq!(identity("b"), "spiffe://example.org/ns/x/sa/default");
    assert_eq!(identity("c"), "spiffe://other.org/ns/x/sa/default");
}

/// hostNetwork pods share their node's address: two on one node are accepted
/// (as over xDS), and neither is found by that address.
#[test]
fn host_network_workloads_may_share_their_node_address() {
    let text = "workloads:\n  - {uid: a, name: a, namespace: x, hostNetwork: true, addresses: [\"198.18.0.9\"]}\n  - {uid: b, name: b, namespace: x, hostNetwork: true, addresses: [\"198.18.0.9\"]}\n";
    let state = state(text);
    assert!(state.workload("a").is_some() && state.workload("b").is_some());
    assert!(
        state
            .workload_by_ip("198.18.0.9".parse().unwrap())
            .is_none()
    );
}

fn parse_err(text: &str) -> String {
    LocalState::parse(std::path::Path::new("/etc/ambit/state.yaml"), text)
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_files_are_refused_naming_path_item_and_field() {
    let e = parse_err("workloads: [ {uid: a");
    assert!(
        e.starts_with("/etc/ambit/state.yaml: does not parse"),
        "{e}"
    );
    let e = parse_err(
        "workloads:\n  - uid: a\n    name: a\n    namespace: x\n    addresses: [\"not-an-ip\"]\n",
    );
    assert!(e.contains("state.yaml") && e.contains("line"), "{e}");
    let e = parse_err("workloads:\n  - uid: a\n    name: a\n    namespace: x\n    addresses: []\n");
    assert!(e.contains("workload a: field addresses"), "{e}");
    let e = parse_err(
        "workloads:\n  - uid: a\n    name: a\n    namespace: x\n    serviceAccount: \"b/c\"\n    addresses: [\"198.18.0.1\"]\n",
    );
    assert!(e.contains("workload a: field serviceAccount"), "{e}");
    let e = parse_err(
        "workloads:\n  - {uid: a, name: a, namespace: x, addresses: [\"198.18.0.1\"]}\n  - {uid: b, name: b, namespace: x, addresses: [\"198.18.0.1\"]}\n",
    );
    assert!(
        e.contains("workload b: field addresses: 198.18.0.1 belongs to another workload"),
        "{e}"
    );
    let e = parse_err(
        "services:\n  - {name: s, namespace: x, hostname: h, vips: [\"198.18.0.1\"], ports: [{servicePort: 0, targetPort: 1}]}\n",
    );
    assert!(e.contains("service x/s: field ports"), "{e}");
    let e = parse_err("workloadz: []\n");
    assert!(e.contains("unknown field"), "{e}");
}

#[tokio::test]
async fn the_watcher_applies_changes_and_keeps_the_last_good_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.yaml");
    write_whole(&path, FILE).unwrap();
    let store = Arc::new(StateStore::default());
    let status = Arc::new(Mutex::new(None));
    let (trigger, watcher) = mesh_core::drain::channel();
    let mut versions = store.subscribe();
    let (synced_tx, synced) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(watch_local_state(
        path.clone(),
        store.clone(),
        status.clone(),
        synced_tx,
        Duration::from_millis(20),
        watcher,
    ));
    versions.changed().await.unwrap();
    assert_eq!(store.snapshot().workloads().count(), 4);
    assert!(*synced.borrow(), "synced at the first state applied");

    // A broken file: reported, and the state stays.
    write_whole(&path, "workloads: [").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while status.lock().unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "error never reported"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        status
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .contains("does not parse")
    );
    assert_eq!(store.snapshot().workloads().count(), 4);

    // Fixed: applied, and the report clears.
    write_whole(&path, FILE.replace("  - uid: legacy", "  - uid: legacy2")).unwrap();
    versions.changed().await.unwrap();
    assert!(store.snapshot().workload("legacy2").is_some());
    assert!(status.lock().unwrap().is_none());

    assert_eq!(
        trigger.drain(Duration::from_secs(5)).await,
        mesh_core::drain::DrainOutcome::Graceful
    );
    task.await.unwrap();
}

/// Waits (bounded) until the watcher's status satisfies `what`.
async fn wait_status(status: &Mutex<Option<String>>, what: impl Fn(&Option<String>) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !what(&status.lock().unwrap()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "status never changed as expected: {:?}",
            status.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A file that cannot be read for a while, then comes back with the same
/// bytes: the read error clears.
#[tokio::test]
async fn a_read_error_clears_when_the_same_file_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.yaml");
    std::fs::write(&path, FILE).unwrap();
    let store = Arc::new(StateStore::default());
    let status = Arc::new(Mutex::new(None));
    let (trigger, watcher) = mesh_core::drain::channel();
    let (synced, _) = tokio::sync::watch::channel(false);
    let mut versions = store.subscribe();
    let task = tokio::spawn(watch_local_state(
        path.clone(),
        store.clone(),
        status.clone(),
        synced,
        Duration::from_millis(20),
        watcher,
    ));
    versions.changed().await.unwrap();
    std::fs::remove_file(&path).unwrap();
    wait_status(&status, |s| {
        s.as_ref().is_some_and(|e| e.contains("cannot read"))
    })
    .await;
    write_whole(&path, FILE).unwrap();
    wait_status(&status, Option::is_none).await;
    assert_eq!(store.snapshot().workloads().count(), 4);
    trigger.drain(Duration::from_secs(5)).await;
    task.await.unwrap();
}

/// A file that is not UTF-8 is refused, naming the file, at start and by the
/// watcher alike (which took it with U+FFFD in place of the bad bytes).
#[tokio::test]
async fn a_file_not_utf8_is_refused_at_start_and_by_the_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.yaml");
    // A valid file but for one byte in a workload's name.
    let mut bytes = FILE.replace("name: legacy", "name: legXcy").into_bytes();
    let at = bytes.windows(6).position(|w| w == b"legXcy").unwrap();
    bytes[at + 3] = 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let err = load_local_state(&path, "cluster.local")
        .unwrap_err()
        .to_string();
    let want = format!("{}: does not parse: not UTF-8", path.display());
    assert!(err.starts_with(&want), "{err}");

    let store = Arc::new(StateStore::default());
    let status = Arc::new(Mutex::new(None));
    let (trigger, watcher) = mesh_core::drain::channel();
    let (synced, _) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(watch_local_state(
        path.clone(),
        store.clone(),
        status.clone(),
        synced,
        Duration::from_millis(20),
        watcher,
    ));
    wait_status(&status, |s| {
        s.as_ref().is_some_and(|e| e.starts_with(&want))
    })
    .await;
    assert_eq!(store.snapshot().workloads().count(), 0);
    trigger.drain(Duration::from_secs(5)).await;
    task.await.unwrap();
}

/// `--root-namespace`: the mesh-wide policies are those of the configured root
/// namespace, on the first state and on every replacement.
#[test]
fn mesh_wide_policies_come_from_the_configured_root_namespace() {
    let deny_all_in = |ns: &str| {
        format!(
            "{FILE}policies:\n  - name: deny-all\n    namespace: {ns}\n    scope: GLOBAL\n    action: DENY\n    rules:\n      - clauses: []\n"
        )
    };
    let allowed = |store: &StateStore| {
        let labels = Default::default();
        let dst = crate::policy::Destination {
            namespace: "shop",
            labels: &labels,
        };
        let conn = crate::policy::Connection {
            src_identity: None,
            src_ip: "198.18.9.9".parse().unwrap(),
            dst_ip: "198.18.1.10".parse().unwrap(),
            dst_port: 8080,
        };
        store.snapshot().policies().evaluate(&dst, &conn).allowed
    };
    let store =
        StateStore::with_root_namespace(state(&deny_all_in("mesh-root")), "mesh-root".into());
    assert!(!allowed(&store), "mesh-root's GLOBAL DENY applies to shop");
    store.replace(state(&deny_all_in("istio-system")));
    assert!(
        allowed(&store),
        "istio-system is not the root namespace here"
    );
    store.replace(state(&deny_all_in("mesh-root")));
    assert!(!allowed(&store), "replacements keep the root namespace");
}

/// Writes `text` to `path` whole: a temp file renamed over it, so the watcher
/// never reads a half-written (or truncated, empty: a valid empty state) file.
fn write_whole(path: &std::path::Path, text: impl AsRef<[u8]>) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
