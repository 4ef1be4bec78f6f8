//! Retry delays, doubling from a minimum to a maximum. [`Backoff`] adds jitter, so
//! a fleet of proxies that lost their peer at the same moment does not come back
//! at the same moment, and starts over after a stable session: the reconnects of
//! the xDS stream and of ztunnel's node-agent session. [`BackoffConfig::nominal`]
//! is the same schedule without jitter: ztunnel's certificate retries
//! (`node_certs`, `await_certificate`) and the node agent's re-offers of a pod
//! ztunnel refused.

use std::time::Duration;

/// A retry schedule: doubling from `min` to `max`, reset after a stable session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Delay after the first failure.
    pub min: Duration,
    /// The delay stops doubling here.
    pub max: Duration,
    /// A session that stayed up this long resets the delay to `min`.
    pub stable_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(100),
            max: Duration::from_secs(15),
            stable_after: Duration::from_secs(30),
        }
    }
}

impl BackoffConfig {
    /// The delay before jitter after `failures` earlier failures: `min` doubled
    /// per failure, at most `max`.
    pub fn nominal(&self, failures: u32) -> Duration {
        self.min
            .saturating_mul(1u32 << failures.min(20))
            .min(self.max)
    }
}

/// Share of the nominal delay added or removed at random (here up to 20 %).
const JITTER_PERCENT: u64 = 20;

/// The delays of consecutive failures.
#[derive(Clone, Debug)]
pub struct Backoff {
    config: BackoffConfig,
    failures: u32,
}

impl Backoff {
    pub fn new(config: BackoffConfig) -> Self {
        Self {
            config,
            failures: 0,
        }
    }

    /// Consecutive failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Counts a failure and returns how long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let mut random = [0u8; 8];
        // Without randomness the delay is still bounded: only the jitter is lost.
        let _ = crate::tls::provider().secure_random.fill(&mut random);
        self.next_delay_with(u64::from_le_bytes(random))
    }

    /// [`Backoff::next_delay`] with the random draw given (tests).
    pub fn next_delay_with(&mut self, random: u64) -> Duration {
        let nominal = self.nominal(self.failures);
        self.failures = self.failures.saturating_add(1);
        // Scale by a factor in [1 - J, 1 + J], then clamp to the maximum.
        let span = 2 * JITTER_PERCENT + 1;
        let percent = 100 - JITTER_PERCENT + random % span;
        let millis = nominal.as_millis() as u64 * percent / 100;
        Duration::from_millis(millis).min(self.config.max)
    }

    /// The delay before jitter after `failures` earlier failures.
    pub fn nominal(&self, failures: u32) -> Duration {
        self.config.nominal(failures)
    }

    /// The wait after a session (or attempt) that lasted `lasted`: back to the
    /// minimum after a stable one, else one more failure. A peer that accepts
    /// and drops at once keeps the delay growing.
    pub fn after_session(&mut self, lasted: Duration) -> Duration {
        if lasted >= self.config.stable_after {
            self.reset();
        }
        self.next_delay()
    }

    /// Starts over from the minimum (the connection proved stable).
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn config(&self) -> &BackoffConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_minimum_to_the_maximum() {
        let mut b = Backoff::new(BackoffConfig::default());
        // The middle of the jitter range is the nominal delay.
        let mid = JITTER_PERCENT;
        let delays: Vec<u64> = (0..10)
            .map(|_| b.next_delay_with(mid).as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 15000, 15000]
        );
        assert_eq!(b.failures(), 10);
        b.reset();
        assert_eq!(b.next_delay_with(mid), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_within_a_fifth_and_under_the_maximum() {
        let mut lo = Backoff::new(BackoffConfig::default());
        let mut hi = lo.clone();
        assert_eq!(lo.next_delay_with(0), Duration::from_millis(80));
        assert_eq!(
            hi.next_delay_with(2 * JITTER_PERCENT),
            Duration::from_millis(120)
        );
        let mut b = Backoff::new(BackoffConfig::default());
        for _ in 0..64 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(15), "{d:?}");
        }
        let mut b = Backoff::new(BackoffConfig::default());
        for n in 0..12 {
            let nominal = b.nominal(n);
            let d = b.next_delay();
            assert!(d >= nominal * 4 / 5 && d <= (nominal * 6 / 5).min(Duration::from_secs(15)));
        }
    }

    #[test]
    fn a_stable_session_starts_over_and_a_short_one_keeps_growing() {
        let config = BackoffConfig {
            min: Duration::from_millis(100),
            max: Duration::from_secs(15),
            stable_after: Duration::from_secs(10),
        };
        let mut b = Backoff::new(config);
        let within = |d: Duration, nominal: u64| {
            let n = Duration::from_millis(nominal);
            d >= n * 4 / 5 && d <= n * 6 / 5
        };
        for nominal in [100, 200, 400] {
            let d = b.after_session(Duration::from_secs(1));
            assert!(within(d, nominal), "{d:?} for {nominal}");
        }
        let d = b.after_session(Duration::from_secs(10));
        assert!(within(d, 100), "{d:?}");
        assert_eq!(b.failures(), 1);
        let d = b.after_session(Duration::ZERO);
        assert!(within(d, 200), "{d:?}");
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::new(BackoffConfig::default());
        for _ in 0..100 {
            b.next_delay_with(u64::MAX);
        }
        assert_eq!(b.failures(), 100);
        assert_eq!(b.nominal(u32::MAX), Duration::from_secs(15));
    }
}
