//! Keeps every certificate of a [`CertStore`] fresh: each is renewed at half its life;
//! a failed renewal is retried with exponential backoff while the current
//! certificate, still valid, stays in use. Never drops a certificate early.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::drain::DrainWatcher;
use crate::{CertStore, CertificateSource, SpiffeId};

/// Timing of renewals.
#[derive(Clone, Debug)]
pub struct RenewalConfig {
    /// First retry delay after a failure; doubles per failure.
    pub min_backoff: Duration,
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

/// When a certificate is next due: its refresh time, or its retry after a failure.
fn due_at(
    failing: &HashMap<SpiffeId, (u32, SystemTime)>,
    id: &SpiffeId,
    refresh: SystemTime,
) -> SystemTime {
    failing.get(id).map_or(refresh, |f| f.1)
}

/// Renews the store's certificates from `source` until drained.
pub async fn keep_fresh<S: CertificateSource>(
    store: Arc<CertStore>,
    source: Arc<S>,
    config: RenewalConfig,
    drain: DrainWatcher,
) {
    let mut events = store.subscribe();
    // Identity -> (consecutive failures, next attempt).
    let mut failing: HashMap<SpiffeId, (u32, SystemTime)> = HashMap::new();
    loop {
        let certs = store.all();
        failing.retain(|id, _| certs.iter().any(|c| c.identity() == id));
        let now = SystemTime::now();
        let due: Vec<SpiffeId> = certs
            .iter()
            .filter(|c| now >= due_at(&failing, c.identity(), c.refresh_at()))
            .map(|c| c.identity().clone())
            .collect();
        for id in due {
            match source.issue(&id).await {
                Ok(cert) if cert.identity() == &id => {
                    tracing::info!(identity = %id, not_after = ?cert.not_after(), "certificate renewed");
                    if cert.refresh_at() <= SystemTime::now() {
                        // A certificate due at once would be renewed in a loop.
                        failing.insert(id.clone(), (0, SystemTime::now() + config.min_backoff));
                    } else {
                        failing.remove(&id);
                    }
                    store.insert(cert);
                }
                other => {
                    let error = match other {
                        Err(e) => e.to_string(),
                        Ok(c) => format!("the CA issued {} instead", c.identity()),
                    };
                    let n = failing.get(&id).map_or(1, |f| f.0 + 1);
                    let backoff = config
                        .min_backoff
                        .saturating_mul(1 << (n - 1).min(20))
                        .min(config.max_backoff);
                    let valid_until = store.get(&id).map(|c| c.not_after());
                    tracing::warn!(identity = %id, %error, failures = n, retry_in = ?backoff, ?valid_until, "certificate renewal failed; keeping the current certificate");
                    failing.insert(id, (n, SystemTime::now() + backoff));
                }
            }
        }
        let next = store
            .all()
            .iter()
            .map(|c| due_at(&failing, c.identity(), c.refresh_at()))
            .min();
        let wait = next
            .map(|t| {
                t.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            })
            .unwrap_or(config.max_sleep)
            .min(config.max_sleep);
        tokio::select! {
            () = drain.signaled() => return,
            () = tokio::time::sleep(wait) => {}
            // A new or removed certificate changes the schedule.
            _ = events.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::LocalCa;
    use crate::{CertError, CertEvent, WorkloadCertificate};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A CA that fails its first `fail` requests, and records when each came.
    struct FlakyCa {
        ca: LocalCa,
        fail: AtomicU32,
        attempts: Mutex<Vec<std::time::Instant>>,
    }

    impl CertificateSource for FlakyCa {
        async fn issue(&self, id: &SpiffeId) -> Result<WorkloadCertificate, CertError> {
            self.attempts
                .lock()
                .unwrap()
                .push(std::time::Instant::now());
            if self
                .fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(CertError::Ca("unreachable".into()));
            }
            self.ca.issue_for(id)
        }
    }

    fn setup(ttl: Duration, fail: u32) -> (Arc<CertStore>, Arc<FlakyCa>, SpiffeId) {
        let ca = LocalCa::generate("renewal-test", ttl).unwrap();
        let id = SpiffeId::new("cluster.local", "shop", "cart").unwrap();
        let store = Arc::new(CertStore::new());
        store.insert(ca.issue_for(&id).unwrap());
        let source = Arc::new(FlakyCa {
            ca,
            fail: AtomicU32::new(fail),
            attempts: Mutex::new(Vec::new()),
        });
        (store, source, id)
    }

    async fn next_update(events: &mut tokio::sync::broadcast::Receiver<CertEvent>) -> CertEvent {
        tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .expect("no renewal")
            .unwrap()
    }

    #[tokio::test]
    async fn a_certificate_is_renewed_at_half_its_life() {
        let (store, source, id) = setup(Duration::from_secs(2), 0);
        let first = store.get(&id).unwrap();
        let mut events = store.subscribe();
        let (trigger, watcher) = crate::drain::channel();
        tokio::spawn(keep_fresh(
            store.clone(),
            source,
            RenewalConfig::default(),
            watcher,
        ));
        assert_eq!(
            next_update(&mut events).await,
            CertEvent::Updated(id.clone())
        );
        let renewed = store.get(&id).unwrap();
        // A new certificate (X.509 times have 1 s granularity, so compare the DER).
        assert_ne!(renewed.chain()[0], first.chain()[0]);
        assert!(renewed.not_after() >= first.not_after());
        // Not before half its life.
        assert!(SystemTime::now() >= first.refresh_at());
        trigger.drain(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn failures_back_off_and_keep_the_valid_certificate() {
        let (store, source, id) = setup(Duration::from_secs(2), 3);
        let first = store.get(&id).unwrap();
        let mut events = store.subscribe();
        let (trigger, watcher) = crate::drain::channel();
        let config = RenewalConfig {
            min_backoff: Duration::from_millis(100),
            ..RenewalConfig::default()
        };
        tokio::spawn(keep_fresh(store.clone(), source.clone(), config, watcher));
        assert_eq!(
            next_update(&mut events).await,
            CertEvent::Updated(id.clone())
        );
        let attempts = source.attempts.lock().unwrap().clone();
        assert_eq!(attempts.len(), 4, "three failures, then success");
        // Each wait at least doubles: 100 ms, 200 ms, 400 ms.
        for (i, pair) in attempts.windows(2).enumerate() {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(100 << i),
                "attempt {i}: {gap:?}"
            );
        }
        assert_ne!(store.get(&id).unwrap().chain()[0], first.chain()[0]);
        trigger.drain(Duration::from_secs(5)).await;
    }
}
