//! Debouncing: a push waits until the store has been quiet for `debounce_quiet`,
//! but never longer than `debounce_max` after the first pending change, so a
//! steady trickle of changes still reaches the proxies.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};

use super::store::{ChangeBatch, ResourceStore};

/// When to push.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Debounce {
    pub(crate) quiet: Duration,
    pub(crate) max: Duration,
}

impl Debounce {
    /// Waits for pending changes, then for the quiet time (bounded by the max
    /// delay), and takes them as one batch.
    pub(crate) async fn next_batch(&self, store: &ResourceStore) -> ChangeBatch {
        loop {
            match store.pending_times() {
                Some((first, last)) => {
                    let deadline = (last + self.quiet).min(first + self.max);
                    if Instant::now() >= deadline {
                        if let Some(batch) = store.take_pending() {
                            return batch;
                        }
                    } else {
                        sleep_until(deadline).await;
                    }
                }
                // A change applied between the check and the wait leaves a
                // stored permit, so it is not missed.
                None => store.changed().await,
            }
        }
    }

    /// Hands every debounced batch to `dispatch` until the future is dropped.
    pub(crate) async fn run(&self, store: Arc<ResourceStore>, dispatch: impl Fn(Arc<ChangeBatch>)) {
        loop {
            let batch = self.next_batch(&store).await;
            tracing::debug!(
                changes = batch.len(),
                generation = batch.generation,
                waited_ms = batch.first_change.elapsed().as_millis() as u64,
                "xDS push"
            );
            dispatch(Arc::new(batch));
        }
    }
}
