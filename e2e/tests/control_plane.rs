//! istiod-lite as the mesh's only source of state and certificates, on real
//! network namespaces: live enrollment, pod removal, the control plane stopped and
//! restarted, bad config reported, and a resource the ztunnels refuse (NACK) while
//! they keep their last good state. Certificate rotation is in `cert_rotation.rs`.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::Duration;

use ambit_e2e::mesh_control::{EchoSession, WireCapture, metric_sum};
use ambit_e2e::{EchoTool, MeshCluster, Pod, PodSpec, require_root};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const WORKLOAD_TYPE: &str = "type.googleapis.com/ambit.workload.v1.Workload";

fn echo() -> EchoTool {
    EchoTool::new(env!("CARGO_BIN_EXE_e2e-tool"))
}

fn pod(name: &str, node: u8, ns: &str, sa: &str) -> PodSpec {
    PodSpec::new(name, node)
        .namespace(ns)
        .cni_arg("K8S_POD_SERVICE_ACCOUNT", sa)
}

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// The workload with uid `uid` in a config dump.
fn workload<'a>(dump: &'a Value, uid: &str) -> Option<&'a Value> {
    dump["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["uid"] == uid)
}

/// Sends one message from `from` to `to` and asserts it came back.
async fn assert_echo(from: &Pod, to: SocketAddr, message: &str) {
    let reply = echo().connect(from, to, message).await.unwrap();
    assert_eq!(reply.trim(), message, "{} -> {to}", from.name());
}

/// A connection the destination refused: the captured connection is closed
/// without a reply (or the client fails).
async fn assert_refused(from: &Pod, to: SocketAddr) {
    let reply = echo()
        .connect(from, to, "should-be-refused")
        .await
        .unwrap_or_default();
    assert_eq!(reply, "", "{} -> {to} was not refused", from.name());
}

/// Waits for node `node`'s ztunnel to log a completed connection matching `want`.
async fn access_log(mesh: &mut MeshCluster, node: u8, what: &str, want: &[&str]) -> String {
    mesh.nodes[usize::from(node) - 1]
        .ztunnel
        .wait_for_line(what, WAIT, |l| {
            l.contains("connection complete") && want.iter().all(|w| l.contains(w))
        })
        .await
        .unwrap()
}

/// One long-lived connection from `from` to `to`, pinging every 50 ms.
async fn session(from: &Pod, to: SocketAddr) -> EchoSession {
    EchoSession::start(&echo(), from, to).await.unwrap()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn namespace_yaml(name: &str, ambient: bool) -> String {
    let labels = if ambient {
        "\n  labels:\n    istio.io/dataplane-mode: ambient"
    } else {
        ""
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelling_a_namespace_enrolls_its_pods_live() {
    if !require_root("labelling_a_namespace_enrolls_its_pods_live") {
        return;
    }
    let mut mesh = MeshCluster::start(2).await.unwrap();
    mesh.own_namespace("late");
    mesh.write_config("namespace-late.yaml", &namespace_yaml("late", false))
        .unwrap();
    let client = mesh
        .add_pod(pod("client", 1, "shop", "default"))
        .await
        .unwrap();
    let server = mesh
        .add_pod(pod("server", 2, "late", "default"))
        .await
        .unwrap();
    let uid = server.container_id().to_string();
    let _srv = echo().serve(&server, 8080).await.unwrap();
    let addr = SocketAddr::from((server.ip(), 8080));

    // Outside the mesh: every ztunnel knows the pod, without a tunnel.
    mesh.wait_for_dump("the server's workload, not in the mesh", |d| {
        workload(d, &uid).is_some_and(|w| w["protocol"] == "NONE")
    })
    .await
    .unwrap();
    let capture = WireCapture::start(&mesh, 1, server.ip()).await.unwrap();
    let marker = "PLAIN-BEFORE-LABEL-41d7";
    assert_echo(&client, addr, marker).await;
    let (bytes, lines) = capture.finish().await.unwrap();
    assert!(
        contains(&bytes, marker),
        "not in the mesh yet, the connection should be plaintext: {lines:?}"
    );

    // `kubectl label namespace late istio.io/dataplane-mode=ambient`.
    mesh.write_config("namespace-late.yaml", &namespace_yaml("late", true))
        .unwrap();
    mesh.wait_for_dump("the server's workload, in the mesh", |d| {
        workload(d, &uid).is_some_and(|w| w["protocol"] == "HBONE")
    })
    .await
    .unwrap();
    let capture = WireCapture::start(&mesh, 1, server.ip()).await.unwrap();
    let marker = "HBONE-AFTER-LABEL-41d7";
    assert_echo(&client, addr, marker).await;
    let (bytes, lines) = capture.finish().await.unwrap();
    assert!(
        !contains(&bytes, marker),
        "the marker crossed the wire in plaintext"
    );
    assert!(!lines.is_empty(), "nothing captured");
    let hbone = format!("{}.15008", server.ip());
    for l in &lines {
        assert!(l.contains(&hbone), "a packet not to or from {hbone}: {l}");
    }
    let ip = server.ip().to_string();
    let late = format!("dst_identity={}", spiffe("late", "default"));
    let shop = format!("src_identity={}", spiffe("shop", "default"));
    access_log(
        &mut mesh,
        2,
        "the HBONE connection in the destination's access log",
        &["inbound", &ip, &late, &shop],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_pod_removes_its_workload_from_every_ztunnel() {
    if !require_root("removing_a_pod_removes_its_workload_from_every_ztunnel") {
        return;
    }
    let mut mesh = MeshCluster::start(2).await.unwrap();
    let client = mesh
        .add_pod(pod("client", 1, "shop", "default"))
        .await
        .unwrap();
    let stay = mesh
        .add_pod(pod("stay", 2, "shop", "default"))
        .await
        .unwrap();
    let gone = mesh
        .add_pod(pod("gone", 2, "shop", "default"))
        .await
        .unwrap();
    let _srv = echo().serve(&stay, 8080).await.unwrap();
    let gone_uid = gone.container_id().to_string();
    for dump in mesh.config_dumps().unwrap() {
        assert!(workload(&dump, &gone_uid).is_some(), "{dump}");
    }

    mesh.delete_pod("gone").await.unwrap();
    let dumps = mesh.config_dumps().unwrap();
    assert_eq!(dumps.len(), 2);
    for (n, dump) in dumps.iter().enumerate() {
        assert!(
            workload(dump, &gone_uid).is_none(),
            "node {}'s ztunnel still has the removed pod: {dump}",
            n + 1
        );
        let gone_ip = gone.ip().to_string();
        assert!(
            !dump["workloads"]
                .to_string()
                .contains(&format!("\"{gone_ip}\"")),
            "node {}'s ztunnel still has the removed pod's address: {dump}",
            n + 1
        );
        for p in [&client, &stay] {
            assert!(
                workload(dump, p.container_id()).is_some(),
                "node {} lost {}: {dump}",
                n + 1,
                p.name()
            );
        }
    }
    let model = mesh.control_debug("/debug/model").unwrap();
    assert!(!model.to_string().contains(&gone_uid), "{model}");
    assert_echo(&client, SocketAddr::from((stay.ip(), 8080)), "still here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_istiod_lite_stopped_traffic_flows_and_a_restart_resyncs_without_resending() {
    if !require_root(
        "with_istiod_lite_stopped_traffic_flows_and_a_restart_resyncs_without_resending",
    ) {
        return;
    }
    let mut mesh = MeshCluster::start(2).await.unwrap();
    let left = mesh.add_pod(pod("left", 1, "shop", "left")).await.unwrap();
    let right = mesh
        .add_pod(pod("right", 2, "shop", "right"))
        .await
        .unwrap();
    let _l = echo().serve(&left, 8080).await.unwrap();
    let _r = echo().serve(&right, 8080).await.unwrap();
    let to_left = SocketAddr::from((left.ip(), 8080));
    let to_right = SocketAddr::from((right.ip(), 8080));
    assert_echo(&left, to_right, "warm-up").await;
    let mut session = session(&left, to_right).await;
    let sent_before = metric_sum(
        &mesh.control_metrics().unwrap(),
        "istiod_xds_resources_sent_total",
        &[],
    );
    assert!(sent_before > 0.0, "istiod-lite never sent a resource");

    let before = session.latest().await.unwrap();
    mesh.stop_control_plane().await.unwrap();
    mesh.wait_for_xds(false).await.unwrap();
    for round in 0..3 {
        assert_echo(&left, to_right, &format!("new left->right {round}")).await;
        assert_echo(&right, to_left, &format!("new right->left {round}")).await;
    }
    // Nothing is lost: every ztunnel keeps both workloads and both certificates.
    for (n, dump) in mesh.config_dumps().unwrap().iter().enumerate() {
        for p in [&left, &right] {
            assert!(
                workload(dump, p.container_id()).is_some(),
                "node {}: {dump}",
                n + 1
            );
        }
        let held: Vec<_> = dump["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["identity"].as_str())
            .collect();
        let want = spiffe("shop", if n == 0 { "left" } else { "right" });
        assert!(held.contains(&want.as_str()), "node {}: {held:?}", n + 1);
    }

    let during = session.latest().await.unwrap();
    assert!(during > before, "no echo while istiod-lite was down");
    mesh.restart_control_plane().await.unwrap();
    mesh.wait_for_xds(true).await.unwrap();
    // Both clients resumed, hold what istiod-lite has, and nothing is pending.
    let clients = mesh
        .poll("both ztunnels resynced", WAIT, |m| {
            let debug = m.control_debug("/debug/clients").ok()?;
            let resources = debug["resources"].as_object()?.clone();
            let clients = debug["clients"].as_array()?.clone();
            let settled = |c: &Value| {
                c["types"].as_array().is_some_and(|ts| {
                    ts.len() == 3
                        && ts.iter().all(|t| {
                            t["pending"] == 0
                                && t["in_flight"] == 0
                                && t["held"].as_u64()
                                    == resources
                                        .get(t["type_url"].as_str().unwrap_or_default())
                                        .and_then(Value::as_u64)
                                        .or(Some(0))
                        })
                })
            };
            (clients.len() == 2 && clients.iter().all(settled)).then_some(debug)
        })
        .await
        .unwrap();
    let metrics = mesh.control_metrics().unwrap();
    assert_eq!(
        metric_sum(&metrics, "istiod_xds_resources_sent_total", &[]),
        0.0,
        "a resync resent resources:\n{metrics}\n{clients:#}"
    );
    for c in clients["clients"].as_array().unwrap() {
        for t in c["types"].as_array().unwrap() {
            assert_eq!(t["resources_sent"], 0, "{c:#}");
            assert_eq!(t["nacks"], 0, "{c:#}");
        }
    }
    // The session went on through all of it.
    let last = session.finish().await.unwrap();
    assert!(
        last > during,
        "no echo after the restart ({during} -> {last})"
    );
    assert_echo(&left, to_right, "after the restart").await;
}

const GOOD_POLICY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: server-callers
  namespace: shop
spec:
  selector:
    matchLabels:
      app: server
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/shop/sa/frontend"]
"#;

/// The same policy with an IP block that is no address: were it applied, it
/// would let `outsider` in.
const BAD_POLICY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: server-callers
  namespace: shop
spec:
  selector:
    matchLabels:
      app: server
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/shop/sa/frontend"]
    - from:
        - source:
            ipBlocks: ["not-an-ip"]
"#;

/// A good Service and, in the same file, a malformed one.
const SERVICES: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: server
  namespace: shop
spec:
  clusterIP: 198.19.210.10
  selector:
    app: server
  ports:
    - name: tcp
      port: 9080
      targetPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: broken
  namespace: shop
spec:
  selector:
    app: server
  ports:
    - port: eighty
"#;

/// The reports of `/debug/errors` whose origin ends with `file`.
fn reports_for(errors: &Value, file: &str) -> Vec<Value> {
    errors
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter(|r| r["origin"].as_str().is_some_and(|o| o.ends_with(file)))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_yaml_and_an_invalid_policy_are_reported_and_the_mesh_keeps_working() {
    if !require_root("bad_yaml_and_an_invalid_policy_are_reported_and_the_mesh_keeps_working") {
        return;
    }
    let mut mesh = MeshCluster::start(2).await.unwrap();
    let frontend = mesh
        .add_pod(pod("frontend", 1, "shop", "frontend"))
        .await
        .unwrap();
    let outsider = mesh
        .add_pod(pod("outsider", 1, "shop", "outsider"))
        .await
        .unwrap();
    let server = mesh
        .add_pod(pod("server", 2, "shop", "server"))
        .await
        .unwrap();
    let _srv = echo().serve(&server, 8080).await.unwrap();
    let addr = SocketAddr::from((server.ip(), 8080));
    let vip: SocketAddr = "198.19.210.10:9080".parse().unwrap();
    let has_policy = |d: &Value| d["policies"].to_string().contains("server-callers");
    mesh.write_config("policy.yaml", GOOD_POLICY).unwrap();
    mesh.wait_for_dump("the policy", has_policy).await.unwrap();
    assert_echo(&frontend, addr, "allowed").await;
    assert_refused(&outsider, addr).await;

    // The policy edited into an invalid one, a file with a good and a malformed
    // document, and a file that is not YAML at all.
    mesh.write_config("policy.yaml", BAD_POLICY).unwrap();
    mesh.write_config("services.yaml", SERVICES).unwrap();
    mesh.write_config(
        "syntax.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: x\n",
    )
    .unwrap();
    let errors = mesh
        .poll("three reports", WAIT, |m| {
            let e = m.control_debug("/debug/errors").ok()?;
            let all = ["policy.yaml", "services.yaml", "syntax.yaml"];
            all.iter()
                .all(|f| !reports_for(&e, f).is_empty())
                .then_some(e)
        })
        .await
        .unwrap();
    let policy = &reports_for(&errors, "policy.yaml")[0]["error"];
    assert_eq!(policy["kind"], "AuthorizationPolicy", "{errors:#}");
    assert_eq!(policy["name"], "server-callers", "{errors:#}");
    assert_eq!(policy["namespace"], "shop", "{errors:#}");
    assert_eq!(
        policy["field"], "spec.rules[1].from[0].source.ipBlocks[0]",
        "{errors:#}"
    );
    let service = &reports_for(&errors, "services.yaml");
    assert_eq!(service.len(), 1, "{errors:#}");
    assert_eq!(service[0]["document"], 2, "{errors:#}");
    assert_eq!(service[0]["error"]["kind"], "Service", "{errors:#}");
    assert_eq!(service[0]["error"]["name"], "broken", "{errors:#}");
    assert_eq!(
        service[0]["error"]["field"], "spec.ports[0].port",
        "{errors:#}"
    );
    // A syntax error has no object to name: the file and the place in it.
    let syntax = &reports_for(&errors, "syntax.yaml")[0];
    assert!(
        syntax["error"]["problem"]
            .as_str()
            .unwrap()
            .contains("line"),
        "{errors:#}"
    );

    // The good Service of the malformed file is served, the last good version of
    // the policy stays enforced, the rest of the mesh keeps working.
    mesh.wait_for_dump("the good Service", |d| {
        d["services"].to_string().contains("198.19.210.10")
    })
    .await
    .unwrap();
    for dump in mesh.config_dumps().unwrap() {
        assert!(!dump["services"].to_string().contains("broken"), "{dump}");
        assert!(
            !dump["policies"].to_string().contains("not-an-ip"),
            "{dump}"
        );
    }
    assert_echo(&frontend, addr, "still allowed").await;
    assert_echo(&frontend, vip, "through the VIP").await;
    assert_refused(&outsider, addr).await;
    assert_refused(&outsider, vip).await;

    // Fixing the files clears the reports.
    mesh.write_config("policy.yaml", GOOD_POLICY).unwrap();
    mesh.control()
        .unwrap()
        .remove_config("syntax.yaml")
        .unwrap();
    mesh.poll("the fixed files' reports cleared", WAIT, |m| {
        let e = m.control_debug("/debug/errors").ok()?;
        (reports_for(&e, "policy.yaml").is_empty() && reports_for(&e, "syntax.yaml").is_empty())
            .then_some(())
    })
    .await
    .unwrap();
    assert_refused(&outsider, addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_no_ztunnel_can_apply_is_nacked_and_the_last_good_state_kept() {
    if !require_root("a_workload_no_ztunnel_can_apply_is_nacked_and_the_last_good_state_kept") {
        return;
    }
    let mut mesh = MeshCluster::start(2).await.unwrap();
    let client = mesh
        .add_pod(pod("client", 1, "shop", "client"))
        .await
        .unwrap();
    let server = mesh
        .add_pod(pod("server", 2, "shop", "server"))
        .await
        .unwrap();
    let _srv = echo().serve(&server, 8080).await.unwrap();
    let addr = SocketAddr::from((server.ip(), 8080));
    assert_echo(&client, addr, "before").await;

    // Another pod claiming the server's address.
    let impostor = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "impostor",
            "namespace": "shop",
            "uid": "impostor-0b5e",
            "labels": {"app": "impostor"},
        },
        "spec": {
            "nodeName": "node-2",
            "serviceAccountName": "impostor",
            "containers": [{"name": "app", "image": "e2e-tool"}],
        },
        "status": {
            "phase": "Running",
            "podIP": server.ip().to_string(),
            "podIPs": [{"ip": server.ip().to_string()}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    });
    mesh.write_config("impostor.yaml", &impostor.to_string())
        .unwrap();

    // Every ztunnel refuses it and says so.
    let mut last = Value::Null;
    let clients = mesh
        .poll("a NACK from both ztunnels", WAIT, |m| {
            let debug = m.control_debug("/debug/clients").ok()?;
            last = debug.clone();
            let nacked = |c: &Value| {
                c["types"].as_array().is_some_and(|ts| {
                    ts.iter().any(|t| {
                        t["type_url"] == WORKLOAD_TYPE
                            && t["last_nack"]["message"]
                                .as_str()
                                .is_some_and(|msg| msg.contains("impostor"))
                    })
                })
            };
            let clients = debug["clients"].as_array()?;
            (clients.len() == 2 && clients.iter().all(nacked)).then_some(debug)
        })
        .await
        .unwrap_or_else(|e| {
            let dumps = mesh.config_dumps().unwrap();
            panic!(
                "{e}: /debug/clients {last:#}\nztunnels' xDS: {:#} {:#}",
                dumps[0]["xds"], dumps[1]["xds"]
            )
        });
    let metrics = mesh.control_metrics().unwrap();
    assert!(
        metric_sum(&metrics, "istiod_xds_nacks_total", &[]) >= 2.0,
        "{metrics}\n{clients:#}"
    );
    let message = clients["clients"][0]["types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type_url"] == WORKLOAD_TYPE)
        .unwrap()["last_nack"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains(&server.ip().to_string()), "{message}");
    for (n, dump) in mesh.config_dumps().unwrap().iter().enumerate() {
        assert!(
            workload(dump, "impostor-0b5e").is_none(),
            "node {}: {dump}",
            n + 1
        );
        let kept = workload(dump, server.container_id()).unwrap();
        assert_eq!(kept["serviceAccount"], "server", "node {}: {kept}", n + 1);
        let nack = &dump["xds"]["types"][WORKLOAD_TYPE]["lastNack"];
        assert!(
            nack["message"]
                .as_str()
                .is_some_and(|m| m.contains("impostor")),
            "node {}: {nack}",
            n + 1
        );
    }

    // The original pod is still reached through the mesh, with its identity:
    // the destination logs both connections, before and after the NACK.
    assert_echo(&client, addr, "after the NACK").await;
    let ip = server.ip().to_string();
    let dst = format!("dst_identity={}", spiffe("shop", "server"));
    let src = format!("src_identity={}", spiffe("shop", "client"));
    for which in ["before", "after"] {
        access_log(
            &mut mesh,
            2,
            &format!("the connection {which} the NACK, with the server's identity"),
            &["inbound", &ip, &dst, &src],
        )
        .await;
    }
}
