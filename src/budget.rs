//! Time budgets: one deadline for a whole run, and a timeout per attempt.
//!
//! A run's budget starts once the key's lock is held (the lock wait has its own bound) and
//! covers everything after — waiting for concurrency permits and rate tokens, every attempt and
//! every backoff sleep — so a caller knows the longest the work can take. Each attempt runs under `min(attempt timeout, budget left)`. At that
//! point the attempt's cancellation token fires; a job that ignores it is abandoned (its future
//! dropped) after a grace period, so a stuck job can never hold a key forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering, fence};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::CancelReason;
use crate::time::{Instant, add_saturating};

const NOT_CANCELLED: u8 = 0;

/// The cancellation of one run from outside (replace, shutdown, lease lost): a reason that
/// every check reads in one load, and a [`CancellationToken`] made only when something has to
/// wait on it or hand it on (an attempt that does not finish at its first poll, a limit wait,
/// a backoff sleep, a deadline's child token, a job asking its context). A run that finishes
/// at once never makes one, and a token costs an allocation and a mutex operation per clone,
/// drop and check.
#[derive(Debug, Default)]
pub(crate) struct RunSignal {
    reason: AtomicU8,
    token: OnceLock<CancellationToken>,
}

impl RunSignal {
    /// Cancels the run; the first reason given is kept.
    pub(crate) fn cancel(&self, reason: CancelReason) {
        let code = match reason {
            CancelReason::Replaced => 1,
            CancelReason::Shutdown => 2,
            CancelReason::LeaseLost => 3,
        };
        let _ =
            self.reason
                .compare_exchange(NOT_CANCELLED, code, Ordering::SeqCst, Ordering::SeqCst);
        // Pairs with the fence in `token`: either this sees the token, or `token` sees the
        // reason and cancels what it made.
        fence(Ordering::SeqCst);
        if let Some(t) = self.token.get() {
            t.cancel();
        }
    }

    /// Whether the run was cancelled.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.reason.load(Ordering::SeqCst) != NOT_CANCELLED
    }

    /// Why the run was cancelled (`Shutdown` if it was not).
    pub(crate) fn reason(&self) -> CancelReason {
        match self.reason.load(Ordering::SeqCst) {
            1 => CancelReason::Replaced,
            3 => CancelReason::LeaseLost,
            _ => CancelReason::Shutdown,
        }
    }

    /// The run's token, made on first use (already cancelled if the run is).
    pub(crate) fn token(&self) -> &CancellationToken {
        let t = self.token.get_or_init(CancellationToken::new);
        fence(Ordering::SeqCst);
        if self.is_cancelled() {
            t.cancel();
        }
        t
    }

    /// Resolves once the run is cancelled.
    pub(crate) async fn cancelled(&self) {
        if !self.is_cancelled() {
            self.token().cancelled().await;
        }
    }
}

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
    bounded(
        fut,
        deadline,
        stuck,
        Some(token),
        || outer.is_cancelled(),
        outer.cancelled(),
        grace,
    )
    .await
}

/// [`run_bounded`] for the controller's usual attempt: no deadline and no heartbeat timeout,
/// so only the run's [`RunSignal`] can stop it (then with `grace` to notice).
///
/// A plain future over the job's future, pinned where the caller keeps it, rather than an
/// `async fn`: an `async fn` holds the job's future twice (its argument and its pinned local),
/// and every byte here is a byte of every run's boxed future. The wait for the signal, and
/// then the grace period's sleep, are made (boxed) only when the job does not finish at its
/// first poll: a quick job never needs them.
pub(crate) fn run_attempt<'a, F: Future>(
    fut: Pin<&'a mut F>,
    outer: &'a RunSignal,
    grace: Duration,
) -> RunAttempt<'a, F> {
    RunAttempt {
        fut,
        outer,
        grace,
        wait: None,
        cancelled: false,
    }
}

/// The future of [`run_attempt`].
pub(crate) struct RunAttempt<'a, F: Future> {
    fut: Pin<&'a mut F>,
    outer: &'a RunSignal,
    grace: Duration,
    /// The wait for the run's signal; once it fired, the grace period's sleep.
    wait: Option<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>,
    /// The run's signal fired: the job has until `wait` (the sleep) to stop.
    cancelled: bool,
}

impl<F: Future> Future for RunAttempt<'_, F> {
    type Output = AttemptEnd<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if !this.cancelled {
            // The job first (as a biased select would): a result that is there wins, unless
            // the run was cancelled meanwhile.
            if let Poll::Ready(r) = this.fut.as_mut().poll(cx) {
                return Poll::Ready(if this.outer.is_cancelled() {
                    AttemptEnd::Cancelled { abandoned: false }
                } else {
                    AttemptEnd::Done(r)
                });
            }
            let outer = this.outer;
            let wait = this.wait.get_or_insert_with(|| Box::pin(outer.cancelled()));
            if wait.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.cancelled = true;
            this.wait = Some(Box::pin(tokio::time::sleep(this.grace)));
        }
        if this.fut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(AttemptEnd::Cancelled { abandoned: false });
        }
        match this.wait.as_mut().map(|w| w.as_mut().poll(cx)) {
            Some(Poll::Pending) => Poll::Pending,
            _ => Poll::Ready(AttemptEnd::Cancelled { abandoned: true }),
        }
    }
}

/// [`run_bounded`] for the controller's attempt under a limit: `own` is the attempt's token
/// (a child of the run's), cancelled at the deadline or when `stuck` resolves.
pub(crate) async fn run_limited<F: Future>(
    fut: F,
    deadline: Option<(Instant, Limit)>,
    stuck: Option<impl Future<Output = ()>>,
    own: Option<&CancellationToken>,
    outer: &RunSignal,
    grace: Duration,
) -> AttemptEnd<F::Output> {
    bounded(
        fut,
        deadline,
        stuck,
        own,
        || outer.is_cancelled(),
        outer.cancelled(),
        grace,
    )
    .await
}

/// The body of both: `is_outer` and `outer` say whether and when the run was cancelled from
/// outside; `token` (if any) is cancelled when a limit is reached.
async fn bounded<F: Future>(
    fut: F,
    deadline: Option<(Instant, Limit)>,
    stuck: Option<impl Future<Output = ()>>,
    token: Option<&CancellationToken>,
    is_outer: impl Fn() -> bool,
    outer: impl Future<Output = ()>,
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
            return if is_outer() {
                AttemptEnd::Cancelled { abandoned: false }
            } else {
                AttemptEnd::Done(r)
            };
        }
        _ = outer => None,
        _ = sleep_until_opt(deadline.map(|d| d.0)) => deadline.map(|d| d.1),
        _ = stuck => Some(Limit::Heartbeat),
    };
    if let Some(t) = token {
        t.cancel();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_job_that_finishes_at_once_makes_no_wait_and_no_token() {
        let signal = RunSignal::default();
        let job = std::pin::pin!(async { 7 });
        let end = run_attempt(job, &signal, Duration::from_secs(1)).await;
        assert!(matches!(end, AttemptEnd::Done(7)));
        assert!(signal.token.get().is_none(), "no token for a quick job");
    }

    #[tokio::test(start_paused = true)]
    async fn a_result_that_arrives_after_the_cancel_counts_as_cancelled() {
        let signal = RunSignal::default();
        signal.cancel(CancelReason::Replaced);
        let job = std::pin::pin!(async { 7 });
        let end = run_attempt(job, &signal, Duration::from_secs(1)).await;
        assert!(matches!(end, AttemptEnd::Cancelled { abandoned: false }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_gets_the_grace_after_a_cancel_and_is_abandoned_past_it() {
        let grace = Duration::from_secs(2);
        for (stops_after, abandoned) in [(Duration::from_secs(1), false), (grace * 3, true)] {
            let signal = std::sync::Arc::new(RunSignal::default());
            let s2 = std::sync::Arc::clone(&signal);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                s2.cancel(CancelReason::Shutdown);
            });
            let start = Instant::now();
            // Ignores the signal; stops on its own `stops_after` after the cancel.
            let job = std::pin::pin!(async {
                tokio::time::sleep(Duration::from_secs(5) + stops_after).await;
            });
            let end = run_attempt(job, &signal, grace).await;
            assert!(
                matches!(end, AttemptEnd::Cancelled { abandoned: a } if a == abandoned),
                "stops {stops_after:?} after the cancel"
            );
            let took = start.elapsed();
            let expect = Duration::from_secs(5) + stops_after.min(grace);
            assert_eq!(took, expect, "stops {stops_after:?} after the cancel");
        }
    }
}
