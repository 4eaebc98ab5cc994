//! Jobs: the policy a run follows, the context a job body receives, and the plugin trait.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::budget::Deadline;
use crate::controller::{KeyRecord, RunHandle};
use crate::cooldown::Cooldown;
use crate::error::{ConfigError, RunError};
use crate::lock::FencingToken;
use crate::retry::RetryPolicy;
use crate::time::Instant;

/// What a run does when another run of the same key is already in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Join the run in flight and share its result (default).
    #[default]
    Coalesce,
    /// Return [`JobError::Busy`](crate::JobError::Busy) at once, as ShedLock does.
    Skip,
    /// Trailing edge: at most one more run after the current one; everyone arriving meanwhile
    /// shares that one. The queued run starts as soon as the current one ends (it was admitted
    /// when queued, so the cooldown does not hold it back).
    QueueOne,
    /// Cancel the run in flight (its callers get `Cancelled { reason: Replaced }`) and start
    /// anew once it has stopped — never two at once.
    Replace,
}

impl Overlap {
    /// Parses `coalesce`, `skip`, `queue-one` (or `queue_one`) or `replace`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "coalesce" => Some(Overlap::Coalesce),
            "skip" => Some(Overlap::Skip),
            "queue-one" => Some(Overlap::QueueOne),
            "replace" => Some(Overlap::Replace),
            _ => None,
        }
    }
}

/// How runs of one job behave.
///
/// Defaults: overlap `Coalesce`; no cooldown; no budget and no attempt timeout; abandon grace
/// 1 s; one attempt (see [`RetryPolicy`]); no concurrency group; priority 0; lock wait 0 (a key
/// held outside this controller makes the run `Busy`); lease 30 s (replicated backends only).
///
/// ```
/// use job_runtime::{JobPolicy, Overlap};
/// use std::time::Duration;
///
/// let policy = JobPolicy::builder()
///     .overlap(Overlap::Skip)
///     .cooldown(Duration::from_secs(60))
///     .failure_cooldown(Duration::from_secs(5))
///     .budget(Duration::from_secs(30))
///     .attempt_timeout(Duration::from_secs(10))
///     .max_attempts(3)
///     .group("db")
///     .priority(10)
///     .build()
///     .unwrap();
/// assert_eq!(policy.overlap(), Overlap::Skip);
/// assert_eq!(policy.priority(), 10);
/// ```
#[derive(Debug, Clone)]
pub struct JobPolicy {
    pub(crate) overlap: Overlap,
    pub(crate) cooldown: Cooldown,
    pub(crate) budget: Option<Duration>,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) abandon_grace: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) group: Option<Arc<str>>,
    pub(crate) priority: i32,
    pub(crate) lock_wait: Duration,
    pub(crate) lease: Duration,
    pub(crate) heartbeat_timeout: Option<Duration>,
}

impl Default for JobPolicy {
    fn default() -> Self {
        Self {
            overlap: Overlap::Coalesce,
            cooldown: Cooldown::NONE,
            budget: None,
            attempt_timeout: None,
            abandon_grace: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            group: None,
            priority: 0,
            lock_wait: Duration::ZERO,
            lease: Duration::from_secs(30),
            heartbeat_timeout: None,
        }
    }
}

/// Turns a user-facing name into the form used in variable names and lookups: ASCII upper
/// case, every other character `_`.
pub(crate) fn normalize_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// `normalize_name(name) == normalized`, without allocating.
pub(crate) fn matches_normalized(name: &str, normalized: &str) -> bool {
    let mut n = normalized.bytes();
    name.chars().all(|c| {
        let c = if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase() as u8
        } else {
            b'_'
        };
        n.next() == Some(c)
    }) && n.next().is_none()
}

impl JobPolicy {
    /// A builder starting from the defaults.
    pub fn builder() -> JobPolicyBuilder {
        JobPolicyBuilder {
            policy: Self::default(),
            failure_cooldown_set: false,
        }
    }

    /// The overlap policy.
    pub fn overlap(&self) -> Overlap {
        self.overlap
    }
    /// The cooldown.
    pub fn cooldown(&self) -> Cooldown {
        self.cooldown
    }
    /// The run's time budget.
    pub fn budget(&self) -> Option<Duration> {
        self.budget
    }
    /// The per-attempt timeout.
    pub fn attempt_timeout(&self) -> Option<Duration> {
        self.attempt_timeout
    }
    /// The retry policy.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }
    /// The concurrency / rate group, in normalized form.
    pub fn group(&self) -> Option<&str> {
        self.group.as_deref()
    }
    /// The priority of its attempts' waits for a concurrency permit (higher first).
    pub fn priority(&self) -> i32 {
        self.priority
    }

    /// Checks values that types cannot rule out.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.retry.validate("")?;
        for (name, d) in [
            ("budget", self.budget),
            ("attempt timeout", self.attempt_timeout),
        ] {
            if d == Some(Duration::ZERO) {
                return Err(ConfigError::one(
                    name,
                    "0s",
                    "a zero time would fail every run",
                    "a duration longer than zero, or none",
                ));
            }
        }
        Ok(())
    }
}

/// Builds a [`JobPolicy`]; see its defaults.
#[derive(Debug, Clone)]
#[must_use]
pub struct JobPolicyBuilder {
    policy: JobPolicy,
    failure_cooldown_set: bool,
}

impl JobPolicyBuilder {
    /// What to do when a run of the key is in flight.
    pub fn overlap(mut self, o: Overlap) -> Self {
        self.policy.overlap = o;
        self
    }
    /// Cooldown after a successful run; also after a failed one unless
    /// [`failure_cooldown`](Self::failure_cooldown) is set.
    pub fn cooldown(mut self, d: Duration) -> Self {
        self.policy.cooldown.after_success = d;
        if !self.failure_cooldown_set {
            self.policy.cooldown.after_failure = d;
        }
        self
    }
    /// Cooldown after a failed run.
    pub fn failure_cooldown(mut self, d: Duration) -> Self {
        self.policy.cooldown.after_failure = d;
        self.failure_cooldown_set = true;
        self
    }
    /// One deadline for the whole run: lock excluded, permits, attempts and backoff included.
    pub fn budget(mut self, d: Duration) -> Self {
        self.policy.budget = Some(d);
        self
    }
    /// A timeout for each attempt.
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.policy.attempt_timeout = Some(d);
        self
    }
    /// How long a job that ignores its cancellation token gets before it is abandoned.
    pub fn abandon_grace(mut self, d: Duration) -> Self {
        self.policy.abandon_grace = d;
        self
    }
    /// The whole retry policy.
    pub fn retry(mut self, r: RetryPolicy) -> Self {
        self.policy.retry = r;
        self
    }
    /// Attempts in all (shortcut into the retry policy).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.policy.retry.max_attempts =
            std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN);
        self
    }
    /// The named concurrency / rate group, configured on the controller.
    pub fn group(mut self, name: &str) -> Self {
        self.policy.group = Some(normalize_name(name).into());
        self
    }
    /// Where its attempts queue when a concurrency limit (the group's or the global one) is
    /// full: a waiting attempt of higher priority starts before one of lower priority, and
    /// attempts of equal priority start in arrival order. Default 0; negative values queue
    /// behind the default.
    ///
    /// Priority orders the queue only: it does not cancel or pause attempts already running,
    /// reserve permits, or change rate-limit waits, and a low priority can wait for as long as
    /// higher-priority attempts keep arriving (the run's budget still bounds that wait). A
    /// retry queues anew, behind the attempts of its priority already waiting.
    ///
    /// ```
    /// use job_runtime::JobPolicy;
    ///
    /// let urgent = JobPolicy::builder().group("db").priority(10).build().unwrap();
    /// let batch = JobPolicy::builder().group("db").priority(-1).build().unwrap();
    /// assert!(urgent.priority() > batch.priority());
    /// assert_eq!(JobPolicy::default().priority(), 0);
    /// ```
    pub fn priority(mut self, p: i32) -> Self {
        self.policy.priority = p;
        self
    }
    /// How long a run waits for a key held outside this controller (0: `Busy` at once).
    pub fn lock_wait(mut self, d: Duration) -> Self {
        self.policy.lock_wait = d;
        self
    }
    /// Counts an attempt as stuck when it reports no heartbeat or progress
    /// ([`JobContext::heartbeat`], [`JobContext::progress`]) for `d`: its token is cancelled,
    /// it gets the abandon grace to stop, and the run fails with `JobError::Stuck` (no retry:
    /// a job that hung once is likely to hang again). Off by default; zero turns it off.
    pub fn heartbeat_timeout(mut self, d: Duration) -> Self {
        self.policy.heartbeat_timeout = (!d.is_zero()).then_some(d);
        self
    }
    /// Lease length on a replicated backend; renewed at a third of it.
    pub fn lease(mut self, d: Duration) -> Self {
        self.policy.lease = d;
        self
    }
    /// Validates and builds.
    pub fn build(self) -> Result<JobPolicy, ConfigError> {
        self.policy.validate()?;
        Ok(self.policy)
    }
}

/// What a job body gets: who it is, how long it has, and how to report.
///
/// Cheap to clone. `cancelled()` resolves when the attempt must stop (deadline, replace,
/// shutdown, lease lost); a job that ignores it is abandoned after the grace period.
#[derive(Clone)]
pub struct JobContext {
    pub(crate) job: Arc<str>,
    pub(crate) key: Arc<str>,
    pub(crate) attempt: u32,
    pub(crate) deadline: Deadline,
    /// The run's cancellation, which this attempt follows.
    pub(crate) run: Arc<RunHandle>,
    /// The attempt's own token, when a limit (deadline, heartbeat timeout) may stop it alone;
    /// a child of the run's.
    pub(crate) own: Option<CancellationToken>,
    pub(crate) fencing: FencingToken,
    pub(crate) record: Arc<KeyRecord>,
}

impl fmt::Debug for JobContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobContext")
            .field("job", &self.job)
            .field("key", &self.key)
            .field("attempt", &self.attempt)
            .field("fencing_token", &self.fencing)
            .finish()
    }
}

impl JobContext {
    /// The job's name.
    pub fn job(&self) -> &str {
        &self.job
    }
    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }
    /// Attempt number, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The run's deadline, if it has a budget.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline.at()
    }
    /// Time left in the run's budget (`None`: no budget).
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline.remaining(self.run.clock().now())
    }
    /// Resolves when this attempt must stop.
    pub async fn cancelled(&self) {
        match &self.own {
            Some(t) => t.cancelled().await,
            None => self.run.signal.cancelled().await,
        }
    }
    /// Whether this attempt must stop.
    pub fn is_cancelled(&self) -> bool {
        match &self.own {
            Some(t) => t.is_cancelled(),
            None => self.run.signal.is_cancelled(),
        }
    }
    /// The attempt's cancellation token (for passing on to sub-tasks).
    pub fn token(&self) -> &CancellationToken {
        match &self.own {
            Some(t) => t,
            None => self.run.signal.token(),
        }
    }
    /// The lock's fencing token: pass it to systems that can refuse stale writers.
    pub fn fencing_token(&self) -> FencingToken {
        self.fencing
    }
    /// Reports progress; shown in status.
    pub fn progress(&self, done: u64, total: u64) {
        self.record.progress(done, total);
        self.record.heartbeat(self.run.clock().wall_now(), None);
    }
    /// Says the job is alive, with optional details; shown in status.
    pub fn heartbeat(&self, details: Option<&str>) {
        self.record.heartbeat(self.run.clock().wall_now(), details);
    }
    /// Wall time now, on the runtime's clock.
    pub fn wall_now(&self) -> SystemTime {
        self.run.clock().wall_now()
    }
    /// The trace id (32 hex digits) of the span the job is running in — its `job.attempt`
    /// span or a child of it — for the job's own logs. `None` without feature `otel` or when
    /// no OpenTelemetry layer is installed.
    pub fn trace_id(&self) -> Option<String> {
        crate::telemetry::current_trace_id()
    }
}

/// A job as a plugin: a name, a policy, and a body.
///
/// ```
/// use job_runtime::{Job, JobContext, JobRuntimeController, RunError, RuntimeConfig};
/// use std::sync::Arc;
///
/// struct Count;
/// impl Job for Count {
///     type Output = usize;
///     fn name(&self) -> &str { "count" }
///     async fn run(&self, ctx: JobContext) -> Result<usize, RunError> {
///         Ok(ctx.key().len())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let ctl = JobRuntimeController::new(RuntimeConfig::default());
/// let n = ctl.run_job(&Arc::new(Count), "hello").await.unwrap();
/// assert_eq!(*n, 5);
/// # }
/// ```
pub trait Job: Send + Sync + 'static {
    /// What a successful run produces.
    type Output: Send + Sync + 'static;
    /// The job's name: one per job, used in status, locks and variables.
    fn name(&self) -> &str;
    /// The policy its runs follow.
    fn policy(&self) -> JobPolicy {
        JobPolicy::default()
    }
    /// The body of one attempt.
    fn run(&self, ctx: JobContext) -> impl Future<Output = Result<Self::Output, RunError>> + Send;
}
