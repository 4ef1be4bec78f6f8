//! ztunnel's side of the agent: the zds listener, one task per connection. A new
//! connection says hello, becomes the one ztunnel the agent talks to (the previous
//! connection is let go of) and gets every known pod, then `SnapshotSent`. What
//! the agent tells a connection goes through that connection's queue, in order:
//! the rest of the agent queues a message without waiting (under its pod table's
//! lock, whose order the queue keeps) and awaits the answer with no lock held,
//! while this task sends each message and waits for its ack, bounded in time. A
//! malformed, unexpected or late message drops the connection, never the agent.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::drain::DrainWatcher;
use mesh_core::os::{NetNs, SeqPacket, SeqPacketListener};
use tokio::sync::mpsc::error::TrySendError;
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

/// One pod of a snapshot: its enrollment (`generation`) and its `AddWorkload`.
#[derive(Debug)]
pub(crate) struct SnapshotPod {
    pub(crate) uid: String,
    pub(crate) generation: u64,
    pub(crate) msg: Vec<u8>,
    pub(crate) netns: Arc<NetNs>,
}

/// What the connection's task is asked to send, in queue order.
#[derive(Debug)]
enum Command {
    /// One message (with `netns` attached); its answer goes to `reply`.
    Message {
        msg: Vec<u8>,
        netns: Option<Arc<NetNs>>,
        reply: oneshot::Sender<Result<(), ExchangeError>>,
    },
    /// Every pod, then `SnapshotSent`; each pod's answer goes to the enroller.
    Snapshot(Vec<SnapshotPod>),
}

/// How the rest of the agent reaches a connection: its queue. Dropping the
/// handle lets the connection go once what is queued has been sent.
#[derive(Debug)]
pub(crate) struct ZtunnelHandle {
    pub(crate) id: u64,
    commands: mpsc::Sender<Command>,
}

/// The answer to a queued message, to await with no lock held.
#[derive(Debug)]
#[must_use = "a queued message's answer says whether ztunnel took it"]
pub(crate) struct Pending {
    /// The connection the message went to.
    pub(crate) conn: u64,
    answer: oneshot::Receiver<Result<(), ExchangeError>>,
}

impl Pending {
    pub(crate) async fn answer(self) -> Result<(), ExchangeError> {
        self.answer.await.unwrap_or_else(|_| {
            Err(ExchangeError::Broken(
                "connection closed before the answer".into(),
            ))
        })
    }
}

impl ZtunnelHandle {
    /// A handle on connection `id` and the receiving end of its queue, which
    /// holds at most `capacity` commands.
    fn channel(id: u64, capacity: usize) -> (Self, mpsc::Receiver<Command>) {
        let (commands, inbox) = mpsc::channel(capacity.max(1));
        (Self { id, commands }, inbox)
    }

    /// Queues `msg` (with `netns` attached) behind everything queued before,
    /// without waiting. A full queue is a connection too far behind to keep
    /// (`Broken`): the next connection's snapshot carries every pod.
    pub(crate) fn queue(
        &self,
        msg: Vec<u8>,
        netns: Option<Arc<NetNs>>,
    ) -> Result<Pending, ExchangeError> {
        let (reply, answer) = oneshot::channel();
        self.push(Command::Message { msg, netns, reply })?;
        Ok(Pending {
            conn: self.id,
            answer,
        })
    }

    /// Queues a snapshot of `pods`, followed by `SnapshotSent`.
    pub(crate) fn queue_snapshot(&self, pods: Vec<SnapshotPod>) -> Result<(), ExchangeError> {
        self.push(Command::Snapshot(pods))
    }

    fn push(&self, command: Command) -> Result<(), ExchangeError> {
        self.commands.try_send(command).map_err(|e| {
            ExchangeError::Broken(match e {
                TrySendError::Full(_) => "its queue is full".into(),
                TrySendError::Closed(_) => "connection closed".into(),
            })
        })
    }
}

/// A connected ztunnel socket.
#[derive(Debug)]
struct ZdsConnection {
    sock: SeqPacket,
    ack_timeout: Duration,
}

impl ZdsConnection {
    /// Sends `msg` and waits up to the ack timeout for ztunnel's ack.
    async fn exchange(&self, msg: &[u8], netns: Option<&NetNs>) -> Result<(), ExchangeError> {
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

/// Settings of the zds side.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ZdsSettings {
    pub(crate) hello: Duration,
    pub(crate) ack: Duration,
    /// Commands a connection's queue holds: enough for every queuer at once
    /// (each plugin request and the re-offer task have at most one message
    /// queued, and the snapshot is one command).
    pub(crate) queue: usize,
}

/// Accepts ztunnel connections until the drain starts.
pub(crate) async fn serve(
    listener: SeqPacketListener,
    enroller: Arc<Enroller>,
    settings: ZdsSettings,
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
            ack_timeout: settings.ack,
        };
        let id = next_id;
        let enroller = enroller.clone();
        let drain = drain.clone();
        tokio::spawn(
            async move {
                run_connection(conn, id, &enroller, settings, drain).await;
                enroller.detach(id).await;
                drop(permit);
            }
            .instrument(tracing::info_span!("zds", conn = id)),
        );
    }
}

async fn run_connection(
    conn: ZdsConnection,
    id: u64,
    enroller: &Enroller,
    settings: ZdsSettings,
    drain: DrainWatcher,
) {
    let hello_timeout = settings.hello;
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
    let (handle, mut inbox) = ZtunnelHandle::channel(id, settings.queue);
    match enroller.attach(handle).await {
        Ok(pods) => tracing::info!(pods, "this ztunnel connection is active; snapshot queued"),
        Err(e) => {
            tracing::warn!("dropping ztunnel connection: cannot queue its snapshot: {e}");
            return;
        }
    }
    loop {
        tokio::select! {
            command = inbox.recv() => {
                let Some(command) = command else {
                    tracing::info!("closing: the agent let go of this connection (a newer one took over)");
                    return;
                };
                tokio::select! {
                    kept = run_command(&conn, id, enroller, command) => if !kept {
                        return;
                    },
                    _ = drain.signaled() => {
                        tracing::info!("closing the ztunnel connection: shutting down");
                        return;
                    }
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

/// Sends what `command` says and takes the answers; false when the connection
/// broke (it is dropped).
async fn run_command(conn: &ZdsConnection, id: u64, enroller: &Enroller, command: Command) -> bool {
    match command {
        Command::Message { msg, netns, reply } => {
            let result = conn.exchange(&msg, netns.as_deref()).await;
            let broken = matches!(result, Err(ExchangeError::Broken(_)));
            if let Err(e) = &result {
                tracing::warn!("{e}");
            }
            let _ = reply.send(result);
            !broken
        }
        Command::Snapshot(pods) => {
            let total = pods.len();
            for pod in pods {
                let result = conn.exchange(&pod.msg, Some(&pod.netns)).await;
                if let Err(ExchangeError::Broken(reason)) = &result {
                    tracing::warn!("dropping ztunnel connection during the snapshot: {reason}");
                    return false;
                }
                // Taken before the next message goes out.
                enroller
                    .snapshot_answer(id, &pod.uid, pod.generation, result)
                    .await;
            }
            match conn.exchange(&zds::encode_snapshot_sent(), None).await {
                Ok(()) => tracing::info!(pods = total, "snapshot sent"),
                Err(ExchangeError::Refused(reason)) => {
                    tracing::warn!("ztunnel refused the end of the snapshot: {reason}")
                }
                Err(ExchangeError::Broken(reason)) => {
                    tracing::warn!("dropping ztunnel connection during the snapshot: {reason}");
                    return false;
                }
            }
            true
        }
    }
}
