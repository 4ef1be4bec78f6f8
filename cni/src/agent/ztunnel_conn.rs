//! ztunnel's side of the agent: the zds listener, one task per connection. A new
//! connection says hello, gets every known pod and `SnapshotSent`, then becomes the
//! one ztunnel the agent talks to (the previous connection is closed). Each message
//! waits for its ack, bounded in time; a malformed, unexpected or late message
//! drops the connection, never the agent.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::drain::DrainWatcher;
use mesh_core::os::{NetNs, SeqPacket, SeqPacketListener};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument;

use super::enroller::Enroller;
use crate::zds::{self, ZtunnelEvent};

/// Connections served at once (one is active; others are arriving or leaving).
const MAX_CONNECTIONS: usize = 8;

/// Why a message to ztunnel did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ExchangeError {
    /// ztunnel answered with an error: the connection stays.
    #[error("ztunnel refused: {0}")]
    Refused(String),
    /// No usable answer: the connection is dropped.
    #[error("ztunnel connection broken: {0}")]
    Broken(String),
}

/// Why no message came from ztunnel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum RecvError {
    #[error("ztunnel closed the connection")]
    Closed,
    #[error("{0}")]
    Invalid(String),
}

/// One message for the connection's task, with its reply channel.
struct Command {
    msg: Vec<u8>,
    netns: Option<NetNs>,
    reply: oneshot::Sender<Result<(), ExchangeError>>,
}

/// How the rest of the agent reaches the active connection. Dropping the last
/// handle closes the connection.
#[derive(Debug, Clone)]
pub(crate) struct ZtunnelHandle {
    pub(crate) id: u64,
    commands: mpsc::Sender<Command>,
}

impl ZtunnelHandle {
    /// Sends one message (with `netns` attached) and waits for its ack.
    pub(crate) async fn exchange(
        &self,
        msg: Vec<u8>,
        netns: Option<NetNs>,
    ) -> Result<(), ExchangeError> {
        let gone = || ExchangeError::Broken("connection closed".into());
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command { msg, netns, reply })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// A connected ztunnel socket.
#[derive(Debug)]
pub(crate) struct ZdsConnection {
    sock: SeqPacket,
    ack_timeout: Duration,
}

impl ZdsConnection {
    /// Sends `msg` and waits up to the ack timeout for ztunnel's ack.
    pub(crate) async fn exchange(
        &self,
        msg: &[u8],
        netns: Option<&NetNs>,
    ) -> Result<(), ExchangeError> {
        use std::os::fd::AsFd;
        self.sock
            .send(msg, netns.map(|ns| ns.as_fd()))
            .await
            .map_err(|e| ExchangeError::Broken(format!("send failed: {e}")))?;
        let event = tokio::time::timeout(self.ack_timeout, self.recv_event())
            .await
            .map_err(|_| ExchangeError::Broken(format!("no ack within {:?}", self.ack_timeout)))?
            .map_err(|e| ExchangeError::Broken(e.to_string()))?;
        match event {
            ZtunnelEvent::Ack { error } if error.is_empty() => Ok(()),
            ZtunnelEvent::Ack { error } => Err(ExchangeError::Refused(error)),
            ZtunnelEvent::Hello { .. } => Err(ExchangeError::Broken(
                "hello where an ack was expected".into(),
            )),
        }
    }

    /// The next message from ztunnel, or why there is none.
    async fn recv_event(&self) -> Result<ZtunnelEvent, RecvError> {
        let (bytes, fd) = self
            .sock
            .recv()
            .await
            .map_err(|e| RecvError::Invalid(format!("receive failed: {e}")))?;
        if fd.is_some() {
            return Err(RecvError::Invalid("ztunnel sent a file descriptor".into()));
        }
        if bytes.is_empty() {
            return Err(RecvError::Closed);
        }
        zds::decode_ztunnel(&bytes).map_err(|e| RecvError::Invalid(e.to_string()))
    }
}

/// Timeouts of the zds side.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ZdsTimeouts {
    pub(crate) hello: Duration,
    pub(crate) ack: Duration,
}

/// Accepts ztunnel connections until the drain starts.
pub(crate) async fn serve(
    listener: SeqPacketListener,
    enroller: Arc<Enroller>,
    timeouts: ZdsTimeouts,
    drain: DrainWatcher,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut next_id = 0u64;
    loop {
        let permit = tokio::select! {
            _ = drain.signaled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let sock = tokio::select! {
            _ = drain.signaled() => break,
            accepted = listener.accept() => match accepted {
                Ok(sock) => sock,
                Err(e) => {
                    tracing::warn!("accepting a ztunnel connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        next_id += 1;
        let conn = ZdsConnection {
            sock,
            ack_timeout: timeouts.ack,
        };
        let task = run_connection(
            conn,
            next_id,
            enroller.clone(),
            timeouts.hello,
            drain.clone(),
        );
        tokio::spawn(
            async move {
                task.await;
                drop(permit);
            }
            .instrument(tracing::info_span!("zds", conn = next_id)),
        );
    }
}

async fn run_connection(
    conn: ZdsConnection,
    id: u64,
    enroller: Arc<Enroller>,
    hello_timeout: Duration,
    drain: DrainWatcher,
) {
    match tokio::time::timeout(hello_timeout, conn.recv_event()).await {
        Ok(Ok(ZtunnelEvent::Hello { version })) => {
            tracing::info!(version, "ztunnel said hello");
        }
        Ok(Ok(other)) => {
            tracing::warn!(?other, "dropping ztunnel connection: expected hello");
            return;
        }
        Ok(Err(reason)) => {
            tracing::warn!("dropping ztunnel connection before hello: {reason}");
            return;
        }
        Err(_) => {
            tracing::warn!("dropping ztunnel connection: no hello within {hello_timeout:?}");
            return;
        }
    }
    let (commands, mut inbox) = mpsc::channel(1);
    let handle = ZtunnelHandle { id, commands };
    match enroller.attach(&conn, handle).await {
        Ok(pods) => tracing::info!(pods, "snapshot sent; this ztunnel connection is active"),
        Err(e) => {
            tracing::warn!("dropping ztunnel connection during the snapshot: {e}");
            return;
        }
    }
    loop {
        tokio::select! {
            command = inbox.recv() => {
                let Some(command) = command else {
                    tracing::info!("closing: a newer ztunnel connection took over");
                    return;
                };
                let result = conn.exchange(&command.msg, command.netns.as_ref()).await;
                let broken = matches!(result, Err(ExchangeError::Broken(_)));
                if let Err(e) = &result {
                    tracing::warn!("{e}");
                }
                let _ = command.reply.send(result);
                if broken {
                    return;
                }
            }
            unsolicited = conn.recv_event() => {
                match unsolicited {
                    Err(RecvError::Closed) => tracing::info!("ztunnel closed the connection"),
                    Err(reason) => tracing::warn!("dropping ztunnel connection: {reason}"),
                    Ok(event) => tracing::warn!(?event, "dropping ztunnel connection: unexpected message"),
                }
                return;
            }
            _ = drain.signaled() => {
                tracing::info!("closing the ztunnel connection: shutting down");
                return;
            }
        }
    }
}
