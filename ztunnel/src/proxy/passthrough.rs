//! Inbound plaintext (15006 inside the pod): traffic from outside the mesh reaches
//! the pod under the same L4 policy, with no identity.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::copy::copy_bidirectional;
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
}

impl InboundPassthrough {
    pub fn new(pod: Pod, net: PodNet, inputs: Arc<ProxyInputs>) -> Self {
        Self { pod, net, inputs }
    }

    pub async fn run(self, listener: TcpListener, drain: DrainWatcher) {
        let max = self.inputs.config.max_connections as usize;
        let own_port = listener.local_addr().map_or(0, |a| a.port());
        accept_loop(listener, max, drain, "inbound plaintext", |stream, src| {
            let this = self.clone();
            async move { this.serve(stream, src, own_port).await }
        })
        .await
    }

    async fn serve(&self, mut client: TcpStream, src: SocketAddr, own_port: u16) {
        let dst = match original_dst(&client, src) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(%src, error = %e, "inbound plaintext connection without an original destination");
                return;
            }
        };
        let state = self.inputs.state.snapshot();
        let refuse = |reason: &'static str,
                      explanation: String,
                      policy: Option<String>,
                      rule: Option<usize>| {
            self.inputs.metrics.deny(reason);
            self.inputs.why.record(Refused {
                at: Refused::now(),
                direction: "inbound_plaintext",
                source: src.to_string(),
                source_identity: None,
                destination: dst.to_string(),
                destination_workload: Some(format!("{}/{}", self.pod.namespace, self.pod.name)),
                reason,
                policy,
                rule,
                explanation,
            });
        };
        if is_self_call(&client, dst, own_port) {
            return refuse(
                reason::SELF_CALL,
                format!("{dst} is this inbound listener itself"),
                None,
                None,
            );
        }
        let Some(workload) = state.workload(&self.pod.uid).cloned() else {
            return refuse(
                reason::UNKNOWN_DESTINATION,
                format!("pod {} is not in ztunnel's state", self.pod.uid),
                None,
                None,
            );
        };
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
        if !decision.allowed {
            return refuse(
                reason::POLICY,
                decision.to_string(),
                decision.policy.clone(),
                decision.rule,
            );
        }
        let mut upstream = match self
            .net
            .connect_within(
                dst,
                self.net.spoof_source().then_some(src.ip()),
                self.inputs.hbone.connect_timeout,
            )
            .await
        {
            Ok(s) => s,
            Err(e) => {
                return refuse(
                    reason::UPSTREAM_UNREACHABLE,
                    format!("connect to {dst}: {e}"),
                    None,
                    None,
                );
            }
        };
        let info = ConnInfo {
            direction: "inbound_plaintext",
            source: src,
            destination: dst,
            labels: ConnLabels {
                reporter: "destination",
                destination_workload: workload.name.clone(),
                destination_workload_namespace: workload.namespace.clone(),
                destination_principal: workload
                    .identity()
                    .map(|i| i.to_string())
                    .unwrap_or_default(),
                ..Default::default()
            },
        };
        let mut guard =
            ConnGuard::open(info, self.inputs.metrics.clone(), self.inputs.conns.clone());
        if copy_bidirectional(&mut client, &mut upstream, guard.stats())
            .await
            .is_err()
        {
            guard.set_end("error");
        }
    }
}
