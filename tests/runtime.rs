//! The scheduling runtime: triggers fire into the controller on paused time, exactly; bad
//! registrations are refused; pause / resume / manual runs; faults never stop the loop; shutdown
//! ends within its grace with no lock held.

#[path = "support/callsites.rs"]
mod callsites;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use job_runtime::runtime::Runtime;
use job_runtime::schedule::Trigger;
use job_runtime::time::Instant;
use job_runtime::{Job, JobContext, JobPolicy, JobRuntimeController, RunError, RuntimeConfig};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A plugin counting its runs; what a run does is a parameter.
struct Counted<F> {
    name: &'static str,
    policy: JobPolicy,
    runs: Arc<AtomicU64>,
    body: F,
}

impl<F, Fut> Job for Counted<F>
where
    F: Fn(JobContext, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), RunError>> + Send,
{
    type Output = ();
    fn name(&self) -> &str {
        self.name
    }
    fn policy(&self) -> JobPolicy {
        self.policy.clone()
    }
    async fn run(&self, ctx: JobContext) -> Result<(), RunError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        (self.body)(ctx, n).await
    }
}

fn counted<F, Fut>(name: &'static str, body: F) -> (Counted<F>, Arc<AtomicU64>)
where
    F: Fn(JobContext, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), RunError>> + Send,
{
    let runs = Arc::new(AtomicU64::new(0));
    (
        Counted {
            name,
            policy: JobPolicy::default(),
            runs: Arc::clone(&runs),
            body,
        },
        runs,
    )
}

async fn ok(_ctx: JobContext, _n: u64) -> Result<(), RunError> {
    Ok(())
}

#[cfg(feature = "cron")]
#[tokio::test(start_paused = true)]
async fn bad_registrations_are_refused_naming_what_is_wrong() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let err = Runtime::builder(&ctl)
        .job(counted("a", ok).0)
        .job(counted("a", ok).0)
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("two jobs are registered as `a`"),
        "{err}"
    );

    let err = Runtime::builder(&ctl)
        .job(counted("a", ok).0)
        .trigger("b", "k", Trigger::every(secs(1)))
        .build()
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("job `b`, which is not registered (registered: [a])"),
        "{err}"
    );

    let err = Runtime::builder(&ctl)
        .job(counted("a", ok).0)
        .trigger("a", "k", Trigger::cron("every monday"))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("every monday"), "{err}");

    let err = Runtime::builder(&ctl)
        .job(counted("a", ok).0)
        .trigger("a", "k", Trigger::cron("0 0 0 30 2 *"))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("never"), "{err}");
}

#[cfg(feature = "cron")]
#[tokio::test(start_paused = true)]
async fn an_every_second_cron_fires_86400_times_in_a_simulated_day() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let (job, runs) = counted("tick", ok);
    let rt = Runtime::builder(&ctl)
        .job(job)
        .trigger("tick", "k", Trigger::cron("* * * * * *"))
        .build()
        .unwrap()
        .start();
    // Start just after a whole second, so the day holds exactly 86,400 second boundaries.
    tokio::time::sleep(secs(86_400)).await;
    let fires = rt.status()[0].fires;
    let report = rt.shutdown(secs(1)).await;
    assert!((86_400..=86_401).contains(&fires), "{fires}");
    assert_eq!(runs.load(Ordering::SeqCst), fires);
    assert_eq!(report.succeeded, fires);
    assert_eq!(rt.status()[0].misfires, 0);
}

/// A timer whose next fire is an hour away still has the wall clock looked at within a minute
/// (its shard's clock check): a jump of the clock is noticed and the cron's next fire is
/// recomputed from the new time.
#[cfg(feature = "cron")]
#[tokio::test(start_paused = true)]
async fn a_wall_clock_jump_is_noticed_within_a_minute_by_an_idle_timer() {
    use job_runtime::time::Clock;
    use std::time::UNIX_EPOCH;
    // 2024-05-06T07:08:09Z
    let wall0 = UNIX_EPOCH + secs(1_714_979_289);
    let clock = Clock::with_wall_start(wall0);
    let ctl = JobRuntimeController::with_clock(RuntimeConfig::default(), clock.clone());
    let (job, runs) = counted("hourly", ok);
    let rt = Runtime::builder(&ctl)
        .job(job)
        .trigger("hourly", "k", Trigger::cron("0 0 * * * *"))
        .build()
        .unwrap()
        .start();
    let at = |h: u64| UNIX_EPOCH + secs(1_714_953_600 + h * 3600); // 2024-05-06 h:00Z
    tokio::time::sleep(secs(1)).await;
    assert_eq!(rt.status()[0].next_fire, Some(at(8)));
    // Three hours forward, ten seconds in.
    tokio::time::sleep(secs(9)).await;
    clock.shift_wall(3 * 3600 * 1_000_000_000);
    tokio::time::sleep(secs(55)).await;
    let t = &rt.status()[0];
    assert_eq!(t.clock_jumps, 1, "noticed at the once-a-minute look");
    assert_eq!(
        t.next_fire,
        Some(at(11)),
        "replanned from the new wall time"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "nothing fires for the skipped hours"
    );
    assert!(rt.shutdown(secs(1)).await.clean);
}

/// A small jump hours after a trigger last woke is judged as it would be a minute after: the
/// shard's clock checks vouch for the time between. The daily trigger's planner last read the
/// clocks at the start, five hours earlier; on its own it would allow 1 s + 1 ms per second
/// elapsed (18 s) before calling a 10 s step a jump, and fire the skipped 12:00 late.
#[cfg(feature = "cron")]
#[tokio::test(start_paused = true)]
async fn a_small_jump_long_after_a_triggers_last_wake_is_still_a_jump() {
    use job_runtime::time::Clock;
    use std::time::UNIX_EPOCH;
    // 2024-05-06T07:08:57Z: the shard looks at the clocks at hh:mm:57.
    let clock = Clock::with_wall_start(UNIX_EPOCH + secs(1_714_979_337));
    let ctl = JobRuntimeController::with_clock(RuntimeConfig::default(), clock.clone());
    let (job, runs) = counted("noon", ok);
    let rt = Runtime::builder(&ctl)
        .job(job)
        .trigger("noon", "k", Trigger::cron("0 0 12 * * *"))
        .build()
        .unwrap()
        .start();
    let noon = |d: u64| UNIX_EPOCH + secs(1_714_953_600 + 12 * 3600 + d * 86_400);
    // At 11:59:52, ten seconds forward: the clock skips 12:00:00 before the 11:59:57 look.
    tokio::time::sleep(secs(4 * 3600 + 50 * 60 + 55)).await;
    clock.shift_wall(10 * 1_000_000_000);
    tokio::time::sleep(secs(120)).await;
    let t = &rt.status()[0];
    assert_eq!(t.clock_jumps, 1, "a 10 s step is a jump");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the skipped 12:00 does not fire"
    );
    assert_eq!(t.next_fire, Some(noon(1)), "replanned for tomorrow");
    assert!(rt.shutdown(secs(1)).await.clean);
}

#[tokio::test(start_paused = true)]
async fn an_interval_fires_on_schedule_and_pause_skips_fires() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let (job, runs) = counted("tick", ok);
    let rt = Runtime::builder(&ctl)
        .job(job)
        .trigger("tick", "k", Trigger::every(secs(10)))
        .build()
        .unwrap()
        .start();
    tokio::time::sleep(secs(35)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 4, "at 0, 10, 20, 30 s");
    let next = rt.status()[0].next_fire.unwrap();
    assert_eq!(
        next.duration_since(ctl.clock().wall_now()).unwrap(),
        secs(5)
    );
    rt.pause("tick").unwrap();
    tokio::time::sleep(secs(30)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 4, "paused");
    assert!(rt.status()[0].paused);
    // A manual run works while paused.
    rt.trigger("tick", "k", false).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 5);
    rt.resume("tick").unwrap();
    tokio::time::sleep(secs(10)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        6,
        "resumed at the next fire (70 s)"
    );
    assert!(rt.pause("nope").is_err());
}

/// Triggers of different periods share a timer task (one heap of deadlines): each fires on its
/// own schedule, exactly.
#[tokio::test(start_paused = true)]
async fn triggers_sharing_a_timer_each_fire_on_their_own_schedule() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let (job, _runs) = counted("tick", ok);
    let mut b = Runtime::builder(&ctl).job(job);
    for (key, period) in [("a", 3), ("b", 5), ("c", 7)] {
        b = b.trigger("tick", key, Trigger::every(secs(period)));
    }
    let rt = b.build().unwrap().start();
    tokio::time::sleep(secs(105) + Duration::from_millis(500)).await;
    let fires: Vec<(String, u64)> = rt.status().into_iter().map(|t| (t.key, t.fires)).collect();
    // At 0, p, 2p, … up to 105 s: 105 / p + 1 fires.
    let expected = [("a", 36), ("b", 22), ("c", 16)].map(|(k, n)| (k.to_string(), n));
    assert_eq!(fires, expected);
    for t in rt.status() {
        let run = t.run.unwrap();
        assert_eq!(run.runs, t.fires, "{}: every fire ran", t.key);
    }
    assert!(rt.shutdown(secs(1)).await.clean);
}

/// On a multi-thread runtime the triggers are dealt to several timer tasks (one per worker):
/// every trigger fires, none twice at once, and shutdown stops every timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_triggers_on_four_workers_all_fire_and_all_stop() {
    const TRIGGERS: usize = 200;
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let (job, runs) = counted("tick", ok);
    let mut b = Runtime::builder(&ctl).job(job);
    for i in 0..TRIGGERS {
        b = b.trigger(
            "tick",
            &format!("k{i}"),
            Trigger::every(Duration::from_millis(20)),
        );
    }
    let rt = b.build().unwrap().start();
    // Wait (no bound on speed asserted) until every trigger has fired three times.
    let deadline = std::time::Instant::now() + secs(60);
    while rt
        .status()
        .iter()
        .any(|t| t.run.as_ref().unwrap().successes < 3)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "a trigger stopped firing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = rt.shutdown(secs(5)).await;
    assert!(report.clean);
    let after = runs.load(Ordering::SeqCst);
    assert_eq!(
        report.finished(),
        after,
        "every fired run ended and was counted"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        after,
        "no timer fires after shutdown"
    );
    for t in rt.status() {
        let st = t.run.unwrap();
        assert_eq!(st.runs, st.successes, "{}", t.key);
        assert!(t.fires >= st.runs, "{}: a run per fire at most", t.key);
    }
}

/// Housekeeping drops idle keys' records, but not those of a running runtime's triggers: their
/// status (runs, last success) is there before the first fire and after every sweep, and goes
/// with the runtime.
#[tokio::test(start_paused = true)]
async fn a_scheduled_jobs_status_outlives_housekeeping() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let (job, runs) = counted("tick", ok);
    let rt = Runtime::builder(&ctl)
        .job(job)
        .trigger("tick", "k", Trigger::every(secs(10)).initial_delay(secs(5)))
        .build()
        .unwrap()
        .start();
    let before = rt.status()[0].run.clone().expect("a record from the start");
    assert_eq!(before.runs, 0);
    tokio::time::sleep(secs(26)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 3, "at 5, 15, 25 s");
    // An ad hoc key of the same job, idle since: swept.
    ctl.run("tick", "ad hoc", &JobPolicy::default(), |_ctx| async {
        Ok(())
    })
    .await
    .unwrap();
    ctl.housekeep();
    assert!(ctl.status("tick", "ad hoc").is_none());
    let after = rt.status()[0].run.clone().expect("kept by the runtime");
    assert_eq!((after.runs, after.successes), (3, 3));
    assert!(after.last_success.is_some());
    rt.shutdown(secs(1)).await;
    drop(rt);
    ctl.housekeep();
    assert!(
        ctl.status("tick", "k").is_none(),
        "released with the runtime"
    );
}

#[tokio::test(start_paused = true)]
async fn a_job_still_running_at_its_next_fire_is_never_run_twice_at_once() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let running = Arc::new(AtomicU64::new(0));
    let max = Arc::new(AtomicU64::new(0));
    let (r, m) = (Arc::clone(&running), Arc::clone(&max));
    let (job, runs) = counted("slow", move |_ctx, _n| {
        let (r, m) = (Arc::clone(&r), Arc::clone(&m));
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(3_500)).await;
            r.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let rt = Runtime::builder(&ctl)
        .job(job)
        .trigger("slow", "k", Trigger::every(secs(1)))
        .build()
        .unwrap()
        .start();
    tokio::time::sleep(secs(20)).await;
    let report = rt.shutdown(secs(10)).await;
    assert_eq!(max.load(Ordering::SeqCst), 1, "never two at once");
    // Default overlap Coalesce: fires during a run join it. Runs start at 0, 4, 8, 12, 16 s
    // (the first fire after each 3.5 s run ends).
    assert_eq!(runs.load(Ordering::SeqCst), 5);
    // The three fires during each run joined it (1-3, 5-7, 9-11, 13-15, 17-19 s).
    let status = ctl
        .status("slow", "k")
        .expect("a scheduled key keeps its status");
    assert_eq!((status.runs, status.coalesced), (5, 15));
    assert!(report.clean);
}

#[tokio::test(start_paused = true)]
async fn a_thousand_panics_and_hangs_never_stop_the_loop() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let (mut job, runs) = counted("faulty", |ctx: JobContext, n| async move {
        match n % 2 {
            0 => panic!("injected fault {n}"),
            _ => {
                // Hang, ignoring the token, until the budget cuts it off.
                let _ = &ctx;
                std::future::pending::<()>().await;
                Ok(())
            }
        }
    });
    job.policy = JobPolicy::builder()
        .budget(Duration::from_millis(5))
        .abandon_grace(Duration::from_millis(1))
        .build()
        .unwrap();
    let rt = Runtime::builder(&ctl)
        .job(job)
        .trigger("faulty", "k", Trigger::every(Duration::from_millis(10)))
        .build()
        .unwrap()
        .start();
    tokio::time::sleep(Duration::from_millis(10_000)).await;
    let start = Instant::now();
    let report = rt.shutdown(secs(1)).await;
    assert!(start.elapsed() <= secs(1));
    assert!(
        runs.load(Ordering::SeqCst) >= 1_000,
        "{}",
        runs.load(Ordering::SeqCst)
    );
    assert_eq!(report.succeeded, 0);
    assert!(report.failed >= 1_000, "{report:?}");
    assert!(
        ctl.try_acquire("faulty", "k").is_some(),
        "no lock left behind"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_within_grace_plus_abandon_grace_with_no_lock_held() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let (mut job, _runs) = counted("hang", |_ctx, _n| async {
        std::future::pending::<()>().await;
        Ok(())
    });
    job.policy = JobPolicy::builder().abandon_grace(secs(1)).build().unwrap();
    let rt = Runtime::builder(&ctl)
        .job(job)
        .trigger("hang", "k", Trigger::every(secs(60)))
        .build()
        .unwrap()
        .start();
    tokio::time::sleep(secs(1)).await;
    let start = Instant::now();
    let report = rt.shutdown(secs(5)).await;
    assert!(!report.clean);
    assert_eq!(
        start.elapsed(),
        secs(6),
        "grace 5 s, then abandoned after 1 s"
    );
    assert_eq!(report.abandoned, 1, "the job ignored its token: {report:?}");
    assert_eq!(report.cancelled, 0, "{report:?}");
    assert_eq!(report.finished(), 0, "{report:?}");
    assert_eq!(ctl.abandoned_runs(), 1);
    assert!(ctl.try_acquire("hang", "k").is_some(), "no lock held");
    assert!(
        rt.trigger("hang", "k", true).await.is_err(),
        "no runs after shutdown"
    );
}

#[tokio::test(start_paused = true)]
async fn a_job_that_heeds_its_token_at_shutdown_counts_as_cancelled_not_abandoned() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let (mut job, _runs) = counted("polite", |ctx: JobContext, _n| async move {
        ctx.cancelled().await;
        Ok(())
    });
    job.policy = JobPolicy::builder().abandon_grace(secs(1)).build().unwrap();
    let rt = Runtime::builder(&ctl)
        .job(job)
        .trigger("polite", "k", Trigger::every(secs(60)))
        .build()
        .unwrap()
        .start();
    tokio::time::sleep(secs(1)).await;
    let start = Instant::now();
    let report = rt.shutdown(secs(5)).await;
    assert_eq!(start.elapsed(), secs(5), "grace, then it stops at once");
    assert!(!report.clean);
    assert_eq!((report.cancelled, report.abandoned), (1, 0), "{report:?}");
    assert_eq!(ctl.abandoned_runs(), 0);
    assert!(ctl.try_acquire("polite", "k").is_some(), "no lock held");
}

/// A timer's fire is a `job.trigger` span and its run a `job.run` child of it, both for a run
/// that ends in the timer's own poll and for one that has to wait (and so goes on in a task).
#[tokio::test(start_paused = true)]
async fn a_timer_fire_is_the_parent_of_its_run_span() {
    use std::sync::Mutex;
    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::registry::LookupSpan;

    /// (span, parent) names, as spans open.
    type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;
    /// Records [`Seen`].
    struct Parents(Seen);
    impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Parents {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            id: &tracing::span::Id,
            ctx: Context<'_, S>,
        ) {
            let parent = ctx
                .span(id)
                .and_then(|s| s.parent())
                .map(|p| p.name().to_owned());
            let name = attrs.metadata().name().to_owned();
            self.0.lock().unwrap().push((name, parent));
        }
    }

    let seen = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(Parents(Arc::clone(&seen)));
    let _default = callsites::scoped(subscriber);

    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let (quick, quick_runs) = counted("quick", ok);
    let (slow, slow_runs) = counted("slow", |_ctx, _n| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(())
    });
    let rt = Runtime::builder(&ctl)
        .job(quick)
        .job(slow)
        .trigger("quick", "k", Trigger::every(secs(10)))
        .trigger("slow", "k", Trigger::every(secs(10)))
        .build()
        .unwrap()
        .start();
    tokio::time::sleep(secs(25)).await;
    assert!(rt.shutdown(secs(1)).await.clean);
    let runs = quick_runs.load(Ordering::SeqCst) + slow_runs.load(Ordering::SeqCst);
    assert_eq!(runs, 6, "three fires of each");

    let seen = seen.lock().unwrap();
    let triggers = seen.iter().filter(|(n, _)| n == "job.trigger").count();
    let run_parents: Vec<Option<&str>> = seen
        .iter()
        .filter(|(n, _)| n == "job.run")
        .map(|(_, p)| p.as_deref())
        .collect();
    assert_eq!(triggers, 6, "{seen:?}");
    assert_eq!(run_parents, vec![Some("job.trigger"); 6], "{seen:?}");
}
