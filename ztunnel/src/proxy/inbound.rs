//! Inbound HBONE (15008 inside the pod): the CONNECT must target an address of this
//! pod, pass L4 policy, and reach the pod's port from inside its namespace with the
//! caller's own address; then bytes are spliced both ways.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;

use mesh_core::SpiffeId;
use mesh_core::copy::{SpliceIo, copy_bidirectional};
use mesh_core::hbone::{
    ConnectHandler, InboundConnect, Refusal, RefusalKind, SourceMetadata, StatusCode,
};

use super::conn::{ConnGuard, ConnInfo};
use super::{Pod, PodNet, ProxyInputs};
use crate::metrics::ConnLabels;
use crate::policy::{Connection, Destination};
use crate::state::ProxyState;
use crate::why::{Refused, reason};

/// The reason a caller denied by policy is given (`ambit-reason`).
pub const POLICY_DENIAL_ON_WIRE: &str = "denied by the destination's authorization policy (the destination node's /debug/why says which)";

/// Decides each CONNECT reaching one pod.
#[derive(Debug)]
pub struct InboundHandler {
    pod: Pod,
    /// The pod's identity, whose certificate its listener presents.
    identity: SpiffeId,
    net: PodNet,
    inputs: Arc<ProxyInputs>,
    /// The pod's proxy listeners' ports, never a tunnel's target.
    own_ports: [u16; 3],
    /// One permit per tunnel open into the pod (`--max-connections`, as each of
    /// its listeners): the HBONE server's own bounds are per node, so many
    /// callers could otherwise hold many thousand sockets into one pod.
    tunnels: Arc<Semaphore>,
}

impl InboundHandler {
    pub fn new(
        pod: Pod,
        identity: SpiffeId,
        net: PodNet,
        inputs: Arc<ProxyInputs>,
        own_ports: [u16; 3],
    ) -> Self {
        let tunnels = Arc::new(Semaphore::new(inputs.config.max_connections as usize));
        Self {
            pod,
            identity,
            net,
            inputs,
            own_ports,
            tunnels,
        }
    }
}

impl ConnectHandler for InboundHandler {
    async fn before_handshake(&self) {
        self.inputs
            .await_certificate(&self.identity, super::CERTIFICATE_WAIT)
            .await;
    }

    async fn handle(&self, connect: InboundConnect) {
        let state = self.inputs.state.snapshot();
        let target = connect.target();
        let peer = connect.peer().clone();
        let src = SocketAddr::new(
            source_ip(&state, &peer, &connect),
            connect.peer_addr().port(),
        );
        let refuse = |connect: InboundConnect,
                      kind,
                      status,
                      reason: &'static str,
                      explanation: String,
                      policy: Option<(String, Option<usize>)>| {
            let (policy, rule) = policy.map_or((None, None), |(p, r)| (Some(p), r));
            self.inputs.refuse(Refused {
                at: Refused::now(),
                direction: "inbound",
                source: src.to_string(),
                source_identity: Some(peer.to_string()),
                destination: target.to_string(),
                destination_workload: Some(format!("{}/{}", self.pod.namespace, self.pod.name)),
                reason,
                policy,
                rule,
                explanation: explanation.clone(),
            });
            // Which policy and rule decided is for this node's why view, not for
            // the caller: it would map the destination's policies for whoever
            // is denied.
            let on_wire = if reason == reason::POLICY {
                POLICY_DENIAL_ON_WIRE.to_string()
            } else {
                explanation
            };
            connect.refuse(kind, Refusal::new(status, on_wire));
        };
        let Ok(_tunnel_slot) = self.tunnels.clone().try_acquire_owned() else {
            let why = format!(
                "pod {}/{} has {} tunnels open, the most it takes (--max-connections)",
                self.pod.namespace, self.pod.name, self.inputs.config.max_connections
            );
            return refuse(
                connect,
                RefusalKind::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                reason::OVERLOADED,
                why,
                None,
            );
        };
        let Some(workload) = state.workload(&self.pod.uid).cloned() else {
            let why = format!(
                "pod {}/{} ({}) is not in ztunnel's state",
                self.pod.namespace, self.pod.name, self.pod.uid
            );
            return refuse(
                connect,
                RefusalKind::Unknown,
                StatusCode::SERVICE_UNAVAILABLE,
                reason::UNKNOWN_DESTINATION,
                why,
                None,
            );
        };
        if let Some(why) = super::bad_destination(&workload, target, &self.own_ports) {
            return refuse(
                connect,
                RefusalKind::Unknown,
                StatusCode::BAD_REQUEST,
                reason::BAD_DESTINATION,
                why,
                None,
            );
        }
        let decision = state.policies().evaluate(
            &Destination {
                namespace: &workload.namespace,
                labels: &workload.labels,
            },
            &Connection {
                src_identity: Some(&peer),
                src_ip: src.ip(),
                dst_ip: target.ip(),
                dst_port: target.port(),
            },
        );
        for dry in &decision.dry_run {
            tracing::info!(src = %peer, dst = %target, "dry-run: {dry}");
        }
        if !decision.allowed {
            let policy = decision.policy.clone().map(|p| (p, decision.rule));
            return refuse(
                connect,
                RefusalKind::Denied,
                StatusCode::FORBIDDEN,
                reason::POLICY,
                decision.to_string(),
                policy,
            );
        }
        let mut upstream = match self
            .net
            .connect_within(
                target,
                self.net.spoof_source().then_some(src.ip()),
                self.inputs.hbone.connect_timeout,
            )
            .await
        {
            Ok(s) => s,
            Err(e) => {
                let why = format!(
                    "connect to {target} in pod {}/{}: {e}",
                    workload.namespace, workload.name
                );
                return refuse(
                    connect,
                    RefusalKind::Unavailable,
                    StatusCode::SERVICE_UNAVAILABLE,
                    reason::UPSTREAM_UNREACHABLE,
                    why,
                    None,
                );
            }
        };
        let meta = SourceMetadata::from_headers(connect.headers()).unwrap_or_default();
        let labels = labels(&state, &peer, src, &meta, &workload);
        let info = ConnInfo {
            direction: "inbound",
            source: src,
            destination: target,
            labels,
        };
        // Counted from here: the app has seen the connection.
        let mut guard =
            ConnGuard::open(info, self.inputs.metrics.clone(), self.inputs.conns.clone());
        let mut tunnel = match connect.accept() {
            Ok(t) => t,
            Err(e) => {
                // The caller went away while the app's connection opened.
                tracing::debug!(error = %e, "HBONE stream gone before its CONNECT was answered");
                upstream.abort();
                guard.set_end("error");
                return;
            }
        };
        let copied = copy_bidirectional(&mut tunnel, &mut upstream, guard.stats()).await;
        if let Err(e) = &copied {
            tracing::debug!(error = %e, "inbound connection ended with an error");
        }
        guard.spliced(&copied);
    }
}

/// The caller's address: the HBONE connection's source, or the `forwarded` address
/// when that is an address of a workload with the caller's verified identity (a
/// client ztunnel that could not dial from the pod's own address, e.g. SOCKS5).
fn source_ip(
    state: &ProxyState,
    peer: &mesh_core::SpiffeId,
    connect: &InboundConnect,
) -> std::net::IpAddr {
    let claimed = connect
        .headers()
        .get(mesh_core::hbone::FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| mesh_core::hbone::parse_forwarded_for(v).ok().flatten());
    claimed
        .filter(|ip| {
            state
                .workload_by_ip(*ip)
                .and_then(|w| w.identity().ok())
                .is_some_and(|id| &id == peer)
        })
        .unwrap_or_else(|| connect.peer_addr().ip())
}

fn labels(
    state: &ProxyState,
    peer: &mesh_core::SpiffeId,
    src: SocketAddr,
    meta: &SourceMetadata,
    dst: &crate::state::Workload,
) -> ConnLabels {
    // Label values come from ztunnel's state, never verbatim from the peer: a
    // name from the peer's baggage counts only if a workload of the peer's
    // identity has it, so a peer cannot mint a metric series per tunnel.
    let src_workload = state.workload_by_ip(src.ip()).or_else(|| {
        meta.workload
            .as_deref()
            .and_then(|name| state.workload_named(name, peer))
    });
    ConnLabels {
        reporter: "destination",
        source_workload: src_workload
            .map(|w| w.owner().to_string())
            .unwrap_or_default(),
        source_workload_namespace: peer.namespace().to_string(),
        source_principal: peer.to_string(),
        destination_workload: dst.owner().to_string(),
        destination_workload_namespace: dst.namespace.clone(),
        destination_principal: dst.identity().map(|i| i.to_string()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod label_tests {
    use std::collections::HashSet;

    use super::*;
    use crate::state::LocalState;

    const STATE: &str = r#"
workloads:
  - {uid: fe-1, name: frontend-1, namespace: shop, serviceAccount: frontend, addresses: ["198.18.1.2"]}
  - {uid: cart-1, name: cart-1, namespace: shop, serviceAccount: cart, addresses: ["198.18.1.3"]}
"#;

    #[test]
    fn remote_baggage_never_mints_a_source_workload_series() {
        let state = LocalState::parse(std::path::Path::new("s.yaml"), STATE)
            .unwrap()
            .into_state();
        let cart = state.workload("cart-1").unwrap().clone();
        let fe = mesh_core::testing::spiffe("shop", "frontend");
        // A source address that is no workload's: only the baggage names it.
        let src: SocketAddr = "198.18.9.9:40000".parse().unwrap();
        let source_workload = |claimed: String| {
            let meta = SourceMetadata {
                workload: Some(claimed),
                ..Default::default()
            };
            labels(&state, &fe, src, &meta, &cart).source_workload
        };
        let mut series = HashSet::new();
        for i in 0..2000 {
            series.insert(source_workload(format!("{i}-{}", "x".repeat(i % 4000))));
            series.insert(source_workload(format!("frontend-{i}")));
            series.insert(source_workload(format!(
                "Frontend-1{}",
                "\u{e9}".repeat(i % 3)
            )));
        }
        // 6000 distinct claims, two series: the peer's own workload (for the claim
        // "frontend-1") and the unknown one.
        assert_eq!(
            series,
            HashSet::from([String::new(), "frontend-1".to_string()])
        );
        // A claim that holds: a workload with the peer's identity has the name.
        assert_eq!(source_workload("frontend-1".into()), "frontend-1");
        // The name of a workload with another identity is not the peer's.
        assert_eq!(source_workload("cart-1".into()), "");
        // The source address wins over any claim.
        let known: SocketAddr = "198.18.1.2:40000".parse().unwrap();
        let meta = SourceMetadata {
            workload: Some("anything".into()),
            ..Default::default()
        };
        assert_eq!(
            labels(&state, &fe, known, &meta, &cart).source_workload,
            "frontend-1"
        );
    }

    /// With the owning workload known (istiod-lite's `workload_name`), both
    /// workload labels hold it, as Istio's: one series per Deployment, however
    /// many pods it runs; a baggage claim of it holds too.
    #[test]
    fn the_workload_labels_name_the_owner_not_the_pod() {
        let owned = STATE
            .replace(
                "frontend, addresses",
                "frontend, workloadName: frontend, addresses",
            )
            .replace("cart, addresses", "cart, workloadName: cart, addresses");
        let state = LocalState::parse(std::path::Path::new("s.yaml"), &owned)
            .unwrap()
            .into_state();
        let cart = state.workload("cart-1").unwrap().clone();
        let fe = mesh_core::testing::spiffe("shop", "frontend");
        let by_address: SocketAddr = "198.18.1.2:40000".parse().unwrap();
        let l = labels(&state, &fe, by_address, &SourceMetadata::default(), &cart);
        assert_eq!(
            (l.source_workload.as_str(), l.destination_workload.as_str()),
            ("frontend", "cart")
        );
        let claim = SourceMetadata {
            workload: Some("frontend".into()),
            ..Default::default()
        };
        let unknown: SocketAddr = "198.18.9.9:40000".parse().unwrap();
        assert_eq!(
            labels(&state, &fe, unknown, &claim, &cart).source_workload,
            "frontend"
        );
    }
}
