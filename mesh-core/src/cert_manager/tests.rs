use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::time::Instant;

use super::*;
use crate::CertEvent;
use crate::ca::LocalCa;
use crate::drain::DrainOutcome;

/// How the test CA answers a request.
#[derive(Clone)]
enum Answer {
    Issue,
    Fail(CertError),
    /// Never answers.
    Hang,
}

/// A CA that answers from a script, then always with `then`; records when each
/// request came (tokio's clock) and how many were in flight at once.
struct ScriptedCa {
    ca: LocalCa,
    script: Mutex<VecDeque<Answer>>,
    then: Answer,
    attempts: Mutex<Vec<Instant>>,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

/// Counts a request in flight until it ends or is cancelled.
struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CertificateSource for ScriptedCa {
    async fn issue(&self, id: &SpiffeId) -> Result<WorkloadCertificate, CertError> {
        self.attempts.lock().unwrap().push(Instant::now());
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        let _counted = Counted(&self.in_flight);
        let answer = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| self.then.clone());
        match answer {
            Answer::Issue => self.ca.issue_for(id),
            Answer::Fail(e) => Err(e),
            Answer::Hang => std::future::pending().await,
        }
    }
}

fn unreachable() -> Answer {
    Answer::Fail(CertError::Ca("unreachable".into()))
}

fn refused() -> Answer {
    Answer::Fail(CertError::Refused("PermissionDenied: not on node".into()))
}

/// Renewal on tokio's (paused) clock.
fn paused() -> RenewalConfig {
    RenewalConfig {
        clock: RenewalClock::Tokio,
        ..RenewalConfig::default()
    }
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", sa).unwrap()
}

/// A store with a certificate for each of `sas`, living `ttl`, and the CA.
fn setup(
    ttl: Duration,
    sas: &[&str],
    script: Vec<Answer>,
    then: Answer,
) -> (Arc<CertStore>, Arc<ScriptedCa>) {
    let ca = LocalCa::generate("renewal-test", ttl).unwrap();
    let store = Arc::new(CertStore::new());
    for sa in sas {
        store.insert(ca.issue_for(&id(sa)).unwrap());
    }
    let source = Arc::new(ScriptedCa {
        ca,
        script: Mutex::new(script.into()),
        then,
        attempts: Mutex::new(Vec::new()),
        in_flight: AtomicUsize::new(0),
        most_in_flight: AtomicUsize::new(0),
    });
    (store, source)
}

async fn next_event(events: &mut tokio::sync::broadcast::Receiver<CertEvent>) -> CertEvent {
    tokio::time::timeout(Duration::from_secs(5 * 3600), events.recv())
        .await
        .expect("no event")
        .unwrap()
}

#[tokio::test]
async fn a_certificate_is_renewed_at_half_its_life() {
    // Real time: the certificates' times come from the system clock.
    let (store, source) = setup(Duration::from_secs(2), &["cart"], vec![], Answer::Issue);
    let first = store.get(&id("cart")).unwrap();
    let mut events = store.subscribe();
    let (trigger, watcher) = crate::drain::channel();
    tokio::spawn(keep_fresh(
        store.clone(),
        source,
        RenewalConfig::default(),
        watcher,
    ));
    assert_eq!(
        next_event(&mut events).await,
        CertEvent::Updated(id("cart"))
    );
    let renewed = store.get(&id("cart")).unwrap();
    // A new certificate (X.509 times have 1 s granularity, so compare the DER).
    assert_ne!(renewed.chain()[0], first.chain()[0]);
    assert!(renewed.not_after() >= first.not_after());
    // Not before half its life.
    assert!(SystemTime::now() >= first.refresh_at());
    trigger.drain(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_and_keep_the_valid_certificate() {
    let script = vec![unreachable(), unreachable(), unreachable()];
    let (store, source) = setup(Duration::from_secs(3600), &["cart"], script, Answer::Issue);
    let first = store.get(&id("cart")).unwrap();
    let mut events = store.subscribe();
    let (trigger, watcher) = crate::drain::channel();
    let config = RenewalConfig {
        min_backoff: Duration::from_millis(100),
        ..paused()
    };
    tokio::spawn(keep_fresh(store.clone(), source.clone(), config, watcher));
    assert_eq!(
        next_event(&mut events).await,
        CertEvent::Updated(id("cart"))
    );
    let attempts = source.attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 4, "three failures, then success");
    // Each wait doubles: 100 ms, 200 ms, 400 ms.
    for (i, pair) in attempts.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let want = Duration::from_millis(100 << i);
        assert!(gap >= want && gap < want * 2, "attempt {i}: {gap:?}");
    }
    assert_ne!(store.get(&id("cart")).unwrap().chain()[0], first.chain()[0]);
    trigger.drain(Duration::from_secs(5)).await;
}

#[test]
fn backoff_is_capped_by_a_quarter_of_the_time_left() {
    let config = paused();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let far = now + Duration::from_secs(86_400);
    assert_eq!(config.backoff(1, now, far), Duration::from_secs(1));
    assert_eq!(config.backoff(4, now, far), Duration::from_secs(8));
    assert_eq!(config.backoff(30, now, far), Duration::from_secs(300));
    // 400 s left: at most 100 s, whatever the failures.
    let near = now + Duration::from_secs(400);
    assert_eq!(config.backoff(30, now, near), Duration::from_secs(100));
    // Never below the floor, even past expiry.
    assert_eq!(config.backoff(30, now, now), Duration::from_secs(1));
    assert_eq!(config.backoff(30, near, now), Duration::from_secs(1));
}

/// Runs renewal of one certificate living `ttl` against a CA that always answers
/// `answer` until the certificate is dropped; checks it went only at expiry and
/// returns, for each renewal attempt, the time left and the wait to the next.
async fn renew_until_dropped(ttl: Duration, answer: Answer) -> Vec<(Duration, Duration)> {
    let (store, source) = setup(ttl, &["cart"], vec![], answer);
    let not_after = store.get(&id("cart")).unwrap().not_after();
    let (start, wall) = (Instant::now(), SystemTime::now());
    let mut events = store.subscribe();
    let (trigger, watcher) = crate::drain::channel();
    tokio::spawn(keep_fresh(store.clone(), source.clone(), paused(), watcher));
    assert_eq!(
        next_event(&mut events).await,
        CertEvent::Removed(id("cart"))
    );
    assert!(store.all().is_empty());
    let attempts = source.attempts.lock().unwrap().clone();
    let at = |t: Instant| wall + (t - start);
    // Dropped only once expired (X.509 times have 1 s granularity).
    assert!(at(Instant::now()) + Duration::from_secs(1) >= not_after);
    // Bounded: at most doubling, then quartering the time left to the 1 s floor.
    assert!(
        attempts.len() >= 2 && attempts.len() < 40,
        "{} attempts",
        attempts.len()
    );
    // And nothing more is asked once it is gone.
    let asked = attempts.len();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(source.attempts.lock().unwrap().len(), asked);
    trigger.drain(Duration::from_secs(5)).await;
    attempts
        .windows(2)
        .map(|pair| {
            let left = not_after.duration_since(at(pair[0])).unwrap_or_default();
            (left, pair[1] - pair[0])
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_certificate_that_expires_while_renewal_fails_is_dropped() {
    // Each retry came within a quarter of the time left (or the 1 s floor):
    // with 300 s backoff the last ones would have come after expiry.
    for (left, gap) in renew_until_dropped(Duration::from_secs(600), unreachable()).await {
        let most = (left / 4).max(Duration::from_secs(1)) + Duration::from_millis(10);
        assert!(gap <= most, "gap {gap:?} with {left:?} left");
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_renewal_waits_the_longest_backoff_and_the_certificate_goes_at_expiry() {
    // No doubling from 1 s: straight to 300 s (or a quarter of the time left).
    for (left, gap) in renew_until_dropped(Duration::from_secs(4000), refused()).await {
        let want = Duration::from_secs(300)
            .min(left / 4)
            .max(Duration::from_secs(1));
        assert!(
            gap + Duration::from_millis(10) >= want,
            "gap {gap:?}, want {want:?}"
        );
    }
}

/// A refusal can be a control plane that has not seen the pod yet: the next try,
/// at the longest backoff, renews it.
#[tokio::test(start_paused = true)]
async fn a_refusal_that_passes_is_renewed_at_the_next_try() {
    let ttl = Duration::from_secs(4000);
    let (store, source) = setup(ttl, &["cart"], vec![refused()], Answer::Issue);
    let first = store.get(&id("cart")).unwrap();
    let mut events = store.subscribe();
    let (trigger, watcher) = crate::drain::channel();
    tokio::spawn(keep_fresh(store.clone(), source.clone(), paused(), watcher));
    assert_eq!(
        next_event(&mut events).await,
        CertEvent::Updated(id("cart"))
    );
    assert_ne!(store.get(&id("cart")).unwrap().chain()[0], first.chain()[0]);
    let attempts = source.attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 2);
    let gap = attempts[1] - attempts[0];
    assert!(
        gap >= Duration::from_secs(300) && gap < Duration::from_secs(301),
        "{gap:?}"
    );
    trigger.drain(Duration::from_secs(5)).await;
}

/// A renewal retry belongs to the certificate that failed: one fetched meanwhile
/// by someone else (a pod's start) is due at its own refresh time. (The test CA
/// dates certificates by the system clock, which stands still here while tokio's
/// runs, so a certificate fetched mid-test is due at once.)
#[tokio::test(start_paused = true)]
async fn a_certificate_fetched_meanwhile_is_not_held_to_the_old_retry() {
    let ttl = Duration::from_secs(4000);
    let (store, source) = setup(ttl, &["cart"], vec![refused()], Answer::Issue);
    let mut events = store.subscribe();
    let (trigger, watcher) = crate::drain::channel();
    tokio::spawn(keep_fresh(store.clone(), source.clone(), paused(), watcher));
    while source.attempts.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Refused: the old certificate's retry is 300 s away. A pod's start fetches.
    store.fetch(&*source, &id("cart")).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        CertEvent::Updated(id("cart"))
    );
    assert_eq!(
        next_event(&mut events).await,
        CertEvent::Updated(id("cart"))
    );
    let attempts = source.attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 3);
    let gap = attempts[2] - attempts[1];
    assert!(
        gap < Duration::from_secs(10),
        "held to the old retry: {gap:?}"
    );
    trigger.drain(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn renewals_run_side_by_side_bounded_and_a_hung_ca_does_not_hold_up_drain() {
    let sas: Vec<String> = (0..12).map(|i| format!("sa-{i}")).collect();
    let sas: Vec<&str> = sas.iter().map(String::as_str).collect();
    let (store, source) = setup(Duration::from_secs(600), &sas, vec![], Answer::Hang);
    let (trigger, watcher) = crate::drain::channel();
    let renewing = tokio::spawn(keep_fresh(store.clone(), source.clone(), paused(), watcher));
    // Past half life, every identity is due; a CA that never answers.
    tokio::time::sleep(Duration::from_secs(400)).await;
    assert_eq!(
        source.in_flight.load(Ordering::SeqCst),
        MAX_CONCURRENT_RENEWALS
    );
    assert_eq!(
        source.most_in_flight.load(Ordering::SeqCst),
        MAX_CONCURRENT_RENEWALS
    );
    let started = Instant::now();
    assert_eq!(
        trigger.drain(Duration::from_secs(30)).await,
        DrainOutcome::Graceful
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    renewing.await.unwrap();
    // The hung requests were cancelled, not left behind.
    assert_eq!(source.in_flight.load(Ordering::SeqCst), 0);
    assert_eq!(store.all().len(), 12);
}
