//! The tokio-cron-scheduler adapter: jobs fired by a real `JobScheduler` go through the
//! controller (overlap policy, pause, outcome counts), and bad requests are refused naming what
//! is wrong.
//!
//! tokio-cron-scheduler reads the wall clock and polls every 500 ms, so these tests run in real
//! time, on `* * * * * *` schedules: each waits for a few fires (about a second apart) and
//! asserts on counts that hold however late the fires come, never on timing. A shutdown
//! report is read only after tokio-cron-scheduler's "done" notification for the fires it
//! counts, which comes once our `trigger` has returned (and counted the outcome).

#![cfg(feature = "tokio-cron-scheduler")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use job_runtime::runtime::{Runtime, RuntimeHandle};
use job_runtime::{
    Job, JobContext, JobError, JobPolicy, JobRuntimeController, Overlap, RunError, RuntimeConfig,
};
use support::{Bodies, Gate, wait_until};
use tokio_cron_scheduler::JobScheduler;

/// Every second.
const EVERY_SECOND: &str = "* * * * * *";

/// How long a test waits for the fires it needs. A few seconds suffice on an idle machine
/// (fires come about a second apart); the margin is for a loaded one.
const PATIENCE: Duration = Duration::from_secs(15);

/// A plugin whose body counts itself in `bodies` and, if it has a gate, waits for it.
struct Probe {
    name: &'static str,
    overlap: Overlap,
    bodies: Arc<Bodies>,
    gate: Option<Gate>,
}

impl Probe {
    fn new(name: &'static str) -> (Self, Arc<Bodies>) {
        let bodies = Bodies::new();
        let probe = Self {
            name,
            overlap: Overlap::default(),
            bodies: Arc::clone(&bodies),
            gate: None,
        };
        (probe, bodies)
    }

    fn gated(mut self, gate: &Gate) -> Self {
        self.gate = Some(gate.clone());
        self
    }

    fn overlap(mut self, overlap: Overlap) -> Self {
        self.overlap = overlap;
        self
    }
}

impl Job for Probe {
    type Output = ();
    fn name(&self) -> &str {
        self.name
    }
    fn policy(&self) -> JobPolicy {
        JobPolicy::builder()
            .overlap(self.overlap)
            .build()
            .expect("valid policy")
    }
    async fn run(&self, _ctx: JobContext) -> Result<(), RunError> {
        let _running = self.bodies.enter();
        if let Some(gate) = &self.gate {
            gate.wait().await;
        }
        Ok(())
    }
}

/// A started `JobScheduler` firing `(job, key)` of `rt` every second, for each pair; with, for
/// each, a count of the fires whose future has ended (tokio-cron-scheduler's "done"
/// notification: sent once our `trigger` has returned, so its outcome is counted).
async fn scheduler(
    rt: &RuntimeHandle,
    jobs: &[(&str, &str)],
) -> (JobScheduler, Vec<Arc<AtomicU64>>) {
    let sched = JobScheduler::new().await.expect("scheduler");
    let mut done = Vec::new();
    for (job, key) in jobs {
        let mut j = rt
            .tokio_cron_job(job, key, EVERY_SECOND)
            .expect("a registered job and a valid schedule");
        let count = Arc::new(AtomicU64::new(0));
        let c = Arc::clone(&count);
        j.on_done_notification_add(
            &sched,
            Box::new(move |_job, _notification, _state| {
                let c = Arc::clone(&c);
                Box::pin(async move {
                    c.fetch_add(1, Ordering::SeqCst);
                })
            }),
        )
        .await
        .expect("notification added");
        sched.add(j).await.expect("added");
        done.push(count);
    }
    sched.start().await.expect("started");
    (sched, done)
}

fn at_least(count: &AtomicU64, n: u64) -> impl FnMut() -> bool + '_ {
    move || count.load(Ordering::SeqCst) >= n
}

fn ctl() -> JobRuntimeController {
    JobRuntimeController::new(RuntimeConfig::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fires_of_a_job_scheduler_run_the_job_through_the_controller() {
    let ctl = ctl();
    let (probe, bodies) = Probe::new("tick");
    let rt = Runtime::builder(&ctl).job(probe).build().unwrap().start();
    let (mut sched, done) = scheduler(&rt, &[("tick", "all")]).await;

    wait_until("two fires done", PATIENCE, at_least(&done[0], 2)).await;
    sched.shutdown().await.unwrap();
    let report = rt.shutdown(Duration::from_secs(5)).await;

    assert!(report.clean);
    // Each fire done is a `trigger` that returned and was counted.
    assert!(report.succeeded >= 2, "{report:?}");
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(bodies.max(), 1, "never two runs at once");
    let st = ctl.status("tick", "all").expect("the key has a status");
    assert!(st.runs >= 2 && st.successes >= 2, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fire_while_the_job_runs_joins_the_run_and_never_blocks_the_scheduler() {
    let ctl = ctl();
    let gate = Gate::new();
    let (slow, slow_bodies) = Probe::new("slow");
    let (witness, _) = Probe::new("witness");
    let rt = Runtime::builder(&ctl)
        .job(slow.gated(&gate)) // Overlap::Coalesce, the default
        .job(witness)
        .build()
        .unwrap()
        .start();
    let (mut sched, done) = scheduler(&rt, &[("slow", "k"), ("witness", "k")]).await;
    let (slow_done, witness_done) = (&done[0], &done[1]);

    wait_until("the slow run started", PATIENCE, || {
        slow_bodies.started() >= 1
    })
    .await;
    let witnessed = witness_done.load(Ordering::SeqCst);
    // Fires go on while the slow run hangs: they join it, and other jobs still run.
    wait_until("two fires joined the slow run", PATIENCE, || {
        ctl.status("slow", "k").is_some_and(|s| s.coalesced >= 2)
    })
    .await;
    wait_until(
        "two more witness fires done",
        PATIENCE,
        at_least(witness_done, witnessed + 2),
    )
    .await;
    assert_eq!(slow_bodies.started(), 1, "joined, not run again");
    assert_eq!(slow_bodies.current(), 1);
    // A fire's future awaits its run: none of the slow job's fires is done yet.
    assert_eq!(slow_done.load(Ordering::SeqCst), 0);

    gate.open();
    // The leader and the two followers at least, each with the shared result.
    wait_until("three slow fires done", PATIENCE, at_least(slow_done, 3)).await;
    sched.shutdown().await.unwrap();
    let report = rt.shutdown(Duration::from_secs(5)).await;
    assert!(report.clean);
    assert!(report.succeeded >= 3, "{report:?}");
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(slow_bodies.max(), 1, "never two runs at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fire_while_the_job_runs_is_refused_under_overlap_skip() {
    let ctl = ctl();
    let gate = Gate::new();
    let (slow, bodies) = Probe::new("slow");
    let rt = Runtime::builder(&ctl)
        .job(slow.gated(&gate).overlap(Overlap::Skip))
        .build()
        .unwrap()
        .start();
    let (mut sched, done) = scheduler(&rt, &[("slow", "k")]).await;

    // The first fire's run hangs on the gate, so every fire done meanwhile was refused.
    wait_until("two fires refused", PATIENCE, at_least(&done[0], 2)).await;
    assert_eq!(bodies.started(), 1, "refused, not run");
    assert_eq!(bodies.current(), 1);

    gate.open();
    sched.shutdown().await.unwrap();
    let report = rt.shutdown(Duration::from_secs(5)).await;
    assert!(report.refused >= 2, "{report:?}");
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(bodies.max(), 1, "never two runs at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_skips_fires_and_resume_restores_them() {
    let ctl = ctl();
    let (paused, paused_bodies) = Probe::new("paused");
    let (witness, witness_bodies) = Probe::new("witness");
    let rt = Runtime::builder(&ctl)
        .job(paused)
        .job(witness)
        .build()
        .unwrap()
        .start();
    rt.pause("paused").unwrap();
    let (mut sched, _) = scheduler(&rt, &[("paused", "k"), ("witness", "k")]).await;

    // Both fire on the same ticks: two witness runs mean the paused job was fired too.
    wait_until("two witness runs", PATIENCE, || {
        witness_bodies.finished() >= 2
    })
    .await;
    assert_eq!(
        paused_bodies.started(),
        0,
        "fires of a paused job are skipped"
    );

    rt.resume("paused").unwrap();
    wait_until("a run after resume", PATIENCE, || {
        paused_bodies.finished() >= 1
    })
    .await;
    sched.shutdown().await.unwrap();
    rt.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fires_after_the_runtime_shut_down_are_refused() {
    let (ctl_a, ctl_b) = (ctl(), ctl());
    let (gone, gone_bodies) = Probe::new("gone");
    let (witness, witness_bodies) = Probe::new("witness");
    let rt_a = Runtime::builder(&ctl_a).job(gone).build().unwrap().start();
    let rt_b = Runtime::builder(&ctl_b)
        .job(witness)
        .build()
        .unwrap()
        .start();
    let job_a = rt_a.tokio_cron_job("gone", "k", EVERY_SECOND).unwrap();
    let report = rt_a.shutdown(Duration::from_secs(1)).await;
    assert!(report.clean);

    let (mut sched, _) = scheduler(&rt_b, &[("witness", "k")]).await;
    sched.add(job_a).await.unwrap();
    wait_until("two witness runs", PATIENCE, || {
        witness_bodies.finished() >= 2
    })
    .await;
    assert_eq!(gone_bodies.started(), 0, "a shut-down runtime runs nothing");
    sched.shutdown().await.unwrap();
    rt_b.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn unknown_jobs_bad_expressions_and_bad_zones_are_refused_naming_them() {
    let ctl = ctl();
    let rt = Runtime::builder(&ctl)
        .job(Probe::new("tick").0)
        .job(Probe::new("cleanup").0)
        .build()
        .unwrap()
        .start();
    let misconfigured = |r: Result<tokio_cron_scheduler::Job, JobError>| match r {
        Err(e @ JobError::Misconfigured { .. }) => e.to_string(),
        Err(e) => panic!("expected Misconfigured, got {e:?}"),
        Ok(_) => panic!("expected an error"),
    };

    let msg = misconfigured(rt.tokio_cron_job("tock", "all", EVERY_SECOND));
    assert!(msg.contains("`tock` is not registered"), "{msg}");
    assert!(msg.contains("registered: [cleanup, tick]"), "{msg}");
    // The unknown job is named even when the zone is wrong too.
    let msg = misconfigured(rt.tokio_cron_job_tz("tock", "all", EVERY_SECOND, "Mars/Base"));
    assert!(msg.contains("`tock` is not registered"), "{msg}");

    for bad in ["*/5 * * * *", "61 * * * * *", "not cron", ""] {
        let msg = misconfigured(rt.tokio_cron_job("tick", "all", bad));
        assert!(msg.contains(&format!("`{bad}`")), "{msg}");
        assert!(msg.contains("cannot parse"), "{msg}");
        assert!(msg.contains("key `all`"), "{msg}");
    }
    #[cfg(feature = "cron")]
    {
        // With our own parser at hand, the field at fault is named too.
        let msg = misconfigured(rt.tokio_cron_job("tick", "all", "*/5 * * * *"));
        assert!(msg.contains("a seconds field is required"), "{msg}");
        let msg = misconfigured(rt.tokio_cron_job("tick", "all", "61 * * * * *"));
        assert!(msg.contains("the second field `61` is invalid"), "{msg}");
    }

    // Parses, but no date matches: refused, not silently dropped by the scheduler.
    for never in ["0 0 0 30 2 *", "0 0 0 1 1 * 2020"] {
        let msg = misconfigured(rt.tokio_cron_job("tick", "all", never));
        assert!(msg.contains(&format!("`{never}`")), "{msg}");
        assert!(msg.contains("never fires"), "{msg}");
    }

    let msg = misconfigured(rt.tokio_cron_job_tz("tick", "all", EVERY_SECOND, "Europe/Berln"));
    assert!(msg.contains("unknown time zone `Europe/Berln`"), "{msg}");

    assert!(rt.tokio_cron_job("cleanup", "all", "0 0 3 * * *").is_ok());
    assert!(
        rt.tokio_cron_job_tz("cleanup", "all", "0 0 3 * * *", "Europe/Berlin")
            .is_ok()
    );
    rt.shutdown(Duration::from_secs(1)).await;
}
