//! Compatibility with [tokio-cron-scheduler](https://docs.rs/tokio-cron-scheduler): any job
//! registered in a [`Runtime`](crate::runtime::Runtime) as a `tokio_cron_scheduler::Job`.
//!
//! Why: a service that already runs a `JobScheduler` should get single-flight, cooldowns,
//! budgets, retry and limits for its jobs without moving its schedules to another scheduler.
//! [`RuntimeHandle::tokio_cron_job`] makes a tokio-cron-scheduler job whose every fire is a
//! [`RuntimeHandle::trigger`] of one registered job and key, so the job's whole pipeline
//! applies (a job still running at its next fire is coalesced, skipped, queued or replaced by
//! its overlap policy, never run twice at once), [`pause`](RuntimeHandle::pause) and
//! [`resume`](RuntimeHandle::resume) apply, and the outcome counts in the
//! [`ShutdownReport`](crate::runtime::ShutdownReport).
//!
//! Our own timer ([`Trigger`](crate::schedule::Trigger)) stays the default, because it is
//! precise and testable: tokio-cron-scheduler reads the wall clock and polls every 500 ms, so
//! its fires come up to half a second late (more under load; `docs/PERFORMANCE.md` measures
//! both), and paused-time tests cannot drive it. This adapter never touches our timing path.
//!
//! # A fire awaits its run
//!
//! The future a fire hands tokio-cron-scheduler awaits the run instead of spawning it onto our
//! task tracker and returning. This never blocks the scheduler: tokio-cron-scheduler runs each
//! fire of an async job in a task of its own, so its 500 ms tick loop and other jobs go on
//! while ours runs. Awaiting keeps its notifications true (a job's "done" notification comes
//! when the run has ended, not when it was offered) and costs no extra task per fire. The run
//! itself is still seen by our shutdown: the controller counts a run on its `TaskTracker` while
//! a caller polls it, and hands it to a tracked task if that caller is dropped, so
//! [`shutdown(grace)`](RuntimeHandle::shutdown) waits for and cancels runs fired by
//! tokio-cron-scheduler exactly like those fired by our own triggers. Only the small waiting
//! task belongs to tokio-cron-scheduler; it ends with the run.
//!
//! # What is tokio-cron-scheduler's, not ours
//!
//! The schedule: its parser (croner 3, six fields with seconds or seven with a year; **when
//! both day fields are restricted, both must match**, unlike [`Trigger`](crate::schedule::Trigger)'s
//! Vixie rule where either may), its polling, and its time zones: with
//! [`tokio_cron_job_tz`](RuntimeHandle::tokio_cron_job_tz) it takes the zone's UTC offset
//! once, when the job is made, and keeps it (a `0 0 3 * * *` job in Europe/Berlin made in
//! summer fires at 04:00 local time in winter). Our misfire policies, daylight-saving rules
//! and clock-jump detection do not apply; nor do the [`status`](RuntimeHandle::status)
//! counters of our triggers (the key's status is in
//! [`JobRuntimeController::status`](crate::JobRuntimeController::status)).
//!
//! A fire after our runtime has shut down is refused (`Cancelled`); remove the job from the
//! `JobScheduler`, or shut that down too. The tokio-cron-scheduler job keeps a clone of the
//! [`RuntimeHandle`].
//!
//! # Example
//!
//! ```
//! use job_runtime::runtime::Runtime;
//! use job_runtime::{Job, JobContext, JobPolicy, JobRuntimeController, Overlap, RunError, RuntimeConfig};
//! use std::time::Duration;
//! use tokio_cron_scheduler::JobScheduler;
//!
//! struct Report;
//! impl Job for Report {
//!     type Output = ();
//!     fn name(&self) -> &str { "report" }
//!     fn policy(&self) -> JobPolicy {
//!         // A fire while the previous run is still going is skipped.
//!         JobPolicy::builder().overlap(Overlap::Skip).build().unwrap()
//!     }
//!     async fn run(&self, _ctx: JobContext) -> Result<(), RunError> { Ok(()) }
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ctl = JobRuntimeController::new(RuntimeConfig::default());
//! // No triggers of our own: the service's JobScheduler fires the job.
//! let rt = Runtime::builder(&ctl).job(Report).build()?.start();
//!
//! let mut sched = JobScheduler::new().await?;
//! sched.add(rt.tokio_cron_job("report", "daily", "* * * * * *")?).await?;
//! sched.start().await?;
//! # let start = std::time::Instant::now();
//! # while ctl.status("report", "daily").is_none_or(|s| s.successes == 0) {
//! #     assert!(start.elapsed() < Duration::from_secs(10), "no fire");
//! #     tokio::time::sleep(Duration::from_millis(20)).await;
//! # }
//! // … every second, one run of `report` for key `daily` through the controller.
//!
//! // Mistakes are errors naming what is wrong.
//! let err = rt.tokio_cron_job("reprot", "daily", "* * * * * *").err().expect("unknown job");
//! assert!(err.to_string().contains("registered: [report]"));
//! let err = rt.tokio_cron_job("report", "daily", "*/5 * * * *").err().expect("no seconds");
//! assert!(err.to_string().contains("`*/5 * * * *`"));
//!
//! sched.shutdown().await?;
//! let report = rt.shutdown(Duration::from_secs(5)).await;
//! assert!(report.succeeded >= 1);
//! # Ok(())
//! # }
//! ```
//!
//! Available with the `tokio-cron-scheduler` feature.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use chrono::TimeZone;
use chrono_tz::Tz;

use crate::error::JobError;
use crate::runtime::RuntimeHandle;

/// What a tokio-cron-scheduler cron expression may contain, quoted by the parse error.
const TCS_SYNTAX: &str = "6 fields `second minute hour day-of-month month day-of-week` or 7 \
     with a trailing year (for example `0 */5 * * * *`: every five minutes), in croner's \
     syntax; tokio-cron-scheduler requires both day fields to match when both are restricted";

type BoxedFire = Pin<Box<dyn Future<Output = ()> + Send>>;

impl RuntimeHandle {
    /// A `tokio_cron_scheduler::Job` that fires `job` for `key` on the cron expression
    /// `schedule` (UTC), each fire through [`trigger`](Self::trigger) without `force`; add it
    /// to a `JobScheduler`. Skipped while the job is [paused](Self::pause).
    ///
    /// The schedule is tokio-cron-scheduler's, parsed by it (see the
    /// [module docs](crate::compat) for how that differs from [`Trigger::cron`]).
    ///
    /// Errors ([`JobError::Misconfigured`]): `job` is not registered (the message lists the
    /// registered jobs), tokio-cron-scheduler cannot parse `schedule`, or `schedule` never
    /// fires; each message names the expression.
    ///
    /// [`Trigger::cron`]: crate::schedule::Trigger
    pub fn tokio_cron_job(
        &self,
        job: &str,
        key: &str,
        schedule: &str,
    ) -> Result<tokio_cron_scheduler::Job, JobError> {
        self.cron_job_in(job, key, schedule, Tz::UTC)
    }

    /// [`tokio_cron_job`](Self::tokio_cron_job) with the expression's times in the IANA time
    /// zone `zone` (such as `Europe/Berlin`).
    ///
    /// tokio-cron-scheduler takes the zone's UTC offset when the job is made and keeps it:
    /// after the next daylight-saving change the job fires an hour off local time. Use our own
    /// [`Trigger::cron(..).time_zone(..)`](crate::schedule::Trigger) where that matters.
    ///
    /// Errors: as [`tokio_cron_job`](Self::tokio_cron_job), and an unknown zone.
    pub fn tokio_cron_job_tz(
        &self,
        job: &str,
        key: &str,
        schedule: &str,
        zone: &str,
    ) -> Result<tokio_cron_scheduler::Job, JobError> {
        // Name the job first if it is unknown: that is the bigger mistake.
        self.is_paused(job)?;
        let tz = Tz::from_str(zone.trim()).map_err(|_| JobError::Misconfigured {
            job: Arc::from(job),
            message: format!(
                "unknown time zone `{zone}` for cron `{schedule}` (key `{key}`); expected an \
                 IANA time zone name such as `UTC`, `Europe/Berlin` or `America/New_York`"
            ),
        })?;
        self.cron_job_in(job, key, schedule, tz)
    }

    fn cron_job_in<Z>(
        &self,
        job: &str,
        key: &str,
        schedule: &str,
        zone: Z,
    ) -> Result<tokio_cron_scheduler::Job, JobError>
    where
        Z: TimeZone,
    {
        self.is_paused(job)?;
        let bad = |message: String| JobError::Misconfigured {
            job: Arc::from(job),
            message,
        };
        let (handle, name, k) = (self.clone(), Arc::<str>::from(job), Arc::<str>::from(key));
        let made = tokio_cron_scheduler::Job::new_async_tz(schedule, zone, move |_id, _sched| {
            // Called by tokio-cron-scheduler's runner for each fire; only builds the future,
            // which the runner spawns as a task of its own.
            let fire: BoxedFire = Box::pin(fire(handle.clone(), Arc::clone(&name), Arc::clone(&k)));
            fire
        });
        let mut made = made.map_err(|_| {
            bad(format!(
                "tokio-cron-scheduler cannot parse cron expression `{schedule}` (key `{key}`){}; \
                 expected {TCS_SYNTAX}",
                diagnosis(schedule)
            ))
        })?;
        // tokio-cron-scheduler marks a job with no next fire with 0, and drops it silently at
        // its next tick: refuse it here instead.
        let never = made.job_data().map_or(true, |d| d.next_tick == 0);
        if never {
            return Err(bad(format!(
                "cron expression `{schedule}` (key `{key}`) never fires: no future date matches \
                 its day-of-month, month, day-of-week and year fields together \
                 (tokio-cron-scheduler requires both day fields to match when both are \
                 restricted)"
            )));
        }
        Ok(made)
    }
}

/// One fire: skipped while the job is paused, otherwise a `trigger` awaited to its end. The
/// outcome is counted by `trigger` (and reported to hooks by the controller); nothing to return
/// to tokio-cron-scheduler.
async fn fire(handle: RuntimeHandle, job: Arc<str>, key: Arc<str>) {
    match handle.is_paused(&job) {
        Ok(false) => {}
        Ok(true) => {
            tracing::trace!(%job, %key, "tokio-cron-scheduler fire skipped: job paused");
            return;
        }
        // Not reached: the job was checked when the tokio-cron-scheduler job was made, and
        // jobs are never unregistered.
        Err(e) => {
            tracing::warn!(%job, %key, error = %e, "tokio-cron-scheduler fire for an unknown job");
            return;
        }
    }
    if let Err(e) = handle.trigger(&job, &key, false).await {
        tracing::debug!(%job, %key, error = %e, "tokio-cron-scheduler fire did not succeed");
    }
}

/// Which field is wrong, from our own parser (the same croner syntax), when it has an opinion.
#[cfg(feature = "cron")]
fn diagnosis(schedule: &str) -> String {
    match crate::schedule::Trigger::cron(schedule).validate() {
        Err(crate::schedule::ScheduleError::InvalidCron { problem, .. }) => format!(": {problem}"),
        _ => String::new(),
    }
}

#[cfg(not(feature = "cron"))]
fn diagnosis(_schedule: &str) -> String {
    String::new()
}
