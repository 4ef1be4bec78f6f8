//! istiod-lite as a whole, on loopback: the real `App` on a config directory, with
//! mesh-core's delta xDS client and CA client as a ztunnel would use them. Config
//! changes reach the client, bad YAML is reported and loses nothing, a NACK is
//! visible in the debug view, the CA enforces "only identities of your node", and
//! a restarted istiod-lite resumes a client without resending what it holds.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_proto::envoy::config::core::v3::Node;
use clap::Parser;
use istiod_lite::app::App;
use istiod_lite::config::Config;
use mesh_core::ca_client::RemoteCa;
use mesh_core::control::{ControlPlane, Token};
use mesh_core::drain::{self, DrainTrigger};
use mesh_core::xds::{Handler, Refusal, Resource, XdsClient, XdsStatus};
use mesh_core::{CertificateSource, SpiffeId};
use prost::Message;

const W: &str = ambit_proto::WORKLOAD_TYPE_URL;
const S: &str = ambit_proto::SERVICE_TYPE_URL;
const A: &str = ambit_proto::AUTHORIZATION_TYPE_URL;
const WAIT: Duration = Duration::from_secs(20);

const NAMESPACE: &str = "apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
";

fn pod(name: &str, node: &str, sa: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop, uid: uid-{name}, labels: {{app: {name}}}}}
spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: app, image: x}}]}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}
"
    )
}

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 198.19.200.10
  selector: {app: reviews}
  ports: [{port: 9080, targetPort: 8080}]
";

fn policy(principal: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reviews-callers, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  rules: [{{from: [{{source: {{principals: [\"{principal}\"]}}}}]}}]
"
    )
}

fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!("{name}.tmp~"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// Records what the client holds, refusing any workload named in `refuse`.
#[derive(Default)]
struct Recorder {
    held: Mutex<HashMap<String, BTreeMap<String, Resource>>>,
    updates: Mutex<usize>,
    refuse: Mutex<Vec<String>>,
}

impl Handler for Recorder {
    fn apply(
        &self,
        type_url: &str,
        updated: Vec<Resource>,
        removed: Vec<String>,
    ) -> Result<(), Vec<Refusal>> {
        let refuse = self.refuse.lock().unwrap().clone();
        let mut held = self.held.lock().unwrap();
        let map = held.entry(type_url.to_string()).or_default();
        let mut refused = Vec::new();
        *self.updates.lock().unwrap() += updated.len();
        for r in updated {
            if type_url == W && refuse.contains(&r.name) {
                refused.push((r.name.clone(), "refused by the test".to_string()));
                continue;
            }
            map.insert(r.name.clone(), r);
        }
        for name in removed {
            map.remove(&name);
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(refused)
        }
    }
}

impl Recorder {
    fn names(&self, type_url: &str) -> Vec<String> {
        let held = self.held.lock().unwrap();
        held.get(type_url)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn authorization(&self, name: &str) -> Option<ambit_proto::security::Authorization> {
        let held = self.held.lock().unwrap();
        let r = held.get(A)?.get(name)?;
        ambit_proto::security::Authorization::decode(r.body.clone()).ok()
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    config: std::path::PathBuf,
    args: Vec<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config");
    std::fs::create_dir(&config).unwrap();
    write(&config, "namespace.yaml", NAMESPACE);
    write(
        &config,
        "pods.yaml",
        &[
            pod("frontend", "node-1", "frontend", "198.18.1.2"),
            pod("reviews", "node-2", "reviews", "198.18.2.2"),
        ]
        .join("---\n"),
    );
    write(&config, "service.yaml", SERVICE);
    write(
        &config,
        "policy.yaml",
        &policy("cluster.local/ns/shop/sa/frontend"),
    );
    let tokens = tmp.path().join("tokens");
    std::fs::write(&tokens, "node-1 token-one\nnode-2 token-two\n").unwrap();
    let args = vec![
        "istiod-lite".to_string(),
        "--config-dir".into(),
        config.display().to_string(),
        "--config-poll".into(),
        "50ms".into(),
        "--ca-dir".into(),
        tmp.path().join("ca").display().to_string(),
        "--node-tokens".into(),
        tokens.display().to_string(),
        "--grpc-addr".into(),
        format!("127.0.0.1:{}", free_port()),
        "--admin-addr".into(),
        "127.0.0.1:0".into(),
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
        "--debounce-quiet".into(),
        "20ms".into(),
        "--drain-deadline".into(),
        "1s".into(),
    ];
    Setup {
        _tmp: tmp,
        config,
        args,
    }
}

fn control_plane(app: &App, token: &str) -> ControlPlane {
    ControlPlane {
        address: app.grpc_addr.to_string(),
        identity: app.config.identity().unwrap(),
        roots: vec![app.root.root()],
        token: Token::Static(token.into()),
        connect_timeout: Duration::from_secs(2),
    }
}

fn start_client(cp: &ControlPlane, recorder: Arc<Recorder>) -> (XdsStatus, DrainTrigger) {
    let node = Node {
        id: "node-1".into(),
        ..Default::default()
    };
    let client = XdsClient::new(cp, node, vec![W, S, A], recorder).unwrap();
    let status = client.status();
    let (trigger, watcher) = drain::channel();
    tokio::spawn(client.run(watcher));
    (status, trigger)
}

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_flows_to_a_client_and_bad_input_loses_nothing() {
    let s = setup();
    let app = App::start(Config::try_parse_from(&s.args).unwrap())
        .await
        .unwrap();
    let recorder = Arc::new(Recorder::default());
    let (status, _client) = start_client(&control_plane(&app, "token-one"), recorder.clone());
    eventually("workloads, service and policy", || {
        recorder.names(W) == ["uid-frontend", "uid-reviews"]
            && recorder.names(S) == ["shop/reviews.shop.svc.cluster.local"]
            && recorder.names(A) == ["shop/reviews-callers"]
    })
    .await;
    eventually("synced", || status.snapshot().synced).await;

    // A policy edit reaches the client.
    write(
        &s.config,
        "policy.yaml",
        &policy("cluster.local/ns/shop/sa/other"),
    );
    eventually("the edited policy", || {
        recorder
            .authorization("shop/reviews-callers")
            .is_some_and(|a| format!("{a:?}").contains("sa/other"))
    })
    .await;

    // A malformed document and an invalid policy are reported with file, name and
    // field; the good policy stays as it was and the rest keeps working.
    write(
        &s.config,
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [oops\n",
    );
    let bad = policy("x").replace("principals: [\"x\"]", "ipBlocks: [\"not-an-ip\"]");
    write(&s.config, "policy.yaml", &bad);
    write(
        &s.config,
        "extra.yaml",
        &pod("extra", "node-1", "frontend", "198.18.1.3"),
    );
    eventually("the new pod, despite the bad files", || {
        recorder.names(W).contains(&"uid-extra".to_string())
    })
    .await;
    let errors = get(app.admin_addr, "/debug/errors").await;
    assert!(errors.contains("broken.yaml"), "{errors}");
    assert!(
        errors.contains("policy.yaml") && errors.contains("reviews-callers"),
        "{errors}"
    );
    assert!(errors.contains("ipBlocks"), "{errors}");
    assert!(
        recorder
            .authorization("shop/reviews-callers")
            .is_some_and(|a| format!("{a:?}").contains("sa/other")),
        "the last good policy stays"
    );
    // Fixing the file clears the report.
    write(
        &s.config,
        "policy.yaml",
        &policy("cluster.local/ns/shop/sa/frontend"),
    );
    std::fs::remove_file(s.config.join("broken.yaml")).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let errors = get(app.admin_addr, "/debug/errors").await;
        if !errors.contains("policy.yaml") && !errors.contains("broken.yaml") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "reports not cleared {WAIT:?} after the fix: {errors}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // A resource the client cannot apply is NACKed and visible in the debug view.
    recorder.refuse.lock().unwrap().push("uid-late".into());
    write(
        &s.config,
        "late.yaml",
        &pod("late", "node-2", "reviews", "198.18.2.9"),
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    let seen = loop {
        let seen = get(app.admin_addr, "/debug/clients").await;
        if seen.contains("refused by the test") || tokio::time::Instant::now() >= deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(
        seen.contains("refused by the test") && seen.contains("uid-late"),
        "{seen}"
    );

    // Removing a pod removes its workload.
    std::fs::remove_file(s.config.join("extra.yaml")).unwrap();
    eventually("the removed pod's workload gone", || {
        !recorder.names(W).contains(&"uid-extra".to_string())
    })
    .await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_signs_only_identities_of_the_callers_node() {
    let s = setup();
    let app = App::start(Config::try_parse_from(&s.args).unwrap())
        .await
        .unwrap();
    let ca = RemoteCa::new(&control_plane(&app, "token-one"), Duration::ZERO).unwrap();
    let frontend = SpiffeId::new("cluster.local", "shop", "frontend").unwrap();
    let cert = ca.issue(&frontend).await.unwrap();
    assert_eq!(cert.identity(), &frontend);
    // `reviews` runs on node-2 only.
    let reviews = SpiffeId::new("cluster.local", "shop", "reviews").unwrap();
    let err = ca.issue(&reviews).await.unwrap_err().to_string();
    assert!(err.contains("node-1") && err.contains("reviews"), "{err}");
    // node-2's token may.
    let ca2 = RemoteCa::new(&control_plane(&app, "token-two"), Duration::ZERO).unwrap();
    ca2.issue(&reviews).await.unwrap();
    // A bad token is refused.
    let bad = RemoteCa::new(&control_plane(&app, "nope"), Duration::ZERO).unwrap();
    assert!(bad.issue(&frontend).await.is_err());
    let metrics = get(app.metrics_addr, "/metrics").await;
    assert!(
        metrics.contains("istiod_ca_certificates_signed_total 2"),
        "{metrics}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_istiod_resumes_clients_without_resending() {
    let s = setup();
    let config = Config::try_parse_from(&s.args).unwrap();
    let app = App::start(config.clone()).await.unwrap();
    let cp = control_plane(&app, "token-one");
    let recorder = Arc::new(Recorder::default());
    let (status, _client) = start_client(&cp, recorder.clone());
    eventually("initial state", || {
        recorder.names(W).len() == 2 && recorder.names(A).len() == 1
    })
    .await;
    eventually("synced", || status.snapshot().synced).await;
    let before = *recorder.updates.lock().unwrap();

    // Down: the client keeps what it holds.
    app.shutdown().await;
    drop(app);
    eventually("the client notices", || !status.snapshot().connected).await;
    assert_eq!(recorder.names(W).len(), 2);

    // Up again, same directories and CA: the client resumes with its versions and
    // gets nothing it already holds; a change made meanwhile does arrive.
    write(
        &s.config,
        "extra.yaml",
        &pod("extra", "node-1", "frontend", "198.18.1.3"),
    );
    let app = App::start(config).await.unwrap();
    eventually("the change made while down", || {
        recorder.names(W).contains(&"uid-extra".to_string())
    })
    .await;
    eventually("reconnected", || status.snapshot().connected).await;
    assert_eq!(
        *recorder.updates.lock().unwrap() - before,
        1,
        "only the new workload was sent after the restart"
    );
    let debug = app.xds.debug_snapshot();
    let sent: u64 = debug
        .clients
        .iter()
        .flat_map(|c| c.types.iter())
        .map(|t| t.resources_sent)
        .sum();
    assert_eq!(sent, 1, "{debug:?}");
    app.shutdown().await;
}

/// A PeerAuthentication in the config directory reaches ztunnel as the DENY
/// policy that refuses plaintext; a namespace override changes its scope; a
/// malformed one is reported with its field while the last good one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_authentication_reaches_a_client_as_a_plaintext_deny() {
    let s = setup();
    let strict = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";
    write(&s.config, "mesh-pa.yaml", strict);
    let app = App::start(Config::try_parse_from(&s.args).unwrap())
        .await
        .unwrap();
    let recorder = Arc::new(Recorder::default());
    let (_status, _client) = start_client(&control_plane(&app, "token-one"), recorder.clone());
    let global = "istio-system/istio_converted_static_strict";
    eventually("the mesh-wide STRICT policy", || {
        recorder.names(A).contains(&global.to_string())
    })
    .await;
    let a = recorder.authorization(global).unwrap();
    assert_eq!(a.scope, ambit_proto::security::Scope::Global as i32);
    assert_eq!(a.action, ambit_proto::security::Action::Deny as i32);
    assert!(format!("{a:?}").contains("Presence(true)"), "{a:?}");

    // shop opts out: no GLOBAL policy any more, shop's pods take plaintext.
    let open = "apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: open, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}
";
    write(&s.config, "shop-pa.yaml", open);
    eventually("the GLOBAL policy withdrawn", || {
        let names = recorder.names(A);
        !names.contains(&global.to_string())
            && names.contains(&"istio-system/istio_converted_namespace_strict".to_string())
            && !names.iter().any(|n| n.starts_with("shop/istio_converted"))
    })
    .await;

    // A typo in the mode is reported with its field; the last good policy stays.
    write(
        &s.config,
        "shop-pa.yaml",
        &open.replace("PERMISSIVE", "permissive"),
    );
    let mut errors = String::new();
    for _ in 0..200 {
        errors = get(app.admin_addr, "/debug/errors").await;
        if errors.contains("spec.mtls.mode") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        errors.contains("shop-pa.yaml") && errors.contains("spec.mtls.mode"),
        "{errors}"
    );
    assert!(!recorder.names(A).contains(&global.to_string()));
    app.shutdown().await;
}
