//! The node agent's client: receives the node's pods over the zds protocol (Unix
//! SOCK_SEQPACKET, one protobuf message per packet, a pod's network namespace
//! passed as SCM_RIGHTS) and starts or stops their proxies, acking each message.
//!
//! No pod is taken (ztunnel does not connect) before the state source has
//! synced: with an empty state every destination would pass through in
//! plaintext, without mTLS. If the node agent goes away, running pods keep being served and ztunnel
//! reconnects with backoff; after a reconnect the agent re-sends every pod and a
//! snapshot marker, and pods it did not re-send are dropped.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use ambit_proto::zds::{
    Ack, NodeAgentMessage, ZdsHello, ZtunnelMessage, node_agent_message::Payload, ztunnel_message,
};
use mesh_core::backoff::{Backoff, BackoffConfig};
use mesh_core::os::{NetNs, SeqPacket};
use prost::Message;

use crate::app::App;
use crate::proxy::{Pod, PodPorts};

/// The zds protocol version ztunnel speaks.
pub const ZDS_VERSION: u32 = 1;
/// Reconnect delays: 50 ms doubling to 5 s, with jitter. A session that lasted
/// 10 s was healthy: the next reconnect is quick again. A shorter one (the agent
/// closing it at once, e.g. for another ztunnel on the same socket) keeps the
/// delay growing, so two clients never fight at full speed.
const RECONNECT: BackoffConfig = BackoffConfig {
    min: Duration::from_millis(50),
    max: Duration::from_secs(5),
    stable_after: Duration::from_secs(10),
};

/// Connects to the node agent and serves it until the process drains.
pub async fn run(app: Arc<App>) {
    let Some(drain) = app.watcher() else { return };
    let path = app.inputs.config.node_agent_socket.clone();
    if !app.is_state_synced() {
        tracing::info!("waiting for the state to sync before taking pods");
        tokio::select! {
            () = drain.signaled() => return,
            synced = app.state_synced() => if !synced { return },
        }
        tracing::info!(path = %path.display(), "state synced; connecting to the node agent");
    }
    let mut backoff = Backoff::new(RECONNECT);
    loop {
        let mut connected = None;
        let session = async {
            let sock = SeqPacket::connect(&path).await?;
            tracing::info!(path = %path.display(), "connected to the node agent");
            connected = Some(std::time::Instant::now());
            serve(&app, &sock).await
        };
        let ended = tokio::select! {
            () = drain.signaled() => return,
            r = session => r,
        };
        let delay = backoff.after_session(connected.map_or(Duration::ZERO, |at| at.elapsed()));
        match ended {
            Ok(()) => tracing::warn!("node agent closed the connection; reconnecting in {delay:?}"),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "node agent unreachable; retrying in {delay:?}")
            }
        }
        tokio::select! {
            () = drain.signaled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One connection: hello, then messages until the agent closes it.
async fn serve(app: &App, sock: &SeqPacket) -> std::io::Result<()> {
    let hello = ZtunnelMessage {
        payload: Some(ztunnel_message::Payload::Hello(ZdsHello {
            version: ZDS_VERSION,
        })),
    };
    sock.send(&hello.encode_to_vec(), None).await?;
    let mut resent: HashSet<String> = HashSet::new();
    loop {
        let (bytes, fd) = match sock.recv().await {
            Ok(m) => m,
            // A truncated packet or too many descriptors: refuse it, keep the session.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                ack(sock, format!("malformed message: {e}")).await?;
                continue;
            }
            Err(e) => return Err(e),
        };
        if bytes.is_empty() && fd.is_none() {
            return Ok(());
        }
        let result = match NodeAgentMessage::decode(bytes.as_slice()) {
            Err(e) => Err(format!("malformed message: not a NodeAgentMessage: {e}")),
            Ok(NodeAgentMessage { payload: None }) => {
                Err("malformed message: no payload".to_string())
            }
            Ok(NodeAgentMessage { payload: Some(p) }) => handle(app, p, fd, &mut resent).await,
        };
        let error = result.err().unwrap_or_default();
        if !error.is_empty() {
            tracing::warn!(%error, "node agent message refused");
        }
        ack(sock, error).await?;
    }
}

async fn ack(sock: &SeqPacket, error: String) -> std::io::Result<()> {
    let msg = ZtunnelMessage {
        payload: Some(ztunnel_message::Payload::Ack(Ack { error })),
    };
    sock.send(&msg.encode_to_vec(), None).await
}

async fn handle(
    app: &App,
    payload: Payload,
    fd: Option<std::os::fd::OwnedFd>,
    resent: &mut HashSet<String>,
) -> Result<(), String> {
    match payload {
        Payload::Add(add) => {
            let fd = fd.ok_or_else(|| {
                format!("add {}: no network namespace descriptor attached", add.uid)
            })?;
            let info = add
                .info
                .ok_or_else(|| format!("add {}: no workload info", add.uid))?;
            if add.uid.is_empty() || info.name.is_empty() || info.namespace.is_empty() {
                return Err("add: uid, name and namespace are required".into());
            }
            let pod = Pod {
                uid: add.uid.clone(),
                name: info.name,
                namespace: info.namespace,
                service_account: if info.service_account.is_empty() {
                    "default".into()
                } else {
                    info.service_account
                },
            };
            app.add_pod(pod, Some(NetNs::from_fd(fd)), PodPorts::default())
                .await
                .map_err(|e| e.to_string())?;
            // Only a pod served now counts as re-sent: a refused one's older proxy
            // (in a namespace the agent no longer reports) goes at the snapshot.
            resent.insert(add.uid);
            Ok(())
        }
        Payload::Del(del) => {
            if fd.is_some() {
                return Err(format!("del {}: unexpected descriptor", del.uid));
            }
            if !app.remove_pod(&del.uid).await {
                tracing::info!(uid = %del.uid, "delete of a pod ztunnel does not have");
            }
            resent.remove(&del.uid);
            Ok(())
        }
        Payload::SnapshotSent(_) => {
            for uid in app.pod_uids().await {
                if !resent.contains(&uid) {
                    tracing::info!(%uid, "pod not in the node agent's snapshot; removing");
                    app.remove_pod(&uid).await;
                }
            }
            Ok(())
        }
    }
}
