//! Wires ztunnel together: CA, state source, metrics, admin endpoints, SOCKS5, and
//! the pods handed over by the node agent. `main` and the tests both start an `App`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use mesh_core::CertStore;
use mesh_core::ca::LocalCa;
use mesh_core::drain::{self, DrainOutcome, DrainTrigger, DrainWatcher};
use mesh_core::hbone::HboneConfig;
use mesh_core::os::NetNs;
use tokio::net::TcpListener;

use crate::admin::{self, AdminState, Endpoint};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{ConnTable, Pod, PodNet, PodPorts, PodProxy, ProxyInputs, Socks5, StartError};
use crate::state::{StateStore, load_local_state, watch_local_state};
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
    pods: tokio::sync::Mutex<HashMap<String, PodProxy>>,
    drain: Mutex<Option<DrainTrigger>>,
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
                "--ca-key {}: mode {:o} lets others read the CA key; use 0600",
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
        let ca = Arc::new(load_ca(&config)?);
        let certs = Arc::new(CertStore::new());
        let state = Arc::new(StateStore::default());
        let local_state_error = Arc::new(Mutex::new(None));
        let (trigger, watcher) = drain::channel();
        if let Some(path) = &config.local_state {
            match load_local_state(path) {
                Ok(s) => state.replace(s),
                Err(e) => {
                    tracing::error!(error = %e, "local state refused at start; starting empty");
                    *local_state_error.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(e.to_string());
                }
            }
            tokio::spawn(watch_local_state(
                path.clone(),
                state.clone(),
                local_state_error.clone(),
                config.local_state_poll,
                watcher.clone(),
            ));
        }
        let hbone = HboneConfig {
            max_streams_per_connection: config.pool_max_streams as usize,
            pool_idle_timeout: config.pool_idle_timeout,
            server_max_connections: config.max_connections as usize,
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
        let admin = Arc::new(AdminState {
            inputs: inputs.clone(),
            local_state_error,
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
            drain: Mutex::new(Some(trigger)),
        })
    }

    /// Starts proxying `pod` in `netns` (ztunnel's own namespace when `None`).
    pub async fn add_pod(
        &self,
        pod: Pod,
        netns: Option<NetNs>,
        ports: PodPorts,
    ) -> Result<SocketAddr, StartError> {
        let spoof = netns.is_some() || nix::unistd::Uid::effective().is_root();
        let name = format!("{}/{}", pod.namespace, pod.name);
        let mut net = match netns {
            Some(ns) => PodNet::new(ns, self.inputs.config.packet_mark)
                .map_err(|error| StartError::Namespace { pod: name, error })?,
            None => PodNet::local(self.inputs.config.packet_mark),
        };
        if !spoof {
            net = net.without_source_spoofing();
        }
        let uid = pod.uid.clone();
        // A re-sent pod replaces its old listeners.
        if let Some(old) = self.pods.lock().await.remove(&uid) {
            old.stop(self.inputs.config.drain_deadline).await;
        }
        let proxy = PodProxy::start(pod, net, ports, self.inputs.clone()).await?;
        let hbone = proxy.addrs.hbone;
        self.pods.lock().await.insert(uid, proxy);
        Ok(hbone)
    }

    /// Stops proxying a pod: its listeners close, its connections drain.
    pub async fn remove_pod(&self, uid: &str) -> bool {
        let proxy = self.pods.lock().await.remove(uid);
        match proxy {
            Some(p) => {
                p.stop(self.inputs.config.drain_deadline).await;
                true
            }
            None => false,
        }
    }

    /// Pods proxied now.
    pub async fn pod_uids(&self) -> Vec<String> {
        self.pods.lock().await.keys().cloned().collect()
    }

    pub fn set_ready(&self) {
        self.admin.set_ready();
    }

    /// A watcher of the process drain; `None` once shutdown has begun.
    pub fn watcher(&self) -> Option<DrainWatcher> {
        self.drain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|t| t.watcher())
    }

    /// Drains every pod and endpoint within the configured deadline.
    pub async fn shutdown(&self) -> DrainOutcome {
        let deadline = self.inputs.config.drain_deadline;
        let pods: Vec<PodProxy> = self.pods.lock().await.drain().map(|(_, p)| p).collect();
        for p in pods {
            p.stop(deadline).await;
        }
        let trigger = self.drain.lock().unwrap_or_else(|e| e.into_inner()).take();
        match trigger {
            Some(t) => t.drain(deadline).await,
            None => DrainOutcome::Graceful,
        }
    }
}
