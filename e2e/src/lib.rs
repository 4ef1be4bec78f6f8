//! End-to-end test library: builds clusters out of Linux network namespaces (a wire
//! namespace, one per node, one per pod wired by the standard CNI plugins with the
//! mesh's own plugin chainable after them) and runs real processes in them. Every
//! cluster removes what it created when dropped, also when its test panics.
//!
//! Addresses come from 198.18.0.0/15 only (see [`underlay`]); nothing is added to the
//! root namespace. Needs root: start each test with [`require_root`].

pub mod build;
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
pub mod packages;
pub mod pod;
pub mod process;
pub mod underlay;

pub use cluster::{Cluster, ClusterBuilder, ClusterError};
pub use cni::{CniChain, CniError, CniPlugin, CniResult};
pub use control_plane::ControlPlane;
pub use echo::{EchoServer, EchoTool};
pub use mesh::{MeshCluster, MeshError, NodeMesh, cancel_build, workspace_bin};
pub use naming::ClusterPrefix;
pub use netns::{Netns, NetnsError, list_netns};
pub use node::Node;
pub use pod::{Pod, PodSpec};
pub use process::{NsProcess, ProcessError, WAIT_TIMEOUT};

pub use mesh_core::testing::require_root;
