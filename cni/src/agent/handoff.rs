//! Whether ztunnel has each enrolled pod, and when to offer it again. A pod
//! ztunnel refused in a snapshot stays redirected (its traffic must not leave the
//! mesh) and is offered again with a growing delay, bounded by [`RETRY_MAX`];
//! until ztunnel takes it, CHECK reports it.

use std::time::Duration;

use tokio::time::Instant;

/// Longest delay between two offers of a refused pod.
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(60);

/// Where a pod stands with ztunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Handoff {
    /// The current (or last) ztunnel connection acked it.
    Acked,
    /// Not acked yet: no ztunnel was connected, the connection broke before the
    /// ack (it goes in the next snapshot), or the answer is still to come.
    Waiting,
    /// ztunnel refused it; offered again at `retry_at`.
    Refused {
        reason: String,
        attempts: u32,
        retry_at: Instant,
    },
}

impl Handoff {
    /// The state after ztunnel's `attempts`-th refusal: retried after `first`,
    /// doubled each time, at most [`RETRY_MAX`].
    pub(crate) fn refused(reason: String, attempts: u32, first: Duration, now: Instant) -> Self {
        let schedule = mesh_core::backoff::BackoffConfig {
            min: first,
            max: RETRY_MAX,
            stable_after: Duration::ZERO,
        };
        let delay = schedule.nominal(attempts.saturating_sub(1));
        Self::Refused {
            reason,
            attempts,
            retry_at: now + delay,
        }
    }

    /// Why the pod is not with ztunnel, or `None` when it is.
    pub(crate) fn problem(&self) -> Option<String> {
        match self {
            Self::Acked => None,
            Self::Waiting => Some(
                "ztunnel has not acked it yet (not connected, or its answer is still to come)"
                    .into(),
            ),
            Self::Refused {
                reason, attempts, ..
            } => Some(format!(
                "ztunnel refused it ({reason}); {attempts} attempt(s) so far, retrying"
            )),
        }
    }

    pub(crate) fn retry_at(&self) -> Option<Instant> {
        match self {
            Self::Refused { retry_at, .. } => Some(*retry_at),
            _ => None,
        }
    }

    pub(crate) fn attempts(&self) -> u32 {
        match self {
            Self::Refused { attempts, .. } => *attempts,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_and_stay_bounded() {
        let now = Instant::now();
        let first = Duration::from_millis(500);
        let at = |n| {
            Handoff::refused("no".into(), n, first, now)
                .retry_at()
                .unwrap()
                - now
        };
        assert_eq!(at(1), first);
        assert_eq!(at(2), first * 2);
        assert_eq!(at(3), first * 4);
        assert_eq!(at(20), RETRY_MAX);
        assert_eq!(at(u32::MAX), RETRY_MAX);
        let refused = Handoff::refused("no certificate".into(), 2, first, now);
        assert_eq!(refused.attempts(), 2);
        assert!(refused.problem().unwrap().contains("no certificate"));
        assert_eq!(Handoff::Acked.problem(), None);
    }
}
