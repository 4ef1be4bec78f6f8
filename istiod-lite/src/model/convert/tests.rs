//! Tests of the conversion: one valid snippet per kind, and each shape of error
//! with the field path it must name.

use std::net::IpAddr;

use serde_json::Value;

use super::from_json;
use crate::model::{Object, ObjectError, PolicyAction, TargetPort};

mod fuzz;
mod peer_auth;
mod policy;

fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap()
}

fn ok(text: &str) -> Object {
    match from_json(yaml(text)) {
        Ok(o) => o,
        Err(e) => panic!("expected success, got {e}"),
    }
}

fn err(text: &str) -> ObjectError {
    match from_json(yaml(text)) {
        Ok(o) => panic!("expected an error, got {o:?}"),
        Err(e) => e,
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn namespace_is_cluster_scoped() {
    let Object::Namespace(ns) = ok("
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  namespace: ignored
  labels: {istio.io/dataplane-mode: ambient}
  uid: u-1
  generation: 3
")
    else {
        panic!("not a namespace")
    };
    assert_eq!(ns.meta.name, "shop");
    assert_eq!(ns.meta.namespace, "");
    assert_eq!(ns.meta.uid, "u-1");
    assert_eq!(ns.meta.generation, Some(3));
    assert_eq!(ns.meta.labels["istio.io/dataplane-mode"], "ambient");
}

#[test]
fn namespaced_kinds_default_to_default() {
    let o = ok("{apiVersion: v1, kind: ServiceAccount, metadata: {name: web}}");
    assert_eq!(o.key().to_string(), "ServiceAccount default/web");
}

#[test]
fn pod_is_reduced() {
    let Object::Pod(pod) = ok(r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  ownerReferences:
  - {apiVersion: v1, kind: Node, name: node-a, uid: u0}
  - {apiVersion: apps/v1, kind: ReplicaSet, name: web-5d4f8, uid: u1, controller: true}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers:
  - name: app
    image: nginx
    ports: [{name: http, containerPort: 8080}, {containerPort: 9090}]
status:
  podIP: 198.18.0.5
  podIPs: [{ip: 198.18.0.5}, {ip: "fd00::5"}]
  conditions: [{type: PodScheduled, status: "True"}, {type: Ready, status: "False"}]
"#)
    else {
        panic!("not a pod")
    };
    assert_eq!(pod.node_name, "node-a");
    assert_eq!(pod.service_account, "web");
    assert_eq!(pod.ips, vec![ip("198.18.0.5"), ip("fd00::5")]);
    assert!(!pod.ready);
    assert!(!pod.host_network);
    assert_eq!(pod.named_ports.len(), 1);
    assert_eq!(pod.named_ports["http"], 8080);
    let controller = pod.controller.expect("the controlling owner");
    assert_eq!(
        (controller.kind.as_str(), controller.name.as_str()),
        ("ReplicaSet", "web-5d4f8")
    );
}

#[test]
fn pod_readiness() {
    let Object::Pod(bare) =
        ok("{apiVersion: v1, kind: Pod, metadata: {name: p}, status: {podIP: 198.18.0.9}}")
    else {
        panic!()
    };
    assert!(bare.ready, "no conditions: ready");
    assert_eq!(bare.controller, None);
    assert!(!bare.terminal, "no phase: not terminal");
    assert_eq!(bare.service_account, "default");
    assert_eq!(bare.ips, vec![ip("198.18.0.9")]);
    let Object::Pod(gone) = ok("
apiVersion: v1
kind: Pod
metadata: {name: p, deletionTimestamp: '2024-01-01T00:00:00Z'}
status: {conditions: [{type: Ready, status: 'True'}]}
")
    else {
        panic!()
    };
    assert!(!gone.ready, "terminating: not ready");
    let Object::Pod(host) =
        ok("{apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {hostNetwork: true}}")
    else {
        panic!()
    };
    assert!(host.host_network);
    assert!(host.ips.is_empty());
    for (phase, terminal) in [
        ("Pending", false),
        ("Running", false),
        ("Succeeded", true),
        ("Failed", true),
    ] {
        let Object::Pod(p) = ok(&format!(
            "{{apiVersion: v1, kind: Pod, metadata: {{name: p}}, status: {{phase: {phase}}}}}"
        )) else {
            panic!()
        };
        assert_eq!(p.terminal, terminal, "{phase}");
        assert_eq!(p.ready, !terminal, "{phase}");
    }
}

#[test]
fn pod_errors_name_their_field() {
    let e = err(
        "{apiVersion: v1, kind: Pod, metadata: {name: p, namespace: shop}, status: {podIPs: [{ip: 198.18.0.1}, {ip: nope}]}}",
    );
    assert_eq!(
        (e.kind.as_str(), e.namespace.as_str(), e.name.as_str()),
        ("Pod", "shop", "p")
    );
    assert_eq!(e.field, "status.podIPs[1].ip");
    assert!(e.problem.contains("nope"), "{e}");

    let e =
        err("{apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {hostNetwork: yes please}}");
    assert_eq!(e.field, "spec.hostNetwork");
    assert_eq!(e.namespace, "default");

    let e = err(
        "{apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {containers: [{name: a, ports: [{containerPort: 0}]}]}}",
    );
    assert_eq!(e.field, "spec.containers[0].ports[0].containerPort");
    assert!(e.problem.contains("1-65535"), "{e}");

    let e = err("{apiVersion: v1, kind: Pod, metadata: {labels: {a: b}}}");
    assert_eq!(e.field, "metadata.name");
    assert_eq!(e.problem, "required");

    let e = err("{apiVersion: v1, kind: Pod, metadata: {name: Web_1}}");
    assert_eq!(e.field, "metadata.name");
    assert_eq!(e.name, "Web_1");

    let e = err("{apiVersion: v1, kind: Pod, metadata: {name: p, namespace: Shop}}");
    assert_eq!(e.field, "metadata.namespace");

    let e = err(
        "{apiVersion: v1, kind: Pod, metadata: {name: p, labels: {app.kubernetes.io/name: [x]}}}",
    );
    assert_eq!(e.field, r#"metadata.labels["app.kubernetes.io/name"]"#);
}

#[test]
fn service_is_reduced() {
    let Object::Service(svc) = ok("
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 198.19.0.10
  ports:
  - {name: http, port: 80, targetPort: http, appProtocol: http}
  - {port: 443, targetPort: 8443, protocol: TCP}
  - {port: 53, protocol: UDP}
")
    else {
        panic!()
    };
    assert_eq!(svc.cluster_ips, vec![ip("198.19.0.10")]);
    assert_eq!(svc.selector.unwrap()["app"], "web");
    assert_eq!(svc.ports[0].target_port, TargetPort::Name("http".into()));
    assert_eq!(svc.ports[0].app_protocol.as_deref(), Some("http"));
    assert_eq!(svc.ports[1].target_port, TargetPort::Number(8443));
    assert_eq!(svc.ports[1].protocol, "TCP");
    assert_eq!(svc.ports[2].target_port, TargetPort::Number(53));
    assert_eq!(svc.ports[2].protocol, "UDP");
}

#[test]
fn headless_and_dual_stack_services() {
    let Object::Service(headless) = ok(
        "{apiVersion: v1, kind: Service, metadata: {name: db}, spec: {clusterIP: None, selector: {}}}",
    ) else {
        panic!()
    };
    assert!(headless.cluster_ips.is_empty());
    assert_eq!(headless.selector, None);
    let Object::Service(dual) = ok(
        "{apiVersion: v1, kind: Service, metadata: {name: db}, spec: {clusterIP: 198.19.0.1, clusterIPs: [198.19.0.1, 'fd00::1']}}",
    ) else {
        panic!()
    };
    assert_eq!(dual.cluster_ips, vec![ip("198.19.0.1"), ip("fd00::1")]);
}

#[test]
fn service_errors_name_their_field() {
    let e = err(
        "{apiVersion: v1, kind: Service, metadata: {name: web}, spec: {ports: [{port: 80}, {port: 70000}]}}",
    );
    assert_eq!(e.field, "spec.ports[1].port");
    assert!(e.problem.contains("70000"));
    let e = err(
        "{apiVersion: v1, kind: Service, metadata: {name: web}, spec: {ports: [{port: 80, targetPort: 0}]}}",
    );
    assert_eq!(e.field, "spec.ports[0].targetPort");
    let e = err(
        "{apiVersion: v1, kind: Service, metadata: {name: web}, spec: {clusterIPs: [198.19.0.1, bogus]}}",
    );
    assert_eq!(e.field, "spec.clusterIPs[1]");
    let e =
        err("{apiVersion: v1, kind: Service, metadata: {name: web}, spec: {ports: [{name: x}]}}");
    assert_eq!(e.field, "spec.ports[0].port");
    let e = err("{apiVersion: v1, kind: Service, metadata: {name: web.shop}}");
    assert_eq!(e.field, "metadata.name");
}

#[test]
fn endpoint_slice_is_reduced() {
    let Object::EndpointSlice(slice) = ok("
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: [198.18.0.5]
  conditions: {ready: false}
  nodeName: node-a
  targetRef: {kind: Pod, name: web-1, namespace: shop}
- addresses: [198.18.0.6]
ports: [{name: http, port: 8080, protocol: TCP}]
")
    else {
        panic!()
    };
    assert_eq!(slice.service_name, "web");
    assert_eq!(slice.endpoints.len(), 2);
    assert!(!slice.endpoints[0].ready);
    assert_eq!(slice.endpoints[0].pod_name.as_deref(), Some("web-1"));
    assert_eq!(slice.endpoints[0].node_name.as_deref(), Some("node-a"));
    assert!(slice.endpoints[1].ready);
    assert_eq!(slice.endpoints[1].addresses, vec![ip("198.18.0.6")]);
    assert_eq!(slice.ports[0].port, 8080);
}

#[test]
fn endpoint_slice_errors_name_their_field() {
    let e = err(
        "{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: s}, addressType: IPv4}",
    );
    assert_eq!(e.field, r#"metadata.labels["kubernetes.io/service-name"]"#);
    let e = err("
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.1]}, {addresses: [198.18.0.2, 198.18.0.300]}]
");
    assert_eq!(e.field, "endpoints[1].addresses[1]");
    let e = err(
        "{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: s, labels: {kubernetes.io/service-name: web}}, addressType: IPv4, ports: [{port: 99999}]}",
    );
    assert_eq!(e.field, "ports[0].port");
    let e = err("{apiVersion: discovery.k8s.io/v1beta1, kind: EndpointSlice, metadata: {name: s}}");
    assert_eq!(e.field, "apiVersion");
}

#[test]
fn gateway_is_reduced() {
    let Object::Gateway(gw) = ok("
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: shop
  labels: {istio.io/waypoint-for: service}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - {name: mesh, port: 15008, protocol: HBONE}
  addresses: [{value: 198.19.0.20}, {type: Hostname, value: waypoint.shop}]
")
    else {
        panic!()
    };
    assert_eq!(gw.class_name, "istio-waypoint");
    assert_eq!(gw.listeners.len(), 1);
    assert_eq!(
        (gw.listeners[0].name.as_str(), gw.listeners[0].port),
        ("mesh", 15008)
    );
    assert_eq!(gw.listeners[0].protocol, "HBONE");
    assert_eq!(gw.addresses, vec![ip("198.19.0.20")]);
    // The older served version reads the same.
    ok(
        "{apiVersion: gateway.networking.k8s.io/v1beta1, kind: Gateway, metadata: {name: w}, spec: {gatewayClassName: c, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}}",
    );
}

#[test]
fn gateway_errors_name_their_field() {
    let base = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: w, namespace: shop}\n";
    let e = err(&format!(
        "{base}spec: {{gatewayClassName: c, listeners: [{{name: mesh, port: 0, protocol: HBONE}}]}}"
    ));
    assert_eq!(e.field, "spec.listeners[0].port");
    let e = err(&format!(
        "{base}spec: {{gatewayClassName: c, listeners: [{{name: mesh, port: 15008}}]}}"
    ));
    assert_eq!(e.field, "spec.listeners[0].protocol");
    assert!(e.problem.contains("missing"), "{e}");
    let e = err(&format!(
        "{base}spec: {{listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}"
    ));
    assert_eq!(e.field, "spec.gatewayClassName");
    let e = err(&format!(
        "{base}spec: {{gatewayClassName: c, listeners: []}}"
    ));
    assert_eq!(e.field, "spec.listeners");
    let e = err(base);
    assert_eq!(e.field, "spec");
    assert_eq!(
        (e.kind.as_str(), e.namespace.as_str(), e.name.as_str()),
        ("Gateway", "shop", "w")
    );
}

#[test]
fn http_route_is_reduced() {
    let Object::HttpRoute(route) = ok("
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}]
  rules:
  - backendRefs: [{name: web-v1, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]
")
    else {
        panic!()
    };
    assert_eq!(route.parent_refs[0].name, "web");
    assert_eq!(route.parent_refs[0].kind.as_deref(), Some("Service"));
    assert_eq!(route.parent_refs[0].port, Some(80));
    assert_eq!(route.rules[0]["backendRefs"][1]["weight"], 10);

    let e = err(
        "{apiVersion: gateway.networking.k8s.io/v1, kind: HTTPRoute, metadata: {name: r}, spec: {parentRefs: [{kind: Service}]}}",
    );
    assert_eq!(e.field, "spec.parentRefs[0].name");
    let e = err(
        "{apiVersion: gateway.networking.k8s.io/v1, kind: HTTPRoute, metadata: {name: r}, spec: {parentRefs: [{name: a, port: 70000}]}}",
    );
    assert_eq!(e.field, "spec.parentRefs[0].port");
    // A parentRef names a Gateway (the default), a Service or a ServiceEntry.
    let e = err(
        "{apiVersion: gateway.networking.k8s.io/v1, kind: HTTPRoute, metadata: {name: r}, spec: {parentRefs: [{name: a}, {kind: Deployment, name: b}]}}",
    );
    assert_eq!(e.field, "spec.parentRefs[1].kind");
    let e = err(
        "{apiVersion: gateway.networking.k8s.io/v1, kind: HTTPRoute, metadata: {name: r}, spec: {rules: {}}}",
    );
    assert_eq!(e.field, "spec.rules");
}

#[test]
fn destination_rule_is_reduced() {
    for version in ["v1", "v1beta1", "v1alpha3"] {
        let Object::DestinationRule(dr) = ok(&format!(
            "{{apiVersion: networking.istio.io/{version}, kind: DestinationRule, metadata: {{name: web}},
              spec: {{host: web.shop.svc.cluster.local, trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: 10}}}}}}}}}}"
        )) else {
            panic!()
        };
        assert_eq!(dr.host, "web.shop.svc.cluster.local");
        assert_eq!(
            dr.traffic_policy["connectionPool"]["tcp"]["maxConnections"],
            10
        );
    }
    let e = err(
        "{apiVersion: networking.istio.io/v1, kind: DestinationRule, metadata: {name: web}, spec: {trafficPolicy: {}}}",
    );
    assert_eq!(e.field, "spec.host");
    let e = err(
        "{apiVersion: networking.istio.io/v1, kind: DestinationRule, metadata: {name: web}, spec: {host: ''}}",
    );
    assert_eq!(e.field, "spec.host");
}

#[test]
fn dispatch_errors() {
    let e = from_json(yaml("[1, 2]")).unwrap_err();
    assert_eq!((e.kind.as_str(), e.field.as_str()), ("?", "."));
    let e = err("{apiVersion: v1, metadata: {name: x}}");
    assert_eq!(e.field, "kind");
    let e = err("{apiVersion: apps/v1, kind: Deployment, metadata: {name: web, namespace: shop}}");
    assert_eq!(
        (e.kind.as_str(), e.namespace.as_str(), e.name.as_str()),
        ("Deployment", "shop", "web")
    );
    assert_eq!(e.field, "kind");
    assert!(e.problem.contains("Deployment"));
    let e =
        err("{apiVersion: security.istio.io/v2, kind: AuthorizationPolicy, metadata: {name: p}}");
    assert_eq!(e.field, "apiVersion");
    assert_eq!(e.kind, "AuthorizationPolicy");
    let e = err("{kind: Pod, metadata: {name: p}}");
    assert_eq!(e.field, "apiVersion");
    let e = err("{apiVersion: v1, kind: Pod, metadata: [oops]}");
    assert_eq!(e.field, "metadata");
    assert_eq!(e.name, "");
    // The display names the object and the field.
    let e = err(
        "{apiVersion: v1, kind: Service, metadata: {name: web, namespace: shop}, spec: {ports: [{port: -1}]}}",
    );
    assert_eq!(
        e.to_string(),
        "Service shop/web: field spec.ports[0].port: port -1 is out of range 1-65535"
    );
}

#[test]
fn policy_action_defaults_to_allow() {
    let Object::AuthorizationPolicy(p) = ok(
        "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: deny-all, namespace: shop}}",
    ) else {
        panic!()
    };
    assert_eq!(p.spec.action, PolicyAction::Allow);
    assert!(p.spec.rules.is_empty());
}
