//! A server connection's idle clock: how long it has had no open tunnel, so one
//! that carries none for `server_idle_timeout` gives its accept slot back.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// How long a client has, after the idle GOAWAY, to answer its PING (h2 closes the
/// connection once it has): one that does not is dropped.
const GOAWAY_GRACE: Duration = Duration::from_secs(10);

/// What the connection does at a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IdleStep {
    Keep,
    /// Idle for the limit: send GOAWAY.
    GoAway,
    /// Idle still, `GOAWAY_GRACE` after the GOAWAY: close.
    Close,
}

#[derive(Debug)]
pub(super) struct IdleClock {
    tunnels: Arc<Mutex<Tunnels>>,
    limit: Duration,
    next_check: Option<Instant>,
    /// Fires at `next_check`: one timer for the connection's life, reset at each
    /// check, rather than a new one each time its accept loop turns (per CONNECT).
    timer: Pin<Box<tokio::time::Sleep>>,
    going_away: bool,
}

#[derive(Debug)]
struct Tunnels {
    open: usize,
    /// When the last tunnel began or ended (or the connection did).
    since: Instant,
}

/// One tunnel's part in its connection's clock, until it is dropped.
#[derive(Debug)]
pub(super) struct OpenTunnel(Arc<Mutex<Tunnels>>);

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        let mut t = lock(&self.0);
        t.open -= 1;
        t.since = Instant::now();
    }
}

fn lock(m: &Mutex<Tunnels>) -> std::sync::MutexGuard<'_, Tunnels> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl IdleClock {
    pub(super) fn new(limit: Duration) -> Self {
        let now = Instant::now();
        Self {
            tunnels: Arc::new(Mutex::new(Tunnels {
                open: 0,
                since: now,
            })),
            limit,
            next_check: Some(now + limit),
            timer: Box::pin(tokio::time::sleep_until(now + limit)),
            going_away: false,
        }
    }

    /// A tunnel begins; it ends when the returned guard is dropped.
    pub(super) fn begin(&self) -> OpenTunnel {
        let mut t = lock(&self.tunnels);
        t.open += 1;
        t.since = Instant::now();
        OpenTunnel(self.tunnels.clone())
    }

    /// Resolves at the next check.
    pub(super) async fn next_check(&mut self) {
        match self.next_check {
            Some(_) => self.timer.as_mut().await,
            None => std::future::pending().await,
        }
    }

    fn schedule(&mut self, at: Option<Instant>) {
        self.next_check = at;
        if let Some(at) = at {
            self.timer.as_mut().reset(at);
        }
    }

    /// The check: `h2_streams` says whether h2 still has streams (a handler may
    /// keep a tunnel beyond its task). A connection with tunnels is looked at
    /// again one limit later, so a busy one costs one timer per limit.
    pub(super) fn check(&mut self, h2_streams: bool) -> IdleStep {
        let now = Instant::now();
        let (open, since) = {
            let t = lock(&self.tunnels);
            (t.open, t.since)
        };
        let idle = open == 0 && !h2_streams;
        if self.going_away {
            // A tunnel that came in GOAWAY's round trip keeps the connection until
            // it ends; then h2 closes it.
            self.schedule(None);
            return if idle {
                IdleStep::Close
            } else {
                IdleStep::Keep
            };
        }
        if idle && since + self.limit <= now {
            self.going_away = true;
            self.schedule(Some(now + GOAWAY_GRACE));
            return IdleStep::GoAway;
        }
        self.schedule(Some(if idle {
            since + self.limit
        } else {
            now + self.limit
        }));
        IdleStep::Keep
    }
}
