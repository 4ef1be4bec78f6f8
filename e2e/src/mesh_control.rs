//! What control-plane tests do to a meshed cluster: start it with extra
//! istiod-lite flags, stop and restart istiod-lite in place, and read what the
//! control plane and every ztunnel report (debug views, metrics, config dumps).

use std::ffi::OsString;
use std::time::Duration;

use crate::control_plane::{CONTROL_NODE, DEBUG_ADDR, METRICS_ADDR};
use crate::mesh::{MESH_WAIT, MeshCluster, MeshError};

/// ztunnel's admin endpoint, on each node's loopback.
const ZTUNNEL_ADMIN: &str = "127.0.0.1:15000";

/// How a control-plane test wants its cluster.
#[derive(Debug, Clone, Default)]
pub struct MeshOptions {
    /// Flags appended to istiod-lite's command line (`--cert-ttl 30s`, ...).
    pub istiod_args: Vec<OsString>,
}

impl MeshOptions {
    /// Appends flags to istiod-lite's command line.
    pub fn istiod_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.istiod_args.extend(args.into_iter().map(Into::into));
        self
    }
}

impl MeshCluster {
    /// As [`MeshCluster::start`], with `options` applied. istiod-lite's extra
    /// flags take effect before the first pod exists: the harness's istiod-lite is
    /// replaced in place (same CA, tokens and port) and every ztunnel has
    /// reconnected to the new one when this returns.
    pub async fn start_with(nodes: u8, options: MeshOptions) -> Result<Self, MeshError> {
        let mut mesh = Self::start(nodes).await?;
        if !options.istiod_args.is_empty() {
            let control = mesh
                .control
                .as_mut()
                .ok_or_else(|| MeshError::Setup("no control plane".into()))?;
            control
                .restart_with_args(&mesh.cluster, options.istiod_args)
                .await?;
            mesh.wait_for_xds(true).await?;
        }
        Ok(mesh)
    }

    /// Stops istiod-lite (SIGTERM) and waits until it exited.
    pub async fn stop_control_plane(&mut self) -> Result<(), MeshError> {
        self.control
            .as_mut()
            .ok_or_else(|| MeshError::Setup("no control plane".into()))?
            .stop()
            .await
    }

    /// Starts istiod-lite again in place and waits until it serves (not until
    /// the ztunnels reconnected: see [`MeshCluster::wait_for_xds`]).
    pub async fn restart_control_plane(&mut self) -> Result<(), MeshError> {
        self.control
            .as_mut()
            .ok_or_else(|| MeshError::Setup("no control plane".into()))?
            .restart(&self.cluster)
            .await
    }

    /// Waits until every ztunnel's xDS stream is `connected` (or is not).
    pub async fn wait_for_xds(&self, connected: bool) -> Result<(), MeshError> {
        let what = if connected {
            "an xDS stream"
        } else {
            "the xDS stream's end"
        };
        self.wait_for_dump(what, |d| d["xds"]["connected"] == connected)
            .await
    }

    /// Node `node`'s ztunnel config dump.
    pub fn config_dump(&self, node: u8) -> Result<serde_json::Value, MeshError> {
        let body = self.fetch(node, ZTUNNEL_ADMIN, "/config_dump")?;
        serde_json::from_str(&body)
            .map_err(|e| MeshError::Setup(format!("node {node}'s config dump: {e}: {body}")))
    }

    /// Every node's ztunnel config dump, node 1 first.
    pub fn config_dumps(&self) -> Result<Vec<serde_json::Value>, MeshError> {
        (1..=self.nodes.len() as u8)
            .map(|n| self.config_dump(n))
            .collect()
    }

    /// istiod-lite's debug view at `path` (`/debug/clients`, `/debug/errors`,
    /// `/debug/model`), as JSON.
    pub fn control_debug(&self, path: &str) -> Result<serde_json::Value, MeshError> {
        let body = self.fetch(CONTROL_NODE, DEBUG_ADDR, path)?;
        serde_json::from_str(&body)
            .map_err(|e| MeshError::Setup(format!("istiod-lite {path}: {e}: {body}")))
    }

    /// istiod-lite's Prometheus text.
    pub fn control_metrics(&self) -> Result<String, MeshError> {
        self.fetch(CONTROL_NODE, METRICS_ADDR, "/metrics")
    }

    /// Polls `cond` every 50 ms until it returns `Some`, for at most `timeout`.
    pub async fn poll<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Self) -> Option<T>,
    ) -> Result<T, MeshError> {
        let deadline = tokio::time::Instant::now() + timeout.min(MESH_WAIT * 4);
        loop {
            if let Some(v) = cond(self) {
                return Ok(v);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(MeshError::Setup(format!("no {what} within {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The sum of the samples of metric `name` whose line contains every one of
/// `labels` (`type_url="..."`), in Prometheus text.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter(|l| labels.iter().all(|m| l.contains(m)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
