//! Keeps every certificate of a [`CertStore`] fresh: each is renewed at half its life;
//! a failed renewal is retried with backoff while the current certificate, still
//! valid, stays in use. A certificate that expires while renewal still fails is
//! dropped; one the CA refuses outright is not asked for again, and is dropped when
//! it expires unless something fetches it again meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinSet;

use crate::drain::DrainWatcher;
use crate::{CertError, CertEvent, CertStore, CertificateSource, SpiffeId, WorkloadCertificate};

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
}

impl Default for RenewalConfig {
    fn default() -> Self {
        Self {
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            max_sleep: Duration::from_secs(60),
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

/// Why an identity is not simply due at its refresh time.
#[derive(Clone, Copy, Debug)]
enum Retry {
    /// Renewal failed `failures` times in a row; next attempt at `at`.
    Failing { failures: u32, at: SystemTime },
    /// The CA refused it: not asked again, dropped at expiry.
    Refused,
}

/// The wall clock, advanced by tokio's clock too: the later of the system time
/// and the system time at start plus tokio's elapsed time. Tokio's paused clock
/// drives it in tests; a system clock stepped back never delays a renewal.
struct Clock {
    start: (SystemTime, tokio::time::Instant),
}

impl Clock {
    fn new() -> Self {
        Self {
            start: (SystemTime::now(), tokio::time::Instant::now()),
        }
    }

    fn now(&self) -> SystemTime {
        let ticked = self.start.0 + self.start.1.elapsed();
        SystemTime::now().max(ticked)
    }
}

/// The renewal schedule: which identities are retried or refused, and which
/// are being renewed now.
#[derive(Default)]
struct Schedule {
    retry: HashMap<SpiffeId, Retry>,
    renewing: HashMap<tokio::task::Id, SpiffeId>,
}

impl Schedule {
    /// When `cert` is next due: its refresh time, its retry after a failure, or
    /// (refused) its expiry.
    fn due_at(&self, cert: &WorkloadCertificate) -> SystemTime {
        match self.retry.get(cert.identity()) {
            None => cert.refresh_at(),
            Some(Retry::Failing { at, .. }) => *at,
            Some(Retry::Refused) => cert.not_after(),
        }
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
    let clock = Clock::new();
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
            if matches!(schedule.retry.get(id), Some(Retry::Refused)) {
                tracing::info!(identity = %id, "certificate the CA refused to renew has expired; dropped");
                store.remove(id);
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
                // Fetched by someone else: the CA issues it again.
                Ok(CertEvent::Updated(id)) => {
                    if matches!(schedule.retry.get(&id), Some(Retry::Refused)) {
                        schedule.retry.remove(&id);
                    }
                }
                Ok(CertEvent::Removed(_)) => {}
                // Which were fetched is lost: every refusal gets one more try.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    schedule.retry.retain(|_, r| !matches!(r, Retry::Refused));
                }
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
                let at = now + config.min_backoff;
                schedule
                    .retry
                    .insert(id, Retry::Failing { failures: 0, at });
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
        tracing::warn!(identity = %id, %error, not_after = ?held.not_after(), "certificate expired and renewal still fails; dropped");
        store.remove(&id);
        schedule.retry.remove(&id);
        return;
    }
    if error.is_permanent() {
        tracing::warn!(identity = %id, %error, valid_until = ?held.not_after(), "the CA refused to renew the certificate; not asking again, keeping it until it expires");
        schedule.retry.insert(id, Retry::Refused);
        return;
    }
    let failures = match schedule.retry.get(&id) {
        Some(Retry::Failing { failures, .. }) => failures + 1,
        _ => 1,
    };
    let backoff = config.backoff(failures, now, held.not_after());
    tracing::warn!(identity = %id, %error, failures, retry_in = ?backoff, valid_until = ?held.not_after(), "certificate renewal failed; keeping the current certificate");
    let at = now + backoff;
    schedule.retry.insert(id, Retry::Failing { failures, at });
}

#[cfg(test)]
mod tests;
