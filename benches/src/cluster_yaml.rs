//! A generated cluster as a directory of Kubernetes YAML, for the `control_plane`
//! scenario: namespaces enrolled in the mesh, services with 10 pods each spread
//! over the nodes, selector-scoped AuthorizationPolicies, the node tokens, and the
//! single changes the scenario times (one pod added, one policy rewritten).
//!
//! Addresses come from 198.18.0.0/15 only: pods from 198.18.0.0/16, service VIPs
//! from 198.19.0.0/16.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use ambit_proto::{AUTHORIZATION_TYPE_URL, WORKLOAD_TYPE_URL};
use serde_json::{Value, json};

/// The size of the generated cluster. Pods are 10 per service, spread so each
/// node runs 10 when there are as many services as nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scale {
    pub nodes: usize,
    pub services: usize,
    pub policies: usize,
    pub namespaces: usize,
}

impl Scale {
    pub const PODS_PER_SERVICE: usize = 10;

    /// The scenario: 1,000 nodes, 10,000 pods, 1,000 services, 200 policies.
    pub const FULL: Scale = Scale {
        nodes: 1000,
        services: 1000,
        policies: 200,
        namespaces: 100,
    };

    /// The smoke run.
    pub const QUICK: Scale = Scale {
        nodes: 50,
        services: 50,
        policies: 10,
        namespaces: 5,
    };

    pub fn pods(&self) -> usize {
        self.services * Self::PODS_PER_SERVICE
    }

    /// Resources istiod-lite serves for this cluster, in
    /// [`crate::xds_load::TYPE_URLS`] order: one workload per pod (all enrolled),
    /// one service per Service, one authorization per policy.
    pub fn expected(&self) -> [usize; 3] {
        [self.pods(), self.services, self.policies]
    }

    fn namespace_of_service(&self, svc: usize) -> String {
        format!("ns-{:03}", svc % self.namespaces)
    }

    /// The service policy `p` selects.
    fn service_of_policy(&self, p: usize) -> usize {
        p * self.services / self.policies.max(1)
    }
}

/// One change to the config directory, and the resources every client must
/// receive because of it: `(type URL, name)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// File name inside the config directory.
    pub file: String,
    pub text: String,
    pub watched: Vec<(&'static str, String)>,
}

/// Writes the config directory (one file per namespace with its Namespace,
/// Services and Pods; one file per policy) and `root/node-tokens`; returns each
/// node's `(id, token)`.
pub fn write_cluster(
    root: &Path,
    config: &Path,
    scale: Scale,
) -> io::Result<Vec<(String, String)>> {
    std::fs::create_dir_all(config)?;
    let mut per_ns: Vec<Vec<Value>> = (0..scale.namespaces)
        .map(|n| {
            vec![json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": format!("ns-{n:03}"),
                    "labels": {"istio.io/dataplane-mode": "ambient"},
                },
            })]
        })
        .collect();
    for svc in 0..scale.services {
        let ns = scale.namespace_of_service(svc);
        let docs = &mut per_ns[svc % scale.namespaces];
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": format!("svc-{svc}"), "namespace": ns},
            "spec": {
                "clusterIP": service_ip(svc),
                "selector": {"app": format!("svc-{svc}")},
                "ports": [{"name": "tcp", "port": 80, "targetPort": 8080}],
            },
        }));
        for k in 0..Scale::PODS_PER_SERVICE {
            let i = svc * Scale::PODS_PER_SERVICE + k;
            let node = i % scale.nodes + 1;
            docs.push(pod(
                &ns,
                &format!("svc-{svc}-{k}"),
                svc,
                node,
                &pod_ip(i),
                i,
            ));
        }
    }
    for (n, docs) in per_ns.iter().enumerate() {
        let text: Vec<String> = docs.iter().map(Value::to_string).collect();
        write_atomic(
            &config.join(format!("ns-{n:03}.yaml")),
            &text.join("\n---\n"),
        )?;
    }
    for p in 0..scale.policies {
        let text = policy(scale, p, None).to_string();
        write_atomic(&config.join(format!("policy-{p:03}.yaml")), &text)?;
    }
    let tokens: Vec<(String, String)> = (1..=scale.nodes)
        .map(|n| {
            (
                format!("node-{n}"),
                format!("bench-{n:04}-{}", std::process::id()),
            )
        })
        .collect();
    let mut lines = String::from("# node token\n");
    for (node, token) in &tokens {
        let _ = writeln!(lines, "{node} {token}");
    }
    std::fs::write(root.join("node-tokens"), lines)?;
    Ok(tokens)
}

/// Change `rep` of the pod kind: a new file with one pod backing an existing
/// service. Only its workload changes: service membership travels in the
/// workload (its `services` entry), as in Istio's ztunnel, not in the Service.
pub fn added_pod(scale: Scale, rep: usize) -> Change {
    let svc = (rep * 37 + 11) % scale.services;
    let ns = scale.namespace_of_service(svc);
    let uid = scale.pods() + rep;
    // Above every generated pod's address (10,000 pods end at 198.18.39.16).
    let ip = format!("198.18.250.{}", rep % 250 + 1);
    let doc = pod(
        &ns,
        &format!("added-{rep}"),
        svc,
        rep % scale.nodes + 1,
        &ip,
        uid,
    );
    Change {
        file: format!("added-{rep}.yaml"),
        text: doc.to_string(),
        watched: vec![(WORKLOAD_TYPE_URL, pod_uid(uid))],
    }
}

/// Change `rep` of the policy kind: one policy file rewritten with one more
/// principal.
pub fn changed_policy(scale: Scale, rep: usize) -> Change {
    let p = (rep * 13 + 3) % scale.policies;
    let ns = scale.namespace_of_service(scale.service_of_policy(p));
    let extra = format!("cluster.local/ns/{ns}/sa/changed-{rep}");
    Change {
        file: format!("policy-{p:03}.yaml"),
        text: policy(scale, p, Some(&extra)).to_string(),
        watched: vec![(AUTHORIZATION_TYPE_URL, format!("{ns}/policy-{p}"))],
    }
}

/// Write then rename: the directory source never reads half a file.
pub fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Pod `i`'s address: 198.18.0.1 upwards.
fn pod_ip(i: usize) -> String {
    format!("198.18.{}.{}", (i + 1) >> 8, (i + 1) & 0xff)
}

/// Service `svc`'s VIP: 198.19.0.1 upwards.
fn service_ip(svc: usize) -> String {
    format!("198.19.{}.{}", (svc + 1) >> 8, (svc + 1) & 0xff)
}

/// A uid shaped as Kubernetes's (36 characters), so resources have their real size.
fn pod_uid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

/// A running pod as a kubelet reports it, backing `svc-<svc>`.
fn pod(ns: &str, name: &str, svc: usize, node: usize, ip: &str, uid: usize) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": pod_uid(uid),
            "labels": {"app": format!("svc-{svc}"), "version": "v1"},
        },
        "spec": {
            "nodeName": format!("node-{node}"),
            "serviceAccountName": format!("sa-{svc}"),
            "containers": [{"name": "app", "image": "app", "ports": [{"containerPort": 8080}]}],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    })
}

/// Policy `p`: ALLOW three principals to ports 8080 and 9090 of one service's
/// pods; `extra` adds a principal.
fn policy(scale: Scale, p: usize, extra: Option<&str>) -> Value {
    let svc = scale.service_of_policy(p);
    let ns = scale.namespace_of_service(svc);
    let mut principals: Vec<String> = (1..=3)
        .map(|d| {
            let from = (svc + d * 7) % scale.services;
            let from_ns = scale.namespace_of_service(from);
            format!("cluster.local/ns/{from_ns}/sa/sa-{from}")
        })
        .collect();
    principals.extend(extra.map(str::to_string));
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": format!("policy-{p}"), "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": format!("svc-{svc}")}},
            "action": "ALLOW",
            "rules": [{
                "from": [{"source": {"principals": principals}}],
                "to": [{"operation": {"ports": ["8080", "9090"]}}],
            }],
        },
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::net::Ipv4Addr;

    use super::*;

    fn in_bench_range(ip: &str) -> bool {
        let ip: Ipv4Addr = ip.parse().unwrap();
        let [a, b, c, d] = ip.octets();
        // Inside 198.18.0.0/15, neither its network nor its broadcast address.
        a == 198 && (b == 18 || b == 19) && (b, c, d) != (18, 0, 0) && (b, c, d) != (19, 255, 255)
    }

    #[test]
    fn addresses_are_distinct_and_in_the_benchmark_range() {
        let scale = Scale::FULL;
        let mut seen = HashSet::new();
        let pods = (0..scale.pods()).map(pod_ip);
        let services = (0..scale.services).map(service_ip);
        let added = (0..20).map(|r| {
            let doc: Value = serde_json::from_str(&added_pod(scale, r).text).unwrap();
            doc["status"]["podIP"].as_str().unwrap().to_string()
        });
        for ip in pods.chain(services).chain(added) {
            assert!(in_bench_range(&ip), "{ip}");
            assert!(seen.insert(ip.clone()), "{ip} twice");
        }
    }

    #[test]
    fn every_service_has_ten_pods_and_every_node_ten() {
        let scale = Scale::FULL;
        let mut per_node = vec![0; scale.nodes];
        for i in 0..scale.pods() {
            per_node[i % scale.nodes] += 1;
        }
        assert!(per_node.iter().all(|n| *n == 10));
        assert_eq!(scale.expected(), [10_000, 1000, 200]);
    }

    #[test]
    fn writes_the_directory_and_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        let tokens = write_cluster(dir.path(), &config, Scale::QUICK).unwrap();
        assert_eq!(tokens.len(), 50);
        let files = std::fs::read_dir(&config).unwrap().count();
        assert_eq!(files, Scale::QUICK.namespaces + Scale::QUICK.policies);
        let ns = std::fs::read_to_string(config.join("ns-000.yaml")).unwrap();
        assert_eq!(ns.matches("\"kind\":\"Pod\"").count(), 100);
        let change = changed_policy(Scale::QUICK, 0);
        assert!(config.join(&change.file).is_file());
        assert!(change.text.contains("changed-0"));
    }
}
