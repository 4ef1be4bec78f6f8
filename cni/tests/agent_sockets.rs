//! One node agent per state file, and an agent's socket files are its own: a
//! second agent is refused before it touches the first one's sockets, and at
//! shutdown an agent removes only the socket files it bound. No root needed.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;

use ambit_cni::agent::{Agent, AgentError, StateError};
use ambit_cni::api::{AgentReply, AgentRequest};
use ambit_cni::plugin::AgentClient;
use support::*;

async fn list(plugin_socket: &Path) -> Result<AgentReply, String> {
    let client = AgentClient::new(plugin_socket, EVENT_TIMEOUT);
    tokio::task::spawn_blocking(move || client.request(&AgentRequest::List))
        .await
        .unwrap()
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_is_refused_and_the_first_stays_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestAgent::start_in(dir.path());
    assert!(matches!(
        list(&first.plugin_socket).await,
        Ok(AgentReply::Ok { .. })
    ));

    let err = Agent::bind(TestAgent::config_in(dir.path())).unwrap_err();
    assert!(
        matches!(err, AgentError::State(StateError::Locked { .. })),
        "{err}"
    );

    // Both of the first agent's sockets still answer.
    let reply = list(&first.plugin_socket).await;
    assert!(matches!(reply, Ok(AgentReply::Ok { .. })), "{reply:?}");
    let (_zt, pods) = FakeZtunnel::attach(&first.zds_socket).await;
    assert!(pods.is_empty());
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_leaves_a_socket_file_the_agent_did_not_bind() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start_in(dir.path());
    let (plugin_socket, zds_socket) = (agent.plugin_socket.clone(), agent.zds_socket.clone());
    // Somebody else's socket now sits at the plugin path.
    std::fs::remove_file(&plugin_socket).unwrap();
    let _other = std::os::unix::net::UnixListener::bind(&plugin_socket).unwrap();
    agent.stop().await;
    assert!(
        plugin_socket.exists(),
        "the agent removed a socket not its own"
    );
    assert!(!zds_socket.exists(), "the agent left its own socket behind");
}
