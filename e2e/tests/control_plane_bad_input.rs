//! Bad input to istiod-lite on real network namespaces: a malformed YAML document
//! and an invalid AuthorizationPolicy are reported with file, name and field while
//! the mesh keeps working, and a resource every ztunnel refuses is NACKed, shown in
//! istiod-lite's debug view, and the last good state kept.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::net::SocketAddr;

use ambit_e2e::checks::{spiffe, workload};
use ambit_e2e::mesh_control::metric_sum;
use ambit_e2e::{MeshCluster, require_root};
use common::{WAIT, access_log, assert_denied, assert_echo, echo, pod};
use serde_json::Value;

const WORKLOAD_TYPE: &str = "type.googleapis.com/ambit.workload.v1.Workload";

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
    assert_denied(&mesh, 2, &outsider, addr).await;

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
    assert_denied(&mesh, 2, &outsider, addr).await;
    assert_denied(&mesh, 2, &outsider, vip).await;

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
    assert_denied(&mesh, 2, &outsider, addr).await;
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
