//! End-to-end test library: builds clusters out of Linux network namespaces (a wire
//! namespace, one per node, one per pod wired by the standard CNI plugins with the
//! mesh's own plugin chainable after them) and runs real processes in them. Every
//! cluster removes what it created when dropped, also when its test panics.
//!
//! Addresses come from 198.18.0.0/15 only (see [`underlay`]); nothing is added to the
//! root namespace. Needs root: start each test with [`require_root`].

pub mod checks;
pub mod cluster;
pub mod cni;
pub mod control_plane;
pub mod echo;
pub mod mesh;
pub mod mesh_control;
pub mod naming;
pub mod netns;
pub mod node;
pub mod pod;
pub mod process;
pub mod underlay;

use std::io::Write;

pub use cluster::{Cluster, ClusterBuilder, ClusterError};
pub use cni::{CniChain, CniError, CniPlugin, CniResult};
pub use control_plane::ControlPlane;
pub use echo::{EchoServer, EchoTool};
pub use mesh::{MeshCluster, MeshError, NodeMesh, workspace_bin};
pub use naming::ClusterPrefix;
pub use netns::{Netns, NetnsError, list_netns};
pub use node::Node;
pub use pod::{Pod, PodSpec};
pub use process::{NsProcess, ProcessError, WAIT_TIMEOUT};

/// Whether the test can run. Without root: panics when `CI=true` (CI must run these
/// tests, not skip them), otherwise prints a loud SKIPPED line and returns false so
/// the test can return early. The line bypasses the harness's output capture.
pub fn require_root(test_name: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test_name} needs root, and CI=true: e2e tests must run in CI");
    }
    // Straight to fd 2: `eprintln!` is captured by the test harness and would hide it.
    let line = format!("SKIPPED (needs root): {test_name}\n");
    let _best_effort = std::io::stderr().lock().write_all(line.as_bytes());
    false
}
