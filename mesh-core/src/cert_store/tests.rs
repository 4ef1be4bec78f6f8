use std::sync::atomic::{AtomicU32, Ordering};

use super::*;
use crate::ca::LocalCa;

fn cart() -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", "cart").unwrap()
}

/// A CA that counts its requests and answers each only when the test says so.
struct GatedCa {
    ca: LocalCa,
    requests: AtomicU32,
    open: tokio::sync::Semaphore,
}

impl GatedCa {
    fn new() -> Self {
        Self {
            ca: LocalCa::generate("store-test", Duration::from_secs(3600)).unwrap(),
            requests: AtomicU32::new(0),
            open: tokio::sync::Semaphore::new(0),
        }
    }
}

impl CertificateSource for GatedCa {
    async fn issue(&self, id: &SpiffeId) -> Result<WorkloadCertificate, CertError> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.open.acquire().await.unwrap().forget();
        self.ca.issue_for(id)
    }
}

#[test]
fn a_key_the_leaf_does_not_certify_is_refused() {
    let ca = LocalCa::generate("store-test", Duration::from_secs(3600)).unwrap();
    let (_, chain) = ca
        .sign(
            &[cart().to_string()],
            time::OffsetDateTime::now_utc(),
            time::OffsetDateTime::now_utc() + time::Duration::hours(1),
        )
        .unwrap();
    let (other_key, _) = ca
        .sign(
            &[cart().to_string()],
            time::OffsetDateTime::now_utc(),
            time::OffsetDateTime::now_utc() + time::Duration::hours(1),
        )
        .unwrap();
    let err = WorkloadCertificate::new(other_key, chain, vec![ca.root()]).unwrap_err();
    assert!(
        matches!(
            err,
            CertError::Key(rustls::Error::InconsistentKeys(
                rustls::InconsistentKeys::KeyMismatch
            ))
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn concurrent_fetches_of_one_identity_share_one_request() {
    let store = Arc::new(CertStore::new());
    let ca = Arc::new(GatedCa::new());
    let fetch = || {
        let (store, ca) = (store.clone(), ca.clone());
        tokio::spawn(async move { store.fetch(&*ca, &cart()).await })
    };
    let (first, second) = (fetch(), fetch());
    while ca.requests.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    // Both are waiting before the CA answers once.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(ca.requests.load(Ordering::SeqCst), 1, "joined, not asked");
    ca.open.add_permits(1);
    let (a, b) = (
        first.await.unwrap().unwrap(),
        second.await.unwrap().unwrap(),
    );
    assert_eq!(ca.requests.load(Ordering::SeqCst), 1);
    assert!(Arc::ptr_eq(&a, &b));
    // Once answered, the next fetch asks again.
    ca.open.add_permits(1);
    store.fetch(&*ca, &cart()).await.unwrap();
    assert_eq!(ca.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_fetch_whose_request_was_cancelled_asks_itself() {
    let store = Arc::new(CertStore::new());
    let ca = Arc::new(GatedCa::new());
    let leader = {
        let (store, ca) = (store.clone(), ca.clone());
        tokio::spawn(async move { store.fetch(&*ca, &cart()).await })
    };
    while ca.requests.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let joined = {
        let (store, ca) = (store.clone(), ca.clone());
        tokio::spawn(async move { store.fetch(&*ca, &cart()).await })
    };
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(ca.requests.load(Ordering::SeqCst), 1, "joined, not asked");
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    ca.open.add_permits(1);
    let cert = joined.await.unwrap().unwrap();
    assert_eq!(cert.identity(), &cart());
    assert_eq!(ca.requests.load(Ordering::SeqCst), 2);
    assert!(store.get(&cart()).is_some());
}
