//! Istio's `PeerAuthentication` to the `Authorization` DENY policies ztunnel
//! enforces: plaintext (a connection without a peer identity) to a workload and
//! port whose effective mode is STRICT matches a rule `notPrincipals: ["*"]`.
//!
//! The effective mode follows Istio's `ComposePeerAuthentication`: the oldest
//! (creationTimestamp, then name) selector policy of the workload's namespace
//! that selects it, else the oldest namespace policy, else the oldest mesh policy
//! (root namespace, no selector), else PERMISSIVE; UNSET inherits the next level,
//! a port-level mode overrides its workload's mode on that port. A selector
//! policy in the root namespace applies to nothing, as in Istio.
//!
//! ztunnel's scopes cannot say "except these namespaces / workloads", so:
//! - mesh STRICT with every namespace STRICT: one GLOBAL policy; otherwise one
//!   NAMESPACE policy in each STRICT namespace known (from Namespaces, pods and
//!   policies), so a namespace that overrides to PERMISSIVE gets none;
//! - a workload whose mode differs from its namespace's is left out of the
//!   GLOBAL / NAMESPACE rule by its pod addresses (`notDestinationIps`), and its
//!   selector policy gets a WORKLOAD_SELECTOR policy with what it makes STRICT,
//!   leaving out (by address) the pods an older selector policy decides for.
//!
//! Every address left out is one whose pods all need leaving out: a pod not yet
//! known, or an address shared with a pod that stays STRICT, gets the broader
//! policy, so a race errs toward refusing plaintext, never toward accepting it.
//! DISABLE is PERMISSIVE in ambient (reported), except at port level under an
//! UNSET workload mode, where it keeps the inherited mode (as Istio). The result
//! depends on pods, so it is recomputed whole when a pod, namespace or
//! PeerAuthentication changes while PeerAuthentications exist.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ambit_proto::security as pb;

use ambit_proto::AUTHORIZATION_TYPE_URL;

use super::authz::{Problem, string_match};
use super::index::Store;
use super::service::{ip_bytes, selects};
use super::{TranslateSettings, Translator, encode, removal};
use crate::model::{Kind, MtlsMode, Object, ObjectKey, PeerAuthentication, Pod};
use crate::xds::ResourceUpdate;

/// The GLOBAL policy of a mesh-wide STRICT (Istio's name). Names with `_` cannot
/// be Kubernetes object names, so none clashes with an AuthorizationPolicy.
pub(super) const GLOBAL_NAME: &str = "istio_converted_static_strict";
/// The NAMESPACE policy of a STRICT namespace.
pub(super) const NAMESPACE_NAME: &str = "istio_converted_namespace_strict";
/// Prefix of a selector policy's WORKLOAD_SELECTOR policy.
pub(super) const SELECTOR_PREFIX: &str = "istio_converted_peer_authentication_";

/// The translation of every PeerAuthentication.
#[derive(Debug, Default)]
pub(super) struct Converted {
    /// By resource name `<namespace>/<name>`.
    pub authorizations: BTreeMap<String, pb::Authorization>,
    pub problems: BTreeMap<ObjectKey, Vec<Problem>>,
}

/// What a workload accepts: plaintext refused on every port (`strict`) or on
/// none, except on `except`, where it is the other way round.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Profile {
    strict: bool,
    except: BTreeSet<u16>,
}

impl Profile {
    fn uniform(strict: bool) -> Self {
        Self {
            strict,
            except: BTreeSet::new(),
        }
    }

    /// A selector policy's profile in a namespace whose mode is `parent`. Under
    /// an inherited mode (UNSET) a port-level DISABLE keeps that mode, as in
    /// Istio's ambient controller: there only PERMISSIVE makes a port accept
    /// plaintext that an inherited STRICT refuses.
    fn of(pa: &PeerAuthentication, parent: MtlsMode) -> Self {
        let base = pa.mode.or(parent);
        let strict = base.is_strict();
        let inherits = pa.mode == MtlsMode::Unset;
        let except = pa
            .port_level
            .iter()
            .filter(|(_, mode)| !(inherits && **mode == MtlsMode::Disable))
            .filter(|(_, mode)| mode.or(base).is_strict() != strict)
            .map(|(port, _)| *port)
            .collect();
        Self { strict, except }
    }

    fn refuses_any(&self) -> bool {
        self.strict || !self.except.is_empty()
    }
}

/// Oldest first: creationTimestamp (unset counts as oldest), then name.
fn age(pa: &PeerAuthentication) -> (Option<i64>, &str) {
    (pa.created, pa.meta.name.as_str())
}

/// Translates every PeerAuthentication of `store`; see the module doc.
pub(super) fn build(settings: &TranslateSettings, store: &Store) -> Converted {
    let root = settings.root_namespace.as_str();
    let mut out = Converted::default();
    let mut policies: Vec<&PeerAuthentication> = store
        .of_kind(Kind::PeerAuthentication)
        .filter_map(|o| match o {
            Object::PeerAuthentication(pa) => Some(pa),
            _ => None,
        })
        .collect();
    policies.sort_by(|a, b| age(a).cmp(&age(b)));
    let pods: Vec<&Pod> = store
        .of_kind(Kind::Pod)
        .filter_map(|o| match o {
            Object::Pod(p) if p.captured() => Some(p),
            _ => None,
        })
        .collect();

    // Resolve the mesh and namespace levels; the oldest of each decides.
    let mut mesh = MtlsMode::Permissive;
    let mut namespace_policy: BTreeMap<&str, &PeerAuthentication> = BTreeMap::new();
    let mut selectors: BTreeMap<&str, Vec<&PeerAuthentication>> = BTreeMap::new();
    let mut mesh_policy: Option<&PeerAuthentication> = None;
    for pa in &policies {
        let ns = pa.meta.namespace.as_str();
        report_disable(pa, &mut out.problems);
        let decided_by = match (&pa.selector, ns == root) {
            (Some(_), true) => {
                problem(
                    &mut out.problems,
                    pa,
                    "spec.selector",
                    "ignored: a policy with a selector in the root namespace applies to no \
                     workload (as in Istio); put it in the workloads' namespace"
                        .into(),
                );
                continue;
            }
            (Some(_), false) => {
                selectors.entry(ns).or_default().push(pa);
                continue;
            }
            (None, true) => mesh_policy.get_or_insert(pa),
            (None, false) => namespace_policy.entry(ns).or_insert(pa),
        };
        if decided_by.meta.name != pa.meta.name {
            let scope = if ns == root {
                "the mesh"
            } else {
                "this namespace"
            };
            let older = &decided_by.meta.name;
            problem(
                &mut out.problems,
                pa,
                "metadata.creationTimestamp",
                format!(
                    "ignored: the older PeerAuthentication {ns}/{older} decides for {scope} \
                 (Istio uses the oldest)"
                ),
            );
        }
    }
    if let Some(pa) = mesh_policy {
        mesh = pa.mode.or(mesh);
    }

    // Every namespace known, with its mode.
    let mut namespaces: BTreeMap<&str, MtlsMode> = BTreeMap::new();
    let known = store
        .of_kind(Kind::Namespace)
        .map(|o| o.meta().name.as_str())
        .chain(pods.iter().map(|p| p.meta.namespace.as_str()))
        .chain(policies.iter().map(|p| p.meta.namespace.as_str()));
    for ns in known {
        let mode = match namespace_policy.get(ns) {
            Some(pa) if ns != root => pa.mode.or(mesh),
            _ => mesh,
        };
        namespaces.insert(ns, mode);
    }
    let ns_profile =
        |ns: &str| Profile::uniform(namespaces.get(ns).copied().unwrap_or(mesh).is_strict());

    // Each pod's deciding selector policy and profile.
    let mut decided: Vec<(&Pod, Option<&PeerAuthentication>, Profile)> = Vec::new();
    let mut outvoted: BTreeMap<ObjectKey, Vec<String>> = BTreeMap::new();
    for pod in &pods {
        let ns = pod.meta.namespace.as_str();
        let parent = namespaces.get(ns).copied().unwrap_or(mesh);
        let mut matching = selectors
            .get(ns)
            .into_iter()
            .flatten()
            .copied()
            .filter(|pa| {
                pa.selector
                    .as_ref()
                    .is_some_and(|s| selects(s, &pod.meta.labels))
            });
        let winner = matching.next();
        for loser in matching {
            outvoted
                .entry(key(loser))
                .or_default()
                .push(pod.meta.name.clone());
        }
        let profile = winner.map_or_else(|| ns_profile(ns), |pa| Profile::of(pa, parent));
        decided.push((pod, winner, profile));
    }
    for (k, pods) in outvoted {
        let Some(Object::PeerAuthentication(pa)) = store.get(&k) else {
            continue;
        };
        problem(
            &mut out.problems,
            pa,
            "spec.selector",
            format!(
                "does not decide for {} pod(s) ({}) that an older PeerAuthentication also \
             selects (Istio uses the oldest)",
                pods.len(),
                pods.join(", ")
            ),
        );
    }

    // Mesh and namespace level.
    let deviates = |pod: &Pod, profile: &Profile| *profile != ns_profile(&pod.meta.namespace);
    let all_strict = mesh.is_strict() && namespaces.values().all(|m| m.is_strict());
    if all_strict {
        let excluded = addresses(&decided, |pod, _, p| Some(deviates(pod, p)));
        out.insert(strict_policy(
            GLOBAL_NAME,
            root,
            pb::Scope::Global,
            excluded,
        ));
    } else {
        for (ns, _) in namespaces.iter().filter(|(_, m)| m.is_strict()) {
            let excluded = addresses(&decided, |pod, _, p| {
                (pod.meta.namespace == *ns).then(|| deviates(pod, p))
            });
            out.insert(strict_policy(
                NAMESPACE_NAME,
                ns,
                pb::Scope::Namespace,
                excluded,
            ));
        }
    }

    // Selector level: the policies that make something STRICT their namespace does not.
    for (ns, list) in &selectors {
        let parent = namespaces.get(ns).copied().unwrap_or(mesh);
        for pa in list {
            let profile = Profile::of(pa, parent);
            if profile == ns_profile(ns) || !profile.refuses_any() {
                continue;
            }
            let Some(selector) = &pa.selector else {
                continue;
            };
            let excluded = addresses(&decided, |pod, winner, _| {
                let selected = pod.meta.namespace == *ns && selects(selector, &pod.meta.labels);
                selected.then(|| winner.is_some_and(|w| w.meta.name != pa.meta.name))
            });
            let mut m = refuse_plaintext(excluded);
            if profile.strict {
                m.not_destination_ports = profile.except.iter().map(|p| u32::from(*p)).collect();
            } else {
                m.destination_ports = profile.except.iter().map(|p| u32::from(*p)).collect();
            }
            out.insert(pb::Authorization {
                name: format!("{SELECTOR_PREFIX}{}", pa.meta.name),
                namespace: ns.to_string(),
                scope: pb::Scope::WorkloadSelector.into(),
                action: pb::Action::Deny.into(),
                rules: vec![rule(m)],
                dry_run: false,
                selector: selector
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            });
        }
    }
    out
}

impl Translator {
    /// Recomputes every PeerAuthentication's authorizations and reports; returns
    /// the resources that changed or went away. Nothing to build while there are
    /// no PeerAuthentications and nothing from them was sent, but the reports of
    /// deleted ones (which may have sent nothing) still go.
    pub(super) fn update_peer_authentications(&mut self) -> Vec<ResourceUpdate> {
        self.reports
            .retain(|k, _| k.kind != Kind::PeerAuthentication);
        let none = self
            .store
            .of_kind(Kind::PeerAuthentication)
            .next()
            .is_none();
        if none && self.peer_auth.is_empty() {
            return Vec::new();
        }
        let converted = build(&self.settings, &self.store);
        for (key, problems) in converted.problems {
            self.set_reports(key, problems);
        }
        let mut updates = Vec::new();
        let mut sent = std::mem::take(&mut self.peer_auth);
        for (name, authorization) in converted.authorizations {
            let body = encode::authorization(authorization);
            if sent.remove(&name).as_ref() != Some(&body) {
                updates.push(ResourceUpdate {
                    type_url: AUTHORIZATION_TYPE_URL,
                    name: name.clone(),
                    body: Some(body.clone()),
                });
            }
            self.peer_auth.insert(name, body);
        }
        updates.extend(
            sent.into_keys()
                .map(|name| removal(AUTHORIZATION_TYPE_URL, name)),
        );
        updates
    }
}

impl Converted {
    fn insert(&mut self, a: pb::Authorization) {
        self.authorizations
            .insert(format!("{}/{}", a.namespace, a.name), a);
    }
}

/// The addresses to leave out of a policy: `verdict` says, per pod, whether it is
/// in the policy's reach (`Some`) and whether to leave it out (`Some(true)`). An
/// address is left out only when every pod in reach holding it is.
fn addresses<'a>(
    decided: &[(&'a Pod, Option<&'a PeerAuthentication>, Profile)],
    verdict: impl Fn(&Pod, Option<&PeerAuthentication>, &Profile) -> Option<bool>,
) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    let mut keep = BTreeSet::new();
    for (pod, winner, profile) in decided {
        match verdict(pod, *winner, profile) {
            Some(true) => out.extend(pod.ips.iter().copied()),
            Some(false) => keep.extend(pod.ips.iter().copied()),
            None => {}
        }
    }
    out.retain(|ip| !keep.contains(ip));
    out
}

/// `notPrincipals: ["*"]`: the connection has no peer identity (plaintext).
fn refuse_plaintext(excluded: BTreeSet<IpAddr>) -> pb::Match {
    pb::Match {
        not_principals: vec![string_match("*")],
        not_destination_ips: excluded
            .iter()
            .map(|ip| pb::IpBlock {
                address: ip_bytes(ip),
                length: if ip.is_ipv4() { 32 } else { 128 },
            })
            .collect(),
        ..Default::default()
    }
}

fn rule(m: pb::Match) -> pb::Rule {
    pb::Rule {
        clauses: vec![pb::Clause { matches: vec![m] }],
    }
}

fn strict_policy(
    name: &str,
    namespace: &str,
    scope: pb::Scope,
    excluded: BTreeSet<IpAddr>,
) -> pb::Authorization {
    pb::Authorization {
        name: name.into(),
        namespace: namespace.into(),
        scope: scope.into(),
        action: pb::Action::Deny.into(),
        rules: vec![rule(refuse_plaintext(excluded))],
        dry_run: false,
        selector: Default::default(),
    }
}

fn key(pa: &PeerAuthentication) -> ObjectKey {
    ObjectKey::new(
        Kind::PeerAuthentication,
        pa.meta.namespace.clone(),
        pa.meta.name.clone(),
    )
}

fn problem(
    problems: &mut BTreeMap<ObjectKey, Vec<Problem>>,
    pa: &PeerAuthentication,
    field: &str,
    problem: String,
) {
    problems.entry(key(pa)).or_default().push(Problem {
        field: field.into(),
        problem,
    });
}

/// DISABLE is PERMISSIVE in ambient: say so where it is written.
fn report_disable(pa: &PeerAuthentication, problems: &mut BTreeMap<ObjectKey, Vec<Problem>>) {
    const WHY: &str = "DISABLE is treated as PERMISSIVE: in ambient, ztunnel accepts \
                       plaintext then and still sends mutual TLS between mesh workloads";
    if pa.mode == MtlsMode::Disable {
        problem(problems, pa, "spec.mtls.mode", WHY.into());
    }
    const INHERITED: &str = "DISABLE under an inherited mode (mtls.mode UNSET) keeps \
                             that mode on this port, as in Istio's ambient: an inherited \
                             STRICT still refuses plaintext; set PERMISSIVE to accept it";
    let why = if pa.mode == MtlsMode::Unset {
        INHERITED
    } else {
        WHY
    };
    for (port, mode) in &pa.port_level {
        if *mode == MtlsMode::Disable {
            problem(
                problems,
                pa,
                &format!("spec.portLevelMtls.{port}.mode"),
                why.into(),
            );
        }
    }
}
