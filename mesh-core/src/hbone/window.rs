//! The send window a pooled connection's tunnels share: which of them wait for it
//! and since when, so the pool can tell a connection whose window is held by
//! tunnels whose far end does not read, and put new tunnels on another.
//!
//! HTTP/2 flow control has two levels. A receiver returns window as its app takes
//! the bytes, so a tunnel whose target does not read holds its stream window's
//! worth of the connection's window until it does; a connection window is four
//! stream windows (memory stays bounded), so four such tunnels hold all of it and
//! every other tunnel on the connection stalls. h2 does not say which level a
//! waiting stream waits for, so the pool infers it from the waits it sees.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A wait for window this long is a stall, not the ordinary pause of a transfer
/// between two window updates (one round trip).
pub(crate) const STALL: Duration = Duration::from_millis(100);

/// The waits for send window of one connection's tunnels.
#[derive(Debug)]
pub(crate) struct WindowWaits {
    /// The peer's stream and connection windows (its `HboneConfig`'s, which the
    /// pool takes to be its own: every proxy of the mesh has the same).
    stream_window: u64,
    connection_window: u64,
    waits: Mutex<HashMap<u32, Wait>>,
}

#[derive(Clone, Copy, Debug)]
struct Wait {
    since: Instant,
    /// The tunnel had sent less than a stream window when its wait began, so its
    /// own window was open: only the connection's can hold it.
    own_window_open: bool,
}

impl WindowWaits {
    pub(crate) fn new(stream_window: u32, connection_window: u32) -> Self {
        Self {
            stream_window: stream_window.into(),
            connection_window: connection_window.into(),
            waits: Mutex::new(HashMap::new()),
        }
    }

    fn waits(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Wait>> {
        self.waits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stream `id`, which has sent `sent` bytes, starts waiting for window.
    pub(crate) fn begin(&self, id: u32, sent: u64) {
        let wait = Wait {
            since: Instant::now(),
            own_window_open: sent < self.stream_window,
        };
        self.waits().insert(id, wait);
    }

    /// Stream `id` got window, or ended.
    pub(crate) fn end(&self, id: u32) {
        self.waits().remove(&id);
    }

    /// Whether a new tunnel would find no window here: a tunnel whose own window
    /// is open has stalled (only the connection's window can hold it), or enough
    /// tunnels have stalled to hold the whole connection window, a stream window
    /// each at most.
    pub(crate) fn congested(&self) -> bool {
        let now = Instant::now();
        let mut stalled = 0u64;
        for wait in self.waits().values() {
            if now.saturating_duration_since(wait.since) < STALL {
                continue;
            }
            if wait.own_window_open {
                return true;
            }
            stalled += 1;
        }
        stalled * self.stream_window >= self.connection_window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u32 = 1 << 20;

    #[tokio::test(start_paused = true)]
    async fn stalls_that_hold_the_connection_window_congest_it() {
        let waits = WindowWaits::new(2 * MIB, 8 * MIB);
        // Three tunnels stuck on their own full windows leave one window free.
        for id in [1, 3, 5] {
            waits.begin(id, (2 * MIB).into());
        }
        tokio::time::advance(STALL).await;
        assert!(!waits.congested());
        // A fourth one takes it; a wait shorter than a stall does not count yet.
        waits.begin(7, (3 * MIB).into());
        assert!(!waits.congested());
        tokio::time::advance(STALL).await;
        assert!(waits.congested());
        waits.end(7);
        assert!(!waits.congested());
    }

    #[tokio::test(start_paused = true)]
    async fn one_stalled_tunnel_whose_own_window_is_open_congests_the_connection() {
        let waits = WindowWaits::new(2 * MIB, 8 * MIB);
        waits.begin(1, 1000);
        tokio::time::advance(STALL / 2).await;
        assert!(!waits.congested());
        tokio::time::advance(STALL / 2).await;
        assert!(waits.congested());
        waits.end(1);
        assert!(!waits.congested());
    }
}
