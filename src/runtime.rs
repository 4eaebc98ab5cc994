//! The runtime: plugins registered once, fired on time by their triggers, paused and resumed,
//! observed, and stopped cleanly.
//!
//! Why a layer over the controller: a service wants to say "run `session-scan` every minute and
//! `cleanup` at 03:00 Berlin time" once, and get the controller's guarantees for every fire.
//! Triggers fire *into* the controller, so a job's overlap policy, cooldown, budget, retry and
//! limits all apply: a job still running at its next fire is coalesced, skipped or queued per
//! its policy, never run twice at once. A fire never waits for its run: the timer loop offers
//! the run and goes back to sleep, so a slow, panicking or hanging job never delays the loop.
//!
//! Each trigger is driven by a [`Planner`], which applies the trigger's misfire policy and
//! notices wall-clock jumps. The triggers are dealt to timer shards, one per tokio worker
//! (under the runtime's `TaskTracker`): a shard's task sleeps on the tokio clock until the
//! earliest of its triggers' next wakes (a heap of deadlines), then asks the planner of each
//! trigger that is due what to fire.
//!
//! Shutdown: stop the triggers, then [`JobRuntimeController::shutdown`]: running jobs get
//! `grace` to finish, then are cancelled (a job ignoring its token is abandoned after its
//! policy's `abandon_grace`) and waited for; a snapshot refresh cut this way shows as
//! interrupted in its store's status, and its last good file stays on disk.
//!
//! ```
//! use job_runtime::runtime::Runtime;
//! use job_runtime::schedule::Trigger;
//! use job_runtime::{Job, JobContext, JobRuntimeController, RunError, RuntimeConfig};
//! use std::time::Duration;
//!
//! struct Tick;
//! impl Job for Tick {
//!     type Output = ();
//!     fn name(&self) -> &str { "tick" }
//!     async fn run(&self, _ctx: JobContext) -> Result<(), RunError> { Ok(()) }
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let ctl = JobRuntimeController::new(RuntimeConfig::default());
//! let rt = Runtime::builder(&ctl)
//!     .job(Tick)
//!     .trigger("tick", "all", Trigger::every(Duration::from_secs(10)))
//!     .build()
//!     .unwrap()
//!     .start();
//! tokio::time::sleep(Duration::from_secs(35)).await;
//! let st = &rt.status()[0];
//! assert_eq!(st.fires, 4); // at 0, 10, 20 and 30 s
//! let report = rt.shutdown(Duration::from_secs(5)).await;
//! assert!(report.clean);
//! # }
//! ```

use std::cmp::Reverse;
use std::collections::binary_heap::PeekMut;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crossbeam_utils::CachePadded;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::controller::{JobRuntimeController, KeyStatus, PinnedKey, Started};
use crate::error::{CancelReason, JobError};
use crate::job::{Job, JobContext};
use crate::schedule::{ClockReading, CronCache, Plan, Planner, Schedule, Trigger};
use crate::time::Instant;

type Fire = Pin<Box<dyn Future<Output = Result<(), JobError>> + Send>>;

/// What a fire got to in its first poll: the run's result, or the rest of it.
enum FireStart {
    Done(Result<(), JobError>),
    Waiting(Fire),
}

impl FireStart {
    /// The result, awaiting the rest if there is one.
    async fn finish(self) -> Result<(), JobError> {
        match self {
            FireStart::Done(r) => r,
            FireStart::Waiting(rest) => rest.await,
        }
    }
}

/// Starts one run of a plugin and polls it once: (controller, key, forced). The key is shared,
/// not copied: a timer's fire hands over its trigger's key.
/// A timer's fire also hands over its trigger's pinned key.
type Firer =
    Box<dyn Fn(&JobRuntimeController, &str, Option<&PinnedKey>, bool) -> FireStart + Send + Sync>;

/// A registered plugin with its type erased: runs one key, forced or not.
struct Entry {
    name: Arc<str>,
    fire: Firer,
    paused: AtomicBool,
}

struct TriggerSpec {
    job: Arc<str>,
    key: Arc<str>,
    trigger: Trigger,
}

/// Registers plugins and their triggers; [`build`](Self::build) validates them.
#[must_use]
pub struct RuntimeBuilder {
    ctl: JobRuntimeController,
    jobs: Vec<Entry>,
    triggers: Vec<TriggerSpec>,
}

impl fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field(
                "jobs",
                &self.jobs.iter().map(|j| &j.name).collect::<Vec<_>>(),
            )
            .field("triggers", &self.triggers.len())
            .finish()
    }
}

/// Entry point: `Runtime::builder(&ctl)`.
#[derive(Debug)]
pub struct Runtime {
    ctl: JobRuntimeController,
    jobs: HashMap<Arc<str>, Arc<Entry>>,
    triggers: Vec<(TriggerSpec, Schedule)>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry").field("name", &self.name).finish()
    }
}

impl fmt::Debug for TriggerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}: {:?}", self.job, self.key, self.trigger)
    }
}

impl Runtime {
    /// A builder for a runtime firing into `ctl`.
    pub fn builder(ctl: &JobRuntimeController) -> RuntimeBuilder {
        RuntimeBuilder {
            ctl: ctl.clone(),
            jobs: Vec::new(),
            triggers: Vec::new(),
        }
    }
}

impl RuntimeBuilder {
    /// Registers a plugin under its name, with its policy.
    pub fn job<J: Job>(mut self, job: J) -> Self {
        let job = Arc::new(job);
        let name: Arc<str> = Arc::from(job.name());
        let fire = move |ctl: &JobRuntimeController,
                         key: &str,
                         pinned: Option<&PinnedKey>,
                         force: bool|
              -> FireStart {
            let policy = job.policy();
            let body = {
                let j = Arc::clone(&job);
                move |ctx: JobContext| {
                    let j = Arc::clone(&j);
                    async move { j.run(ctx).await }
                }
            };
            // `run` or `run_forced`, one instance of the pipeline for both; admission and the
            // run's first poll happen here.
            match ctl.start_now(job.name(), key, pinned, &policy, force, body) {
                Started::Done(r) => FireStart::Done(r.map(|_| ())),
                Started::Waiting(rest) => {
                    FireStart::Waiting(Box::pin(async move { rest.await.map(|_| ()) }))
                }
            }
        };
        self.jobs.push(Entry {
            name,
            fire: Box::new(fire),
            paused: AtomicBool::new(false),
        });
        self
    }

    /// Fires `job` for `key` on `trigger`.
    pub fn trigger(mut self, job: &str, key: &str, trigger: Trigger) -> Self {
        self.triggers.push(TriggerSpec {
            job: Arc::from(job),
            key: Arc::from(key),
            trigger,
        });
        self
    }

    /// Checks the registrations: no two jobs with one name, every trigger for a registered
    /// job, every trigger valid (a bad cron expression or time zone, a zero period, a schedule
    /// that never fires). The error says which.
    pub fn build(self) -> Result<Runtime, JobError> {
        let bad = |job: &str, message: String| JobError::Misconfigured {
            job: Arc::from(job),
            message,
        };
        let mut jobs = HashMap::new();
        for e in self.jobs {
            let name = Arc::clone(&e.name);
            if jobs.insert(Arc::clone(&name), Arc::new(e)).is_some() {
                return Err(bad(
                    &name,
                    format!("two jobs are registered as `{name}`; job names must be unique"),
                ));
            }
        }
        let now = self.ctl.clock().wall_now();
        let mut triggers = Vec::with_capacity(self.triggers.len());
        let mut crons = CronCache::default();
        for t in self.triggers {
            if !jobs.contains_key(&t.job) {
                let mut known: Vec<_> = jobs.keys().map(|k| k.to_string()).collect();
                known.sort();
                return Err(bad(
                    &t.job,
                    format!(
                        "a trigger names job `{}`, which is not registered (registered: [{}])",
                        t.job,
                        known.join(", ")
                    ),
                ));
            }
            let schedule = Schedule::new_cached(&t.trigger, now, &mut crons)
                .map_err(|e| bad(&t.job, format!("trigger for key `{}`: {e}", t.key)))?;
            if schedule.next_after(now).is_none() {
                return Err(bad(
                    &t.job,
                    format!("trigger for key `{}` never fires", t.key),
                ));
            }
            triggers.push((t, schedule));
        }
        Ok(Runtime {
            ctl: self.ctl,
            jobs,
            triggers,
        })
    }
}

#[derive(Debug, Default)]
struct Counts {
    fires: AtomicU64,
    misfires: AtomicU64,
    clock_jumps: AtomicU64,
}

struct TriggerState {
    job: Arc<Entry>,
    /// `interval` or `cron` (the trigger itself lives in its timer's planner).
    kind: &'static str,
    next_fire: Mutex<Option<SystemTime>>,
    counts: Counts,
    /// The controller's record of (job, key) and its `RunKey`, held so that housekeeping keeps
    /// the record: the status of a scheduled job (runs, last success, last error) lasts as long
    /// as the runtime, and a fire hands both to admission instead of hashing the key and
    /// looking the record up.
    pinned: PinnedKey,
}

impl TriggerState {
    /// The trigger's key (the pinned key's string).
    fn key(&self) -> &str {
        self.pinned.key()
    }
}

/// Outcomes of the runs the runtime fired.
#[derive(Debug, Default)]
struct Outcomes {
    succeeded: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    cancelled: AtomicU64,
}

struct Inner {
    ctl: JobRuntimeController,
    jobs: HashMap<Arc<str>, Arc<Entry>>,
    triggers: Vec<Arc<TriggerState>>,
    stop: CancellationToken,
    timers: TaskTracker,
    /// Written by every fire from every timer shard: on cache lines of its own, so that the
    /// fields read on every fire (`ctl`, `stop`) are not invalidated by each write.
    outcomes: CachePadded<Outcomes>,
}

/// A started runtime. Cheap to clone.
#[derive(Clone)]
pub struct RuntimeHandle {
    inner: Arc<Inner>,
}

impl fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeHandle")
            .field("jobs", &self.inner.jobs.len())
            .field("triggers", &self.inner.triggers.len())
            .finish()
    }
}

/// One trigger's schedule and the status of its key.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct TriggerStatus {
    /// Job name.
    pub job: String,
    /// Key.
    pub key: String,
    /// The job is paused: its fires are skipped.
    pub paused: bool,
    /// The next fire (wall time; `None`: never again).
    #[serde(serialize_with = "crate::time::serde_fmt::rfc3339")]
    pub next_fire: Option<SystemTime>,
    /// Fires so far (each offered a run to the controller).
    pub fires: u64,
    /// Wake-ups that were late past the misfire grace.
    pub misfires: u64,
    /// Wall-clock jumps noticed.
    pub clock_jumps: u64,
    /// The controller's status of the key, if it has one.
    pub run: Option<KeyStatus>,
}

/// What [`RuntimeHandle::shutdown`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Every run in flight finished within the grace period.
    pub clean: bool,
    /// Runs fired by the runtime that succeeded, over its life.
    pub succeeded: u64,
    /// …that failed (including a panic, a timeout, a stuck job).
    pub failed: u64,
    /// …that were refused at once (busy, cooling down).
    pub refused: u64,
    /// …that were cancelled (by shutdown, or replaced) and stopped within their abandon grace.
    pub cancelled: u64,
    /// Runs that ignored the shutdown's cancellation past their policy's abandon grace: their
    /// futures were dropped, possibly half done. Counted by the controller during this
    /// shutdown, so a run of the same controller not fired by this runtime counts too.
    pub abandoned: u64,
}

impl ShutdownReport {
    /// Runs that ran to an end of their own: `succeeded + failed`.
    pub fn finished(&self) -> u64 {
        self.succeeded + self.failed
    }
}

impl Runtime {
    /// Starts the timer shards (one task per tokio worker, at most one per trigger). Must be
    /// called inside a tokio runtime.
    pub fn start(self) -> RuntimeHandle {
        let now = ClockReading::of(self.ctl.clock());
        let (triggers, schedules): (Vec<_>, Vec<_>) = self
            .triggers
            .into_iter()
            .map(|(t, schedule)| {
                let job = Arc::clone(&self.jobs[&t.job]);
                let state = Arc::new(TriggerState {
                    // The record's key shares the job's name and the trigger's key strings.
                    pinned: self.ctl.pin(&job.name, &t.key),
                    job,
                    kind: t.trigger.kind_name(),
                    next_fire: Mutex::new(None),
                    counts: Counts::default(),
                });
                (state, schedule)
            })
            .unzip();
        let inner = Arc::new(Inner {
            ctl: self.ctl,
            jobs: self.jobs,
            triggers,
            stop: CancellationToken::new(),
            timers: TaskTracker::new(),
            outcomes: CachePadded::default(),
        });
        // Shards of timers: as many as the tokio runtime has workers, triggers dealt round
        // robin, so a burst of fires can spread over the workers.
        let shards = tokio::runtime::Handle::current()
            .metrics()
            .num_workers()
            .clamp(1, inner.triggers.len().max(1));
        let per_shard = inner.triggers.len().div_ceil(shards);
        let mut slots: Vec<Vec<Slot>> =
            (0..shards).map(|_| Vec::with_capacity(per_shard)).collect();
        for (i, (t, schedule)) in inner.triggers.iter().zip(schedules).enumerate() {
            // Validated in `build`. An interval is anchored anew, now; a cron schedule does not
            // depend on its anchor, so the one `build` parsed is kept (parsing is most of what
            // registering a cron trigger costs). A cron whose last year ran out between `build`
            // and `start` never fires: its status shows no next fire.
            let schedule = if schedule.compiled().is_elapsed_time() {
                match Schedule::new(schedule.trigger(), now.wall) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(job = %t.job.name, key = %t.key(), error = %e, "trigger not started");
                        continue;
                    }
                }
            } else {
                schedule
            };
            slots[i % shards].push(Slot {
                t: Arc::clone(t),
                planner: Planner::new(schedule, now),
            });
        }
        for shard in slots.into_iter().filter(|s| !s.is_empty()) {
            inner.timers.spawn(timers(Arc::clone(&inner), shard, now));
        }
        RuntimeHandle { inner }
    }
}

/// The longest a timer shard goes without a look at the clocks (to notice wall-clock jumps).
const CLOCK_CHECK: Duration = Duration::from_secs(60);

/// How many due triggers a shard handles on one clock reading before it reads the clocks
/// again (a burst of thousands of fires takes milliseconds; the later ones are judged, for
/// misfires, against a reading at most this many fires old).
const FIRES_PER_READING: u32 = 64;

/// One trigger in a timer shard.
struct Slot {
    t: Arc<TriggerState>,
    planner: Planner,
}

impl Slot {
    /// When to wake this trigger next (its planner's deadline); `None` when it never fires
    /// again.
    fn wake_at(&self) -> Option<Instant> {
        self.wake_at_for(self.planner.next_fire())
    }

    /// [`wake_at`](Self::wake_at), given the planner's next fire (a wake's plan has it).
    fn wake_at_for(&self, next_fire: Option<SystemTime>) -> Option<Instant> {
        *crate::lock::unpoisoned(&self.t.next_fire) = next_fire;
        self.planner.deadline()
    }
}

/// A shard of timers: one task sleeps until the earliest wake of its triggers (a heap of
/// deadlines), then handles every trigger that is due. `start` is the clock reading the
/// planners were made at.
///
/// One task, one timer entry and one cancellation waiter serve a whole shard: a task per
/// trigger cost ~1 KB each and a tokio timer entry, wake and poll per fire, which adds up when
/// thousands of triggers are due at once.
///
/// The shard also looks at the clocks at least once every [`CLOCK_CHECK`], however far its
/// triggers' fires are, and compares the reading with its previous one. An idle shard costs
/// one clock reading a minute, whatever its number of triggers. On a wall-clock jump, every
/// planner is handed the shard's last reading from before it ([`Planner::vouch`]) and woken,
/// so it sees the jump as it would had it woken itself a minute earlier, and re-plans.
async fn timers(inner: Arc<Inner>, mut slots: Vec<Slot>, start: ClockReading) {
    let origin = start.mono;
    let entries = |slots: &[Slot]| -> BinaryHeap<Reverse<u128>> {
        slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some(heap_entry(origin, s.wake_at()?, i)))
            .collect()
    };
    let mut heap = entries(&slots);
    // The shard's last look at the clocks; no jump since the planners' own readings.
    let mut checked = start;
    let stopped = inner.stop.cancelled();
    tokio::pin!(stopped);
    let sleep = tokio::time::sleep_until(origin);
    tokio::pin!(sleep);
    loop {
        let Some(&Reverse(first)) = heap.peek() else {
            // Nothing fires again.
            return;
        };
        let due = crate::time::add_saturating(origin, Duration::from_nanos(entry_nanos(first)));
        sleep
            .as_mut()
            .reset(due.min(crate::time::add_saturating(checked.mono, CLOCK_CHECK)));
        tokio::select! {
            biased;
            _ = &mut stopped => return,
            _ = &mut sleep => {}
        }
        let mut now = ClockReading::of(inner.ctl.clock());
        if now.jump_since(checked).is_some() {
            for slot in &mut slots {
                if inner.stop.is_cancelled() {
                    return;
                }
                slot.planner.vouch(checked);
                let plan = slot.planner.wake(now);
                wake(&inner, &slot.t, plan);
            }
            heap = entries(&slots);
            checked = now;
            continue;
        }
        checked = now;
        let mut now_nanos = since(origin, now.mono);
        let mut handled = 0u32;
        // The top entry is replaced in place (one sift down), not popped and pushed again.
        while let Some(mut top) = heap.peek_mut() {
            let Reverse(e) = *top;
            if entry_nanos(e) > now_nanos {
                break;
            }
            if inner.stop.is_cancelled() {
                return;
            }
            let i = e as u64 as usize;
            let slot = &mut slots[i];
            let plan = slot.planner.wake(now);
            let next_fire = plan.next_fire();
            wake(&inner, &slot.t, plan);
            match slot.wake_at_for(next_fire) {
                Some(next) => *top = heap_entry(origin, next, i),
                None => {
                    PeekMut::pop(top);
                }
            }
            handled += 1;
            if handled.is_multiple_of(FIRES_PER_READING) {
                now = ClockReading::of(inner.ctl.clock());
                now_nanos = since(origin, now.mono);
            }
        }
    }
}

/// Nanoseconds from `start` to `at` (0 if `at` is earlier; capped at `u64::MAX`, 584 years).
fn since(start: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(start).as_nanos()).unwrap_or(u64::MAX)
}

/// A shard's heap entry for slot `i` waking at `at`: the wake time (nanoseconds after the
/// shard's start) above the slot's index, so one integer comparison orders the entries by
/// time, then by slot. The heap is a max-heap, hence `Reverse`.
fn heap_entry(start: Instant, at: Instant, i: usize) -> Reverse<u128> {
    Reverse(u128::from(since(start, at)) << 64 | i as u128)
}

/// The wake time of a heap entry, in nanoseconds after the shard's start.
fn entry_nanos(e: u128) -> u64 {
    (e >> 64) as u64
}

/// Counts what the planner decided at a trigger's wake and fires its runs (none if its job is
/// paused).
fn wake(inner: &Arc<Inner>, t: &TriggerState, plan: Plan) {
    if plan.misfired() {
        t.counts.misfires.fetch_add(1, Ordering::Relaxed);
    }
    if plan.clock_jump().is_some() {
        t.counts.clock_jumps.fetch_add(1, Ordering::Relaxed);
    }
    if t.job.paused.load(Ordering::Relaxed) {
        return;
    }
    for _ in 0..plan.fires() {
        t.counts.fires.fetch_add(1, Ordering::Relaxed);
        // A root span per fire: the run's `job.run` span is its child.
        let span = trigger_span(inner, &t.job.name, t.key(), t.kind, None);
        if !span.is_disabled() {
            span.record("job.misfired", plan.misfired());
        }
        // The run's first poll happens here, in the shard's task: a run that ends at once (a
        // quick job, a refusal, a join) costs no task and no future. One that waits goes on in
        // a task of its own, so the shard never waits for a job.
        let start = span.in_scope(|| (t.job.fire)(&inner.ctl, t.key(), Some(&t.pinned), false));
        match start {
            FireStart::Done(r) => {
                inner.outcomes.count(&r);
                crate::telemetry::record_outcome(&span, &r);
            }
            FireStart::Waiting(rest) => {
                let mut rest = rest.instrument(span);
                let inner2 = Arc::clone(inner);
                inner.ctl.spawn_tracked(async move {
                    let r = (&mut rest).await;
                    inner2.outcomes.count(&r);
                    crate::telemetry::record_outcome(rest.span(), &r);
                });
            }
        }
    }
}

/// The `job.trigger` span of one fire: a root span for a timer's fire, a child of the caller's
/// span for a manual one (`parent` = the current span).
fn trigger_span(
    inner: &Inner,
    job: &str,
    key: &str,
    kind: &'static str,
    parent: Option<&tracing::Span>,
) -> tracing::Span {
    let span = match parent {
        None => tracing::info_span!(
            parent: None,
            "job.trigger",
            job.name = job,
            job.key = tracing::field::Empty,
            job.trigger = kind,
            job.misfired = tracing::field::Empty,
            job.outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        ),
        Some(p) => tracing::info_span!(
            parent: p,
            "job.trigger",
            job.name = job,
            job.key = tracing::field::Empty,
            job.trigger = kind,
            job.misfired = tracing::field::Empty,
            job.outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        ),
    };
    if !span.is_disabled()
        && let Some(k) = inner.ctl.config().telemetry_keys.render(key)
    {
        span.record("job.key", k);
    }
    span
}

impl Outcomes {
    fn count(&self, r: &Result<(), JobError>) {
        let c = match r {
            Ok(()) => &self.succeeded,
            Err(JobError::Busy { .. } | JobError::CoolingDown { .. }) => &self.refused,
            Err(JobError::Cancelled { .. }) => &self.cancelled,
            Err(_) => &self.failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl RuntimeHandle {
    fn entry(&self, job: &str) -> Result<&Arc<Entry>, JobError> {
        self.inner.jobs.get(job).ok_or_else(|| {
            let mut known: Vec<_> = self.inner.jobs.keys().map(|k| k.to_string()).collect();
            known.sort();
            JobError::Misconfigured {
                job: Arc::from(job),
                message: format!(
                    "job `{job}` is not registered (registered: [{}])",
                    known.join(", ")
                ),
            }
        })
    }

    /// Runs `job` for `key` now (a manual run), through the controller; `force` bypasses the
    /// cooldown. Waits for the run's outcome. Works while the job is paused.
    pub async fn trigger(&self, job: &str, key: &str, force: bool) -> Result<(), JobError> {
        if self.inner.stop.is_cancelled() {
            return Err(JobError::Cancelled {
                job: Arc::from(job),
                key: Arc::from(key),
                reason: CancelReason::Shutdown,
            });
        }
        let e = self.entry(job)?;
        let span = trigger_span(
            &self.inner,
            job,
            key,
            "manual",
            Some(&tracing::Span::current()),
        );
        let start = span.in_scope(|| (e.fire)(&self.inner.ctl, key, None, force));
        let r = start.finish().instrument(span.clone()).await;
        self.inner.outcomes.count(&r);
        crate::telemetry::record_outcome(&span, &r);
        r
    }

    /// Stops firing `job`'s triggers (fires due meanwhile are skipped, not saved up).
    pub fn pause(&self, job: &str) -> Result<(), JobError> {
        self.entry(job)?.paused.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Fires `job`'s triggers again, from their next fire on.
    pub fn resume(&self, job: &str) -> Result<(), JobError> {
        self.entry(job)?.paused.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Whether `job` is paused (for adapters firing on another scheduler's clock, such as
    /// `compat`); an unknown job is the same error as [`trigger`](Self::trigger)'s.
    #[cfg_attr(not(feature = "tokio-cron-scheduler"), allow(dead_code))]
    pub(crate) fn is_paused(&self, job: &str) -> Result<bool, JobError> {
        Ok(self.entry(job)?.paused.load(Ordering::Relaxed))
    }

    /// Every trigger with its next fire and counters, and its key's status.
    pub fn status(&self) -> Vec<TriggerStatus> {
        self.inner
            .triggers
            .iter()
            .map(|t| TriggerStatus {
                job: t.job.name.to_string(),
                key: t.key().to_string(),
                paused: t.job.paused.load(Ordering::Relaxed),
                next_fire: *crate::lock::unpoisoned(&t.next_fire),
                fires: t.counts.fires.load(Ordering::Relaxed),
                misfires: t.counts.misfires.load(Ordering::Relaxed),
                clock_jumps: t.counts.clock_jumps.load(Ordering::Relaxed),
                run: self.inner.ctl.status(&t.job.name, t.key()),
            })
            .collect()
    }

    /// Stops the triggers, lets running jobs go on for `grace`, then cancels them and waits
    /// (see the module docs). Idempotent.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        self.inner.stop.cancel();
        self.inner.timers.close();
        self.inner.timers.wait().await;
        let abandoned_before = self.inner.ctl.abandoned_runs();
        let clean = self.inner.ctl.shutdown(grace).await;
        let abandoned = self.inner.ctl.abandoned_runs() - abandoned_before;
        let o = &self.inner.outcomes;
        ShutdownReport {
            clean,
            succeeded: o.succeeded.load(Ordering::Relaxed),
            failed: o.failed.load(Ordering::Relaxed),
            refused: o.refused.load(Ordering::Relaxed),
            cancelled: o
                .cancelled
                .load(Ordering::Relaxed)
                .saturating_sub(abandoned),
            abandoned,
        }
    }

    /// Waits for SIGINT or SIGTERM (Ctrl-C only, off Unix), then shuts down with `grace`.
    // (Not in loom model builds: tokio has no signal handling under `--cfg loom`.)
    #[cfg(not(loom))]
    pub async fn shutdown_on_signal(&self, grace: Duration) -> std::io::Result<ShutdownReport> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c().await?;
        Ok(self.shutdown(grace).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heap entries order by wake time, then by slot, and give both back.
    #[test]
    fn heap_entries_order_by_time_then_slot() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut heap: BinaryHeap<Reverse<u128>> = [(30, 0), (10, 7), (10, 2), (20, 1)]
            .into_iter()
            .map(|(ms, i)| heap_entry(start, at(ms), i))
            .collect();
        let mut order = Vec::new();
        while let Some(Reverse(e)) = heap.pop() {
            order.push((entry_nanos(e) / 1_000_000, e as u64 as usize));
        }
        assert_eq!(order, [(10, 2), (10, 7), (20, 1), (30, 0)]);
        // A wake before the shard's start is due at once, not far in the future.
        let early = start.checked_sub(Duration::from_secs(1)).unwrap_or(start);
        assert_eq!(entry_nanos(heap_entry(start, early, 3).0), 0);
    }
}
