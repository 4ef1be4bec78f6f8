//! Ambit's benchmark scenarios. Each scenario moves the same load over the direct
//! path (no mesh) and over the mesh path in the same run, and reports both with their
//! ratio; the scenarios themselves are the `[[bench]]` binaries in `scenarios/`.
//!
//! - [`settings`]: how much to move, how often, with which buffers and HBONE tuning.
//! - [`topology`]: which tokio workers run the sending and the receiving end.
//! - [`load`]: the sender and the discarding receiver both paths share.
//! - [`direct`] and [`mesh`]: the two paths, behind the [`Path`] trait.
//! - [`compare`]: warm-up and interleaved repetitions of both paths.
//! - [`cpu`]: the cores each transfer used, and what else was busy meanwhile.
//! - [`report`]: samples, medians and the printed table.
//! - [`cluster_yaml`], [`istiod`] and [`xds_load`]: the `control_plane` scenario's
//!   generated cluster config, the istiod-lite process it measures, and its
//!   simulated delta xDS clients.
//! - [`procfs`] and [`smaps`]: another process's memory and CPU time, and its
//!   resident memory per mapping (`ztunnel_e2e`'s idle figure).

pub mod cluster_yaml;
pub mod compare;
pub mod cpu;
pub mod direct;
pub mod istiod;
pub mod load;
pub mod mesh;
pub mod procfs;
pub mod report;
pub mod settings;
mod size;
pub mod smaps;
pub mod topology;
pub mod xds_load;

use std::future::Future;
use std::io;

pub use compare::compare;
pub use direct::DirectPath;
pub use mesh::MeshPath;
pub use report::{Row, Sample, Series, Table};
pub use settings::{Paths, Settings, SettingsError};
pub use size::{format_size, parse_size};
pub use topology::{Runtimes, Topology};

/// A way bytes get from a sender to a receiver, measured one transfer at a time.
pub trait Path {
    /// Moves `bytes` from a fresh sender to a fresh receiver and times it; setup
    /// (connection, handshake, tunnel) is done before the clock starts.
    fn transfer(&self, bytes: u64) -> impl Future<Output = Result<Sample, BenchError>> + Send;
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("TLS config: {0}")]
    Tls(#[from] mesh_core::tls::TlsError),
    // Boxed: a connect error is large and rare, and would bloat every `Result`.
    #[error("HBONE connect: {0}")]
    Connect(Box<mesh_core::hbone::ConnectError>),
    #[error("the receiving end's task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("the receiver stopped before reporting")]
    ReceiverGone,
    #[error("the receiver got {got} bytes, the sender sent {sent}")]
    ShortTransfer { sent: u64, got: u64 },
}

impl From<mesh_core::hbone::ConnectError> for BenchError {
    fn from(e: mesh_core::hbone::ConnectError) -> Self {
        Self::Connect(Box::new(e))
    }
}

impl BenchError {
    pub(crate) fn io(step: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { step, source }
    }
}
