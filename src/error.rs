//! Errors.
//!
//! [`JobError`] is what a run returns to every caller that asked for it, so it is `Clone` (the
//! same error goes to the leader and to every coalesced follower) and each message says what
//! happened, to which job and key, and what to do. "Not yet" outcomes — `Busy`, `CoolingDown` —
//! are values with the time to wait, returned at once, never a sleep.
//!
//! [`RunError`] is what a job body returns: any error, marked retryable (the default), permanent,
//! or retryable after a given delay, so the job tells the runner what to do next.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A boxed error shared between everyone waiting on a run.
pub type SharedError = Arc<dyn StdError + Send + Sync + 'static>;

/// Why a run did not produce a value.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// Another run holds the key and the job's overlap policy is `Skip` (or the lock is held by
    /// someone outside this controller).
    #[error(
        "job `{job}` key `{key}` is busy: another run holds it; try again later, or use overlap Coalesce or QueueOne to share or follow that run"
    )]
    Busy {
        /// Job name.
        job: Arc<str>,
        /// Key.
        key: Arc<str>,
    },
    /// The key ran recently and its cooldown has not passed.
    #[error(
        "job `{job}` key `{key}` is cooling down for another {remaining:?}; call again after that, or force the run to bypass the cooldown"
    )]
    CoolingDown {
        /// Job name.
        job: Arc<str>,
        /// Key.
        key: Arc<str>,
        /// Time left before the key may run again.
        remaining: Duration,
    },
    /// The per-key lock was not free within the allowed wait.
    #[error(
        "job `{job}` key `{key}`: lock not acquired within {waited:?}; the key is held elsewhere — raise the lock wait or try later"
    )]
    LockTimeout {
        /// Job name.
        job: Arc<str>,
        /// Key.
        key: Arc<str>,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The run's time budget (all attempts, waits and backoff included) ran out.
    #[error("job `{job}` key `{key}` exceeded its time budget of {budget:?}{}; raise the budget or make the job faster", last_suffix(.last))]
    BudgetExceeded {
        /// Job name.
        job: Arc<str>,
        /// Key.
        key: Arc<str>,
        /// The budget that ran out.
        budget: Duration,
        /// The last attempt's error, if an attempt failed before the budget ran out.
        #[source]
        last: Option<Box<JobError>>,
    },
    /// One attempt ran past the per-attempt timeout (it was cancelled; retries may follow).
    #[error(
        "job `{job}` key `{key}` attempt {attempt} timed out after {timeout:?}; raise the attempt timeout or make the job faster"
    )]
    AttemptTimeout {
        /// Job name.
        job: Arc<str>,
        /// Key.
        key: Arc<str>,
        /// Attempt number, from 1.
        attempt: u32,
        /// The attempt timeout.
        timeout: Duration,
    },
    /// The job sent no heartbeat (nor progress) for its policy's heartbeat timeout: it was
    /// counted as stuck, its token cancelled, and the run ended without a retry.
    #[error(
        "job `{job}` key `{key}` is stuck: no heartbeat for {silent_for:?} (heartbeat timeout {timeout:?}) in attempt {attempt}; call ctx.heartbeat() or ctx.progress() more often, or raise the heartbeat timeout"
    )]
    Stuck {
        /// Job name.
        job: Arc<str>,
        /// Key.
        key: Arc<str>,
        /// Attempt number, from 1.
        attempt: u32,
        /// Time since the last heartbeat (or the attempt's start).
        silent_for: Duration,
        /// The heartbeat timeout.
        timeout: Duration,
    },
    /// Every attempt failed.
    #[error("job `{job}` key `{key}` failed after {attempts} attempts; last error: {last}")]
    RetriesExhausted {
        /// Job name.
        job: Arc<str>,
        /// Key.
        key: Arc<str>,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        #[source]
        last: Box<JobError>,
    },
    /// The run was cancelled: replaced by a newer run, shut down, or its lease was lost.
    #[error("job `{job}` key `{key}` was cancelled: {reason}")]
    Cancelled {
        /// Job name.
        job: Arc<str>,
        /// Key.
        key: Arc<str>,
        /// Why.
        reason: CancelReason,
    },
    /// The job body panicked. The lock was released and nothing was cached.
    #[error(
        "job `{job}` key `{key}` panicked: {message}; this is a bug in the job, the runtime goes on"
    )]
    Panicked {
        /// Job name.
        job: Arc<str>,
        /// Key.
        key: Arc<str>,
        /// The panic payload, if it was a string.
        message: String,
    },
    /// The job body returned an error.
    #[error("job `{job}` key `{key}` failed: {source}")]
    Failed {
        /// Job name.
        job: Arc<str>,
        /// Key.
        key: Arc<str>,
        /// The job's own error.
        #[source]
        source: SharedError,
    },
    /// The job's policy refers to something the controller does not have, or was run with two
    /// different output types under one name.
    #[error("job `{job}` is misconfigured: {message}")]
    Misconfigured {
        /// Job name.
        job: Arc<str>,
        /// What is wrong and what is accepted.
        message: String,
    },
    /// The coordination backend failed (database or network error).
    #[error("job `{job}` key `{key}`: coordination backend failed: {source}")]
    Backend {
        /// Job name.
        job: Arc<str>,
        /// Key.
        key: Arc<str>,
        /// The backend's error.
        #[source]
        source: SharedError,
    },
}

fn last_suffix(last: &Option<Box<JobError>>) -> String {
    match last {
        Some(e) => format!(" (last error: {e})"),
        None => String::new(),
    }
}

/// Why a run was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CancelReason {
    /// A newer run replaced it (overlap `Replace`).
    Replaced,
    /// The runtime is shutting down.
    Shutdown,
    /// The coordination lease was lost to another holder.
    LeaseLost,
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CancelReason::Replaced => "replaced by a newer run of the same key",
            CancelReason::Shutdown => "the runtime is shutting down",
            CancelReason::LeaseLost => "its lease was lost to another holder",
        })
    }
}

impl JobError {
    /// The job this error is about.
    pub fn job(&self) -> &str {
        match self {
            JobError::Busy { job, .. }
            | JobError::CoolingDown { job, .. }
            | JobError::LockTimeout { job, .. }
            | JobError::BudgetExceeded { job, .. }
            | JobError::AttemptTimeout { job, .. }
            | JobError::Stuck { job, .. }
            | JobError::RetriesExhausted { job, .. }
            | JobError::Cancelled { job, .. }
            | JobError::Panicked { job, .. }
            | JobError::Failed { job, .. }
            | JobError::Misconfigured { job, .. }
            | JobError::Backend { job, .. } => job,
        }
    }

    /// The key this error is about (empty for `Misconfigured`).
    pub fn key(&self) -> &str {
        match self {
            JobError::Busy { key, .. }
            | JobError::CoolingDown { key, .. }
            | JobError::LockTimeout { key, .. }
            | JobError::BudgetExceeded { key, .. }
            | JobError::AttemptTimeout { key, .. }
            | JobError::Stuck { key, .. }
            | JobError::RetriesExhausted { key, .. }
            | JobError::Cancelled { key, .. }
            | JobError::Panicked { key, .. }
            | JobError::Failed { key, .. }
            | JobError::Backend { key, .. } => key,
            JobError::Misconfigured { .. } => "",
        }
    }

    /// For a "not yet" outcome, how long to wait before asking again.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            JobError::CoolingDown { remaining, .. } => Some(*remaining),
            _ => None,
        }
    }

    /// A short stable name for the kind of error (`busy`, `cooling_down`, …), for status and
    /// telemetry.
    pub fn kind(&self) -> &'static str {
        match self {
            JobError::Busy { .. } => "busy",
            JobError::CoolingDown { .. } => "cooling_down",
            JobError::LockTimeout { .. } => "lock_timeout",
            JobError::BudgetExceeded { .. } => "budget_exceeded",
            JobError::AttemptTimeout { .. } => "attempt_timeout",
            JobError::Stuck { .. } => "stuck",
            JobError::RetriesExhausted { .. } => "retries_exhausted",
            JobError::Cancelled { .. } => "cancelled",
            JobError::Panicked { .. } => "panicked",
            JobError::Failed { .. } => "failed",
            JobError::Misconfigured { .. } => "misconfigured",
            JobError::Backend { .. } => "backend",
        }
    }

    /// `true` when the run did not start because of admission (busy, cooling down, lock
    /// timeout): nothing ran and no state changed.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            JobError::Busy { .. } | JobError::CoolingDown { .. } | JobError::LockTimeout { .. }
        )
    }
}

/// What the runner should do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Retry after the backoff delay.
    Retry,
    /// Retry after exactly this delay (for example a server's `Retry-After`).
    RetryAfter(Duration),
    /// Do not retry: the error is permanent.
    Abort,
}

/// The error a job body returns: any error plus what the runner should do about it.
///
/// Any `std::error::Error + Send + Sync + 'static` converts into a retryable `RunError`, so `?`
/// works in job bodies. Mark an error permanent with [`RunError::permanent`] or give the delay
/// with [`RunError::with_retry_after`].
///
/// ```
/// use job_runtime::{Decision, RunError};
/// use std::time::Duration;
///
/// let e = RunError::msg("database is down");
/// assert_eq!(e.decision(), Decision::Retry);
/// let e = RunError::permanent(std::io::Error::other("bad input"));
/// assert_eq!(e.decision(), Decision::Abort);
/// let e = RunError::msg("429").with_retry_after(Duration::from_secs(2));
/// assert_eq!(e.decision(), Decision::RetryAfter(Duration::from_secs(2)));
/// ```
#[derive(Debug, Clone)]
pub struct RunError {
    source: SharedError,
    decision: Decision,
}

impl RunError {
    /// A retryable error.
    pub fn retryable(e: impl Into<Box<dyn StdError + Send + Sync + 'static>>) -> Self {
        Self {
            source: Arc::from(e.into()),
            decision: Decision::Retry,
        }
    }

    /// A permanent error: no retry.
    pub fn permanent(e: impl Into<Box<dyn StdError + Send + Sync + 'static>>) -> Self {
        Self::retryable(e).with_decision(Decision::Abort)
    }

    /// A retryable error from a message.
    pub fn msg(message: impl Into<String>) -> Self {
        Self::retryable(message.into())
    }

    /// Retry after exactly `d` instead of the backoff delay.
    #[must_use]
    pub fn with_retry_after(self, d: Duration) -> Self {
        self.with_decision(Decision::RetryAfter(d))
    }

    /// Sets what the runner should do.
    #[must_use]
    pub fn with_decision(mut self, decision: Decision) -> Self {
        self.decision = decision;
        self
    }

    /// What the runner should do, as the job marked it.
    pub fn decision(&self) -> Decision {
        self.decision
    }

    /// The underlying error.
    pub fn source_error(&self) -> &SharedError {
        &self.source
    }
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl<E: StdError + Send + Sync + 'static> From<E> for RunError {
    fn from(e: E) -> Self {
        Self::retryable(e)
    }
}

/// A configuration value that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name} = {value:?} is invalid: {problem}; expected {expected}")]
pub struct ConfigProblem {
    /// The variable or field.
    pub name: String,
    /// The value given.
    pub value: String,
    /// What is wrong with it.
    pub problem: String,
    /// What is accepted.
    pub expected: String,
}

/// Invalid configuration: every problem found, each naming the variable or field, the value and
/// what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    problems: Vec<ConfigProblem>,
}

impl ConfigError {
    pub(crate) fn new(problems: Vec<ConfigProblem>) -> Self {
        Self { problems }
    }

    pub(crate) fn one(
        name: impl Into<String>,
        value: impl Into<String>,
        problem: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        Self::new(vec![ConfigProblem {
            name: name.into(),
            value: value.into(),
            problem: problem.into(),
            expected: expected.into(),
        }])
    }

    /// Every problem found.
    pub fn problems(&self) -> &[ConfigProblem] {
        &self.problems
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid job-runtime configuration: ")?;
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}
