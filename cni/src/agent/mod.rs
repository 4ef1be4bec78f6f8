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

use std::os::unix::fs::{MetadataExt, PermissionsExt};
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
use ztunnel_conn::ZdsSettings;

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
    /// The socket files this agent created, removed at shutdown if still theirs.
    bound: [BoundSocket; 2],
    enroller: Arc<Enroller>,
}

impl Agent {
    /// Validates `config`, locks the state file (a second agent on it is refused
    /// before it touches the first one's sockets) and binds both sockets
    /// (owner-only permissions: the zds socket hands out pod namespaces). Needs a
    /// tokio runtime.
    pub fn bind(config: AgentConfig) -> Result<Self, AgentError> {
        config.validate().map_err(AgentError::Config)?;
        let own_netns = NetNs::current()
            .and_then(|ns| ns.inode())
            .map_err(AgentError::OwnNetns)?;
        let bind_err = |path: &Path| {
            let path = path.to_owned();
            move |source| AgentError::Bind { path, source }
        };
        // The state file's lock first: a second agent on the node must be refused
        // before it touches anything of the first one's, its sockets above all.
        prepare_dir(&config.state_file).map_err(bind_err(&config.state_file))?;
        let store = PodStore::locked(&config.state_file)?;
        let (plugin_listener, plugin_bound) =
            bind_socket(&config.plugin_socket, |path| UnixListener::bind(path))
                .map_err(bind_err(&config.plugin_socket))?;
        let (zds_listener, zds_bound) = bind_socket(&config.zds_socket, SeqPacketListener::bind)
            .map_err(bind_err(&config.zds_socket))?;
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
            bound: [plugin_bound, zds_bound],
            enroller,
        })
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Serves both sockets until `drain` signals, then removes the socket files it
    /// bound (a file since replaced by someone else's is left).
    /// Enrolled pods keep their redirection: a restarted agent must not break them.
    pub async fn run(self, drain: DrainWatcher) {
        let Self {
            config,
            plugin_listener,
            zds_listener,
            bound,
            enroller,
        } = self;
        let limits = PluginLimits {
            io_timeout: config.plugin_io_timeout(),
            max_connections: config.max_plugin_connections,
        };
        let zds = ZdsSettings {
            hello: config.hello_timeout(),
            ack: config.ack_timeout(),
            // Each plugin request has at most one message queued, and so has the
            // re-offer task; the snapshot is one more.
            queue: config.max_plugin_connections.saturating_add(2),
        };
        tokio::join!(
            plugin_server::serve(plugin_listener, enroller.clone(), limits, drain.clone()),
            ztunnel_conn::serve(zds_listener, enroller.clone(), zds, drain.clone()),
            enroller.reoffer_refused(drain),
        );
        for socket in &bound {
            socket.remove();
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

/// A socket file this agent bound: its path and inode.
#[derive(Debug)]
struct BoundSocket {
    path: PathBuf,
    inode: u64,
}

impl BoundSocket {
    /// Removes the socket file, unless it is no longer the one this agent bound
    /// (another agent's, or anything put there since): that one is left alone.
    fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.ino() == self.inode => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => tracing::info!(
                path = %self.path.display(),
                "the socket file was replaced since; leaving it"
            ),
            Err(_) => {}
        }
    }
}

/// Creates the socket's directory, removes a stale socket file, binds `path`
/// with owner-only permissions and notes the new file's inode. Only called with
/// the state file's lock held, so the file removed is no live agent's.
fn bind_socket<L>(
    path: &Path,
    bind: impl FnOnce(&Path) -> std::io::Result<L>,
) -> std::io::Result<(L, BoundSocket)> {
    prepare_dir(path)?;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = bind(path)?;
    restrict(path)?;
    let inode = std::fs::symlink_metadata(path)?.ino();
    Ok((
        listener,
        BoundSocket {
            path: path.to_owned(),
            inode,
        },
    ))
}

fn restrict(path: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}
