//! The signals that stop `meshctl demo`: Ctrl-C (SIGINT), SIGTERM and SIGHUP (the
//! terminal closed). One set, registered before the demo creates anything and kept
//! until it has removed everything, so no signal is lost between two steps and
//! none kills the process before its teardown ran.

use std::future::Future;

use tokio::signal::unix::{Signal, SignalKind, signal};

/// The registered stop signals.
#[derive(Debug)]
pub struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl StopSignals {
    /// Registers the handlers: from here on these signals no longer end the process
    /// by themselves, they are reported by [`StopSignals::recv`].
    pub fn register() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for the next stop signal (one received since the last call counts)
    /// and returns its name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }

    /// Runs `work` unless a stop signal comes first: then `work` is dropped (its
    /// guards clean up what it had created) and the signal's name is returned.
    pub async fn race<F: Future>(&mut self, work: F) -> Result<F::Output, &'static str> {
        tokio::select! {
            biased;
            name = self.recv() => Err(name),
            out = work => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_signal_sent_while_nothing_waits_still_stops_the_next_step() {
        let mut signals = StopSignals::register().unwrap();
        // Sent before anything polls the set: it must not be lost.
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).unwrap();
        let outcome = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            signals.race(std::future::pending::<()>()),
        )
        .await
        .expect("the pending SIGHUP stopped the step");
        assert_eq!(outcome, Err("SIGHUP"));
        // Work that finishes wins when no signal is pending.
        assert_eq!(signals.race(async { 7 }).await, Ok(7));
    }
}
