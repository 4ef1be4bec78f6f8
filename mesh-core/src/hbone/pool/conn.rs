//! One pooled HTTP/2 connection: its tunnel slots, the task that drives it and
//! closes it when idle, and the PINGs that tell whether it is still alive.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{PoolInner, PoolKey, lock};
use crate::drain::DrainWatcher;
use crate::hbone::client::ClientConnection;

pub(super) struct PooledConn {
    pub(super) id: u64,
    pub(super) send: SendRequest<Bytes>,
    // The connection's PINGs: first to learn the server's SETTINGS (`settle`),
    // then to tell a dead connection from a slow server (`answers_ping`).
    ping: tokio::sync::Mutex<Option<h2::PingPong>>,
    /// A PING went unanswered.
    dead: AtomicBool,
    /// When it stops taking new tunnels (`HbonePool::max_age`).
    pub(super) retire_at: Instant,
    pub(super) slots: Mutex<Slots>,
    pub(super) changed: Notify,
    pub(super) closed: AtomicBool,
}

impl PooledConn {
    /// A connection with one tunnel: its opener's.
    pub(super) fn new(
        id: u64,
        send: SendRequest<Bytes>,
        ping: Option<h2::PingPong>,
        retire_at: Instant,
    ) -> Self {
        Self {
            id,
            send,
            ping: tokio::sync::Mutex::new(ping),
            dead: AtomicBool::new(false),
            retire_at,
            slots: Mutex::new(Slots {
                active: 1,
                idle_since: Instant::now(),
            }),
            changed: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// Whether the server answers a PING within `within`. A connection whose path
    /// went silent without a reset (the peer's node lost) answers none, and would
    /// otherwise stay pooled until TCP gives up on its unacknowledged data
    /// (about 15 minutes), failing every tunnel that sends early data on it.
    pub(super) async fn answers_ping(&self, within: Duration) -> bool {
        let mut ping = self.ping.lock().await;
        // Once is enough: the many CONNECTs a dead connection leaves unanswered
        // at about the same time do not each wait for a PING of their own in turn.
        if self.dead.load(Ordering::Acquire) {
            return false;
        }
        let Some(ping) = ping.as_mut() else {
            return true;
        };
        // h2's own building blocks of `PingPong::ping` (hyper's keep-alive uses
        // them too), so that an earlier PING still unanswered is waited on rather
        // than refused, and a pong that came after its wait gave up says nothing
        // about now.
        let _ = ping.poll_pong(&mut Context::from_waker(Waker::noop()));
        let _ = ping.send_ping(h2::Ping::opaque());
        let pong = std::future::poll_fn(|cx| ping.poll_pong(cx));
        let answered = matches!(tokio::time::timeout(within, pong).await, Ok(Ok(_)));
        if !answered {
            self.dead.store(true, Ordering::Release);
        }
        answered
    }

    /// A PING on it went unanswered (`answers_ping`): it takes no new tunnel.
    pub(super) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Whether a new stream would fail at once: the server sent GOAWAY, or the
    /// connection failed.
    pub(super) fn going_away(&self) -> bool {
        let mut send = self.send.clone();
        let mut cx = Context::from_waker(Waker::noop());
        matches!(send.poll_ready(&mut cx), Poll::Ready(Err(_)))
    }
}

impl std::fmt::Debug for PooledConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledConn")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub(super) struct Slots {
    pub(super) active: usize,
    pub(super) idle_since: Instant,
}

/// A reserved tunnel slot on a connection; gives it back when the tunnel is dropped.
pub(super) struct SlotGuard {
    pub(super) conn: Arc<PooledConn>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut slots = lock(&self.conn.slots);
        slots.active -= 1;
        if slots.active == 0 {
            slots.idle_since = Instant::now();
        }
        drop(slots);
        self.conn.changed.notify_one();
    }
}

/// Keeps the key's opening lock (`held`) until the new connection's server has
/// answered a PING, or `within` has passed. Until its SETTINGS arrive h2 knows no
/// limit on concurrent streams, so the callers queued behind the open would pile
/// onto the new connection beyond `SETTINGS_MAX_CONCURRENT_STREAMS` and wait in
/// h2's queue; the server sends its SETTINGS before it can answer the PING, so
/// after the answer they reserve within its limit. The opener's own tunnel does
/// not wait.
pub(super) async fn settle(
    conn: Arc<PooledConn>,
    held: tokio::sync::OwnedMutexGuard<()>,
    within: Duration,
) {
    conn.answers_ping(within).await;
    drop(held);
}

/// Drives one connection's HTTP/2 state and closes it once idle past the timeout.
/// Once the pool's drain has begun (`drain`, or the pool's flag for a connection
/// opened after that) it closes as soon as it is idle; until then it still takes
/// the tunnels of connections accepted just before the drain (were it taken out
/// of the pool, each of them would dial a connection of its own, one after
/// another); when the drain is forced, at once.
pub(super) async fn drive<D>(
    pool: Weak<PoolInner<D>>,
    key: PoolKey,
    conn: Arc<PooledConn>,
    connection: ClientConnection,
    drain: Option<DrainWatcher>,
) {
    let mut connection = std::pin::pin!(connection);
    let idle = match pool.upgrade() {
        Some(p) => p.config.pool_idle_timeout,
        None => return,
    };
    let mut draining = false;
    loop {
        let Some(p) = pool.upgrade() else { return };
        if !draining
            && (drain.as_ref().is_some_and(DrainWatcher::is_draining)
                || p.draining.load(Ordering::Acquire))
        {
            draining = true;
        }
        drop(p);
        let idle_for = if draining { Duration::ZERO } else { idle };
        let deadline = {
            let slots = lock(&conn.slots);
            (slots.active == 0).then_some(slots.idle_since + idle_for)
        };
        let idle_wait = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            res = &mut connection => {
                if let Err(e) = res {
                    tracing::debug!(conn = conn.id, error = %e, "HBONE connection ended");
                }
                if let Some(p) = pool.upgrade() {
                    p.remove(&key, &conn);
                }
                return;
            }
            () = idle_wait => {
                let Some(p) = pool.upgrade() else { return };
                if p.retire_if_idle(&key, &conn, idle_for) {
                    tracing::debug!(conn = conn.id, draining, "closing idle HBONE connection");
                    return;
                }
            }
            () = conn.changed.notified() => {}
            () = phase(&drain, DrainWatcher::signaled), if !draining => {}
            () = phase(&drain, DrainWatcher::forced) => {
                tracing::debug!(conn = conn.id, "closing HBONE connection: drain forced");
                if let Some(p) = pool.upgrade() {
                    p.remove(&key, &conn);
                }
                return;
            }
        }
    }
}

/// Resolves when `drain` reaches the phase `reached` waits for; never without one.
async fn phase<'d, F, Fut>(drain: &'d Option<DrainWatcher>, reached: F)
where
    F: FnOnce(&'d DrainWatcher) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    match drain {
        Some(d) => reached(d).await,
        None => std::future::pending().await,
    }
}
