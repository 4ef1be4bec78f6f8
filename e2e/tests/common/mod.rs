//! Helpers of the control-plane e2e tests (`control_plane.rs`,
//! `control_plane_bad_input.rs`): the e2e tool binary is known only to the test
//! crates (`CARGO_BIN_EXE_*`), so the library's checks get it from here.
#![allow(dead_code)] // each test crate uses its own subset

use std::net::SocketAddr;
use std::time::Duration;

use ambit_e2e::checks;
use ambit_e2e::{EchoTool, MeshCluster, Pod, PodSpec};

pub const WAIT: Duration = Duration::from_secs(20);

pub fn echo() -> EchoTool {
    EchoTool::new(env!("CARGO_BIN_EXE_e2e-tool"))
}

/// A pod in namespace `ns` running as service account `sa`.
pub fn pod(name: &str, node: u8, ns: &str, sa: &str) -> PodSpec {
    PodSpec::new(name, node)
        .namespace(ns)
        .cni_arg("K8S_POD_SERVICE_ACCOUNT", sa)
}

pub async fn assert_echo(from: &Pod, to: SocketAddr, message: &str) {
    checks::assert_echo(&echo(), from, to, message).await;
}

pub async fn assert_refused(from: &Pod, to: SocketAddr) {
    checks::assert_refused(&echo(), from, to).await;
}

/// Refused by node `node`'s policy (see [`checks::assert_denied_by_policy`]).
pub async fn assert_denied(mesh: &MeshCluster, node: u8, from: &Pod, to: SocketAddr) {
    checks::assert_denied_by_policy(mesh, node, &echo(), from, to).await;
}

pub async fn access_log(mesh: &mut MeshCluster, node: u8, what: &str, want: &[&str]) -> String {
    checks::access_log(mesh, node, what, want, WAIT).await
}
