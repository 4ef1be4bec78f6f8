//! One lock per pod uid: requests for one pod run one at a time and in order,
//! while other pods' requests, and their tool runs, go on. A lock nobody holds or
//! waits for is dropped, so there are never more than the requests in flight.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};

use tokio::sync::{Mutex, OwnedMutexGuard};

#[derive(Debug, Default)]
pub(crate) struct PodLocks {
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl PodLocks {
    /// Waits for the lock of pod `uid`.
    pub(crate) async fn lock(&self, uid: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
            // Held or awaited locks have a clone outside the map.
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            locks.entry(uid.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_pod_waits_for_itself_not_for_others_and_unused_locks_go() {
        let locks = PodLocks::default();
        let a = locks.lock("a").await;
        // Another pod's lock is free while "a" is held.
        let b = locks.lock("b").await;
        // "a" again waits until the first holder lets go.
        let mut again = Box::pin(locks.lock("a"));
        assert!(futures_poll_once(&mut again).await.is_none());
        drop(a);
        let a2 = again.await;
        drop((a2, b));
        let _c = locks.lock("c").await;
        assert_eq!(locks.len(), 1, "only the held lock stays");
    }

    /// Polls `fut` once: `Some` if it is ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(fut: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *fut).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
