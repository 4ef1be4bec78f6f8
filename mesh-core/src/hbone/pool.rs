//! The HBONE client: tunnels multiplexed over pooled HTTP/2 connections.
//!
//! Connections are keyed by (source identity, expected destination identities, next
//! hop). A connection carries up to `max_streams_per_connection` tunnels, and no
//! more than its server's `SETTINGS_MAX_CONCURRENT_STREAMS`; only when all of a
//! key's connections are full does another open, and never two at once for one key.
//! Callers that waited behind an open that failed share its error. A connection idle
//! for `pool_idle_timeout` is closed, and as soon as it is idle once the pool's
//! drain has begun.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::client::{open_connection, send_connect};
use super::{ConnectError, ConnectRequest, DirectDialer, H2Stream, HboneConfig, TcpDialer};
use crate::drain::DrainWatcher;
use crate::{CertStore, SpiffeId};

mod conn;
use conn::{PooledConn, SlotGuard, drive, settle};

/// Which connections a tunnel may share.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: SpiffeId,
    /// Sorted, so the same set is the same key.
    pub destinations: Vec<SpiffeId>,
    pub next_hop: SocketAddr,
}

impl PoolKey {
    pub fn new(source: SpiffeId, mut destinations: Vec<SpiffeId>, next_hop: SocketAddr) -> Self {
        destinations.sort();
        destinations.dedup();
        Self {
            source,
            destinations,
            next_hop,
        }
    }
}

/// Counters of the pool's life, for metrics and tests.
#[derive(Debug, Default)]
pub struct PoolStats {
    connections_opened: AtomicU64,
    connections_closed: AtomicU64,
}

impl PoolStats {
    /// TLS connections opened (one handshake each).
    pub fn connections_opened(&self) -> u64 {
        self.connections_opened.load(Ordering::Relaxed)
    }

    pub fn connections_closed(&self) -> u64 {
        self.connections_closed.load(Ordering::Relaxed)
    }
}

/// The HBONE client of one proxy. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HbonePool<D: TcpDialer = DirectDialer> {
    inner: Arc<PoolInner<D>>,
}

#[derive(Debug)]
struct PoolInner<D> {
    store: Arc<CertStore>,
    config: HboneConfig,
    dialer: D,
    keys: Mutex<HashMap<PoolKey, KeyEntry>>,
    stats: PoolStats,
    next_id: AtomicU64,
    // Held only until the drain begins (see `with_drain`); each connection's task
    // holds its own clone.
    drain: Mutex<Option<DrainWatcher>>,
    draining: AtomicBool,
}

#[derive(Debug, Default)]
struct KeyEntry {
    conns: Vec<Arc<PooledConn>>,
    opening: Arc<Opening>,
}

impl KeyEntry {
    /// No connection, and no caller waiting to open one (only the map holds
    /// `opening`): the entry can go.
    fn unused(&self) -> bool {
        self.conns.is_empty() && Arc::strong_count(&self.opening) == 1
    }
}

/// The opening of a key's connections, one at a time.
#[derive(Debug, Default)]
struct Opening {
    // Held while a connection for this key is being opened, and after that until
    // the server's SETTINGS are known (see `settle`).
    lock: Arc<tokio::sync::Mutex<()>>,
    // Opens that failed, and the last one's error. A caller that waited behind an
    // open that failed takes its error instead of dialing again: otherwise each
    // waiter in turn would wait through its own timeout to the same dead peer.
    failed: AtomicU64,
    last_error: Mutex<Option<Arc<ConnectError>>>,
}

/// A caller's hold on a key's [`Opening`]. When it goes (the open failed, or the
/// caller was dropped while it waited), the key's entry goes too if it has no
/// connection and no other caller: failed dials to ever-new addresses would
/// otherwise pile up.
struct OpeningHold<'p, D> {
    pool: &'p PoolInner<D>,
    key: &'p PoolKey,
    opening: Option<Arc<Opening>>,
}

impl<D> OpeningHold<'_, D> {
    fn opening(&self) -> &Opening {
        self.opening
            .as_deref()
            .unwrap_or_else(|| unreachable!("taken only on drop"))
    }
}

impl<D> Drop for OpeningHold<'_, D> {
    fn drop(&mut self) {
        drop(self.opening.take());
        let mut keys = lock(&self.pool.keys);
        if keys.get(self.key).is_some_and(KeyEntry::unused) {
            keys.remove(self.key);
        }
    }
}

/// Most tries one tunnel makes: each failed try retires the connection it used.
pub const MAX_ATTEMPTS: u32 = 4;

/// How long a connection whose CONNECT went unanswered has to answer a PING
/// before it is taken for dead and retired.
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl HbonePool<DirectDialer> {
    pub fn new(store: Arc<CertStore>, config: HboneConfig) -> Self {
        Self::with_dialer(store, config, DirectDialer)
    }
}

impl<D: TcpDialer> HbonePool<D> {
    pub fn with_dialer(store: Arc<CertStore>, config: HboneConfig, dialer: D) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                store,
                config,
                dialer,
                keys: Mutex::new(HashMap::new()),
                stats: PoolStats::default(),
                next_id: AtomicU64::new(1),
                drain: Mutex::new(None),
                draining: AtomicBool::new(false),
            }),
        }
    }

    /// Ties the pool's connections to `drain` (ztunnel's: the pod's, whose network
    /// namespace they were dialled in). Once it begins idle connections close at
    /// once and busy ones when their last tunnel ends (taking, until then, the
    /// tunnels asked for meanwhile), each holding the drain until then; when it
    /// is forced, all close. The pool
    /// itself lets go of the watcher as the drain begins, so a pool kept alive does
    /// not hold the drain up. Without it a connection lives until it has been idle
    /// for `pool_idle_timeout`.
    pub fn with_drain(self, drain: DrainWatcher) -> Self {
        *lock(&self.inner.drain) = Some(drain.clone());
        let pool = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            drain.signaled().await;
            if let Some(p) = pool.upgrade() {
                p.draining.store(true, Ordering::Release);
                lock(&p.drain).take();
            }
        });
        self
    }

    pub fn stats(&self) -> &PoolStats {
        &self.inner.stats
    }

    /// Keys the pool holds: those with a connection, or with one being opened.
    pub fn key_count(&self) -> usize {
        lock(&self.inner.keys).len()
    }

    /// Open connections, over all keys.
    pub fn connection_count(&self) -> usize {
        lock(&self.inner.keys).values().map(|e| e.conns.len()).sum()
    }

    /// Opens a tunnel to `req.target` through `key.next_hop`. A pooled connection
    /// that turns out to be going away (GOAWAY, reset) is retired and the tunnel
    /// tried on another, as often as the key has such connections (at most
    /// [`MAX_ATTEMPTS`] tries); a fresh connection refused by a server that is
    /// draining is tried once more, as a new connection may reach its successor.
    /// A CONNECT left unanswered ([`HboneConfig::answer_timeout`]) retires its
    /// connection if that answers no PING either, and is tried again only then,
    /// and only if it carried no early data and its connection was a reused one.
    pub async fn connect(
        &self,
        key: PoolKey,
        req: ConnectRequest,
    ) -> Result<H2Stream, ConnectError> {
        let mut fresh_retried = false;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (guard, fresh) = self.checkout(&key).await?;
            let waited = self.inner.config.answer_timeout();
            let answer =
                tokio::time::timeout(waited, send_connect(&guard.conn.send, key.next_hop, &req))
                    .await
                    .unwrap_or(Err(ConnectError::Unanswered {
                        addr: key.next_hop,
                        waited,
                        early_data: !req.early_data.is_empty(),
                    }));
            let e = match answer {
                Ok((send, recv)) => return Ok(H2Stream::new(send, recv, Some(Box::new(guard)))),
                Err(e) => e,
            };
            // A live connection's silence is its server's (a new connection would
            // meet the same): it stays. A dead one goes, whether or not the
            // CONNECT may be sent again.
            let dead = matches!(e, ConnectError::Unanswered { .. });
            if dead && guard.conn.answers_ping(LIVENESS_TIMEOUT).await {
                return Err(e);
            }
            // A reused connection may have gone stale; a fresh one that fails
            // would fail again, unless its server was draining.
            let retry = attempts < MAX_ATTEMPTS
                && e.is_retryable()
                && (!fresh || (!fresh_retried && e.is_drain_refusal()));
            if dead || retry {
                tracing::debug!(conn = guard.conn.id, error = %e, "retiring pooled connection");
                self.retire(&key, &guard.conn);
            }
            if !retry {
                return Err(e);
            }
            fresh_retried |= fresh;
        }
    }

    /// Reserves a slot on a connection of `key`, opening one if all are full; says
    /// whether the connection is fresh.
    async fn checkout(&self, key: &PoolKey) -> Result<(SlotGuard, bool), ConnectError> {
        if let Some(g) = self.try_reserve(key) {
            return Ok((g, false));
        }
        let hold = OpeningHold {
            pool: &self.inner,
            key,
            opening: Some(
                lock(&self.inner.keys)
                    .entry(key.clone())
                    .or_default()
                    .opening
                    .clone(),
            ),
        };
        let opening = hold.opening();
        let failed_before = opening.failed.load(Ordering::Acquire);
        let held = opening.lock.clone().lock_owned().await;
        // Someone may have opened a connection while we waited.
        if let Some(g) = self.try_reserve(key) {
            return Ok((g, false));
        }
        let shared = if opening.failed.load(Ordering::Acquire) == failed_before {
            None
        } else {
            lock(&opening.last_error).clone()
        };
        let opened = match shared {
            Some(error) => Err(ConnectError::Shared(error)),
            None => open_connection(
                &self.inner.store,
                key,
                &self.inner.config,
                &self.inner.dialer,
            )
            .await
            .map_err(|e| {
                let error = Arc::new(e);
                *lock(&opening.last_error) = Some(error.clone());
                opening.failed.fetch_add(1, Ordering::Release);
                ConnectError::Shared(error)
            }),
        };
        // On failure, `hold` removes the key's entry if nothing else uses it.
        let (send, mut connection) = opened?;
        self.inner
            .stats
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        // A year stands in for "never" that an Instant cannot hold.
        let retire_at = now
            .checked_add(self.max_age(key))
            .unwrap_or(now + Duration::from_secs(365 * 24 * 3600));
        let conn = Arc::new(PooledConn::new(id, send, connection.ping_pong(), retire_at));
        tracing::debug!(conn = conn.id, next_hop = %key.next_hop, src = %key.source, "opened HBONE connection");
        lock(&self.inner.keys)
            .entry(key.clone())
            .or_default()
            .conns
            .push(conn.clone());
        tokio::spawn(drive(
            Arc::downgrade(&self.inner),
            key.clone(),
            conn.clone(),
            connection,
            lock(&self.inner.drain).clone(),
        ));
        tokio::spawn(settle(
            conn.clone(),
            held,
            self.inner.config.connect_timeout,
        ));
        Ok((SlotGuard { conn }, true))
    }

    fn try_reserve(&self, key: &PoolKey) -> Option<SlotGuard> {
        let mut keys = lock(&self.inner.keys);
        let entry = keys.get(key)?;
        let max = self.inner.config.max_streams_per_connection.max(1);
        let now = Instant::now();
        let mut gone = Vec::new();
        let reserved = entry.conns.iter().find_map(|conn| {
            if conn.closed.load(Ordering::Acquire) {
                return None;
            }
            // Its server sent GOAWAY (or it failed): a new stream would fail at
            // once. All such connections are retired as they are passed, rather
            // than each costing a tunnel one of its tries: a peer that restarted
            // leaves one for each of its connections with a tunnel still open.
            // So is one past its age (`max_age`): its tunnels carry on, and it
            // closes once it has had none for the idle timeout. And one that
            // answered no PING (its first, after the handshake, or one after an
            // unanswered CONNECT): its path may be gone.
            if conn.is_dead() || conn.going_away() || conn.retire_at <= now {
                gone.push(conn.clone());
                return None;
            }
            // The server's SETTINGS_MAX_CONCURRENT_STREAMS too: beyond it a CONNECT
            // would wait in h2's queue instead of opening another connection.
            let max = max.min(conn.send.current_max_send_streams());
            let mut slots = lock(&conn.slots);
            if slots.active >= max {
                return None;
            }
            slots.active += 1;
            drop(slots);
            conn.changed.notify_one();
            Some(SlotGuard { conn: conn.clone() })
        });
        for conn in &gone {
            tracing::debug!(
                conn = conn.id,
                "retiring a pooled connection that is dead, going away or too old"
            );
            self.inner.remove_locked(&mut keys, key, conn);
        }
        reserved
    }

    /// How long a new connection of `key` takes new tunnels: the pool's
    /// `pool_max_connection_age`, or until the certificate it presents is due for
    /// renewal if that comes first (later connections present the new one), or
    /// until it expires if its renewal is overdue. A busy connection would
    /// otherwise live on with certificates (and roots) long replaced.
    fn max_age(&self, key: &PoolKey) -> Duration {
        let max = self.inner.config.pool_max_connection_age;
        let Some(cert) = self.inner.store.get(&key.source) else {
            return max;
        };
        let now = SystemTime::now();
        let due = match cert.refresh_at() {
            at if at > now => at,
            _ => cert.not_after(),
        };
        // Already past: retired at its first look (no handshake should have
        // taken an expired certificate).
        due.duration_since(now)
            .map_or(Duration::ZERO, |left| left.min(max))
    }

    fn retire(&self, key: &PoolKey, conn: &Arc<PooledConn>) {
        self.inner.remove(key, conn);
    }
}

impl<D> PoolInner<D> {
    /// Takes `conn` out of the pool: no new tunnel will use it.
    fn remove(&self, key: &PoolKey, conn: &Arc<PooledConn>) {
        self.remove_locked(&mut lock(&self.keys), key, conn);
    }

    /// [`Self::remove`], under the map lock its caller holds.
    fn remove_locked(
        &self,
        keys: &mut HashMap<PoolKey, KeyEntry>,
        key: &PoolKey,
        conn: &Arc<PooledConn>,
    ) {
        conn.closed.store(true, Ordering::Release);
        if let Some(entry) = keys.get_mut(key) {
            let before = entry.conns.len();
            entry.conns.retain(|c| !Arc::ptr_eq(c, conn));
            if entry.conns.len() < before {
                self.stats
                    .connections_closed
                    .fetch_add(1, Ordering::Relaxed);
            }
            if entry.unused() {
                keys.remove(key);
            }
        }
    }

    /// Retires `conn` if it has been idle long enough. The check and the removal
    /// happen under one hold of the map lock, which `try_reserve` takes too, so no
    /// tunnel can reserve the connection in between.
    fn retire_if_idle(&self, key: &PoolKey, conn: &Arc<PooledConn>, idle: Duration) -> bool {
        let mut keys = lock(&self.keys);
        let expired = {
            let slots = lock(&conn.slots);
            slots.active == 0 && slots.idle_since + idle <= Instant::now()
        };
        if expired {
            self.remove_locked(&mut keys, key, conn);
        }
        expired
    }
}
