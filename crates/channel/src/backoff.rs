//! Jittered exponential backoff for reconnecting.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with jitter: the n-th delay is drawn uniformly from `[b/2, b]` where
/// `b = min(initial * 2^n, max)`. The lower bound keeps a crowd of reconnecting agents from
/// spinning; the jitter spreads them out.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Default for Backoff {
    /// 100 ms doubling up to 5 s.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

impl Backoff {
    /// Starts at `initial`, doubles on every [`Backoff::next`] up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        let max = max.max(initial);
        Backoff { initial, max, current: initial }
    }

    /// The next delay to wait; grows the following one.
    #[allow(clippy::should_implement_trait, reason = "an endless sequence, not an iterator")]
    pub fn next(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let hi = ceiling.as_micros() as u64;
        let lo = hi / 2;
        Duration::from_micros(rand::rng().random_range(lo..=hi))
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        self.current
    }

    /// Back to the initial delay (call after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_jitter_bounds_and_cap() {
        for _ in 0..200 {
            let mut b = Backoff::default();
            let mut ceiling = Duration::from_millis(100);
            for _ in 0..20 {
                let d = b.next();
                assert!(d <= ceiling && d >= ceiling / 2, "{d:?} outside [{:?}, {ceiling:?}]", ceiling / 2);
                assert!(d <= Duration::from_secs(5));
                ceiling = (ceiling * 2).min(Duration::from_secs(5));
            }
            assert_eq!(b.ceiling(), Duration::from_secs(5));
        }
    }

    #[test]
    fn reset_returns_to_the_initial_delay() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(80));
        for _ in 0..10 {
            b.next();
        }
        assert_eq!(b.ceiling(), Duration::from_millis(80));
        b.reset();
        let d = b.next();
        assert!(d <= Duration::from_millis(10) && d >= Duration::from_millis(5), "{d:?}");
    }

    #[test]
    fn jitter_actually_varies() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            seen.insert(Backoff::default().next());
        }
        assert!(seen.len() > 1, "50 first delays were all equal");
    }

    #[test]
    fn degenerate_configuration_is_sane() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        let d = b.next();
        assert!(d <= Duration::from_millis(1));
    }
}
