//! The current state, shared by every listener: swapped whole on change, with a
//! watch channel for whoever must react (pod listeners, the admin view).

use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use super::ProxyState;

/// Holds the current [`ProxyState`] and announces each new one.
#[derive(Debug)]
pub struct StateStore {
    current: RwLock<Arc<ProxyState>>,
    version: watch::Sender<u64>,
    /// Set on every state: the namespace whose policies apply mesh-wide.
    root_namespace: String,
    /// The mesh's trust domain (`--trust-domain`): a workload the source gives
    /// none is in it.
    trust_domain: String,
}

impl Default for StateStore {
    fn default() -> Self {
        Self::new(ProxyState::default())
    }
}

impl StateStore {
    pub fn new(state: ProxyState) -> Self {
        let root_namespace = state.policies().root_namespace().to_string();
        Self::with_root_namespace(state, root_namespace)
    }

    /// A store whose states (this one and every replacement) take their
    /// mesh-wide policies from `root_namespace`.
    pub fn with_root_namespace(mut state: ProxyState, root_namespace: String) -> Self {
        state.set_root_namespace(&root_namespace);
        Self {
            current: RwLock::new(Arc::new(state)),
            version: watch::channel(0).0,
            root_namespace,
            trust_domain: mesh_core::DEFAULT_TRUST_DOMAIN.to_string(),
        }
    }

    /// Puts the workloads its sources give no trust domain in `trust_domain`.
    pub fn with_trust_domain(mut self, trust_domain: impl Into<String>) -> Self {
        self.trust_domain = trust_domain.into();
        self
    }

    /// The state a new connection uses.
    pub fn snapshot(&self) -> Arc<ProxyState> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the state; new connections see it at once. Round robin goes on
    /// where the previous state left it.
    pub fn replace(&self, mut state: ProxyState) {
        state.set_root_namespace(&self.root_namespace);
        {
            let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
            state.keep_round_robin(&current);
            *current = Arc::new(state);
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// The namespace whose policies apply mesh-wide.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// The trust domain of the workloads their source gives none.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Resolves on each replacement.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}
