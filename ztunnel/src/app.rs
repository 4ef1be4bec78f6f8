//! Wires ztunnel together: CA (local or istiod-lite's), state source (local file or
//! delta xDS), metrics, admin endpoints, SOCKS5, and the pods handed over by the
//! node agent. `main` and the tests both start an `App`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use mesh_core::ca::LocalCa;
use mesh_core::ca_client::RemoteCa;
use mesh_core::control::{ControlPlane, Token};
use mesh_core::drain::{self, DrainOutcome, DrainTrigger, DrainWatcher};
use mesh_core::hbone::HboneConfig;
use mesh_core::os::NetNs;
use mesh_core::xds::{Node, XdsClient, XdsStatus};
use mesh_core::{CertError, CertStore, CertificateSource, SpiffeId, WorkloadCertificate};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState, Endpoint};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::node_certs::{NodeCertificates, keep_node_certificates};
use crate::proxy::{ConnTable, Pod, PodNet, PodPorts, PodProxy, ProxyInputs, Socks5, StartError};
use crate::state::{StateStore, XDS_TYPES, XdsState, load_local_state, watch_local_state};
use crate::why::WhyLog;

/// A running ztunnel.
#[derive(Debug)]
pub struct App {
    pub inputs: Arc<ProxyInputs>,
    pub admin: Arc<AdminState>,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub socks5_addr: Option<SocketAddr>,
    pods: tokio::sync::Mutex<HashMap<String, RunningPod>>,
    // Removed or replaced pods whose connections are still draining; finished
    // ones are pruned whenever one is added, so it holds only those draining.
    retired: Mutex<Vec<JoinHandle<DrainOutcome>>>,
    // Set by `shutdown` under the `pods` lock: no pod is added after it.
    closing: AtomicBool,
    drain: Mutex<Option<DrainTrigger>>,
    // Pod uid -> identity, of the pods proxied or starting: whose certificates
    // `keep_node_certificates` keeps.
    pod_identities: tokio::sync::watch::Sender<HashMap<String, SpiffeId>>,
}

/// A pod's proxy, with what it was started from: a pod re-sent with the same
/// identity, namespace and ports keeps it.
#[derive(Debug)]
struct RunningPod {
    proxy: PodProxy,
    netns: Option<u64>,
    ports: PodPorts,
}

/// How long a connection to the control plane may take to open.
const CONTROL_PLANE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the node's certificates come from.
#[derive(Debug)]
pub enum CaClient {
    /// A root held by this process (local CA mode).
    Local(LocalCa),
    /// istiod-lite's CA (`--ca-address`).
    Remote(RemoteCa),
}

impl CaClient {
    /// The mesh roots: what pods' listeners trust before their certificate arrives.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        match self {
            CaClient::Local(ca) => vec![ca.root()],
            CaClient::Remote(ca) => ca.roots().to_vec(),
        }
    }
}

impl CertificateSource for CaClient {
    async fn issue(&self, identity: &SpiffeId) -> Result<WorkloadCertificate, CertError> {
        match self {
            CaClient::Local(ca) => ca.issue(identity).await,
            CaClient::Remote(ca) => ca.issue(identity).await,
        }
    }
}

/// How to reach the control plane at `address`, from the settings.
fn control_plane(config: &Config, address: &str) -> anyhow::Result<ControlPlane> {
    let path = config
        .root_cert
        .as_ref()
        .context("--root-cert is required with --xds-address or --ca-address")?;
    let roots = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("--root-cert {}", path.display()))?;
    anyhow::ensure!(
        !roots.is_empty(),
        "--root-cert {}: no PEM certificate in the file",
        path.display()
    );
    Ok(ControlPlane {
        address: address.to_string(),
        identity: config
            .control_plane_identity()
            .context("--control-plane-identity")?,
        roots,
        token: match &config.token_file {
            Some(path) => Token::File(path.clone()),
            None => Token::None,
        },
        connect_timeout: CONTROL_PLANE_CONNECT_TIMEOUT,
    })
}

/// The certificate source the settings name: istiod-lite's CA or a local root.
fn ca_client(config: &Config) -> anyhow::Result<CaClient> {
    match &config.ca_address {
        Some(address) => {
            let control = control_plane(config, address)?;
            let ca = RemoteCa::new(&control, config.cert_ttl).context("--ca-address")?;
            Ok(CaClient::Remote(ca))
        }
        None => Ok(CaClient::Local(load_ca(config)?)),
    }
}

/// Starts the delta xDS client that feeds `state`; its status for the admin view
/// and its watch of the first full sync.
fn start_xds(
    config: &Config,
    address: &str,
    state: Arc<StateStore>,
    drain: DrainWatcher,
) -> anyhow::Result<(XdsStatus, watch::Receiver<bool>)> {
    let control = control_plane(config, address)?;
    let node = Node {
        id: config.node_name.clone(),
        cluster: "ztunnel".to_string(),
        metadata: None,
    };
    let handler = XdsState::new(state);
    let client =
        XdsClient::new(&control, node, XDS_TYPES.to_vec(), handler).context("--xds-address")?;
    let status = client.status();
    let synced = client.synced();
    tokio::spawn(client.run(drain));
    Ok((status, synced))
}

/// Loads the CA root; the key file must not be readable by group or others.
fn load_ca(config: &Config) -> anyhow::Result<LocalCa> {
    match (&config.ca_cert, &config.ca_key) {
        (Some(cert), Some(key)) => {
            let mode = std::fs::metadata(key)
                .with_context(|| format!("--ca-key {}", key.display()))?
                .permissions()
                .mode();
            anyhow::ensure!(
                mode & 0o077 == 0,
                "--ca-key {}: mode {:o} lets group or others read the CA key; use 0600 or 0400",
                key.display(),
                mode & 0o777
            );
            let cert_pem = std::fs::read_to_string(cert)
                .with_context(|| format!("--ca-cert {}", cert.display()))?;
            let key_pem = std::fs::read_to_string(key)
                .with_context(|| format!("--ca-key {}", key.display()))?;
            LocalCa::from_pem(&cert_pem, &key_pem, config.cert_ttl).context("--ca-cert/--ca-key")
        }
        _ => {
            tracing::warn!(
                "no --ca-cert/--ca-key: using a root of this process only; other nodes will not trust it"
            );
            Ok(LocalCa::generate(
                "ambit-ztunnel-ephemeral",
                config.cert_ttl,
            )?)
        }
    }
}

impl App {
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        tracing::info!(config = %serde_json::to_string(&*config).unwrap_or_default(), "ztunnel starting");
        let ca = Arc::new(ca_client(&config)?);
        let certs = Arc::new(CertStore::new());
        let state = Arc::new(
            StateStore::with_root_namespace(Default::default(), config.root_namespace.clone())
                .with_trust_domain(config.trust_domain.clone()),
        );
        let local_state_error = Arc::new(Mutex::new(None));
        let (trigger, watcher) = drain::channel();
        // Until the source has synced, the state is empty and every destination
        // would pass through in plaintext: no pod is taken before (`inpod::run`).
        let (synced_tx, mut synced) = watch::channel(config.local_state.is_none());
        let xds = match &config.xds_address {
            Some(address) => {
                let (status, xds_synced) =
                    start_xds(&config, address, state.clone(), watcher.clone())?;
                synced = xds_synced;
                Some(status)
            }
            None => None,
        };
        if let Some(path) = &config.local_state {
            match load_local_state(path, &config.trust_domain) {
                Ok(s) => {
                    state.replace(s);
                    synced_tx.send_replace(true);
                }
                Err(e) => {
                    tracing::error!(error = %e, "local state refused at start; starting empty, taking no pod until a good file is applied");
                    *local_state_error.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(e.to_string());
                }
            }
            tokio::spawn(watch_local_state(
                path.clone(),
                state.clone(),
                local_state_error.clone(),
                synced_tx,
                config.local_state_poll,
                watcher.clone(),
            ));
        }
        let hbone = HboneConfig {
            stream_window: config.hbone_window,
            connection_window: config.hbone_window * 4,
            max_streams_per_connection: config.pool_max_streams as usize,
            pool_idle_timeout: config.pool_idle_timeout,
            server_max_connections: config.max_connections as usize,
            // Peers' pools (the same setting) close their idle connections first.
            server_idle_timeout: HboneConfig::default()
                .server_idle_timeout
                .max(config.pool_idle_timeout * 2),
            ..HboneConfig::default()
        };
        let inputs = Arc::new(ProxyInputs {
            metrics: Arc::new(Metrics::new(certs.clone())),
            config: config.clone(),
            state,
            certs,
            ca,
            why: Arc::new(WhyLog::default()),
            conns: Arc::new(ConnTable::default()),
            hbone,
        });
        // Renew every identity's certificate at half its life.
        tokio::spawn(mesh_core::cert_manager::keep_fresh(
            inputs.certs.clone(),
            inputs.ca.clone(),
            mesh_core::cert_manager::RenewalConfig::default(),
            watcher.clone(),
        ));
        // Fetch those of identities with a workload here, release the others.
        let pod_identities = tokio::sync::watch::Sender::new(HashMap::new());
        tokio::spawn(keep_node_certificates(
            NodeCertificates {
                certs: inputs.certs.clone(),
                ca: inputs.ca.clone(),
                state: inputs.state.clone(),
                node: config.node_name.clone(),
                pods: pod_identities.subscribe(),
                prefetch: config.uses_xds(),
                grace: config.cert_release_grace,
            },
            watcher.clone(),
        ));
        let admin = Arc::new(AdminState {
            inputs: inputs.clone(),
            local_state_error,
            xds,
            synced,
            ready: Default::default(),
        });
        let admin_addr = admin::serve(
            config.admin_addr,
            Endpoint::Admin,
            admin.clone(),
            watcher.clone(),
        )
        .await
        .with_context(|| format!("--admin-addr {}", config.admin_addr))?;
        let metrics_addr = admin::serve(
            config.metrics_addr,
            Endpoint::Metrics,
            admin.clone(),
            watcher.clone(),
        )
        .await
        .with_context(|| format!("--metrics-addr {}", config.metrics_addr))?;
        let readiness_addr = admin::serve(
            config.readiness_addr,
            Endpoint::Readiness,
            admin.clone(),
            watcher.clone(),
        )
        .await
        .with_context(|| format!("--readiness-addr {}", config.readiness_addr))?;
        let socks5_addr = if config.socks5 {
            let listener = TcpListener::bind(config.socks5_addr)
                .await
                .with_context(|| format!("--socks5-addr {}", config.socks5_addr))?;
            let addr = listener.local_addr()?;
            tokio::spawn(Socks5::new(inputs.clone()).run(listener, watcher.clone()));
            Some(addr)
        } else {
            None
        };
        tracing::info!(%admin_addr, %metrics_addr, %readiness_addr, ?socks5_addr, "ztunnel serving");
        Ok(Self {
            inputs,
            admin,
            admin_addr,
            metrics_addr,
            readiness_addr,
            socks5_addr,
            pods: Default::default(),
            retired: Default::default(),
            closing: AtomicBool::new(false),
            drain: Mutex::new(Some(trigger)),
            pod_identities,
        })
    }

    /// Starts proxying `pod` in `netns` (ztunnel's own namespace when `None`).
    ///
    /// A pod re-sent unchanged (same identity, namespace and ports: the node agent
    /// re-sends every pod after a reconnect) keeps its running proxy and its
    /// connections. A changed pod gets a new proxy; the old one's listeners close
    /// and its connections drain in the background, so this returns without
    /// waiting for them. In a new namespace the new proxy starts before the old
    /// one closes; if it cannot start, the old one goes all the same (its
    /// sandbox is gone) and the pod is not served until it is sent again.
    pub async fn add_pod(
        &self,
        pod: Pod,
        netns: Option<NetNs>,
        ports: PodPorts,
    ) -> Result<SocketAddr, StartError> {
        let name = format!("{}/{}", pod.namespace, pod.name);
        let inode = netns
            .as_ref()
            .map(NetNs::inode)
            .transpose()
            .map_err(|error| StartError::Namespace {
                pod: name.clone(),
                error,
            })?;
        // Held throughout, so that adds and removes of one pod apply in order.
        let mut pods = self.pods.lock().await;
        if self.closing.load(Ordering::Relaxed) {
            return Err(StartError::ShuttingDown { pod: name });
        }
        let same_namespace = match pods.get(&pod.uid) {
            Some(running) if running.proxy.pod == pod && running.netns == inode => {
                if running.ports == ports {
                    tracing::debug!(pod = %name, "pod re-sent unchanged; its proxy keeps running");
                    return Ok(running.proxy.addrs.hbone);
                }
                true
            }
            Some(running) => running.netns == inode,
            None => false,
        };
        // Its certificate is kept from now on, while the proxy starts.
        if let Ok(identity) = pod.identity(&self.inputs.config.trust_domain) {
            let uid = pod.uid.clone();
            self.pod_identities.send_modify(|ids| {
                ids.insert(uid, identity);
            });
        }
        // In the same namespace the new listeners need the old ones' ports.
        if same_namespace && let Some(old) = pods.remove(&pod.uid) {
            self.retire(old).await;
        }
        let uid = pod.uid.clone();
        let proxy = match self.start_proxy(pod, netns, ports, name).await {
            Ok(proxy) => proxy,
            Err(e) => {
                // The agent reports the pod's current namespace: a proxy left in
                // an older one would serve a sandbox that is gone.
                if let Some(old) = pods.remove(&uid) {
                    self.retire(old).await;
                }
                self.publish_pod_identities(&pods);
                return Err(e);
            }
        };
        let hbone = proxy.addrs.hbone;
        let running = RunningPod {
            proxy,
            netns: inode,
            ports,
        };
        if let Some(old) = pods.insert(uid, running) {
            self.retire(old).await;
        }
        self.publish_pod_identities(&pods);
        Ok(hbone)
    }

    /// Tells `keep_node_certificates` whose certificates the pods need now.
    fn publish_pod_identities(&self, pods: &HashMap<String, RunningPod>) {
        let trust_domain = &self.inputs.config.trust_domain;
        let ids = pods
            .iter()
            .filter_map(|(uid, running)| {
                let id = running.proxy.pod.identity(trust_domain).ok()?;
                Some((uid.clone(), id))
            })
            .collect();
        self.pod_identities.send_replace(ids);
    }

    async fn start_proxy(
        &self,
        pod: Pod,
        netns: Option<NetNs>,
        ports: PodPorts,
        name: String,
    ) -> Result<PodProxy, StartError> {
        let spoof = netns.is_some() || nix::unistd::Uid::effective().is_root();
        let mut net = match netns {
            Some(ns) => PodNet::new(ns, self.inputs.config.packet_mark)
                .map_err(|error| StartError::Namespace { pod: name, error })?,
            None => PodNet::local(self.inputs.config.packet_mark),
        };
        if !spoof {
            net = net.without_source_spoofing();
        }
        PodProxy::start(pod, net, ports, self.inputs.clone()).await
    }

    /// Stops proxying a pod: its listeners are closed when this returns, its
    /// connections drain in the background. False if the pod was not proxied.
    pub async fn remove_pod(&self, uid: &str) -> bool {
        let mut pods = self.pods.lock().await;
        match pods.remove(uid) {
            Some(running) => {
                self.retire(running).await;
                self.publish_pod_identities(&pods);
                true
            }
            None => false,
        }
    }

    /// Closes a pod's listeners and keeps its draining task until it ends, for
    /// [`App::shutdown`] to wait on. The task is kept before the first await:
    /// an add or remove cut short there (the node agent's session dropped at
    /// shutdown) does not lose it, so shutdown still waits for its connections.
    async fn retire(&self, pod: RunningPod) {
        let (draining, listeners) = pod.proxy.close(self.inputs.config.drain_deadline);
        {
            let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
            retired.retain(|d| !d.is_finished());
            retired.push(draining);
        }
        listeners.closed().await;
    }

    /// Pods proxied now.
    pub async fn pod_uids(&self) -> Vec<String> {
        self.pods.lock().await.keys().cloned().collect()
    }

    pub fn set_ready(&self) {
        self.admin.set_ready();
    }

    /// Resolves once the state source has synced: with xDS, every resource type
    /// has had its first response; in local mode, the file has been applied once
    /// (a file refused at start, once a good one is); without a source, at once.
    /// False if the source stopped first (the process is draining).
    pub async fn state_synced(&self) -> bool {
        self.admin.synced.clone().wait_for(|s| *s).await.is_ok()
    }

    /// Whether the state source has synced (see [`App::state_synced`]).
    pub fn is_state_synced(&self) -> bool {
        *self.admin.synced.borrow()
    }

    /// A watcher of the process drain; `None` once shutdown has begun.
    pub fn watcher(&self) -> Option<DrainWatcher> {
        self.drain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|t| t.watcher())
    }

    /// Drains every pod and endpoint within the one configured deadline: the
    /// process drain (the node agent's session, SOCKS5, the admin endpoints) and
    /// every pod's at once. No pod is added once it has begun. Forced if any
    /// drain was.
    pub async fn shutdown(&self) -> DrainOutcome {
        let deadline = self.inputs.config.drain_deadline;
        let trigger = self.drain.lock().unwrap_or_else(|e| e.into_inner()).take();
        let process = async move {
            match trigger {
                Some(t) => t.drain(deadline).await,
                None => DrainOutcome::Graceful,
            }
        };
        let pods = async {
            let pods: Vec<RunningPod> = {
                let mut pods = self.pods.lock().await;
                self.closing.store(true, Ordering::Relaxed);
                pods.drain().map(|(_, p)| p).collect()
            };
            for running in pods {
                self.retire(running).await;
            }
            let retired =
                std::mem::take(&mut *self.retired.lock().unwrap_or_else(|e| e.into_inner()));
            let mut outcome = DrainOutcome::Graceful;
            for draining in retired {
                if !matches!(draining.await, Ok(DrainOutcome::Graceful)) {
                    outcome = DrainOutcome::Forced;
                }
            }
            outcome
        };
        match tokio::join!(process, pods) {
            (DrainOutcome::Graceful, DrainOutcome::Graceful) => DrainOutcome::Graceful,
            _ => DrainOutcome::Forced,
        }
    }
}
