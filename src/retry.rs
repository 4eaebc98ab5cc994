//! Retry: how many attempts, how long between them, and which errors deserve another try.
//!
//! Backoff is a plain `Iterator<Item = Duration>` with a seedable random source, so its bounds
//! can be tested without a clock. The delay before attempt `n + 1` is drawn from a window that
//! grows as `base · 2ⁿ`, capped at `max`:
//!
//! | jitter | delay `n` (0-based) |
//! |---|---|
//! | `None` | `cap(n) = min(max, base · 2ⁿ)` |
//! | `Full` | uniform in `[0, cap(n)]` |
//! | `Equal` | `cap(n)/2 +` uniform in `[0, cap(n)/2]` |
//! | `Decorrelated` | uniform in `[base, min(max, 3 · previous)]` (first: `base`) |
//!
//! The runner never sleeps past the run's budget: a delay that would cross the deadline ends
//! the run at once with `BudgetExceeded`.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{ConfigError, Decision, RunError};

/// How delays are randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// Exactly the exponential delay.
    None,
    /// Uniform between zero and the exponential delay (spreads retries best).
    #[default]
    Full,
    /// Half the exponential delay plus a uniform half.
    Equal,
    /// AWS "decorrelated jitter": uniform between `base` and three times the previous delay.
    Decorrelated,
}

impl Jitter {
    /// Parses `none`, `full`, `equal` or `decorrelated`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Some(Jitter::None),
            "full" => Some(Jitter::Full),
            "equal" => Some(Jitter::Equal),
            "decorrelated" => Some(Jitter::Decorrelated),
            _ => None,
        }
    }
}

/// An endless sequence of retry delays. Take as many as you need.
///
/// ```
/// use job_runtime::retry::{Backoff, Jitter};
/// use std::time::Duration;
///
/// let delays: Vec<_> = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), Jitter::None, 0)
///     .take(5)
///     .collect();
/// assert_eq!(delays, [100, 200, 400, 800, 1000].map(Duration::from_millis));
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: Jitter,
    rng: fastrand::Rng,
    n: u32,
    prev: Duration,
}

impl Backoff {
    /// A backoff from `base` doubling up to `max`, randomised by `jitter` from `seed`.
    /// `base` above `max` is clamped to `max`.
    pub fn new(base: Duration, max: Duration, jitter: Jitter, seed: u64) -> Self {
        Self {
            base: base.min(max),
            max,
            jitter,
            rng: fastrand::Rng::with_seed(seed),
            n: 0,
            prev: Duration::ZERO,
        }
    }

    /// The exponential ceiling for delay `n` (0-based): `min(max, base · 2ⁿ)`.
    pub fn cap(base: Duration, max: Duration, n: u32) -> Duration {
        if base.is_zero() {
            return Duration::ZERO;
        }
        if n >= 127 {
            return max;
        }
        match base.as_nanos().checked_mul(1u128 << n) {
            Some(nanos) if nanos <= max.as_nanos() => {
                // `nanos <= max`, so the seconds fit in a u64.
                Duration::new(
                    (nanos / 1_000_000_000) as u64,
                    (nanos % 1_000_000_000) as u32,
                )
            }
            _ => max,
        }
    }

    fn uniform(&mut self, lo: Duration, hi: Duration) -> Duration {
        if hi <= lo {
            return lo;
        }
        let span = (hi - lo).as_nanos().min(u64::MAX as u128) as u64;
        lo + Duration::from_nanos(self.rng.u64(0..=span))
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let cap = Self::cap(self.base, self.max, self.n);
        let d = match self.jitter {
            Jitter::None => cap,
            Jitter::Full => self.uniform(Duration::ZERO, cap),
            Jitter::Equal => {
                let half = cap / 2;
                half + self.uniform(Duration::ZERO, cap - half)
            }
            Jitter::Decorrelated => {
                if self.n == 0 {
                    self.base
                } else {
                    let hi = self.prev.saturating_mul(3).min(self.max).max(self.base);
                    self.uniform(self.base, hi)
                }
            }
        };
        self.n = self.n.saturating_add(1);
        self.prev = d;
        Some(d)
    }
}

/// Decides what to do after a failed attempt, given the error and the attempt number (from 1).
pub type Classifier = Arc<dyn Fn(&RunError, u32) -> Decision + Send + Sync>;

/// How a run retries.
///
/// Defaults: 1 attempt (no retry), base delay 100 ms, max delay 30 s, full jitter, errors
/// classified by how the job marked them ([`RunError::decision`]). Panics are never retried.
///
/// ```
/// use job_runtime::retry::{Jitter, RetryPolicy};
/// use std::time::Duration;
///
/// let retry = RetryPolicy::builder()
///     .max_attempts(5)
///     .base_delay(Duration::from_millis(50))
///     .max_delay(Duration::from_secs(2))
///     .jitter(Jitter::Equal)
///     .build()
///     .unwrap();
/// assert_eq!(retry.max_attempts().get(), 5);
/// ```
#[derive(Clone)]
pub struct RetryPolicy {
    pub(crate) max_attempts: NonZeroU32,
    pub(crate) base_delay: Duration,
    pub(crate) max_delay: Duration,
    pub(crate) jitter: Jitter,
    pub(crate) seed: Option<u64>,
    pub(crate) classifier: Option<Classifier>,
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("base_delay", &self.base_delay)
            .field("max_delay", &self.max_delay)
            .field("jitter", &self.jitter)
            .field("seed", &self.seed)
            .field("classifier", &self.classifier.as_ref().map(|_| "custom"))
            .finish()
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: NonZeroU32::MIN,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            jitter: Jitter::Full,
            seed: None,
            classifier: None,
        }
    }
}

impl RetryPolicy {
    /// A builder starting from the defaults.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder {
            policy: Self::default(),
        }
    }

    /// No retry: one attempt.
    pub fn never() -> Self {
        Self::default()
    }

    /// Attempts in all, the first included.
    pub fn max_attempts(&self) -> NonZeroU32 {
        self.max_attempts
    }

    /// The backoff delays for one run. Seeded from the policy's seed, or from `fallback_seed`.
    pub fn backoff(&self, fallback_seed: u64) -> Backoff {
        Backoff::new(
            self.base_delay,
            self.max_delay,
            self.jitter,
            self.seed.unwrap_or(fallback_seed),
        )
    }

    /// What to do after attempt `attempt` (from 1) failed with `err`.
    pub fn classify(&self, err: &RunError, attempt: u32) -> Decision {
        match &self.classifier {
            Some(c) => c(err, attempt),
            None => err.decision(),
        }
    }

    pub(crate) fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.base_delay > self.max_delay {
            return Err(ConfigError::one(
                format!("{prefix}retry base delay"),
                format!("{:?} > max delay {:?}", self.base_delay, self.max_delay),
                "the base delay is larger than the max delay",
                "base delay <= max delay",
            ));
        }
        Ok(())
    }
}

/// Builds a [`RetryPolicy`]; see its defaults.
#[derive(Debug, Clone)]
#[must_use]
pub struct RetryPolicyBuilder {
    policy: RetryPolicy,
}

impl RetryPolicyBuilder {
    /// Attempts in all, the first included (0 is treated as 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.policy.max_attempts = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        self
    }
    /// The first delay.
    pub fn base_delay(mut self, d: Duration) -> Self {
        self.policy.base_delay = d;
        self
    }
    /// The largest delay.
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.policy.max_delay = d;
        self
    }
    /// The jitter kind.
    pub fn jitter(mut self, j: Jitter) -> Self {
        self.policy.jitter = j;
        self
    }
    /// A fixed seed, for reproducible delays.
    pub fn seed(mut self, seed: u64) -> Self {
        self.policy.seed = Some(seed);
        self
    }
    /// A classifier that overrides how jobs marked their errors.
    pub fn classifier(
        mut self,
        f: impl Fn(&RunError, u32) -> Decision + Send + Sync + 'static,
    ) -> Self {
        self.policy.classifier = Some(Arc::new(f));
        self
    }
    /// Validates (base ≤ max) and builds.
    pub fn build(self) -> Result<RetryPolicy, ConfigError> {
        self.policy.validate("")?;
        Ok(self.policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_doubles_and_saturates() {
        let (b, m) = (Duration::from_millis(10), Duration::from_secs(1));
        assert_eq!(Backoff::cap(b, m, 0), b);
        assert_eq!(Backoff::cap(b, m, 3), Duration::from_millis(80));
        assert_eq!(Backoff::cap(b, m, 40), m);
        assert_eq!(Backoff::cap(Duration::MAX, Duration::MAX, 5), Duration::MAX);
        // Past 2^31 the doubling must go on exactly (regression: it used to stop at 2^31).
        let big = Duration::from_secs(134);
        assert_eq!(
            Backoff::cap(Duration::from_nanos(1), big, 32),
            Duration::from_nanos(1 << 32)
        );
    }

    #[test]
    fn same_seed_same_delays() {
        let a: Vec<_> = Backoff::new(
            Duration::from_millis(1),
            Duration::from_secs(1),
            Jitter::Full,
            7,
        )
        .take(20)
        .collect();
        let b: Vec<_> = Backoff::new(
            Duration::from_millis(1),
            Duration::from_secs(1),
            Jitter::Full,
            7,
        )
        .take(20)
        .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn base_above_max_is_rejected_by_builder() {
        let err = RetryPolicy::builder()
            .base_delay(Duration::from_secs(5))
            .max_delay(Duration::from_secs(1))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("base delay <= max delay"), "{err}");
    }
}
