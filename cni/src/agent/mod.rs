//! The node agent: serves the CNI plugin on a Unix stream socket and ztunnel on
//! the zds SOCK_SEQPACKET socket, and keeps the node's enrolled pods in between.
//! Its pods outlive any ztunnel connection; a bad plugin request or a bad ztunnel
//! message costs that one connection only.

mod config;
mod enroller;
mod handoff;
mod plugin_server;
mod pod_locks;
mod pod_store;
mod ztunnel_conn;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mesh_core::drain::DrainWatcher;
use mesh_core::os::{NetNs, SeqPacketListener};
use tokio::net::UnixListener;

pub use config::{AgentConfig, DEFAULT_STATE_FILE, DEFAULT_ZDS_SOCKET};
pub use pod_store::StateError;

use crate::redirect::Redirector;
use enroller::Enroller;
use plugin_server::PluginLimits;
use pod_store::PodStore;
use ztunnel_conn::ZdsTimeouts;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on or create {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the agent's own network namespace: {0}")]
    OwnNetns(#[source] std::io::Error),
    #[error(transparent)]
    State(#[from] StateError),
}

/// A node agent with both sockets bound, ready to [`Agent::run`].
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    plugin_listener: UnixListener,
    zds_listener: SeqPacketListener,
    enroller: Arc<Enroller>,
}

impl Agent {
    /// Validates `config` and binds both sockets (owner-only permissions: the zds
    /// socket hands out pod namespaces). Needs a tokio runtime.
    pub fn bind(config: AgentConfig) -> Result<Self, AgentError> {
        config.validate().map_err(AgentError::Config)?;
        let own_netns = NetNs::current()
            .and_then(|ns| ns.inode())
            .map_err(AgentError::OwnNetns)?;
        let bind_err = |path: &Path| {
            let path = path.to_owned();
            move |source| AgentError::Bind { path, source }
        };
        let plugin_listener = prepare_socket_path(&config.plugin_socket)
            .and_then(|()| UnixListener::bind(&config.plugin_socket))
            .and_then(|l| restrict(&config.plugin_socket).map(|()| l))
            .map_err(bind_err(&config.plugin_socket))?;
        let zds_listener = prepare_socket_path(&config.zds_socket)
            .and_then(|()| SeqPacketListener::bind(&config.zds_socket))
            .and_then(|l| restrict(&config.zds_socket).map(|()| l))
            .map_err(bind_err(&config.zds_socket))?;
        prepare_dir(&config.state_file).map_err(bind_err(&config.state_file))?;
        let store = PodStore::locked(&config.state_file)?;
        let saved = store.load(own_netns)?;
        tracing::info!(pods = saved.len(), path = %store.path().display(), "loaded saved pods");
        let redirector = Redirector::new(config.redirect(), config.tools());
        let enroller = Arc::new(Enroller::new(
            redirector,
            own_netns,
            store,
            saved,
            config.zds_retry(),
        ));
        tracing::info!(
            plugin_socket = %config.plugin_socket.display(),
            zds_socket = %config.zds_socket.display(),
            proxy_mark = %config.proxy_mark,
            "node agent listening"
        );
        Ok(Self {
            config,
            plugin_listener,
            zds_listener,
            enroller,
        })
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Serves both sockets until `drain` signals, then removes the socket files.
    /// Enrolled pods keep their redirection: a restarted agent must not break them.
    pub async fn run(self, drain: DrainWatcher) {
        let Self {
            config,
            plugin_listener,
            zds_listener,
            enroller,
        } = self;
        let limits = PluginLimits {
            io_timeout: config.plugin_io_timeout(),
            max_connections: config.max_plugin_connections,
        };
        let timeouts = ZdsTimeouts {
            hello: config.hello_timeout(),
            ack: config.ack_timeout(),
        };
        tokio::join!(
            plugin_server::serve(plugin_listener, enroller.clone(), limits, drain.clone()),
            ztunnel_conn::serve(zds_listener, enroller.clone(), timeouts, drain.clone()),
            enroller.reoffer_refused(drain),
        );
        for path in [&config.plugin_socket, &config.zds_socket] {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("node agent stopped");
    }
}

/// Creates the directory `path` goes in.
fn prepare_dir(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir),
        None => Ok(()),
    }
}

/// Creates the socket's directory and removes a stale socket file.
fn prepare_socket_path(path: &Path) -> std::io::Result<()> {
    prepare_dir(path)?;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn restrict(path: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}
