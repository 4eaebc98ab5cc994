//! Time budgets: one deadline for a whole run, and a timeout per attempt.
//!
//! A run's budget starts once the key's lock is held (the lock wait has its own bound) and
//! covers everything after — waiting for concurrency permits and rate tokens, every attempt and
//! every backoff sleep — so a caller knows the longest the work can take. Each attempt runs under `min(attempt timeout, budget left)`. At that
//! point the attempt's cancellation token fires; a job that ignores it is abandoned (its future
//! dropped) after a grace period, so a stuck job can never hold a key forever.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::time::{Instant, add_saturating};

/// The deadline of one run.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// use job_runtime::budget::Deadline;
/// use job_runtime::time::Instant;
/// use std::time::Duration;
///
/// let d = Deadline::new(Instant::now(), Some(Duration::from_secs(10)));
/// tokio::time::sleep(Duration::from_secs(4)).await;
/// assert_eq!(d.remaining(Instant::now()), Some(Duration::from_secs(6)));
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: Option<Instant>,
    budget: Option<Duration>,
}

/// Which limit ended an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The run's budget.
    Budget,
    /// The attempt timeout.
    Attempt,
    /// The heartbeat timeout: the job went silent (stuck).
    Heartbeat,
}

impl Deadline {
    /// A deadline `budget` after `start` (`None`: no deadline).
    pub fn new(start: Instant, budget: Option<Duration>) -> Self {
        Self {
            at: budget.map(|b| add_saturating(start, b)),
            budget,
        }
    }

    /// The instant, if any.
    pub fn at(&self) -> Option<Instant> {
        self.at
    }

    /// The whole budget, if any.
    pub fn budget(&self) -> Option<Duration> {
        self.budget
    }

    /// Time left, or `None` when there is no deadline.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        self.at.map(|at| at.saturating_duration_since(now))
    }

    /// `true` once the deadline has passed.
    pub fn expired(&self, now: Instant) -> bool {
        self.at.is_some_and(|at| now >= at)
    }

    /// The deadline of an attempt starting at `now`, and which limit sets it.
    pub fn for_attempt(&self, now: Instant, timeout: Option<Duration>) -> Option<(Instant, Limit)> {
        let attempt = timeout.map(|t| add_saturating(now, t));
        match (self.at, attempt) {
            (Some(b), Some(a)) if a < b => Some((a, Limit::Attempt)),
            (Some(b), _) => Some((b, Limit::Budget)),
            (None, Some(a)) => Some((a, Limit::Attempt)),
            (None, None) => None,
        }
    }
}

/// How an attempt under a deadline ended.
#[derive(Debug)]
pub enum AttemptEnd<R> {
    /// The job finished (successfully or not).
    Done(R),
    /// The deadline came first; the job stopped within the grace period.
    TimedOut(Limit),
    /// The deadline came first and the job ignored its token past the grace period: its future
    /// was dropped.
    Abandoned(Limit),
    /// The run's token was cancelled from outside (replace, shutdown, lease lost).
    Cancelled {
        /// The job ignored its token past the grace period: its future was dropped.
        abandoned: bool,
    },
}

/// Runs `fut` until it finishes, `deadline` passes, `stuck` resolves (the job went silent),
/// or `outer` fires.
///
/// At the deadline `token` (the attempt's token) is cancelled and the job gets `grace` to
/// notice; then its future is dropped. On outside cancellation the same grace applies, and the
/// attempt ends as `Cancelled` whatever the job returned after the cancellation.
pub async fn run_bounded<F: Future>(
    fut: F,
    deadline: Option<(Instant, Limit)>,
    stuck: Option<impl Future<Output = ()>>,
    token: &CancellationToken,
    outer: &CancellationToken,
    grace: Duration,
) -> AttemptEnd<F::Output> {
    tokio::pin!(fut);
    let stuck = async move {
        match stuck {
            Some(s) => s.await,
            None => std::future::pending().await,
        }
    };
    let limit = tokio::select! {
        biased;
        // A job that returns as soon as it sees an outside cancellation was still cancelled,
        // whatever it returned: the same outcome as one that took part of its grace period.
        r = &mut fut => {
            return if outer.is_cancelled() {
                AttemptEnd::Cancelled { abandoned: false }
            } else {
                AttemptEnd::Done(r)
            };
        }
        _ = outer.cancelled() => None,
        _ = sleep_until_opt(deadline.map(|d| d.0)) => deadline.map(|d| d.1),
        _ = stuck => Some(Limit::Heartbeat),
    };
    token.cancel();
    let grace_end = add_saturating(Instant::now(), grace);
    let stopped = tokio::select! {
        biased;
        _ = &mut fut => true,
        _ = tokio::time::sleep_until(grace_end) => false,
    };
    match (limit, stopped) {
        (None, stopped) => AttemptEnd::Cancelled {
            abandoned: !stopped,
        },
        (Some(l), true) => AttemptEnd::TimedOut(l),
        (Some(l), false) => AttemptEnd::Abandoned(l),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
