//! Tests of PeerAuthentication translation: each scope and override, UNSET
//! inheritance, port-level modes, the oldest-wins rule and its reports. Besides
//! the resources' shape, each test asks whether plaintext to a pod and port is
//! refused, evaluating what was sent the way ztunnel does for the fields used.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ambit_proto::AUTHORIZATION_TYPE_URL;
use ambit_proto::security::{self as sec, string_match::MatchType};
use prost::Message;

use super::peer_auth::{GLOBAL_NAME, NAMESPACE_NAME, SELECTOR_PREFIX};
use super::tests::{labels, meta, namespace, pod, up_pod};
use super::*;
use crate::model::{MtlsMode, PeerAuthentication, Pod};

const ROOT: &str = "istio-system";

/// A PeerAuthentication; `selector` empty for a namespace (or mesh) policy.
fn pa(
    ns: &str,
    name: &str,
    selector: &[(&str, &str)],
    mode: MtlsMode,
    ports: &[(u16, MtlsMode)],
) -> PeerAuthentication {
    PeerAuthentication {
        meta: meta(ns, name, &[]),
        created: None,
        selector: (!selector.is_empty()).then(|| labels(selector)),
        mode,
        port_level: ports.iter().copied().collect(),
    }
}

fn up(p: PeerAuthentication) -> ObjectChange {
    ObjectChange::Upsert(Object::PeerAuthentication(p))
}

fn delete(ns: &str, name: &str) -> ObjectChange {
    ObjectChange::Delete(ObjectKey::new(Kind::PeerAuthentication, ns, name))
}

/// A translator and the authorizations it has sent, as ztunnel would hold them.
struct Mesh {
    t: Translator,
    sent: BTreeMap<String, sec::Authorization>,
}

impl Mesh {
    fn new() -> Self {
        Self {
            t: Translator::new(TranslateSettings::default()),
            sent: BTreeMap::new(),
        }
    }

    fn apply(&mut self, changes: Vec<ObjectChange>) -> Vec<String> {
        let mut names = Vec::new();
        for u in self.t.apply(changes) {
            if u.type_url != AUTHORIZATION_TYPE_URL {
                continue;
            }
            names.push(u.name.clone());
            match u.body {
                Some(body) => {
                    let a = sec::Authorization::decode(body).unwrap();
                    assert_eq!(u.name, format!("{}/{}", a.namespace, a.name));
                    self.sent.insert(u.name, a);
                }
                None => {
                    self.sent.remove(&u.name);
                }
            }
        }
        names
    }

    fn names(&self) -> Vec<&str> {
        self.sent.keys().map(String::as_str).collect()
    }

    fn get(&self, name: &str) -> &sec::Authorization {
        self.sent
            .get(name)
            .unwrap_or_else(|| panic!("{name} not sent: {:?}", self.names()))
    }

    /// Whether plaintext (no peer identity) to `pod` on `port` is refused.
    fn refused(&self, pod: &Pod, port: u16) -> bool {
        let ip = pod.ips[0];
        self.sent.values().any(|a| {
            let ns = &pod.meta.namespace;
            let applies = match sec::Scope::try_from(a.scope).unwrap() {
                sec::Scope::Global => a.namespace == ROOT,
                sec::Scope::Namespace => a.namespace == *ns,
                sec::Scope::WorkloadSelector => {
                    (a.namespace == *ns || a.namespace == ROOT)
                        && a.selector
                            .iter()
                            .all(|(k, v)| pod.meta.labels.get(k) == Some(v))
                }
            };
            applies
                && a.action == sec::Action::Deny as i32
                && a.rules.iter().any(|r| {
                    r.clauses
                        .iter()
                        .all(|c| c.matches.iter().any(|m| plaintext_matches(m, ip, port)))
                })
        })
    }
}

/// A match against a connection without identity; only the fields the
/// translation uses may be set.
fn plaintext_matches(m: &sec::Match, ip: IpAddr, port: u16) -> bool {
    assert!(m.principals.is_empty() && m.namespaces.is_empty() && m.source_ips.is_empty());
    let within = |b: &sec::IpBlock| {
        let bytes = match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        assert_eq!(b.length as usize, bytes.len() * 8, "host blocks only");
        b.address == bytes
    };
    let port = u32::from(port);
    !m.not_principals.is_empty()
        && !m.not_destination_ips.iter().any(within)
        && (m.destination_ports.is_empty() || m.destination_ports.contains(&port))
        && !m.not_destination_ports.contains(&port)
}

fn refuses_plaintext_everywhere(a: &sec::Authorization) {
    assert_eq!(a.action, sec::Action::Deny as i32);
    let m = &a.rules[0].clauses[0].matches[0];
    assert_eq!(m.not_principals.len(), 1);
    assert_eq!(
        m.not_principals[0].match_type,
        Some(MatchType::Presence(true))
    );
}

fn web(ns: &str, ip: &str) -> Pod {
    pod(ns, "web", ip, &[("app", "web")])
}

#[test]
fn mesh_strict_is_one_global_policy() {
    let mut mesh = Mesh::new();
    let shop = web("shop", "198.18.0.1");
    mesh.apply(vec![
        namespace("shop", &[]),
        up_pod(shop.clone()),
        up(pa(ROOT, "default", &[], MtlsMode::Strict, &[])),
    ]);
    let name = format!("{ROOT}/{GLOBAL_NAME}");
    assert_eq!(mesh.names(), [name.as_str()]);
    let global = mesh.get(&name);
    assert_eq!(global.scope, sec::Scope::Global as i32);
    refuses_plaintext_everywhere(global);
    assert!(
        global.rules[0].clauses[0].matches[0]
            .not_destination_ips
            .is_empty()
    );
    assert!(mesh.refused(&shop, 8080));
    assert_eq!(mesh.t.counts().2, 1);

    // Deleting the policy withdraws its authorization.
    assert_eq!(mesh.apply(vec![delete(ROOT, "default")]), [name]);
    assert!(mesh.sent.is_empty() && !mesh.refused(&shop, 8080));
}

#[test]
fn namespace_strict_covers_its_namespace_only() {
    let mut mesh = Mesh::new();
    let (shop, bank) = (web("shop", "198.18.0.1"), web("bank", "198.18.0.2"));
    mesh.apply(vec![
        up_pod(shop.clone()),
        up_pod(bank.clone()),
        up(pa("shop", "strict", &[], MtlsMode::Strict, &[])),
    ]);
    let name = format!("shop/{NAMESPACE_NAME}");
    assert_eq!(mesh.names(), [name.as_str()]);
    assert_eq!(mesh.get(&name).scope, sec::Scope::Namespace as i32);
    refuses_plaintext_everywhere(mesh.get(&name));
    assert!(mesh.refused(&shop, 8080));
    assert!(!mesh.refused(&bank, 8080));
}

#[test]
fn namespace_permissive_under_mesh_strict_is_left_out() {
    let mut mesh = Mesh::new();
    let (shop, bank) = (web("shop", "198.18.0.1"), web("bank", "198.18.0.2"));
    mesh.apply(vec![
        namespace(ROOT, &[]),
        namespace("shop", &[]),
        namespace("bank", &[]),
        up_pod(shop.clone()),
        up_pod(bank.clone()),
        up(pa(ROOT, "default", &[], MtlsMode::Strict, &[])),
        up(pa("shop", "open", &[], MtlsMode::Permissive, &[])),
    ]);
    let bank_policy = format!("bank/{NAMESPACE_NAME}");
    let root_policy = format!("{ROOT}/{NAMESPACE_NAME}");
    assert_eq!(mesh.names(), [bank_policy.as_str(), &root_policy]);
    assert!(!mesh.refused(&shop, 8080));
    assert!(mesh.refused(&bank, 8080));

    // A namespace created later is STRICT before its first pod arrives.
    mesh.apply(vec![namespace("late", &[])]);
    assert!(mesh.refused(&web("late", "198.18.0.3"), 8080));
    // Without the override, one GLOBAL policy again.
    mesh.apply(vec![delete("shop", "open")]);
    assert_eq!(mesh.names(), [format!("{ROOT}/{GLOBAL_NAME}")]);
    assert!(mesh.refused(&shop, 8080));
}

#[test]
fn selector_strict_covers_the_selected_workloads() {
    let mut mesh = Mesh::new();
    let web = web("shop", "198.18.0.1");
    let api = pod("shop", "api", "198.18.0.2", &[("app", "api")]);
    mesh.apply(vec![
        up_pod(web.clone()),
        up_pod(api.clone()),
        up(pa("shop", "web", &[("app", "web")], MtlsMode::Strict, &[])),
    ]);
    let name = format!("shop/{SELECTOR_PREFIX}web");
    assert_eq!(mesh.names(), [name.as_str()]);
    let a = mesh.get(&name);
    assert_eq!(a.scope, sec::Scope::WorkloadSelector as i32);
    assert_eq!(a.selector, [("app".to_string(), "web".to_string())].into());
    refuses_plaintext_everywhere(a);
    assert!(mesh.refused(&web, 8080));
    assert!(!mesh.refused(&api, 8080));
}

#[test]
fn selector_permissive_under_namespace_strict_is_left_out_by_address() {
    let mut mesh = Mesh::new();
    let web = web("shop", "198.18.0.1");
    let legacy = pod("shop", "legacy", "198.18.0.2", &[("app", "legacy")]);
    mesh.apply(vec![
        up_pod(web.clone()),
        up_pod(legacy.clone()),
        up(pa("shop", "strict", &[], MtlsMode::Strict, &[])),
        up(pa(
            "shop",
            "legacy",
            &[("app", "legacy")],
            MtlsMode::Permissive,
            &[],
        )),
    ]);
    assert_eq!(mesh.names(), [format!("shop/{NAMESPACE_NAME}")]);
    assert!(mesh.refused(&web, 8080));
    assert!(!mesh.refused(&legacy, 8080));

    // The legacy pod moves: the exception follows it, the old address is STRICT.
    let mut moved = legacy.clone();
    moved.ips = vec!["198.18.0.9".parse().unwrap()];
    let names = mesh.apply(vec![up_pod(moved.clone())]);
    assert_eq!(names, [format!("shop/{NAMESPACE_NAME}")]);
    assert!(!mesh.refused(&moved, 8080));
    assert!(mesh.refused(&legacy, 8080));
    // An unrelated pod change sends nothing new.
    let mut relabeled = web.clone();
    relabeled.meta.labels.insert("tier".into(), "front".into());
    assert!(mesh.apply(vec![up_pod(relabeled)]).is_empty());
}

#[test]
fn a_shared_address_stays_strict() {
    let mut mesh = Mesh::new();
    let web = web("shop", "198.18.0.1");
    // Terminating and new pod with the same address: refusing is the safe side.
    let legacy = pod("shop", "legacy", "198.18.0.1", &[("app", "legacy")]);
    mesh.apply(vec![
        up_pod(web.clone()),
        up_pod(legacy.clone()),
        up(pa(ROOT, "default", &[], MtlsMode::Strict, &[])),
        up(pa(
            "shop",
            "legacy",
            &[("app", "legacy")],
            MtlsMode::Permissive,
            &[],
        )),
    ]);
    assert!(mesh.refused(&web, 8080));
    assert!(mesh.refused(&legacy, 8080));
}

#[test]
fn unset_inherits_from_the_next_level() {
    let mut mesh = Mesh::new();
    let web = web("shop", "198.18.0.1");
    let api = pod("shop", "api", "198.18.0.2", &[("app", "api")]);
    mesh.apply(vec![
        up_pod(web.clone()),
        up_pod(api.clone()),
        up(pa(ROOT, "default", &[], MtlsMode::Strict, &[])),
        up(pa("shop", "unset", &[], MtlsMode::Unset, &[])),
        up(pa(
            "shop",
            "web",
            &[("app", "web")],
            MtlsMode::Unset,
            &[(8080, MtlsMode::Permissive), (9090, MtlsMode::Unset)],
        )),
    ]);
    // The namespace inherits STRICT: one GLOBAL policy, web's port 8080 left out.
    assert_eq!(
        mesh.names(),
        [
            format!("{ROOT}/{GLOBAL_NAME}"),
            format!("shop/{SELECTOR_PREFIX}web")
        ]
    );
    assert!(mesh.refused(&api, 8080));
    assert!(!mesh.refused(&web, 8080));
    assert!(mesh.refused(&web, 9090));
    assert!(mesh.refused(&web, 15000));

    // A mesh-wide UNSET is PERMISSIVE.
    mesh.apply(vec![up(pa(ROOT, "default", &[], MtlsMode::Unset, &[]))]);
    assert!(!mesh.refused(&api, 8080) && !mesh.refused(&web, 9090));
}

#[test]
fn port_level_strict_under_permissive() {
    let mut mesh = Mesh::new();
    let web = web("shop", "198.18.0.1");
    mesh.apply(vec![
        up_pod(web.clone()),
        up(pa(
            "shop",
            "web",
            &[("app", "web")],
            MtlsMode::Permissive,
            &[(9090, MtlsMode::Strict)],
        )),
    ]);
    let a = mesh.get(&format!("shop/{SELECTOR_PREFIX}web"));
    assert_eq!(a.rules[0].clauses[0].matches[0].destination_ports, [9090]);
    assert!(mesh.refused(&web, 9090));
    assert!(!mesh.refused(&web, 8080));
}

#[test]
fn port_level_disable_keeps_an_inherited_strict_as_in_istio() {
    let mut mesh = Mesh::new();
    let web = web("shop", "198.18.0.1");
    let api = pod("shop", "api", "198.18.0.2", &[("app", "api")]);
    mesh.apply(vec![
        up_pod(web.clone()),
        up_pod(api.clone()),
        up(pa(ROOT, "default", &[], MtlsMode::Strict, &[])),
        up(pa(
            "shop",
            "web",
            &[("app", "web")],
            MtlsMode::Unset,
            &[(8080, MtlsMode::Disable), (9090, MtlsMode::Permissive)],
        )),
        up(pa(
            "shop",
            "api",
            &[("app", "api")],
            MtlsMode::Strict,
            &[(8080, MtlsMode::Disable)],
        )),
    ]);
    assert!(
        mesh.refused(&web, 8080),
        "DISABLE under an inherited STRICT"
    );
    assert!(!mesh.refused(&web, 9090));
    assert!(
        !mesh.refused(&api, 8080),
        "DISABLE under an explicit STRICT"
    );
    let reports = mesh.t.reports();
    let about = |name: &str| {
        let r = reports.iter().find(|r| r.error.name == name).unwrap();
        assert_eq!(r.error.field, "spec.portLevelMtls.8080.mode");
        r.error.problem.clone()
    };
    assert!(about("web").contains("inherited"), "{reports:?}");
    assert!(
        about("api").contains("treated as PERMISSIVE"),
        "{reports:?}"
    );
}

#[test]
fn the_oldest_policy_decides_and_the_others_are_reported() {
    let mut mesh = Mesh::new();
    let web = web("shop", "198.18.0.1");
    let mut old = pa(
        "shop",
        "zz-old",
        &[("app", "web")],
        MtlsMode::Permissive,
        &[],
    );
    old.created = Some(100);
    let mut new = pa("shop", "aa-new", &[("app", "web")], MtlsMode::Strict, &[]);
    new.created = Some(200);
    let mut ns_old = pa("shop", "ns-b", &[], MtlsMode::Permissive, &[]);
    ns_old.created = Some(100);
    let mut ns_new = pa("shop", "ns-a", &[], MtlsMode::Strict, &[]);
    ns_new.created = Some(200);
    mesh.apply(vec![
        up_pod(web.clone()),
        up(old),
        up(new),
        up(ns_old),
        up(ns_new),
    ]);
    // aa-new's policy is sent for other pods it may select, without web.
    assert!(!mesh.refused(&web, 8080));
    let other = pod("shop", "web-2", "198.18.0.2", &[("app", "web"), ("v", "2")]);
    assert!(mesh.refused(&other, 8080), "a new pod gets the STRICT side");
    let reports = mesh.t.reports();
    let about = |name: &str| reports.iter().filter(|r| r.error.name == name).count();
    assert_eq!(
        (
            about("aa-new"),
            about("ns-a"),
            about("zz-old"),
            about("ns-b")
        ),
        (1, 1, 0, 0)
    );
    assert!(
        reports.iter().any(|r| r.error.problem.contains("web")),
        "{reports:?}"
    );
}

#[test]
fn disable_is_permissive_and_reported() {
    let mut mesh = Mesh::new();
    let web = web("shop", "198.18.0.1");
    mesh.apply(vec![
        up_pod(web.clone()),
        up(pa(ROOT, "default", &[], MtlsMode::Strict, &[])),
        up(pa("shop", "web", &[("app", "web")], MtlsMode::Disable, &[])),
    ]);
    assert!(!mesh.refused(&web, 8080));
    let reports = mesh.t.reports();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].error.field, "spec.mtls.mode");
    assert!(reports[0].error.problem.contains("PERMISSIVE"));
    // Fixing it clears the report.
    mesh.apply(vec![up(pa(
        "shop",
        "web",
        &[("app", "web")],
        MtlsMode::Strict,
        &[],
    ))]);
    assert!(mesh.t.reports().is_empty());
}

#[test]
fn a_selector_in_the_root_namespace_is_ignored_and_reported() {
    let mut mesh = Mesh::new();
    let web = web("shop", "198.18.0.1");
    mesh.apply(vec![
        up_pod(web.clone()),
        up(pa(ROOT, "web", &[("app", "web")], MtlsMode::Strict, &[])),
    ]);
    assert!(mesh.sent.is_empty());
    let reports = mesh.t.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].error.field, "spec.selector");
    // Deleting it clears its report, though it never sent anything.
    mesh.apply(vec![delete(ROOT, "web")]);
    assert!(mesh.t.reports().is_empty(), "{:?}", mesh.t.reports());
}

#[test]
fn names_cannot_clash_with_authorization_policies() {
    for name in [GLOBAL_NAME, NAMESPACE_NAME, SELECTOR_PREFIX] {
        assert!(name.contains('_'), "{name} could be a Kubernetes name");
    }
}
