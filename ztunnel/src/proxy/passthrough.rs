//! Inbound plaintext (15006 inside the pod): traffic from outside the mesh reaches
//! the pod under the same L4 policy, with no identity.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::copy::{SpliceIo, copy_bidirectional};
use mesh_core::drain::DrainWatcher;
use tokio::net::{TcpListener, TcpStream};

use super::conn::{ConnGuard, ConnInfo};
use super::{Pod, PodNet, ProxyInputs, is_self_call, original_dst};
use crate::metrics::ConnLabels;
use crate::policy::{Connection, Destination};
use crate::why::{Refused, reason};
use mesh_core::accept::accept_loop;

#[derive(Clone, Debug)]
pub struct InboundPassthrough {
    pod: Pod,
    net: PodNet,
    inputs: Arc<ProxyInputs>,
    /// The pod's proxy listeners' ports, never a connection's target.
    own_ports: [u16; 3],
}

/// Why a connection was refused, for the metrics and the "why" view.
struct Refusal {
    reason: &'static str,
    explanation: String,
    policy: Option<String>,
    rule: Option<usize>,
}

impl Refusal {
    fn new(reason: &'static str, explanation: String) -> Self {
        Self {
            reason,
            explanation,
            policy: None,
            rule: None,
        }
    }
}

impl InboundPassthrough {
    pub fn new(pod: Pod, net: PodNet, inputs: Arc<ProxyInputs>, own_ports: [u16; 3]) -> Self {
        Self {
            pod,
            net,
            inputs,
            own_ports,
        }
    }

    pub async fn run(self, listener: TcpListener, drain: DrainWatcher) {
        let max = self.inputs.config.max_connections as usize;
        let own_port = listener.local_addr().map_or(0, |a| a.port());
        accept_loop(listener, max, drain, "inbound plaintext", |stream, src| {
            let this = self.clone();
            async move {
                let dst = original_dst(&stream, src);
                this.serve(stream, src, dst, own_port).await
            }
        })
        .await
    }

    /// A refused connection is reset, as outbound refuses: its client sees the
    /// refusal at once even if it speaks second, never an orderly end.
    /// `dst` is the connection's original destination, as the capture saw it; a
    /// connection without one (not captured, or its conntrack entry gone) is
    /// refused too, counted and explained under the listener's own address.
    pub(super) async fn serve(
        &self,
        mut client: TcpStream,
        src: SocketAddr,
        dst: std::io::Result<SocketAddr>,
        own_port: u16,
    ) {
        let (dst, admitted) = match dst {
            Ok(dst) => (dst, self.admit(&client, src, dst, own_port).await),
            Err(e) => (
                super::pod_net::listener_addr(&client),
                Err(Refusal::new(
                    reason::NO_ORIGINAL_DESTINATION,
                    super::pod_net::no_original_destination(&e),
                )),
            ),
        };
        match admitted {
            Ok((mut upstream, info)) => {
                let mut guard =
                    ConnGuard::open(info, self.inputs.metrics.clone(), self.inputs.conns.clone());
                let copied = copy_bidirectional(&mut client, &mut upstream, guard.stats()).await;
                guard.spliced(&copied);
            }
            Err(refusal) => {
                self.inputs.refuse(Refused {
                    at: Refused::now(),
                    direction: "inbound_plaintext",
                    source: src.to_string(),
                    source_identity: None,
                    destination: dst.to_string(),
                    destination_workload: Some(format!("{}/{}", self.pod.namespace, self.pod.name)),
                    reason: refusal.reason,
                    policy: refusal.policy,
                    rule: refusal.rule,
                    explanation: refusal.explanation,
                });
                client.abort();
            }
        }
    }

    /// Checks the connection against the state and the policy, then connects to
    /// the pod: the upstream and what the connection is counted as.
    async fn admit(
        &self,
        client: &TcpStream,
        src: SocketAddr,
        dst: SocketAddr,
        own_port: u16,
    ) -> Result<(TcpStream, ConnInfo), Refusal> {
        if is_self_call(client, dst, own_port) {
            return Err(Refusal::new(
                reason::SELF_CALL,
                format!("{dst} is this inbound listener itself"),
            ));
        }
        let state = self.inputs.state.snapshot();
        let Some(workload) = state.workload(&self.pod.uid).cloned() else {
            return Err(Refusal::new(
                reason::UNKNOWN_DESTINATION,
                format!("pod {} is not in ztunnel's state", self.pod.uid),
            ));
        };
        // Every inbound TCP segment of the pod is captured here, whatever its
        // destination: one addressed to the pod's loopback (or elsewhere) must
        // not be relayed there from inside the pod.
        if let Some(why) = super::bad_destination(&workload, dst, &self.own_ports) {
            return Err(Refusal::new(reason::BAD_DESTINATION, why));
        }
        let decision = state.policies().evaluate(
            &Destination {
                namespace: &workload.namespace,
                labels: &workload.labels,
            },
            &Connection {
                src_identity: None,
                src_ip: src.ip(),
                dst_ip: dst.ip(),
                dst_port: dst.port(),
            },
        );
        for dry in &decision.dry_run {
            tracing::info!(%src, %dst, "dry-run: {dry}");
        }
        if !decision.allowed {
            return Err(Refusal {
                reason: reason::POLICY,
                explanation: decision.to_string(),
                policy: decision.policy.clone(),
                rule: decision.rule,
            });
        }
        let upstream = self
            .net
            .connect_within(
                dst,
                self.net.spoof_source().then_some(src.ip()),
                self.inputs.hbone.connect_timeout,
            )
            .await
            .map_err(|e| {
                Refusal::new(
                    reason::UPSTREAM_UNREACHABLE,
                    format!("connect to {dst}: {e}"),
                )
            })?;
        let info = ConnInfo {
            direction: "inbound_plaintext",
            source: src,
            destination: dst,
            labels: ConnLabels {
                reporter: "destination",
                destination_workload: workload.owner().to_string(),
                destination_workload_namespace: workload.namespace.clone(),
                destination_principal: workload
                    .identity()
                    .map(|i| i.to_string())
                    .unwrap_or_default(),
                ..Default::default()
            },
        };
        Ok((upstream, info))
    }
}

#[cfg(test)]
#[path = "passthrough_tests.rs"]
mod tests;
