//! Wires istiod-lite together: a config source feeds the model task, which runs
//! the translator and hands the resources to the xDS server; the CA and the xDS
//! server share one gRPC-over-TLS port; debug and metrics endpoints read it all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use mesh_core::drain::{self, DrainOutcome, DrainTrigger, DrainWatcher};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::auth::review::TokenReviewer;
use crate::auth::tokens::TokenFile;
use crate::auth::{AuthError, Authenticator, CaCaller, Caller};
use crate::ca::{CaMetrics, CaRoot, CaService, CertTtl, IdentityPolicy, ReservedIdentities};
use crate::config::Config;
use crate::model::{Report, SourceEvent};
use crate::source::dir::DirSource;
use crate::source::kube::KubeSource;
use crate::translate::{TranslateSettings, Translator};
use crate::xds::{ResourceStore, XdsMetrics, XdsServer, XdsSettings};

/// Source events waiting for the model task; a source blocks beyond it.
const SOURCE_QUEUE: usize = 1024;

/// The model as the rest of the process sees it.
#[derive(Debug)]
pub struct ModelState {
    pub translator: RwLock<Translator>,
    /// Current problems by origin (file path, `kube:<Kind>`, `translate`).
    pub reports: Mutex<BTreeMap<String, Vec<Report>>>,
    /// Becomes true once every source has delivered its first full view.
    pub synced: tokio::sync::watch::Sender<bool>,
}

impl ModelState {
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Every current problem, sorted by origin.
    pub fn all_reports(&self) -> Vec<Report> {
        let reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        reports.values().flatten().cloned().collect()
    }
}

impl IdentityPolicy for ModelState {
    fn may_issue(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.translator
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .may_issue(node, namespace, service_account)
    }
}

/// How callers are authenticated: node tokens (embedded) or TokenReview (Kubernetes).
#[derive(Debug)]
pub enum NodeAuth {
    Tokens(TokenFile),
    Kube(TokenReviewer),
}

impl Authenticator for NodeAuth {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        match self {
            NodeAuth::Tokens(t) => t.authenticate(token).await,
            NodeAuth::Kube(k) => k.authenticate(token).await,
        }
    }

    async fn authenticate_for_ca(&self, token: &str) -> Result<CaCaller, AuthError> {
        match self {
            NodeAuth::Tokens(t) => t.authenticate_for_ca(token).await,
            NodeAuth::Kube(k) => k.authenticate_for_ca(token).await,
        }
    }
}

/// A running istiod-lite.
#[derive(Debug)]
pub struct App {
    pub config: Arc<Config>,
    pub model: Arc<ModelState>,
    pub xds: XdsServer,
    pub root: Arc<CaRoot>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    drain: Mutex<Option<DrainTrigger>>,
}

impl App {
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        tracing::info!(config = %serde_json::to_string(&*config).unwrap_or_default(), "istiod-lite starting");
        let identity = config
            .identity()
            .context("--trust-domain/--root-namespace")?;
        let proxy_accounts = config.proxy_account_pairs().map_err(anyhow::Error::msg)?;
        let (trigger, watcher) = drain::channel();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(mesh_core::metrics::ProcessCollector));

        let (default_ttl, max_ttl) = config.checked_cert_ttls().map_err(anyhow::Error::msg)?;
        let ttl = CertTtl {
            default: default_ttl,
            max: max_ttl,
        };
        let root = Arc::new(
            CaRoot::load_or_generate(&config.ca_dir, &config.trust_domain, ttl)
                .with_context(|| format!("--ca-dir {}", config.ca_dir.display()))?,
        );
        let auth = Arc::new(Self::authenticator(&config).await?);

        let model = Arc::new(ModelState {
            translator: RwLock::new(Translator::new(TranslateSettings {
                trust_domain: config.trust_domain.clone(),
                root_namespace: config.root_namespace.clone(),
                ..TranslateSettings::default()
            })),
            reports: Mutex::default(),
            synced: tokio::sync::watch::channel(false).0,
        });

        let settings = XdsSettings {
            debounce_quiet: config.debounce_quiet,
            debounce_max: config.debounce_max,
            max_response_bytes: config.xds_max_response,
            push_budget_bytes: config.xds_push_budget,
            answer_timeout: config.xds_answer_timeout,
            max_streams_per_node: config.xds_max_streams_per_node,
            max_names_per_type: config.xds_max_names_per_type,
            ..XdsSettings::default()
        };
        let (xds, ads) = XdsServer::new(
            Arc::new(ResourceStore::new()),
            settings,
            auth.clone(),
            XdsMetrics::new(&mut registry),
            watcher.clone(),
        )
        .context("xDS settings")?;
        let reserved = ReservedIdentities::default()
            .control_plane(identity.namespace(), identity.service_account())
            .proxy_accounts(&proxy_accounts);
        let ca = CaService::new(
            root.clone(),
            auth.clone(),
            model.clone(),
            reserved,
            CaMetrics::new(&mut registry),
        );

        // The model task, then the source that feeds it.
        let (tx, rx) = mpsc::channel(SOURCE_QUEUE);
        // The directories are one source, so a key in two of them is reported.
        let sources = 1;
        tokio::spawn(run_model(
            rx,
            sources,
            model.clone(),
            xds.clone(),
            watcher.clone(),
        ));
        if config.kube {
            let client = kube::Client::try_default()
                .await
                .context("--kube: no usable Kubernetes configuration")?;
            tokio::spawn(KubeSource::new(client).run(tx, watcher.clone()));
        } else {
            let source = DirSource::with_dirs(config.config_dir.clone(), config.config_poll);
            tokio::spawn(source.run(tx, watcher.clone()));
        }

        let tls = root
            .serving_config(&identity)
            .context("serving certificate")?;
        let listener = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("--grpc-addr {}", config.grpc_addr))?;
        let grpc_addr = listener.local_addr()?;
        let routes = tonic::service::Routes::new(ads).add_service(ca.into_server());
        let grpc_drain = watcher.clone();
        let mut synced = model.synced.subscribe();
        tokio::spawn(async move {
            // Like istiod, answer proxies only from a complete view: a CA check or a
            // first push against half a directory would refuse or remove too much.
            // Until then connections wait in the listen backlog.
            tokio::select! {
                () = grpc_drain.signaled() => return,
                r = synced.wait_for(|s| *s) => if r.is_err() { return },
            }
            if let Err(e) =
                crate::xds::serve(listener, Some(Arc::new(tls)), routes, grpc_drain).await
            {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        });

        let registry = Arc::new(registry);
        let admin = crate::admin::Admin {
            config: config.clone(),
            model: model.clone(),
            xds: xds.clone(),
            registry,
        };
        let (admin_addr, metrics_addr) = admin.serve(watcher.clone()).await?;
        tracing::info!(%grpc_addr, %admin_addr, %metrics_addr, identity = %identity, "istiod-lite serving");
        Ok(Self {
            config,
            model,
            xds,
            root,
            grpc_addr,
            admin_addr,
            metrics_addr,
            drain: Mutex::new(Some(trigger)),
        })
    }

    async fn authenticator(config: &Config) -> anyhow::Result<NodeAuth> {
        if let Some(path) = &config.node_tokens {
            let tokens = TokenFile::load(path)
                .with_context(|| format!("--node-tokens {}", path.display()))?;
            return Ok(NodeAuth::Tokens(tokens));
        }
        let client = kube::Client::try_default()
            .await
            .context("--kube: no usable Kubernetes configuration")?;
        Ok(NodeAuth::Kube(Self::token_reviewer(client, config)?))
    }

    /// The Kubernetes-mode authenticator `config` asks for: `--proxy-accounts`
    /// may act as node proxies, with tokens for one of `--token-audiences`.
    pub fn token_reviewer(client: kube::Client, config: &Config) -> anyhow::Result<TokenReviewer> {
        let accounts = config.proxy_account_pairs().map_err(anyhow::Error::msg)?;
        let audiences = config
            .checked_token_audiences()
            .map_err(anyhow::Error::msg)?;
        Ok(TokenReviewer::new(client)
            .with_allowed(accounts)
            .with_audiences(audiences))
    }

    /// Closes every stream and endpoint within the configured deadline.
    pub async fn shutdown(&self) -> DrainOutcome {
        let trigger = self.drain.lock().unwrap_or_else(|e| e.into_inner()).take();
        match trigger {
            Some(t) => t.drain(self.config.drain_deadline).await,
            None => DrainOutcome::Graceful,
        }
    }
}

/// Applies source events to the model in batches (whatever is queued is taken at
/// once, so a relist of thousands of objects is translated in one pass) and hands
/// the changed resources to the xDS server.
async fn run_model(
    mut rx: mpsc::Receiver<SourceEvent>,
    sources: usize,
    model: Arc<ModelState>,
    xds: XdsServer,
    drain: DrainWatcher,
) {
    let mut batch = Vec::new();
    let mut synced = 0;
    loop {
        let first = tokio::select! {
            () = drain.signaled() => return,
            e = rx.recv() => match e {
                Some(e) => e,
                None => return,
            },
        };
        batch.push(first);
        while batch.len() < SOURCE_QUEUE {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let mut changes = Vec::new();
        for event in batch.drain(..) {
            match event {
                SourceEvent::Changes(c) => changes.extend(c),
                SourceEvent::Reports { origin, reports } => {
                    set_reports(&model, origin, reports);
                }
                SourceEvent::Synced => synced += 1,
            }
        }
        if !changes.is_empty() {
            let count = changes.len();
            let (updates, reports) = {
                let mut t = model.translator.write().unwrap_or_else(|e| e.into_inner());
                let updates = t.apply(changes);
                (updates, t.reports())
            };
            let resources = updates.len();
            let changed = xds.apply(updates);
            tracing::debug!(objects = count, resources, changed, "model updated");
            set_reports(&model, "translate".into(), reports);
        }
        // Synced only once what the sources sent before it is in the model and
        // released to the xDS clients (one debounce at most, once): the gRPC
        // server and readiness open on it, and a first push or a CA check
        // against a half-applied view would remove or refuse too much.
        if synced >= sources && !*model.synced.borrow() {
            let store = xds.store().clone();
            tokio::select! {
                () = drain.signaled() => return,
                () = store.wait_released(store.generation()) => {}
            }
            model.synced.send_replace(true);
            tracing::info!("config synced");
        }
    }
}

/// Replaces one origin's problems, logging the new ones and the cleared ones.
fn set_reports(model: &ModelState, origin: String, reports: Vec<Report>) {
    let mut all = model.reports.lock().unwrap_or_else(|e| e.into_inner());
    let old = all.remove(&origin).unwrap_or_default();
    for r in reports.iter().filter(|r| !old.contains(r)) {
        tracing::warn!(report = %r, "config refused");
    }
    if !old.is_empty() && reports.is_empty() {
        tracing::info!(%origin, "config problems cleared");
    }
    if !reports.is_empty() {
        all.insert(origin, reports);
    }
}

#[cfg(test)]
#[path = "app_tests.rs"]
mod tests;
