//! Keeps every certificate of a [`CertStore`] fresh: each is renewed at half its life;
//! a failed renewal is retried with backoff while the current certificate, still
//! valid, stays in use. A certificate that expires while renewal still fails is
//! dropped. A refusal (the CA judged the request, e.g. the identity's pod is not on
//! this node as far as it knows) is retried only at the longest backoff: it may be
//! a control plane that has not seen the pod yet, and an identity that really left
//! the node is released by its owner ([`CertStore::remove_if_current`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinSet;

use crate::drain::DrainWatcher;
use crate::{CertError, CertStore, CertificateSource, SpiffeId, WorkloadCertificate};

/// Renewals in flight at once: a CA that does not answer holds at most this many,
/// and no renewal waits behind another's timeout.
pub const MAX_CONCURRENT_RENEWALS: usize = 8;

/// Timing of renewals.
#[derive(Clone, Debug)]
pub struct RenewalConfig {
    /// First retry delay after a failure; doubles per failure. Also the shortest.
    pub min_backoff: Duration,
    /// Longest retry delay; shorter still near expiry (a quarter of the time left).
    pub max_backoff: Duration,
    /// Longest sleep between checks (the store's events wake it earlier).
    pub max_sleep: Duration,
    /// What "now" is.
    pub clock: RenewalClock,
}

/// The time renewals are scheduled by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RenewalClock {
    /// The system clock, which certificates' validity is judged by.
    #[default]
    System,
    /// The system time at start advanced by tokio's clock: tests drive renewals
    /// with tokio's paused clock.
    Tokio,
}

impl Default for RenewalConfig {
    fn default() -> Self {
        Self {
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            max_sleep: Duration::from_secs(60),
            clock: RenewalClock::System,
        }
    }
}

impl RenewalConfig {
    /// The wait before the `failures`-th retry of a certificate valid until
    /// `not_after`: doubling from `min_backoff`, at most `max_backoff` and a quarter
    /// of the time left, so that a CA back up is asked again well before expiry.
    pub fn backoff(&self, failures: u32, now: SystemTime, not_after: SystemTime) -> Duration {
        let left = not_after.duration_since(now).unwrap_or(Duration::ZERO);
        self.min_backoff
            .saturating_mul(1 << failures.saturating_sub(1).min(20))
            .min(self.max_backoff)
            .min(left / 4)
            .max(self.min_backoff)
    }
}

/// Renewal of an identity failed `failures` times in a row; next attempt at `at`.
/// It applies to the certificate `of`: once another is stored (fetched by someone
/// else), that one is due at its own refresh time.
#[derive(Clone, Debug)]
struct Retry {
    failures: u32,
    at: SystemTime,
    of: Arc<WorkloadCertificate>,
}

/// "Now" for the schedule; see [`RenewalClock`].
struct Clock {
    kind: RenewalClock,
    start: (SystemTime, tokio::time::Instant),
}

impl Clock {
    fn new(kind: RenewalClock) -> Self {
        Self {
            kind,
            start: (SystemTime::now(), tokio::time::Instant::now()),
        }
    }

    fn now(&self) -> SystemTime {
        match self.kind {
            RenewalClock::System => SystemTime::now(),
            RenewalClock::Tokio => self.start.0 + self.start.1.elapsed(),
        }
    }
}

/// The renewal schedule: which identities are retried, and which are being
/// renewed now.
#[derive(Default)]
struct Schedule {
    retry: HashMap<SpiffeId, Retry>,
    renewing: HashMap<tokio::task::Id, SpiffeId>,
}

impl Schedule {
    /// When `cert` is next due: its refresh time, or its retry after a failure.
    fn due_at(&self, cert: &Arc<WorkloadCertificate>) -> SystemTime {
        match self.retry_of(cert) {
            None => cert.refresh_at(),
            Some(retry) => retry.at,
        }
    }

    /// The retry recorded for `cert` itself, if any.
    fn retry_of(&self, cert: &Arc<WorkloadCertificate>) -> Option<&Retry> {
        self.retry
            .get(cert.identity())
            .filter(|r| Arc::ptr_eq(&r.of, cert))
    }

    fn is_renewing(&self, id: &SpiffeId) -> bool {
        self.renewing.values().any(|r| r == id)
    }
}

type Renewal = (SpiffeId, Result<Arc<WorkloadCertificate>, CertError>);

/// Renews the store's certificates from `source` until drained; renewals still
/// in flight then are cancelled.
pub async fn keep_fresh<S: CertificateSource>(
    store: Arc<CertStore>,
    source: Arc<S>,
    config: RenewalConfig,
    drain: DrainWatcher,
) {
    let mut events = store.subscribe();
    let clock = Clock::new(config.clock);
    let mut schedule = Schedule::default();
    // Dropped on return, which cancels what is still in flight.
    let mut running: JoinSet<Renewal> = JoinSet::new();
    loop {
        let certs = store.all();
        schedule
            .retry
            .retain(|id, _| certs.iter().any(|c| c.identity() == id));
        let now = clock.now();
        let mut next: Option<SystemTime> = None;
        for cert in &certs {
            let id = cert.identity();
            if schedule.is_renewing(id) {
                continue;
            }
            let due = schedule.due_at(cert);
            if now < due {
                next = Some(next.map_or(due, |n| n.min(due)));
                continue;
            }
            if running.len() >= MAX_CONCURRENT_RENEWALS {
                // Looked at again when a renewal ends.
                continue;
            }
            let (store, source, id) = (store.clone(), source.clone(), id.clone());
            let task = running.spawn(async move {
                let renewed = store.fetch(&*source, &id).await;
                (id, renewed)
            });
            schedule.renewing.insert(task.id(), cert.identity().clone());
        }
        let wait = next
            .map(|t| t.duration_since(now).unwrap_or(Duration::ZERO))
            .unwrap_or(config.max_sleep)
            .min(config.max_sleep);
        tokio::select! {
            () = drain.signaled() => return,
            Some(done) = running.join_next_with_id() => {
                let (task, renewal) = match done {
                    Ok((task, renewal)) => (task, Some(renewal)),
                    Err(e) => (e.id(), None),
                };
                let id = schedule.renewing.remove(&task);
                if let Some((id, renewed)) = renewal {
                    settle(&store, &config, &mut schedule, clock.now(), id, renewed);
                } else if let Some(id) = id {
                    tracing::error!(identity = %id, "certificate renewal task failed");
                }
            }
            () = tokio::time::sleep(wait) => {}
            event = events.recv() => match event {
                // A change (a certificate fetched by someone else is due at its
                // own refresh time: see `Retry`): look again.
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// Records how a renewal of `id` ended.
fn settle(
    store: &CertStore,
    config: &RenewalConfig,
    schedule: &mut Schedule,
    now: SystemTime,
    id: SpiffeId,
    renewed: Result<Arc<WorkloadCertificate>, CertError>,
) {
    let error = match renewed {
        Ok(cert) => {
            tracing::info!(identity = %id, not_after = ?cert.not_after(), "certificate renewed");
            if cert.refresh_at() <= now {
                // A certificate due at once would be renewed in a loop.
                let retry = Retry {
                    failures: 0,
                    at: now + config.min_backoff,
                    of: cert.clone(),
                };
                schedule.retry.insert(id, retry);
            } else {
                schedule.retry.remove(&id);
            }
            return;
        }
        Err(error) => error,
    };
    let Some(held) = store.get(&id) else {
        schedule.retry.remove(&id);
        return;
    };
    if held.is_expired(now) {
        if store.remove_if_current(&held) {
            tracing::warn!(identity = %id, %error, not_after = ?held.not_after(), "certificate expired and renewal still fails; dropped");
        }
        schedule.retry.remove(&id);
        return;
    }
    let failures = schedule.retry_of(&held).map_or(0, |r| r.failures) + 1;
    // A refusal goes straight to the longest wait: asking sooner would get the
    // same answer unless the control plane's view changed.
    let backoff = config.backoff(
        if error.is_permanent() {
            u32::MAX
        } else {
            failures
        },
        now,
        held.not_after(),
    );
    tracing::warn!(identity = %id, %error, failures, retry_in = ?backoff, valid_until = ?held.not_after(), "certificate renewal failed; keeping the current certificate");
    schedule.retry.insert(
        id,
        Retry {
            failures,
            at: now + backoff,
            of: held.clone(),
        },
    );
}

#[cfg(test)]
mod tests;
