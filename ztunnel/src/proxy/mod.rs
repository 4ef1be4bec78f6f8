//! The per-pod proxy: for each enrolled pod, listeners inside the pod's network
//! namespace on 15001 (outbound capture), 15006 (inbound plaintext capture) and
//! 15008 (inbound HBONE), each tied to the pod's drain.

mod conn;
mod inbound;
mod outbound;
mod passthrough;
mod pod_net;
mod socks5;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::drain::{self, DrainOutcome, DrainTrigger, DrainWatcher};
use mesh_core::hbone::{HboneConfig, HbonePool, HboneServer, ServerStats};
use mesh_core::{CertStore, SpiffeId};
use tokio::task::JoinHandle;

pub use conn::{ConnInfo, ConnTable, ConnView};
pub use inbound::{InboundHandler, POLICY_DENIAL_ON_WIRE};
pub use outbound::Outbound;
pub use passthrough::InboundPassthrough;
pub use pod_net::{PodNet, is_self_call, original_dst};
pub use socks5::Socks5;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::StateStore;
use crate::why::{Refused, WhyLog};

/// What every listener of every pod shares.
#[derive(Debug)]
pub struct ProxyInputs {
    pub config: Arc<Config>,
    pub state: Arc<StateStore>,
    pub certs: Arc<CertStore>,
    pub ca: Arc<crate::app::CaClient>,
    pub metrics: Arc<Metrics>,
    pub why: Arc<WhyLog>,
    pub conns: Arc<ConnTable>,
    pub hbone: HboneConfig,
}

impl ProxyInputs {
    /// A refused connection: counted by its reason and kept for the why view.
    pub fn refuse(&self, refused: Refused) {
        self.metrics.deny(refused.reason);
        self.why.record(refused);
    }

    /// The certificate of `id`, issued now if the store has none past half its
    /// life. A certificate still valid is used while the CA cannot issue a new
    /// one: it is never dropped early (renewal keeps trying in `keep_fresh`).
    pub async fn ensure_certificate(&self, id: &SpiffeId) -> Result<(), mesh_core::CertError> {
        let now = std::time::SystemTime::now();
        let held = self.certs.get(id);
        if held.as_ref().is_some_and(|c| now < c.refresh_at()) {
            return Ok(());
        }
        match self.certs.fetch(self.ca.as_ref(), id).await {
            Ok(_) => Ok(()),
            Err(error) if held.is_some_and(|c| !c.is_expired(now)) => {
                tracing::warn!(identity = %id, %error, "CA unavailable; using the certificate held");
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Waits, at most `max`, until the store holds a certificate of `id`, asking
    /// the CA meanwhile (50 ms doubling to 400 ms between asks; a request in
    /// flight is joined). A pod's first connections can come before its
    /// certificate: the CA refuses until the control plane has seen the pod, and
    /// failing the connection then would reset a client for a few milliseconds'
    /// difference. Returns at `max` either way; the caller then fails as before.
    pub async fn await_certificate(&self, id: &SpiffeId, max: Duration) {
        if self.certs.get(id).is_some() {
            return;
        }
        let mut events = self.certs.subscribe();
        let deadline = tokio::time::Instant::now() + max;
        let retries = mesh_core::backoff::BackoffConfig {
            min: Duration::from_millis(50),
            max: Duration::from_millis(400),
            ..mesh_core::backoff::BackoffConfig::default()
        };
        for attempt in 0u32.. {
            let pause = retries.nominal(attempt);
            let asked = tokio::time::timeout_at(deadline, self.ensure_certificate(id)).await;
            if matches!(asked, Ok(Ok(()))) || self.certs.get(id).is_some() {
                return;
            }
            let next = (tokio::time::Instant::now() + pause).min(deadline);
            // Someone else's fetch may land first.
            loop {
                tokio::select! {
                    event = events.recv() => match event {
                        Ok(mesh_core::CertEvent::Updated(got)) if got == *id => return,
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            if self.certs.get(id).is_some() {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    },
                    () = tokio::time::sleep_until(next) => break,
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return;
            }
        }
    }
}

/// How long a connection waits for its pod's certificate (see
/// [`ProxyInputs::await_certificate`]).
pub const CERTIFICATE_WAIT: Duration = Duration::from_secs(3);

/// A pod the node agent handed over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

impl Pod {
    pub fn identity(&self, trust_domain: &str) -> Result<SpiffeId, mesh_core::SpiffeIdError> {
        SpiffeId::new(trust_domain, &self.namespace, &self.service_account)
    }
}

/// Where a pod's listeners bind, inside its namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodPorts {
    pub outbound: SocketAddr,
    pub inbound_plaintext: SocketAddr,
    pub hbone: SocketAddr,
}

impl PodPorts {
    /// The three listeners' ports: a tunnel to one of them would reach ztunnel
    /// itself, not the pod's app.
    pub fn ports(&self) -> [u16; 3] {
        [
            self.outbound.port(),
            self.inbound_plaintext.port(),
            self.hbone.port(),
        ]
    }
}

/// Why `target` cannot be a destination of an inbound connection to `workload`
/// (the pod a listener belongs to), if it cannot: it must be one of the pod's
/// addresses (not loopback or another host's, which a forged packet could
/// name) and not one of ztunnel's own ports in the pod.
pub(crate) fn bad_destination(
    workload: &crate::state::Workload,
    target: SocketAddr,
    own_ports: &[u16],
) -> Option<String> {
    let (ns, name) = (&workload.namespace, &workload.name);
    if !workload.addresses.contains(&target.ip()) {
        Some(format!(
            "{} is not an address of pod {ns}/{name}",
            target.ip()
        ))
    } else if own_ports.contains(&target.port()) {
        Some(format!(
            "port {} of pod {ns}/{name} is ztunnel's own, not the app's",
            target.port()
        ))
    } else {
        None
    }
}

impl Default for PodPorts {
    fn default() -> Self {
        Self {
            outbound: "0.0.0.0:15001".parse().unwrap_or_else(|_| unreachable!()),
            inbound_plaintext: "0.0.0.0:15006".parse().unwrap_or_else(|_| unreachable!()),
            hbone: "0.0.0.0:15008".parse().unwrap_or_else(|_| unreachable!()),
        }
    }
}

/// Why a pod's proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("pod {pod}: identity: {error}")]
    Identity {
        pod: String,
        error: mesh_core::SpiffeIdError,
    },
    #[error("pod {pod}: certificate: {error}")]
    Certificate {
        pod: String,
        error: Box<mesh_core::CertError>,
    },
    #[error("pod {pod}: TLS: {error}")]
    Tls {
        pod: String,
        error: mesh_core::tls::TlsError,
    },
    #[error("pod {pod}: entering its network namespace: {error}")]
    Namespace { pod: String, error: std::io::Error },
    #[error("pod {pod}: ztunnel is shutting down")]
    ShuttingDown { pod: String },
    #[error("pod {pod}: listen on {addr}: {error}")]
    Listen {
        pod: String,
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// How long a pod's start waits for its first certificate before it lets the
/// fetch go on in the background: well under the node agent's ack timeout (5 s),
/// so a CA that does not answer never makes the agent give up on ztunnel.
const FIRST_CERTIFICATE_WAIT: Duration = Duration::from_secs(2);

/// A running pod proxy; dropping it without [`PodProxy::close`] leaves it running.
#[derive(Debug)]
pub struct PodProxy {
    pub pod: Pod,
    pub addrs: PodPorts,
    drain: DrainTrigger,
    why: Arc<WhyLog>,
    // The three accept loops: each ends as soon as the drain is signaled, its
    // listener closed.
    listeners: Vec<JoinHandle<()>>,
    hbone_stats: Arc<ServerStats>,
}

/// Tries of [`listen_when_free`] on a port in use, [`LISTEN_RETRY`] apart.
const LISTEN_TRIES: u32 = 20;
const LISTEN_RETRY: Duration = Duration::from_millis(50);

/// Listens on `addr` in the pod, trying again for about a second while the port
/// is in use. A pod replaced in place gets the ports its old listeners have just
/// given up, and a closed listener keeps its port while another copy of its
/// descriptor lives: a process forked by the same program (the tests run `ip`
/// beside ztunnel) holds one until its exec. A port that stays taken fails as before.
async fn listen_when_free(
    net: &PodNet,
    addr: SocketAddr,
) -> std::io::Result<tokio::net::TcpListener> {
    let mut tries = 1;
    loop {
        match net.listen(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < LISTEN_TRIES => {
                tries += 1;
                tokio::time::sleep(LISTEN_RETRY).await;
            }
            done => return done,
        }
    }
}

/// The listener tasks of a pod proxy being closed (see [`PodProxy::close`]).
#[derive(Debug)]
pub struct ClosingListeners(Vec<JoinHandle<()>>);

impl ClosingListeners {
    /// Returns once the listeners are closed (their ports free).
    pub async fn closed(self) {
        for listener in self.0 {
            // A listener task that panicked is closed too.
            let _ = listener.await;
        }
    }
}

impl PodProxy {
    /// Opens the pod's listeners in its namespace and starts serving them.
    pub async fn start(
        pod: Pod,
        net: PodNet,
        ports: PodPorts,
        inputs: Arc<ProxyInputs>,
    ) -> Result<Self, StartError> {
        let name = format!("{}/{}", pod.namespace, pod.name);
        let identity =
            pod.identity(&inputs.config.trust_domain)
                .map_err(|error| StartError::Identity {
                    pod: name.clone(),
                    error,
                })?;
        // `keep_node_certificates` fetches the certificate from the moment the
        // pod is announced, and again with backoff while the CA refuses (it may
        // not have seen the pod yet). Wait a little so the first connections find
        // it, then serve anyway: TLS works as soon as it arrives.
        inputs
            .await_certificate(&identity, FIRST_CERTIFICATE_WAIT)
            .await;
        if inputs.certs.get(&identity).is_none() {
            tracing::warn!(pod = %name, %identity, "no certificate within {FIRST_CERTIFICATE_WAIT:?}; it is fetched in the background");
        }
        let listen = async |addr: SocketAddr| {
            listen_when_free(&net, addr)
                .await
                .map_err(|error| StartError::Listen {
                    pod: name.clone(),
                    addr,
                    error,
                })
        };
        let hbone_listener = listen(ports.hbone).await?;
        let outbound_listener = listen(ports.outbound).await?;
        let plaintext_listener = listen(ports.inbound_plaintext).await?;
        // Its callers are outside the mesh, on other hosts: keepalive finds the
        // ones that vanish (the pod's own connections to 15001 cannot).
        mesh_core::hbone::keep_alive(&plaintext_listener);
        let addrs = PodPorts {
            hbone: hbone_listener.local_addr().unwrap_or(ports.hbone),
            outbound: outbound_listener.local_addr().unwrap_or(ports.outbound),
            inbound_plaintext: plaintext_listener
                .local_addr()
                .unwrap_or(ports.inbound_plaintext),
        };
        let tls_err = |error| StartError::Tls {
            pod: name.clone(),
            error,
        };
        let roots = mesh_core::tls::root_store(&inputs.ca.roots()).map_err(tls_err)?;
        let tls = mesh_core::tls::server_config_with_roots(inputs.certs.clone(), &identity, roots)
            .map_err(tls_err)?;
        let (trigger, watcher) = drain::channel();
        let own_ports = addrs.ports();
        let handler = InboundHandler::new(
            pod.clone(),
            identity.clone(),
            net.clone(),
            inputs.clone(),
            own_ports,
        );
        let server = HboneServer::new(hbone_listener, tls, handler, inputs.hbone.clone());
        let hbone_stats = server.stats();
        inputs.why.watch_server(&name, hbone_stats.clone());
        inputs.metrics.count_server_refusals(&hbone_stats);
        let mut listeners = vec![tokio::spawn(server.run(watcher.clone()))];
        let pool = HbonePool::with_dialer(inputs.certs.clone(), inputs.hbone.clone(), net.clone())
            .with_drain(watcher.clone());
        let outbound = Outbound::new(pod.clone(), identity, net.clone(), pool, inputs.clone());
        listeners.push(tokio::spawn(
            outbound.clone().run(outbound_listener, watcher.clone()),
        ));
        let why = inputs.why.clone();
        let passthrough = InboundPassthrough::new(pod.clone(), net, inputs, own_ports);
        listeners.push(tokio::spawn(passthrough.run(plaintext_listener, watcher)));
        tracing::info!(pod = %name, hbone = %addrs.hbone, outbound = %addrs.outbound, inbound = %addrs.inbound_plaintext, "pod proxy started");
        Ok(Self {
            pod,
            addrs,
            drain: trigger,
            why,
            listeners,
            hbone_stats,
        })
    }

    /// Starts closing, without waiting: spawns the drain, which closes the
    /// listeners and ends when the open connections have finished or, at
    /// `deadline`, been closed. Returns the drain's task and the listeners, to
    /// await their closing. Synchronous, so the caller holds the drain's task
    /// before it awaits anything (a caller cut short at an await cannot lose it).
    pub fn close(self, deadline: Duration) -> (JoinHandle<DrainOutcome>, ClosingListeners) {
        let Self {
            pod,
            drain,
            why,
            listeners,
            hbone_stats,
            ..
        } = self;
        let name = format!("{}/{}", pod.namespace, pod.name);
        let draining = tokio::spawn(async move {
            let outcome = drain.drain(deadline).await;
            why.forget_server(&name, &hbone_stats);
            tracing::info!(pod = %name, ?outcome, "pod proxy stopped");
            outcome
        });
        (draining, ClosingListeners(listeners))
    }

    /// A watcher of this pod's drain, for tasks started outside `start`.
    pub fn watcher(&self) -> DrainWatcher {
        self.drain.watcher()
    }
}

#[cfg(test)]
mod listen_tests {
    use super::*;

    /// This test's own loopback net: 127.54.0.0/24.
    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 54, 0, 1], 0))
    }

    #[tokio::test]
    async fn a_port_freed_a_moment_later_is_taken_and_one_kept_is_refused() {
        let net = PodNet::local(0);
        let held = net.listen(addr()).unwrap();
        let port = held.local_addr().unwrap();
        // Given up while the new listener is tried: taken once free.
        let free_later = tokio::spawn(async move {
            tokio::time::sleep(LISTEN_RETRY * 3).await;
            drop(held);
        });
        let listener = listen_when_free(&net, port).await.unwrap();
        assert_eq!(listener.local_addr().unwrap(), port);
        free_later.await.unwrap();
        // Kept: refused, as before, once the tries are spent.
        let started = tokio::time::Instant::now();
        let err = listen_when_free(&net, port).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        assert!(started.elapsed() >= LISTEN_RETRY * (LISTEN_TRIES - 1));
    }
}
