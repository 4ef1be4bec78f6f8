//! The one drain primitive every long-running task in Ambit holds.
//!
//! A [`DrainTrigger`] starts a drain; every task holds a [`DrainWatcher`] clone. On
//! drain, tasks stop taking new work and finish what they have; the trigger waits for
//! every watcher to be dropped, and at the deadline it signals *force*, on which the
//! tasks abandon their work at once.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// What the tasks are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DrainPhase {
    Running,
    /// Stop accepting new work; finish what is in flight.
    Draining,
    /// The deadline passed: abandon in-flight work now.
    Forced,
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every watcher finished before the deadline.
    Graceful,
    /// The deadline passed and the remaining tasks were forced.
    Forced,
}

/// Starts the drain. Dropping it without calling [`DrainTrigger::drain`] leaves the
/// watchers running forever, which is what a process that never shuts down wants.
#[derive(Debug)]
pub struct DrainTrigger {
    phase: watch::Sender<DrainPhase>,
    // Closed once every watcher (each holds a sender) is gone.
    done: mpsc::Receiver<()>,
    // Lets the trigger mint watchers; dropped when the drain starts.
    keeper: mpsc::Sender<()>,
}

/// Held by every task that must be drained; clone it for sub-tasks.
#[derive(Clone, Debug)]
pub struct DrainWatcher {
    phase: watch::Receiver<DrainPhase>,
    _alive: mpsc::Sender<()>,
}

/// A new trigger and its first watcher.
pub fn channel() -> (DrainTrigger, DrainWatcher) {
    let (phase_tx, phase_rx) = watch::channel(DrainPhase::Running);
    let (alive_tx, alive_rx) = mpsc::channel(1);
    let watcher = DrainWatcher {
        phase: phase_rx,
        _alive: alive_tx.clone(),
    };
    let trigger = DrainTrigger {
        phase: phase_tx,
        done: alive_rx,
        keeper: alive_tx,
    };
    (trigger, watcher)
}

impl DrainTrigger {
    /// Signals a drain, waits up to `deadline` for every watcher to be dropped, then
    /// forces the rest and waits for them to go (tasks must react to force promptly).
    pub async fn drain(self, deadline: Duration) -> DrainOutcome {
        let Self {
            phase,
            mut done,
            keeper,
        } = self;
        drop(keeper);
        phase.send_replace(DrainPhase::Draining);
        if tokio::time::timeout(deadline, done.recv()).await.is_ok() {
            return DrainOutcome::Graceful;
        }
        tracing::warn!(
            deadline_ms = deadline.as_millis() as u64,
            "drain deadline passed, forcing the remaining tasks"
        );
        phase.send_replace(DrainPhase::Forced);
        done.recv().await;
        DrainOutcome::Forced
    }

    /// A new watcher, for a task started after the first watcher was handed out.
    pub fn watcher(&self) -> DrainWatcher {
        DrainWatcher {
            phase: self.phase.subscribe(),
            _alive: self.keeper.clone(),
        }
    }
}

impl DrainWatcher {
    /// The current phase.
    pub fn phase(&self) -> DrainPhase {
        *self.phase.borrow()
    }

    /// True once a drain has started (or been forced).
    pub fn is_draining(&self) -> bool {
        self.phase() >= DrainPhase::Draining
    }

    /// Resolves when a drain starts: stop accepting new work.
    pub async fn signaled(&self) {
        self.reached(DrainPhase::Draining).await
    }

    /// Resolves when the deadline has passed: abandon in-flight work.
    pub async fn forced(&self) {
        self.reached(DrainPhase::Forced).await
    }

    async fn reached(&self, phase: DrainPhase) {
        let mut rx = self.phase.clone();
        // An error means the trigger is gone without draining: never resolve.
        if rx.wait_for(|p| *p >= phase).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves when the process is asked to stop (SIGINT or SIGTERM): what every
/// binary waits for before draining.
pub async fn stop_requested() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn graceful_when_every_watcher_finishes() {
        let (trigger, watcher) = channel();
        let w2 = watcher.clone();
        let task = tokio::spawn(async move {
            w2.signaled().await;
            assert!(w2.is_draining());
            // Finish some in-flight work, then drop the watcher.
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        drop(watcher);
        assert_eq!(
            trigger.drain(Duration::from_secs(5)).await,
            DrainOutcome::Graceful
        );
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn forced_at_the_deadline() {
        let (trigger, watcher) = channel();
        let late = trigger.watcher();
        let start = tokio::time::Instant::now();
        let task = tokio::spawn(async move {
            late.signaled().await;
            // Ignores the drain: only force stops it.
            late.forced().await;
            assert_eq!(late.phase(), DrainPhase::Forced);
            tokio::time::Instant::now()
        });
        drop(watcher);
        let outcome = trigger.drain(Duration::from_secs(3)).await;
        assert_eq!(outcome, DrainOutcome::Forced);
        let forced_at = task.await.unwrap();
        assert_eq!(forced_at - start, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_trigger_never_signals() {
        let (trigger, watcher) = channel();
        drop(trigger);
        let waited = tokio::time::timeout(Duration::from_secs(60), watcher.signaled()).await;
        assert!(waited.is_err());
        assert_eq!(watcher.phase(), DrainPhase::Running);
    }
}
