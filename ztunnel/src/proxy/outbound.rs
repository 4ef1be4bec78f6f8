//! Outbound (15001 inside the pod): the captured connection's original destination
//! is routed (service VIP -> one healthy endpoint, workload, or passthrough); mesh
//! destinations are reached over HBONE with the pod's identity from the pod's own
//! address, the rest in plain TCP.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use mesh_core::SpiffeId;
use mesh_core::copy::{SpliceIo, copy_bidirectional};
use mesh_core::drain::DrainWatcher;
use mesh_core::hbone::{
    ConnectError, ConnectRequest, HBONE_PORT, HbonePool, PoolKey, SourceMetadata, TraceParent,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::conn::{ConnGuard, ConnInfo};
use super::{Pod, PodNet, ProxyInputs, is_self_call, original_dst};
use crate::metrics::ConnLabels;
use crate::state::Route;
use crate::why::{Refused, reason};
use mesh_core::accept::accept_loop;

/// The outbound side of one pod (or of SOCKS5 clients on the node).
#[derive(Clone, Debug)]
pub struct Outbound {
    pod: Pod,
    identity: SpiffeId,
    net: PodNet,
    pool: HbonePool<PodNet>,
    inputs: Arc<ProxyInputs>,
}

impl Outbound {
    pub fn new(
        pod: Pod,
        identity: SpiffeId,
        net: PodNet,
        pool: HbonePool<PodNet>,
        inputs: Arc<ProxyInputs>,
    ) -> Self {
        Self {
            pod,
            identity,
            net,
            pool,
            inputs,
        }
    }

    /// Serves captured connections until drained.
    pub async fn run(self, listener: TcpListener, drain: DrainWatcher) {
        let max = self.inputs.config.max_connections as usize;
        let own_port = listener.local_addr().map_or(0, |a| a.port());
        accept_loop(listener, max, drain, "outbound", |mut stream, src| {
            let this = self.clone();
            async move {
                match original_dst(&stream, src) {
                    Ok(dst) if is_self_call(&stream, dst, own_port) => {
                        // Closed with a reset, as every refused connection.
                        stream.abort();
                        let _ = this.refused::<()>(
                            src,
                            dst,
                            None,
                            reason::SELF_CALL,
                            format!("{dst} is this outbound listener itself"),
                        );
                    }
                    Ok(dst) => this.proxy(stream, src, dst).await,
                    Err(e) => {
                        // Nowhere to relay it: refused, reset, counted.
                        stream.abort();
                        let _ = this.refused::<()>(
                            src,
                            super::pod_net::listener_addr(&stream),
                            None,
                            reason::NO_ORIGINAL_DESTINATION,
                            super::pod_net::no_original_destination(&e),
                        );
                    }
                }
            }
        })
        .await
    }

    /// Carries one connection from this pod to `dst`.
    pub async fn proxy(&self, mut client: TcpStream, src: SocketAddr, dst: SocketAddr) {
        // What the client sent before it was accepted goes with the CONNECT.
        let early = match mesh_core::copy::take_ready(&client) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(%src, %dst, error = %e, "client gone before its connection was proxied");
                return;
            }
        };
        let early_len = early.len() as u64;
        let Ok((mut upstream, info)) = self.connect(src, dst, early).await else {
            // Refused: the client sees a reset, not an orderly close (its early
            // bytes were read, so closing would otherwise send a FIN).
            client.abort();
            return;
        };
        self.splice(&mut client, &mut upstream, info, early_len)
            .await;
    }

    /// Moves bytes both ways between `client` and `upstream` until both directions
    /// end, counted as `info` (with `early` bytes already sent ahead): metrics, the
    /// live-connection table and the access log, which says `error` when a side
    /// failed.
    pub async fn splice(
        &self,
        client: &mut TcpStream,
        upstream: &mut Upstream,
        info: ConnInfo,
        early: u64,
    ) {
        let mut guard =
            ConnGuard::open(info, self.inputs.metrics.clone(), self.inputs.conns.clone());
        guard.stats().count_a_to_b(early);
        let copied = match upstream {
            Upstream::Tcp(s) => copy_bidirectional(client, s, guard.stats()).await,
            Upstream::Hbone(s) => copy_bidirectional(client, s, guard.stats()).await,
        };
        guard.spliced(&copied);
    }

    /// Opens the upstream of a connection from this pod to `dst` and sends it
    /// `early` (bytes the client already sent); a refusal is counted and recorded in
    /// the why log, and gives its reason (the metric's `reason` label).
    pub async fn connect(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
        early: Bytes,
    ) -> Result<(Upstream, ConnInfo), &'static str> {
        let state = self.inputs.state.snapshot();
        let route = match state.route(dst) {
            Ok(r) => r,
            Err(e) => return self.refused(src, dst, None, reason::NO_ROUTE, e.to_string()),
        };
        // The pod's owner as the control plane names it; the pod's own name until
        // the pod is in the state.
        let owner = state
            .workload(&self.pod.uid)
            .map_or(self.pod.name.as_str(), |w| w.owner())
            .to_string();
        let src_labels = ConnLabels {
            reporter: "source",
            source_workload: owner.clone(),
            source_workload_namespace: self.pod.namespace.clone(),
            source_principal: self.identity.to_string(),
            ..Default::default()
        };
        match route {
            Route::Passthrough { addr } => {
                let mut upstream = match self
                    .net
                    .connect_within(addr, None, self.inputs.hbone.connect_timeout)
                    .await
                {
                    Ok(s) => {
                        // A destination outside the mesh, on another host.
                        mesh_core::hbone::keep_alive(&s);
                        s
                    }
                    Err(e) => {
                        return self.refused(
                            src,
                            addr,
                            None,
                            reason::UPSTREAM_UNREACHABLE,
                            format!("connect to {addr}: {e}"),
                        );
                    }
                };
                if let Err(e) = upstream.write_all(&early).await {
                    return self.refused(
                        src,
                        addr,
                        None,
                        reason::UPSTREAM_RESET,
                        format!(
                            "{addr} closed before it took the first {} bytes: {e}",
                            early.len()
                        ),
                    );
                }
                let info = ConnInfo {
                    direction: "outbound",
                    source: src,
                    destination: addr,
                    labels: src_labels,
                };
                Ok((Upstream::Tcp(upstream), info))
            }
            Route::Mesh { workload, addr, .. } => {
                let dst_id = match workload.identity() {
                    Ok(id) => id,
                    Err(e) => {
                        return self.refused(
                            src,
                            addr,
                            Some(workload.name.clone()),
                            reason::BAD_DESTINATION,
                            e.to_string(),
                        );
                    }
                };
                let next_hop = SocketAddr::new(addr.ip(), HBONE_PORT);
                let key = PoolKey::new(self.identity.clone(), vec![dst_id.clone()], next_hop);
                let req = ConnectRequest {
                    target: addr,
                    source: SourceMetadata {
                        addr: Some(src.ip()),
                        namespace: Some(self.pod.namespace.clone()),
                        workload: Some(owner),
                        ..Default::default()
                    },
                    trace: TraceParent::new_root(),
                    early_data: early,
                };
                // A pod's first connection may beat its certificate.
                self.inputs
                    .await_certificate(&self.identity, super::CERTIFICATE_WAIT)
                    .await;
                let tunnel = match self.pool.connect(key, req).await {
                    Ok(t) => t,
                    Err(e) => {
                        let reason = match e.root() {
                            ConnectError::Refused { status, .. } if status.as_u16() == 403 => {
                                reason::DENIED_BY_DESTINATION
                            }
                            _ => reason::HBONE_FAILED,
                        };
                        return self.refused(
                            src,
                            addr,
                            Some(workload.name.clone()),
                            reason,
                            e.to_string(),
                        );
                    }
                };
                let labels = ConnLabels {
                    destination_workload: workload.owner().to_string(),
                    destination_workload_namespace: workload.namespace.clone(),
                    destination_principal: dst_id.to_string(),
                    ..src_labels
                };
                let info = ConnInfo {
                    direction: "outbound",
                    source: src,
                    destination: addr,
                    labels,
                };
                Ok((Upstream::Hbone(tunnel), info))
            }
        }
    }

    fn refused<T>(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
        workload: Option<String>,
        reason: &'static str,
        explanation: String,
    ) -> Result<T, &'static str> {
        self.inputs.refuse(Refused {
            at: Refused::now(),
            direction: "outbound",
            source: src.to_string(),
            source_identity: Some(self.identity.to_string()),
            destination: dst.to_string(),
            destination_workload: workload,
            reason,
            policy: None,
            rule: None,
            explanation,
        });
        Err(reason)
    }
}

/// Where an outbound connection's bytes go.
#[derive(Debug)]
pub enum Upstream {
    Tcp(TcpStream),
    Hbone(mesh_core::hbone::H2Stream),
}
