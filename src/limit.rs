//! Bounded concurrency and rate limits.
//!
//! Limits protect what jobs call (a database, an API), so they are taken per attempt, right
//! before the job body runs, and given back before any backoff sleep: nothing is held while a
//! run waits to retry, and every call to the guarded system spends a rate token.
//!
//! Order inside an attempt: the group's concurrency permit, then the global one (so no global
//! slot is held while waiting for a busy group), then the group's rate token, then the global
//! one (tokens last, so a token is spent right before the call it pays for). Waiting counts
//! against the run's budget.
//!
//! Rate limits use governor's GCRA driven by `tokio::time` (its own clock and `until_ready`
//! would ignore paused time in tests): we `check`, and on a refusal sleep for the time governor
//! says, through the tokio timer. With a quota of `n` per period `p` and burst `b`, at most
//! `b + w·n/p` attempts start in any window of length `w`.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock as GovClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::time::Instant;

/// A rate: `count` per `per`, with bursts up to `burst`.
///
/// Parsed from `"<count>/<unit>"` with unit `s`, `min`, `h` or any duration (`"5/250ms"`), and an
/// optional `" burst <n>"` (default: `count`).
///
/// ```
/// use job_runtime::limit::RateLimit;
/// use std::time::Duration;
///
/// let r = RateLimit::parse("100/min burst 10").unwrap();
/// assert_eq!((r.count.get(), r.per, r.burst.get()), (100, Duration::from_secs(60), 10));
/// assert!(RateLimit::parse("fast").is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Starts allowed per period.
    pub count: NonZeroU32,
    /// The period.
    pub per: Duration,
    /// The most starts allowed back to back.
    pub burst: NonZeroU32,
}

/// What a rate accepts, for error messages.
pub const RATE_FORM: &str = "`<count>/<unit>` with a positive count and unit s, min, h or a duration like 250ms, optionally followed by ` burst <n>` (e.g. `100/s`, `10/min burst 5`)";

impl RateLimit {
    /// `n` per second, burst `n`.
    pub fn per_second(n: NonZeroU32) -> Self {
        Self {
            count: n,
            per: Duration::from_secs(1),
            burst: n,
        }
    }

    /// Sets the burst.
    #[must_use]
    pub fn with_burst(mut self, burst: NonZeroU32) -> Self {
        self.burst = burst;
        self
    }

    /// Parses a rate; the error says what is accepted.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (rate, burst) = match s.split_once("burst") {
            Some((r, b)) => (r.trim(), Some(b.trim())),
            None => (s, None),
        };
        let (count, unit) = rate
            .split_once('/')
            .ok_or_else(|| "missing `/` between count and unit".to_string())?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| format!("count `{}` is not a whole number", count.trim()))?;
        let count = NonZeroU32::new(count).ok_or_else(|| "count must be at least 1".to_string())?;
        let unit = unit.trim();
        let per = match unit {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => humantime::parse_duration(other)
                .map_err(|e| format!("unit `{other}` is not s, min, h or a duration ({e})"))?,
        };
        if per.is_zero() {
            return Err("the period must be longer than zero".into());
        }
        let burst = match burst {
            Some(b) => {
                let n: u32 = b
                    .parse()
                    .map_err(|_| format!("burst `{b}` is not a whole number"))?;
                NonZeroU32::new(n).ok_or_else(|| "burst must be at least 1".to_string())?
            }
            None => count,
        };
        if (per / count.get()).is_zero() {
            return Err("more than one start per nanosecond".into());
        }
        Ok(Self { count, per, burst })
    }

    /// The governor quota.
    pub fn quota(&self) -> Quota {
        Quota::with_period(self.per / self.count.get())
            .expect("period checked non-zero")
            .allow_burst(self.burst)
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:?} burst {}", self.count, self.per, self.burst)
    }
}

/// Governor clock reading `tokio::time`, so paused-time tests drive rate limits.
#[derive(Debug, Clone, Copy, Default)]
struct TokioClock;

impl GovClock for TokioClock {
    type Instant = std::time::Instant;
    #[inline]
    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<std::time::Instant>>;

/// Limits of one scope (global, or a named group).
#[derive(Default)]
pub(crate) struct Gate {
    sem: Option<Arc<Semaphore>>,
    rate: Option<Limiter>,
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field(
                "permits_free",
                &self.sem.as_ref().map(|s| s.available_permits()),
            )
            .field("rate", &self.rate.is_some())
            .finish()
    }
}

impl Gate {
    pub(crate) fn new(concurrency: Option<usize>, rate: Option<RateLimit>) -> Self {
        Self {
            sem: concurrency.map(|n| Arc::new(Semaphore::new(n))),
            rate: rate.map(|r| RateLimiter::direct_with_clock(r.quota(), TokioClock)),
        }
    }

    fn is_open(&self) -> bool {
        self.sem.is_none() && self.rate.is_none()
    }

    async fn permit(&self, deadline: Option<Instant>) -> Result<Option<OwnedSemaphorePermit>, ()> {
        let Some(sem) = &self.sem else {
            return Ok(None);
        };
        if let Ok(p) = Arc::clone(sem).try_acquire_owned() {
            return Ok(Some(p));
        }
        let acquire = Arc::clone(sem).acquire_owned();
        let p = match deadline {
            Some(d) => tokio::time::timeout_at(d, acquire).await.map_err(|_| ())?,
            None => acquire.await,
        };
        Ok(Some(p.expect("semaphores are never closed")))
    }

    /// Takes a rate token, sleeping as governor says; returns the time waited.
    async fn token(&self, deadline: Option<Instant>) -> Result<Duration, ()> {
        let Some(rate) = &self.rate else {
            return Ok(Duration::ZERO);
        };
        if rate.check().is_ok() {
            return Ok(Duration::ZERO);
        }
        let start = Instant::now();
        loop {
            match rate.check() {
                Ok(()) => return Ok(start.elapsed()),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(TokioClock.now());
                    let wake = Instant::now() + wait;
                    if deadline.is_some_and(|d| wake > d) {
                        if let Some(d) = deadline {
                            tokio::time::sleep_until(d).await;
                        }
                        return Err(());
                    }
                    tokio::time::sleep_until(wake).await;
                }
            }
        }
    }
}

/// The permits of one attempt; dropping gives them back.
#[derive(Debug, Default)]
pub(crate) struct Permits {
    _group: Option<OwnedSemaphorePermit>,
    _global: Option<OwnedSemaphorePermit>,
    /// Time spent waiting for rate tokens.
    pub(crate) rate_waited: Duration,
}

/// The controller's limits: global and per named group. Fixed when the controller is built.
#[derive(Debug, Default)]
pub(crate) struct Limits {
    global: Gate,
    /// Sorted by name: a lookup is a binary search, cheaper than hashing the name for the few
    /// groups a service defines.
    groups: Vec<(Arc<str>, Gate)>,
}

/// The gates of one job's attempts: the global one and its group's, if any.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scope<'a> {
    global: &'a Gate,
    group: Option<&'a Gate>,
}

impl Scope<'_> {
    /// `true` when neither gate limits anything: an attempt takes nothing.
    pub(crate) fn is_open(&self) -> bool {
        self.global.is_open() && self.group.is_none_or(Gate::is_open)
    }

    /// Takes the permits and tokens for one attempt, waiting until `deadline` at most.
    pub(crate) async fn acquire(&self, deadline: Option<Instant>) -> Result<Permits, LimitError> {
        let mut permits = Permits::default();
        if let Some(g) = self.group {
            permits._group = g.permit(deadline).await.map_err(|_| LimitError::Deadline)?;
        }
        permits._global = self
            .global
            .permit(deadline)
            .await
            .map_err(|_| LimitError::Deadline)?;
        if let Some(g) = self.group {
            permits.rate_waited += g.token(deadline).await.map_err(|_| LimitError::Deadline)?;
        }
        permits.rate_waited += self
            .global
            .token(deadline)
            .await
            .map_err(|_| LimitError::Deadline)?;
        Ok(permits)
    }
}

/// Why permits were not obtained.
#[derive(Debug)]
pub(crate) enum LimitError {
    Deadline,
}

impl Limits {
    pub(crate) fn new(global: Gate, groups: impl IntoIterator<Item = (Arc<str>, Gate)>) -> Self {
        let mut groups: Vec<_> = groups.into_iter().collect();
        groups.sort_by(|a, b| a.0.cmp(&b.0));
        Self { global, groups }
    }

    fn group(&self, name: &str) -> Option<&Gate> {
        self.groups
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .map(|i| &self.groups[i].1)
    }

    /// The gates an attempt of a job in `group` goes through, looked up once per run; `None`
    /// for a group that is not configured.
    pub(crate) fn scope(&self, group: Option<&str>) -> Option<Scope<'_>> {
        let group = match group {
            Some(g) => Some(self.group(g)?),
            None => None,
        };
        Some(Scope {
            global: &self.global,
            group,
        })
    }

    pub(crate) fn has_group(&self, name: &str) -> bool {
        self.group(name).is_some()
    }

    pub(crate) fn group_names(&self) -> impl Iterator<Item = &str> {
        self.groups.iter().map(|(k, _)| &**k)
    }

    /// Free permits of the global limit and each group (for tests and status).
    pub(crate) fn available(&self, group: Option<&str>) -> Option<usize> {
        let gate = match group {
            Some(g) => self.group(g)?,
            None => &self.global,
        };
        gate.sem.as_ref().map(|s| s.available_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates() {
        let r = RateLimit::parse("5/250ms").unwrap();
        assert_eq!(r.per, Duration::from_millis(250));
        assert_eq!(r.burst.get(), 5);
        assert_eq!(
            RateLimit::parse("3/h").unwrap().per,
            Duration::from_secs(3600)
        );
        for bad in [
            "",
            "0/s",
            "-1/s",
            "10",
            "10/parsecs",
            "10/s burst 0",
            "1/0s",
            "x/s",
        ] {
            assert!(RateLimit::parse(bad).is_err(), "{bad} should fail");
        }
    }
}
