//! The bound on response bytes on their way to clients.
//!
//! A response holds its bytes of one server-wide budget from the moment it is
//! built until the client answers it (ACK or NACK), and a client has at most
//! `client_queue` responses unanswered. So however many clients sync at once (a
//! thousand ztunnels reconnecting after a restart), the bytes sitting in stream
//! queues, encode buffers, HTTP/2 and TLS send buffers stay under the budget; the
//! clients take turns (the semaphore is FIFO) instead of all growing at once.
//!
//! A client in the middle of a sync keeps the budget its answered responses free
//! for its next ones, rather than queueing again behind every other client: when
//! a thousand proxies sync at once they finish one group after another (half of
//! them have everything at about half the total time) instead of all at the end.
//!
//! A client that does not answer keeps its place in the budget only for
//! `push_budget_hold`: after that its responses stop counting (their bytes are
//! in the kernel's or the client's hands by then), so a few broken clients cannot
//! starve the others. It still gets nothing more until it answers.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Duration, Instant};

/// The server-wide budget.
#[derive(Debug)]
pub(crate) struct SendBudget {
    semaphore: Arc<Semaphore>,
    total: usize,
    /// What a response asks for before it is built (its maximum size).
    pub(crate) per_response: usize,
}

impl SendBudget {
    pub(crate) fn new(total: usize, per_response: usize) -> Self {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            semaphore: Arc::new(Semaphore::new(total)),
            total,
            per_response: per_response.clamp(1, total),
        }
    }

    /// Waits for room for one response of the maximum size.
    pub(crate) fn acquire(
        &self,
    ) -> impl Future<Output = Option<OwnedSemaphorePermit>> + Send + 'static {
        let semaphore = self.semaphore.clone();
        let n = self.per_response as u32;
        async move { semaphore.acquire_many_owned(n).await.ok() }
    }

    /// Bytes of the budget not held by any response.
    pub(crate) fn available(&self) -> usize {
        self.semaphore.available_permits()
    }

    pub(crate) fn total(&self) -> usize {
        self.total
    }
}

/// Keeps `bytes` of `permit` (at least one) and gives the rest back.
pub(crate) fn keep(mut permit: OwnedSemaphorePermit, bytes: usize) -> OwnedSemaphorePermit {
    let keep = bytes.clamp(1, permit.num_permits());
    drop(permit.split(permit.num_permits() - keep));
    permit
}

/// The sequence number in one of our nonces (`<client>-<seq>`, hex).
pub(crate) fn nonce_seq(nonce: &str) -> Option<u64> {
    let (_, seq) = nonce.rsplit_once('-')?;
    u64::from_str_radix(seq, 16).ok()
}

/// One client's responses not yet answered, each holding its share of the budget.
#[derive(Debug, Default)]
pub(crate) struct Unanswered {
    entries: VecDeque<Pending>,
    /// Budget freed by answers, for the client's next responses.
    spare: Option<OwnedSemaphorePermit>,
    /// The sequence number of the newest response sent.
    highest_sent: u64,
}

#[derive(Debug)]
struct Pending {
    type_url: String,
    seq: u64,
    sent: Instant,
    /// Dropped when answered, or when held too long.
    budget: Option<OwnedSemaphorePermit>,
}

impl Unanswered {
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn push(&mut self, type_url: &str, nonce: &str, permit: OwnedSemaphorePermit) {
        let seq = nonce_seq(nonce).unwrap_or(u64::MAX);
        self.highest_sent = self.highest_sent.max(seq);
        self.entries.push_back(Pending {
            type_url: type_url.to_string(),
            seq,
            sent: Instant::now(),
            budget: Some(permit),
        });
    }

    /// When the oldest response still holding budget has held it for `hold`.
    pub(crate) fn next_expiry(&self, hold: Duration) -> Option<Instant> {
        self.entries
            .iter()
            .find(|p| p.budget.is_some())
            .map(|p| p.sent + hold)
    }

    /// When the oldest unanswered response was sent.
    pub(crate) fn oldest(&self) -> Option<Instant> {
        self.entries.front().map(|p| p.sent)
    }

    /// Gives back the budget of responses unanswered for `hold` or longer.
    pub(crate) fn expire(&mut self, hold: Duration) {
        let now = Instant::now();
        for p in &mut self.entries {
            if p.sent + hold <= now {
                p.budget = None;
            }
        }
    }

    /// The client answered `nonce` of `type_url`: that response and the earlier
    /// ones of the type are settled (a client may answer only the latest); their
    /// budget becomes the client's spare. A nonce never sent settles nothing.
    pub(crate) fn answered(&mut self, type_url: &str, nonce: &str) {
        let Some(seq) = nonce_seq(nonce).filter(|seq| *seq <= self.highest_sent) else {
            return;
        };
        let mut freed = Vec::new();
        self.entries.retain_mut(|p| {
            let settled = p.type_url == type_url && p.seq <= seq;
            if settled {
                freed.extend(p.budget.take());
            }
            !settled
        });
        for permit in freed {
            match self.spare.as_mut() {
                Some(spare) => spare.merge(permit),
                None => self.spare = Some(permit),
            }
        }
    }

    /// `n` bytes of the spare budget, if it has that many; a smaller spare goes
    /// back to everyone.
    pub(crate) fn take_spare(&mut self, n: usize) -> Option<OwnedSemaphorePermit> {
        let mut spare = self.spare.take()?;
        if spare.num_permits() < n {
            return None;
        }
        if spare.num_permits() > n {
            self.spare = spare.split(spare.num_permits() - n);
        }
        Some(spare)
    }

    /// Gives the spare budget back to everyone (the client has nothing to send).
    pub(crate) fn drop_spare(&mut self) {
        self.spare = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_response_holds_its_bytes_until_answered() {
        let budget = SendBudget::new(1000, 400);
        let mut unanswered = Unanswered::default();
        let a = keep(budget.acquire().await.unwrap(), 100);
        assert_eq!(budget.available(), 900, "the unused 300 went back");
        unanswered.push("t1", "7-1", a);
        let b = keep(budget.acquire().await.unwrap(), 5000);
        assert_eq!(b.num_permits(), 400, "never more than was asked");
        unanswered.push("t1", "7-2", b);
        let c = keep(budget.acquire().await.unwrap(), 0);
        unanswered.push("t2", "7-3", c);
        assert_eq!(budget.available(), 499);

        // A full budget makes the next response wait.
        let waiting = budget.acquire();
        let held = keep(budget.acquire().await.unwrap(), 400);
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), &mut waiting)
                .await
                .is_err()
        );
        // Freed budget goes to the waiting response first.
        drop(held);
        let waited = waiting.await.unwrap();
        assert_eq!(budget.available(), 99);

        // Answering 7-2 settles 7-1 too, not the other type's; their budget is
        // the client's spare until it has nothing more to send.
        unanswered.answered("t1", "7-2");
        assert_eq!(unanswered.len(), 1);
        assert_eq!(budget.available(), 99);
        let next = unanswered.take_spare(400).unwrap();
        assert_eq!((next.num_permits(), budget.available()), (400, 99));
        unanswered.drop_spare();
        assert_eq!(budget.available(), 199, "the 100 left of the spare");
        drop(next);
        drop(waited);
        assert_eq!(budget.available(), 999);
        unanswered.answered("t2", "not-a-nonce");
        assert_eq!(unanswered.len(), 1);
        unanswered.answered("t2", "7-3");
        assert_eq!(unanswered.len(), 0);
        assert!(unanswered.take_spare(400).is_none(), "1 byte is not enough");
    }

    /// A client may answer only what it was sent: an answer ahead of that would
    /// free budget (and room in the client's queue) for responses not yet built.
    #[tokio::test]
    async fn an_answer_to_a_response_never_sent_settles_nothing() {
        let budget = SendBudget::new(1000, 400);
        let mut unanswered = Unanswered::default();
        unanswered.answered("t", "7-1");
        unanswered.push("t", "7-1", keep(budget.acquire().await.unwrap(), 100));
        unanswered.answered("t", "7-5");
        assert_eq!((unanswered.len(), budget.available()), (1, 900));
        assert!(unanswered.take_spare(1).is_none());
        unanswered.answered("t", "7-1");
        assert_eq!(unanswered.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_held_too_long_goes_back_but_the_response_stays_unanswered() {
        let budget = SendBudget::new(1000, 400);
        let hold = Duration::from_secs(10);
        let mut unanswered = Unanswered::default();
        assert_eq!(unanswered.next_expiry(hold), None);
        unanswered.push("t", "1-1", keep(budget.acquire().await.unwrap(), 300));
        let deadline = unanswered.next_expiry(hold).unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        unanswered.expire(hold);
        assert_eq!(budget.available(), 700);
        tokio::time::sleep_until(deadline).await;
        unanswered.expire(hold);
        assert_eq!(budget.available(), 1000);
        assert_eq!(unanswered.len(), 1);
        assert_eq!(unanswered.next_expiry(hold), None);
    }
}
