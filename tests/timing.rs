//! Exact timing of cooldowns, budgets, retries and rate limits, under paused tokio time.
//!
//! Every test runs with `start_paused = true`: the runtime's clock only moves when every task is
//! idle, straight to the next timer, so instants are exact and the assertions use `==` rather
//! than tolerances.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use job_runtime::error::CancelReason;
use job_runtime::time::Instant;
use job_runtime::{
    Decision, Jitter, JobContext, JobError, JobPolicy, JobRuntimeController, RateLimit,
    RetryPolicy, RunError, RunState, RuntimeConfig,
};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Helpers (local to this file).

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Long enough to be "forever" in any test here.
const FOREVER: Duration = Duration::from_secs(365 * 86_400);

fn controller() -> JobRuntimeController {
    JobRuntimeController::new(RuntimeConfig::default())
}

/// A shared log of instants, written from inside job bodies.
#[derive(Clone, Default)]
struct Starts(Arc<Mutex<Vec<Instant>>>);

impl Starts {
    fn push(&self, at: Instant) {
        self.0.lock().unwrap().push(at);
    }
    fn get(&self) -> Vec<Instant> {
        let mut v = self.0.lock().unwrap().clone();
        v.sort();
        v
    }
    /// Offsets from `t0`, in call order.
    fn offsets(&self, t0: Instant) -> Vec<Duration> {
        self.0.lock().unwrap().iter().map(|t| *t - t0).collect()
    }
}

/// Sleeps for `d` or until the attempt is cancelled, whichever comes first; returns `true` when
/// cancelled.
async fn sleep_or_cancel(ctx: &job_runtime::JobContext, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = ctx.cancelled() => true,
    }
}

/// Sets a flag when dropped: tells whether an abandoned job's future was dropped, and when.
struct DropFlag(Arc<Mutex<Option<Instant>>>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        *self.0.lock().unwrap() = Some(Instant::now());
    }
}

fn expect_budget_exceeded(
    r: Result<impl std::fmt::Debug, JobError>,
) -> (Duration, Option<JobError>) {
    match r {
        Err(JobError::BudgetExceeded { budget, last, .. }) => (budget, last.map(|b| *b)),
        other => panic!("expected BudgetExceeded, got {other:?}"),
    }
}

fn failed_message(e: &JobError) -> String {
    match e {
        JobError::Failed { source, .. } => source.to_string(),
        other => panic!("expected Failed, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Cooldown.

/// After a success the key is refused for exactly the success span, counted from the end of
/// the run; at exactly the end of the span it runs again.
#[tokio::test(start_paused = true)]
async fn cooldown_after_success_is_exact() {
    let ctl = controller();
    let policy = JobPolicy::builder()
        .cooldown(secs(10))
        .failure_cooldown(secs(4))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let job = {
        let calls = calls.clone();
        move |_ctx| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(secs(3)).await;
                Ok::<_, RunError>(1u32)
            }
        }
    };
    let t0 = Instant::now();
    ctl.run("cd", "k", &policy, job.clone()).await.unwrap();
    assert_eq!(t0.elapsed(), secs(3), "the run itself takes 3 s");

    // 2 s after the end: 8 s left of the 10 s success span.
    tokio::time::sleep(secs(2)).await;
    let err = ctl.run("cd", "k", &policy, job.clone()).await.unwrap_err();
    match &err {
        JobError::CoolingDown { remaining, .. } => assert_eq!(*remaining, secs(8)),
        other => panic!("expected CoolingDown, got {other:?}"),
    }
    assert_eq!(err.retry_after(), Some(secs(8)));
    assert!(err.is_rejection());
    assert_eq!(
        t0.elapsed(),
        secs(5),
        "a rejection returns at once, it never waits"
    );

    // 1 ms before the end: 1 ms left.
    tokio::time::sleep(secs(8) - ms(1)).await;
    match ctl.run("cd", "k", &policy, job.clone()).await {
        Err(JobError::CoolingDown { remaining, .. }) => assert_eq!(remaining, ms(1)),
        other => panic!("expected CoolingDown, got {other:?}"),
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "refused calls never ran the job"
    );

    // Exactly at the end of the span: it runs.
    tokio::time::sleep(ms(1)).await;
    assert_eq!(t0.elapsed(), secs(13));
    ctl.run("cd", "k", &policy, job.clone()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let st = ctl.status("cd", "k").unwrap();
    assert_eq!(st.cooldown_rejections, 2);
    assert_eq!(st.cooldown_remaining, Some(secs(10)));
}

/// After a failure the key is refused for exactly the failure span, not the success span.
#[tokio::test(start_paused = true)]
async fn cooldown_after_failure_uses_its_own_span() {
    let ctl = controller();
    // The failure span set first must survive a later `cooldown(..)`.
    let policy = JobPolicy::builder()
        .failure_cooldown(secs(4))
        .cooldown(secs(10))
        .build()
        .unwrap();
    assert_eq!(policy.cooldown().span(true), secs(10));
    assert_eq!(policy.cooldown().span(false), secs(4));
    let calls = Arc::new(AtomicU32::new(0));
    let job = {
        let calls = calls.clone();
        move |_ctx| {
            let calls = calls.clone();
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(secs(3)).await;
                if n == 0 {
                    Err(RunError::permanent(io::Error::other("bad input")))
                } else {
                    Ok(n)
                }
            }
        }
    };
    let t0 = Instant::now();
    let err = ctl.run("cd", "k", &policy, job.clone()).await.unwrap_err();
    assert_eq!(failed_message(&err), "bad input");
    assert_eq!(t0.elapsed(), secs(3));

    tokio::time::sleep(secs(1)).await;
    match ctl.run("cd", "k", &policy, job.clone()).await {
        Err(JobError::CoolingDown { remaining, .. }) => assert_eq!(remaining, secs(3)),
        other => panic!("expected CoolingDown, got {other:?}"),
    }
    tokio::time::sleep(secs(3) - ms(1)).await;
    match ctl.run("cd", "k", &policy, job.clone()).await {
        Err(JobError::CoolingDown { remaining, .. }) => assert_eq!(remaining, ms(1)),
        other => panic!("expected CoolingDown, got {other:?}"),
    }
    // Exactly 4 s after the failed run ended (not 10 s): it runs, and succeeds.
    tokio::time::sleep(ms(1)).await;
    assert_eq!(t0.elapsed(), secs(7));
    assert_eq!(*ctl.run("cd", "k", &policy, job.clone()).await.unwrap(), 1);
    assert_eq!(t0.elapsed(), secs(10));
    // Now the success span applies.
    match ctl.run("cd", "k", &policy, job.clone()).await {
        Err(JobError::CoolingDown { remaining, .. }) => assert_eq!(remaining, secs(10)),
        other => panic!("expected CoolingDown, got {other:?}"),
    }
}

/// `run_forced` ignores the cooldown, and its own end starts a new cooldown.
#[tokio::test(start_paused = true)]
async fn run_forced_bypasses_cooldown() {
    let ctl = controller();
    let policy = JobPolicy::builder()
        .cooldown(secs(60))
        .failure_cooldown(secs(30))
        .build()
        .unwrap();
    let job = |_ctx| async {
        tokio::time::sleep(secs(1)).await;
        Ok::<_, RunError>(())
    };
    let t0 = Instant::now();
    ctl.run("f", "k", &policy, job).await.unwrap();
    tokio::time::sleep(secs(5)).await;
    assert!(matches!(
        ctl.run("f", "k", &policy, job).await,
        Err(JobError::CoolingDown { .. })
    ));
    ctl.run_forced("f", "k", &policy, job).await.unwrap();
    assert_eq!(t0.elapsed(), secs(7), "the forced run ran at once, for 1 s");
    // The forced run's end restarted the clock: a full 60 s from now.
    match ctl.run("f", "k", &policy, job).await {
        Err(JobError::CoolingDown { remaining, .. }) => assert_eq!(remaining, secs(60)),
        other => panic!("expected CoolingDown, got {other:?}"),
    }
    // A forced run that fails bypasses too, and leaves the failure span.
    let failing = |_ctx| async { Err::<(), _>(RunError::permanent(io::Error::other("no"))) };
    assert!(matches!(
        ctl.run_forced("f", "k", &policy, failing).await,
        Err(JobError::Failed { .. })
    ));
    match ctl.run("f", "k", &policy, job).await {
        Err(JobError::CoolingDown { remaining, .. }) => assert_eq!(remaining, secs(30)),
        other => panic!("expected CoolingDown, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Budget.

/// A job that waits forever but honours its token fails with `BudgetExceeded` at exactly the
/// budget, and its `ctx.cancelled()` fired at that instant.
#[tokio::test(start_paused = true)]
async fn budget_cancels_a_cooperative_job_at_exactly_the_budget() {
    let ctl = controller();
    let policy = JobPolicy::builder().budget(secs(5)).build().unwrap();
    let cancelled_at = Arc::new(Mutex::new(None::<Instant>));
    let job = {
        let cancelled_at = cancelled_at.clone();
        move |ctx: job_runtime::JobContext| {
            let cancelled_at = cancelled_at.clone();
            async move {
                assert_eq!(ctx.remaining(), Some(secs(5)));
                if sleep_or_cancel(&ctx, FOREVER).await {
                    *cancelled_at.lock().unwrap() = Some(Instant::now());
                    assert!(ctx.is_cancelled());
                }
                Err::<(), _>(RunError::msg("stopped"))
            }
        }
    };
    let t0 = Instant::now();
    let (budget, last) = expect_budget_exceeded(ctl.run("b", "k", &policy, job).await);
    assert_eq!(t0.elapsed(), secs(5));
    assert_eq!(budget, secs(5));
    assert!(
        last.is_none(),
        "no attempt failed before the budget ran out: {last:?}"
    );
    assert_eq!(*cancelled_at.lock().unwrap(), Some(t0 + secs(5)));
    assert!(ctl.try_acquire("b", "k").is_some(), "the lock is free");
}

/// A job that ignores its token is abandoned (its future dropped) after the grace period:
/// budget 5 s + grace 1 s = 6 s. The lock is free afterwards and the key runs again.
#[tokio::test(start_paused = true)]
async fn budget_abandons_a_job_ignoring_cancellation_after_the_grace() {
    for grace in [secs(1), Duration::ZERO, ms(2500)] {
        let ctl = controller();
        let policy = JobPolicy::builder()
            .budget(secs(5))
            .abandon_grace(grace)
            .build()
            .unwrap();
        let dropped_at = Arc::new(Mutex::new(None::<Instant>));
        let token = Arc::new(Mutex::new(None::<CancellationToken>));
        let job = {
            let (dropped_at, token) = (dropped_at.clone(), token.clone());
            move |ctx: job_runtime::JobContext| {
                let flag = DropFlag(dropped_at.clone());
                *token.lock().unwrap() = Some(ctx.token().clone());
                async move {
                    let _flag = flag;
                    tokio::time::sleep(FOREVER).await; // never looks at ctx.cancelled()
                    Ok::<_, RunError>(())
                }
            }
        };
        let t0 = Instant::now();
        let (budget, _) = expect_budget_exceeded(ctl.run("b", "k", &policy, job).await);
        assert_eq!(budget, secs(5));
        assert_eq!(t0.elapsed(), secs(5) + grace, "grace {grace:?}");
        assert_eq!(*dropped_at.lock().unwrap(), Some(t0 + secs(5) + grace));
        assert!(token.lock().unwrap().as_ref().unwrap().is_cancelled());
        assert!(ctl.try_acquire("b", "k").is_some(), "the lock is free");
        assert_eq!(ctl.footprint().flights, 0);
        // The key runs again at once (no cooldown in this policy).
        ctl.run("b", "k", &policy, |_ctx| async { Ok::<_, RunError>(()) })
            .await
            .unwrap();
    }
}

/// The budget starts once the per-key lock is held: time spent waiting for a key held
/// elsewhere (`lock_wait`) is not counted (as `JobPolicyBuilder::budget` documents).
#[tokio::test(start_paused = true)]
async fn budget_starts_after_the_lock() {
    let ctl = controller();
    let policy = JobPolicy::builder()
        .budget(secs(5))
        .lock_wait(secs(10))
        .build()
        .unwrap();
    let guard = ctl.try_acquire("b", "k").unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(secs(3)).await;
        drop(guard);
    });
    let t0 = Instant::now();
    let r = ctl
        .run("b", "k", &policy, |ctx| async move {
            sleep_or_cancel(&ctx, FOREVER).await;
            Ok::<_, RunError>(())
        })
        .await;
    expect_budget_exceeded(r);
    assert_eq!(t0.elapsed(), secs(3) + secs(5));
    release.await.unwrap();
}

/// The attempt timeout cancels each attempt; the timeouts are retried and end up inside
/// `RetriesExhausted`.
#[tokio::test(start_paused = true)]
async fn attempt_timeouts_end_in_retries_exhausted() {
    let ctl = controller();
    let retry = RetryPolicy::builder()
        .max_attempts(3)
        .base_delay(ms(100))
        .max_delay(secs(1))
        .jitter(Jitter::None)
        .build()
        .unwrap();
    let policy = JobPolicy::builder()
        .attempt_timeout(secs(1))
        .retry(retry)
        .build()
        .unwrap();
    let starts = Starts::default();
    let job = {
        let starts = starts.clone();
        move |ctx: job_runtime::JobContext| {
            let starts = starts.clone();
            async move {
                starts.push(Instant::now());
                assert_eq!(ctx.remaining(), None, "no budget, only an attempt timeout");
                sleep_or_cancel(&ctx, FOREVER).await;
                Err::<(), _>(RunError::msg("stopped"))
            }
        }
    };
    let t0 = Instant::now();
    match ctl.run("t", "k", &policy, job).await {
        Err(JobError::RetriesExhausted { attempts, last, .. }) => {
            assert_eq!(attempts, 3);
            match *last {
                JobError::AttemptTimeout {
                    attempt, timeout, ..
                } => {
                    assert_eq!(attempt, 3);
                    assert_eq!(timeout, secs(1));
                }
                other => panic!("expected AttemptTimeout inside, got {other:?}"),
            }
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    // 1 s attempt, 100 ms, 1 s attempt, 200 ms, 1 s attempt.
    assert_eq!(starts.offsets(t0), [ms(0), ms(1100), ms(2300)]);
    assert_eq!(t0.elapsed(), ms(3300));
    assert_eq!(ctl.status("t", "k").unwrap().retries, 2);
}

/// An attempt timeout shorter than the budget is the one that fires; the budget then ends the
/// run when what is left cannot hold the next delay.
#[tokio::test(start_paused = true)]
async fn attempt_timeout_within_budget() {
    let ctl = controller();
    let retry = RetryPolicy::builder()
        .max_attempts(10)
        .base_delay(ms(500))
        .max_delay(ms(500))
        .jitter(Jitter::None)
        .build()
        .unwrap();
    let policy = JobPolicy::builder()
        .budget(secs(5))
        .attempt_timeout(secs(2))
        .retry(retry)
        .build()
        .unwrap();
    let starts = Starts::default();
    let job = {
        let starts = starts.clone();
        move |ctx: job_runtime::JobContext| {
            let starts = starts.clone();
            async move {
                starts.push(Instant::now());
                sleep_or_cancel(&ctx, FOREVER).await;
                Err::<(), _>(RunError::msg("stopped"))
            }
        }
    };
    let t0 = Instant::now();
    let (_, last) = expect_budget_exceeded(ctl.run("t", "k", &policy, job).await);
    // Attempts at 0 s and 2.5 s time out at 2 s and 4.5 s; at 4.5 s the 0.5 s delay reaches
    // the deadline, so the run ends at once with the last timeout as `last`.
    assert_eq!(starts.offsets(t0), [ms(0), ms(2500)]);
    assert_eq!(t0.elapsed(), ms(4500));
    assert!(
        matches!(last, Some(JobError::AttemptTimeout { attempt: 2, .. })),
        "{last:?}"
    );
}

/// A retry never sleeps past the budget: when the next delay would cross the deadline the run
/// ends at once, with the last attempt's error as `last`.
#[tokio::test(start_paused = true)]
async fn retry_never_sleeps_past_the_budget() {
    let ctl = controller();
    let retry = RetryPolicy::builder()
        .max_attempts(10)
        .base_delay(secs(1))
        .max_delay(secs(60))
        .jitter(Jitter::None)
        .build()
        .unwrap();
    let policy = JobPolicy::builder()
        .budget(secs(5))
        .retry(retry)
        .build()
        .unwrap();
    let starts = Starts::default();
    let job = {
        let starts = starts.clone();
        move |ctx: job_runtime::JobContext| {
            let starts = starts.clone();
            async move {
                starts.push(Instant::now());
                Err::<(), _>(RunError::msg(format!("boom {}", ctx.attempt())))
            }
        }
    };
    let t0 = Instant::now();
    let (budget, last) = expect_budget_exceeded(ctl.run("r", "k", &policy, job).await);
    // Attempts at 0, 1, 3 s; the next delay (4 s) would end at 7 s > 5 s.
    assert_eq!(starts.offsets(t0), [secs(0), secs(1), secs(3)]);
    assert_eq!(
        t0.elapsed(),
        secs(3),
        "ended at once, no sleep towards the deadline"
    );
    assert_eq!(budget, secs(5));
    assert_eq!(
        failed_message(&last.expect("the last error is kept")),
        "boom 3"
    );

    // The same with a server-given delay longer than the whole budget.
    let t1 = Instant::now();
    let r = ctl
        .run("r", "k2", &policy, |_ctx| async {
            Err::<(), _>(RunError::msg("429").with_retry_after(secs(10)))
        })
        .await;
    let (_, last) = expect_budget_exceeded(r);
    assert_eq!(t1.elapsed(), Duration::ZERO);
    assert_eq!(failed_message(&last.unwrap()), "429");

    // A delay landing exactly on the deadline ends the run too (the attempt after it could
    // not start): budget 3 s, attempts at 0 and 1 s, then a 2 s delay to exactly 3 s.
    let policy3 = JobPolicy::builder()
        .budget(secs(3))
        .retry(policy.retry().clone())
        .build()
        .unwrap();
    let starts = Starts::default();
    let job = {
        let starts = starts.clone();
        move |_ctx| {
            let starts = starts.clone();
            async move {
                starts.push(Instant::now());
                Err::<(), _>(RunError::msg("boom"))
            }
        }
    };
    let t2 = Instant::now();
    expect_budget_exceeded(ctl.run("r", "k3", &policy3, job).await);
    assert_eq!(starts.offsets(t2), [secs(0), secs(1)]);
    assert_eq!(t2.elapsed(), secs(1));
}

/// What one attempt of the randomized job does.
#[derive(Debug, Clone, Copy)]
enum Act {
    FailNow,
    SleepThenFail(Duration),
    WaitHonouring,
    WaitIgnoring,
    SleepIgnoringThenFail(Duration),
    RetryAfter(Duration),
    SucceedAfter(Duration),
}

/// Over many seeds and configurations (failing jobs, slow jobs, jobs ignoring their token,
/// retry delays, server delays, attempt timeouts) a run never takes longer than its budget
/// plus the abandon grace, and never longer than the budget when the job honours its token.
#[tokio::test(start_paused = true)]
async fn budget_bounds_every_run_across_seeds() {
    let ctl = controller();
    // How the cases ended, so the test can show every path was taken.
    let (mut ok, mut ended_early, mut budget_ends, mut exhausted, mut in_grace) = (0, 0, 0, 0, 0);
    for case in 0..1000u64 {
        let mut rng = fastrand::Rng::with_seed(case);
        let budget = ms(rng.u64(50..=8_000));
        let grace = ms(rng.u64(0..=2_000));
        let attempt_timeout = rng.bool().then(|| ms(rng.u64(10..=4_000)));
        let base = ms(rng.u64(1..=2_000));
        let max = base + ms(rng.u64(0..=4_000));
        let jitter = [
            Jitter::None,
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
        ][rng.usize(0..4)];
        let max_attempts = rng.u32(1..=12);
        let may_ignore = rng.u8(0..4) == 0;
        let acts: Vec<Act> = (0..max_attempts)
            .map(|_| match rng.u8(0..10) {
                0..=2 => Act::FailNow,
                3..=4 => Act::SleepThenFail(ms(rng.u64(0..=3_000))),
                5..=6 => Act::WaitHonouring,
                7 if may_ignore => match rng.bool() {
                    true => Act::WaitIgnoring,
                    false => Act::SleepIgnoringThenFail(ms(rng.u64(0..=3_000))),
                },
                7 => Act::WaitHonouring,
                8 => Act::RetryAfter(ms(rng.u64(0..=3_000))),
                _ => Act::SucceedAfter(ms(rng.u64(0..=3_000))),
            })
            .collect();
        let retry = RetryPolicy::builder()
            .max_attempts(max_attempts)
            .base_delay(base)
            .max_delay(max)
            .jitter(jitter)
            .seed(rng.u64(..))
            .build()
            .unwrap();
        let mut b = JobPolicy::builder()
            .budget(budget)
            .abandon_grace(grace)
            .retry(retry);
        if let Some(t) = attempt_timeout {
            b = b.attempt_timeout(t);
        }
        let policy = b.build().unwrap();
        let attempts = Arc::new(AtomicU32::new(0));
        let job = {
            let (acts, attempts) = (Arc::new(acts.clone()), attempts.clone());
            move |ctx: job_runtime::JobContext| {
                let (acts, attempts) = (acts.clone(), attempts.clone());
                async move {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    let act = acts[(ctx.attempt() - 1) as usize];
                    match act {
                        Act::FailNow => Err(RunError::msg("fail")),
                        Act::SleepThenFail(d) => {
                            sleep_or_cancel(&ctx, d).await;
                            Err(RunError::msg("slow fail"))
                        }
                        Act::SleepIgnoringThenFail(d) => {
                            tokio::time::sleep(d).await;
                            Err(RunError::msg("slow fail, deaf"))
                        }
                        Act::WaitHonouring => {
                            sleep_or_cancel(&ctx, FOREVER).await;
                            Err(RunError::msg("cancelled"))
                        }
                        Act::WaitIgnoring => {
                            tokio::time::sleep(FOREVER).await;
                            Ok(())
                        }
                        Act::RetryAfter(d) => Err(RunError::msg("429").with_retry_after(d)),
                        Act::SucceedAfter(d) => {
                            if sleep_or_cancel(&ctx, d).await {
                                Err(RunError::msg("cancelled"))
                            } else {
                                Ok(())
                            }
                        }
                    }
                }
            }
        };
        let t0 = Instant::now();
        let r = ctl.run("prop", &case.to_string(), &policy, job).await;
        let elapsed = t0.elapsed();
        let ctx = format!(
            "case {case}: budget {budget:?} grace {grace:?} timeout {attempt_timeout:?} \
             base {base:?} max {max:?} {jitter:?} attempts {max_attempts} acts {acts:?} \
             → {elapsed:?} {r:?}"
        );
        assert!(elapsed <= budget + grace, "{ctx}");
        if !may_ignore {
            assert!(
                elapsed <= budget,
                "a cooperative job stays within the budget: {ctx}"
            );
        }
        assert!(attempts.load(Ordering::SeqCst) <= max_attempts, "{ctx}");
        match &r {
            Ok(_)
            | Err(JobError::BudgetExceeded { .. })
            | Err(JobError::RetriesExhausted { .. })
            | Err(JobError::Failed { .. })
            | Err(JobError::AttemptTimeout { .. }) => {}
            Err(other) => panic!("unexpected error {other:?}: {ctx}"),
        }
        if let Err(JobError::BudgetExceeded { budget: b, .. }) = &r {
            assert_eq!(*b, budget, "{ctx}");
            budget_ends += 1;
            if elapsed < budget {
                ended_early += 1; // ended early: the next delay would have crossed the deadline
            }
        }
        ok += usize::from(r.is_ok());
        exhausted += usize::from(matches!(r, Err(JobError::RetriesExhausted { .. })));
        in_grace += usize::from(elapsed > budget);
        assert!(
            ctl.try_acquire("prop", &case.to_string()).is_some(),
            "{ctx}"
        );
    }
    assert_eq!(ctl.footprint().flights, 0);
    assert_eq!(ctl.footprint().locks, 0);
    let seen = [ok, budget_ends, ended_early, exhausted, in_grace];
    assert!(
        seen.iter().all(|&n| n > 0),
        "every outcome is exercised: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Retries.

/// With `Jitter::None` the delays between attempts are exactly base, 2·base, 4·base, … capped
/// at max.
#[tokio::test(start_paused = true)]
async fn jitter_none_schedule_is_exact() {
    let ctl = controller();
    let retry = RetryPolicy::builder()
        .max_attempts(8)
        .base_delay(ms(100))
        .max_delay(secs(1))
        .jitter(Jitter::None)
        .build()
        .unwrap();
    let policy = JobPolicy::builder().retry(retry).build().unwrap();
    let starts = Starts::default();
    let job = {
        let starts = starts.clone();
        move |_ctx| {
            let starts = starts.clone();
            async move {
                starts.push(Instant::now());
                Err::<(), _>(RunError::msg("down"))
            }
        }
    };
    let t0 = Instant::now();
    match ctl.run("j", "k", &policy, job).await {
        Err(JobError::RetriesExhausted { attempts, last, .. }) => {
            assert_eq!(attempts, 8);
            assert_eq!(failed_message(&last), "down");
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    let starts = starts.get();
    let gaps: Vec<_> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        gaps,
        [100, 200, 400, 800, 1000, 1000, 1000].map(ms),
        "delays base·2ⁿ capped at max"
    );
    assert_eq!(starts[0], t0, "the first attempt starts at once");
    let st = ctl.status("j", "k").unwrap();
    assert_eq!((st.runs, st.retries, st.failures), (1, 7, 1));
}

/// `RunError::with_retry_after(d)` delays the next attempt by exactly `d`, overriding the
/// backoff (even beyond its max).
#[tokio::test(start_paused = true)]
async fn retry_after_delays_exactly() {
    let ctl = controller();
    let retry = RetryPolicy::builder()
        .max_attempts(4)
        .base_delay(secs(1))
        .max_delay(secs(2))
        .jitter(Jitter::None)
        .build()
        .unwrap();
    let policy = JobPolicy::builder().retry(retry).build().unwrap();
    let starts = Starts::default();
    let job = {
        let starts = starts.clone();
        move |ctx: job_runtime::JobContext| {
            let starts = starts.clone();
            async move {
                starts.push(Instant::now());
                match ctx.attempt() {
                    1 => Err(RunError::msg("429").with_retry_after(ms(7_250))),
                    2 => Err(RunError::msg("blip")), // backoff: n = 0 → 1 s
                    3 => Err(RunError::msg("429").with_retry_after(Duration::ZERO)),
                    _ => Ok(ctx.attempt()),
                }
            }
        }
    };
    let t0 = Instant::now();
    assert_eq!(*ctl.run("ra", "k", &policy, job).await.unwrap(), 4);
    assert_eq!(starts.offsets(t0), [ms(0), ms(7_250), ms(8_250), ms(8_250)]);
}

/// A permanent error stops after one attempt and comes back as `Failed` (not wrapped).
#[tokio::test(start_paused = true)]
async fn permanent_error_stops_after_one_attempt() {
    let ctl = controller();
    let policy = JobPolicy::builder().max_attempts(5).build().unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let job = {
        let calls = calls.clone();
        move |_ctx| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(RunError::permanent(io::Error::other("invalid input")))
            }
        }
    };
    let t0 = Instant::now();
    let err = ctl.run("p", "k", &policy, job).await.unwrap_err();
    assert_eq!(failed_message(&err), "invalid input");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(ctl.status("p", "k").unwrap().retries, 0);
}

/// A custom classifier overrides how the job marked its errors, and sees the attempt number.
#[tokio::test(start_paused = true)]
async fn custom_classifier_is_honoured() {
    let ctl = controller();
    let seen = Arc::new(Mutex::new(Vec::<(String, u32)>::new()));
    let retry = {
        let seen = seen.clone();
        RetryPolicy::builder()
            .max_attempts(10)
            .base_delay(secs(1))
            .max_delay(secs(1))
            .jitter(Jitter::None)
            .classifier(move |e: &RunError, attempt| {
                seen.lock().unwrap().push((e.to_string(), attempt));
                match attempt {
                    1 => Decision::RetryAfter(secs(3)), // even though the job said permanent
                    2 => Decision::Retry,               // backoff: 1 s
                    _ => Decision::Abort,               // even though retries are left
                }
            })
            .build()
            .unwrap()
    };
    let policy = JobPolicy::builder().retry(retry).build().unwrap();
    let starts = Starts::default();
    let job = {
        let starts = starts.clone();
        move |ctx: job_runtime::JobContext| {
            let starts = starts.clone();
            async move {
                starts.push(Instant::now());
                Err::<(), _>(RunError::permanent(io::Error::other(format!(
                    "e{}",
                    ctx.attempt()
                ))))
            }
        }
    };
    let t0 = Instant::now();
    match ctl.run("c", "k", &policy, job).await {
        Err(JobError::RetriesExhausted { attempts, last, .. }) => {
            assert_eq!(attempts, 3);
            assert_eq!(failed_message(&last), "e3");
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    assert_eq!(starts.offsets(t0), [secs(0), secs(3), secs(4)]);
    assert_eq!(
        *seen.lock().unwrap(),
        [("e1".into(), 1), ("e2".into(), 2), ("e3".into(), 3)]
    );
}

/// A panic is never retried — neither one in the job's future nor one while creating it — and
/// even a classifier that always retries is not consulted.
#[tokio::test(start_paused = true)]
async fn panic_is_never_retried() {
    let ctl = controller();
    let consulted = Arc::new(AtomicBool::new(false));
    let retry = {
        let consulted = consulted.clone();
        RetryPolicy::builder()
            .max_attempts(5)
            .base_delay(ms(10))
            .classifier(move |_, _| {
                consulted.store(true, Ordering::SeqCst);
                Decision::Retry
            })
            .build()
            .unwrap()
    };
    let policy = JobPolicy::builder().retry(retry).build().unwrap();

    let calls = Arc::new(AtomicU32::new(0));
    let in_future = {
        let calls = calls.clone();
        move |_ctx| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(ms(5)).await;
                if calls.load(Ordering::SeqCst) > 0 {
                    panic!("bug in the job");
                }
                Ok::<_, RunError>(())
            }
        }
    };
    match ctl.run("pan", "k", &policy, in_future).await {
        Err(JobError::Panicked { message, .. }) => assert_eq!(message, "bug in the job"),
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let sync_calls = Arc::new(AtomicU32::new(0));
    let while_creating = {
        let sync_calls = sync_calls.clone();
        move |_ctx| -> std::future::Ready<Result<(), RunError>> {
            sync_calls.fetch_add(1, Ordering::SeqCst);
            panic!("bug before the future");
        }
    };
    match ctl.run("pan", "k2", &policy, while_creating).await {
        Err(JobError::Panicked { message, .. }) => assert_eq!(message, "bug before the future"),
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert_eq!(sync_calls.load(Ordering::SeqCst), 1);
    assert!(!consulted.load(Ordering::SeqCst));
    assert!(ctl.try_acquire("pan", "k").is_some());
    assert!(ctl.try_acquire("pan", "k2").is_some());
}

// ---------------------------------------------------------------------------------------------
// Rate limits.

/// Checks the GCRA bound: in every window `[starts[i], starts[j]]` the number of starts is at
/// most `burst + w·count/per` where `w` is the window's length. Exact integer arithmetic:
/// `(n − burst)·per ≤ w·count`.
fn assert_gcra_bound(starts: &[Instant], rate: RateLimit) {
    let (count, per, burst) = (
        u128::from(rate.count.get()),
        rate.per.as_nanos(),
        u128::from(rate.burst.get()),
    );
    for i in 0..starts.len() {
        for j in i..starts.len() {
            let n = (j - i + 1) as u128;
            let w = (starts[j] - starts[i]).as_nanos();
            assert!(
                n <= burst || (n - burst) * per <= w * count,
                "{n} starts within {:?} exceed {rate}",
                starts[j] - starts[i]
            );
        }
    }
}

/// Launches `n` runs on distinct keys at once and returns every attempt's start instant.
async fn launch_many(ctl: &JobRuntimeController, policy: &JobPolicy, n: usize) -> Vec<Instant> {
    let starts = Starts::default();
    let runs = (0..n).map(|i| {
        let starts = starts.clone();
        let key = format!("k{i}");
        async move {
            ctl.run("rl", &key, policy, move |_ctx| {
                let starts = starts.clone();
                async move {
                    starts.push(Instant::now());
                    Ok::<_, RunError>(())
                }
            })
            .await
        }
    });
    let results = join_all(runs).await;
    assert!(results.iter().all(Result::is_ok), "all {n} runs finish");
    let starts = starts.get();
    assert_eq!(starts.len(), n);
    starts
}

/// A global rate limit of 5/s: 100 runs on distinct keys all finish, the first five start at
/// once, then one every 200 ms, and no window holds more starts than the GCRA bound.
#[tokio::test(start_paused = true)]
async fn global_rate_limit_bounds_every_window() {
    let rate = RateLimit::parse("5/s").unwrap();
    let ctl = JobRuntimeController::new(RuntimeConfig::default().with_rate_limit(rate));
    let t0 = Instant::now();
    let starts = launch_many(&ctl, &JobPolicy::default(), 100).await;
    assert_gcra_bound(&starts, rate);
    assert!(
        starts[..5].iter().all(|&t| t == t0),
        "the burst starts at once"
    );
    assert_eq!(starts[5] - t0, ms(200));
    assert_eq!(*starts.last().unwrap() - t0, ms(95 * 200));
}

/// The same bound with a burst smaller than the count.
#[tokio::test(start_paused = true)]
async fn rate_limit_with_small_burst_bounds_every_window() {
    let rate = RateLimit::parse("10/2s burst 3").unwrap();
    let ctl = JobRuntimeController::new(RuntimeConfig::default().with_rate_limit(rate));
    let t0 = Instant::now();
    let starts = launch_many(&ctl, &JobPolicy::default(), 60).await;
    assert_gcra_bound(&starts, rate);
    assert_eq!(starts.iter().filter(|&&t| t == t0).count(), 3);
    assert_eq!(*starts.last().unwrap() - t0, ms(57 * 200));
}

/// A group rate limit applies to the group's jobs only.
#[tokio::test(start_paused = true)]
async fn group_rate_limit_bounds_every_window() {
    let rate = RateLimit::parse("5/s").unwrap();
    let ctl = JobRuntimeController::new(RuntimeConfig::default().rate_limit_group("api", rate));
    let grouped = JobPolicy::builder().group("api").build().unwrap();
    let t0 = Instant::now();
    let starts = launch_many(&ctl, &grouped, 100).await;
    assert_gcra_bound(&starts, rate);
    assert_eq!(*starts.last().unwrap() - t0, ms(95 * 200));

    // Outside the group: no limit, all 100 at once.
    let t1 = Instant::now();
    let free = JobRuntimeController::new(RuntimeConfig::default().rate_limit_group("api", rate));
    let starts = launch_many(&free, &JobPolicy::default(), 100).await;
    assert!(starts.iter().all(|&t| t == t1));
}

/// Waiting for a rate token counts against the budget: a budget shorter than the wait ends the
/// run with `BudgetExceeded` at exactly the budget, without running the job.
#[tokio::test(start_paused = true)]
async fn rate_token_wait_counts_against_the_budget() {
    let rate = RateLimit::parse("1/10s").unwrap();
    for (cfg, group) in [
        (RuntimeConfig::default().with_rate_limit(rate), None),
        (
            RuntimeConfig::default().rate_limit_group("api", rate),
            Some("api"),
        ),
    ] {
        let ctl = JobRuntimeController::new(cfg);
        let mk = |budget: Option<Duration>| {
            let mut p = JobPolicy::builder();
            if let Some(g) = group {
                p = p.group(g);
            }
            if let Some(b) = budget {
                p = p.budget(b);
            }
            p.build().unwrap()
        };
        let calls = Arc::new(AtomicU32::new(0));
        let job = {
            let calls = calls.clone();
            move |_ctx| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, RunError>(())
                }
            }
        };
        let t0 = Instant::now();
        ctl.run("rl", "a", &mk(None), job.clone()).await.unwrap();
        assert_eq!(t0.elapsed(), Duration::ZERO);
        // The next token is 10 s away; a 2 s budget cannot wait for it.
        let (budget, last) =
            expect_budget_exceeded(ctl.run("rl", "b", &mk(Some(secs(2))), job.clone()).await);
        assert_eq!((budget, last.is_none()), (secs(2), true));
        assert_eq!(t0.elapsed(), secs(2));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the job never ran");
        // A budget that covers the wait runs when the token comes, at 10 s.
        ctl.run("rl", "c", &mk(Some(secs(9))), job.clone())
            .await
            .unwrap();
        assert_eq!(t0.elapsed(), secs(10));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}

/// A run cancelled by shutdown while it waits for a rate token ends as cancelled, not hung.
#[tokio::test(start_paused = true)]
async fn shutdown_while_waiting_for_a_token() {
    let rate = RateLimit::parse("1/1h").unwrap();
    let ctl = JobRuntimeController::new(RuntimeConfig::default().with_rate_limit(rate));
    let ok = |_ctx| async { Ok::<_, RunError>(()) };
    ctl.run("s", "a", &JobPolicy::default(), ok).await.unwrap();
    let waiting = {
        let ctl = ctl.clone();
        tokio::spawn(async move { ctl.run("s", "b", &JobPolicy::default(), ok).await })
    };
    tokio::time::sleep(secs(1)).await;
    assert!(!ctl.shutdown(secs(1)).await);
    assert!(matches!(
        waiting.await.unwrap(),
        Err(JobError::Cancelled {
            reason: CancelReason::Shutdown,
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// Heartbeats: a silent job is stuck
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_job_that_keeps_beating_is_never_stuck() {
    let ctl = controller();
    let policy = JobPolicy::builder()
        .heartbeat_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let start = Instant::now();
    let v = ctl
        .run("beat", "k", &policy, |ctx| async move {
            for i in 0..10 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if i % 2 == 0 {
                    ctx.heartbeat(Some("alive"));
                } else {
                    ctx.progress(i, 10);
                }
            }
            Ok::<_, RunError>(7)
        })
        .await
        .unwrap();
    assert_eq!(*v, 7);
    assert_eq!(start.elapsed(), Duration::from_secs(20));
}

#[tokio::test(start_paused = true)]
async fn a_silent_job_is_stuck_its_token_fires_and_the_run_fails_without_retry() {
    let ctl = controller();
    let policy = JobPolicy::builder()
        .heartbeat_timeout(Duration::from_secs(3))
        .max_attempts(3)
        .abandon_grace(Duration::from_secs(1))
        .build()
        .unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    // Beats twice, then hangs ignoring its token: stuck 3 s after the last beat (t = 5 s),
    // abandoned 1 s later.
    let job = {
        let attempts = Arc::clone(&attempts);
        move |ctx: JobContext| {
            attempts.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                ctx.heartbeat(None);
                tokio::time::sleep(Duration::from_secs(1)).await;
                ctx.heartbeat(Some("last words"));
                std::future::pending::<()>().await;
                Ok::<u32, RunError>(0)
            }
        }
    };
    let start = Instant::now();
    let run = tokio::spawn({
        let (ctl, policy) = (ctl.clone(), policy.clone());
        async move { ctl.run("hang", "k", &policy, job).await }
    });
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let st = ctl.status("hang", "k").unwrap();
    assert_eq!(st.state, RunState::Stuck, "{st:?}");
    assert_eq!(st.heartbeat_details.as_deref(), Some("last words"));
    let err = run.await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(6));
    match err.clone() {
        JobError::Stuck {
            attempt,
            silent_for,
            timeout,
            ..
        } => {
            assert_eq!(
                (attempt, silent_for, timeout),
                (1, Duration::from_secs(3), Duration::from_secs(3))
            );
        }
        other => panic!("expected Stuck, got {other:?}"),
    }
    assert!(err.to_string().contains("no heartbeat for 3s"), "{err}");
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        1,
        "a stuck run is not retried"
    );
    let st = ctl.status("hang", "k").unwrap();
    assert_eq!(
        (st.state, st.last_error_kind),
        (RunState::Idle, Some("stuck"))
    );
    assert!(ctl.try_acquire("hang", "k").is_some(), "the lock is free");
}

#[tokio::test(start_paused = true)]
async fn a_stuck_job_that_heeds_its_token_ends_at_the_timeout() {
    let ctl = controller();
    let policy = JobPolicy::builder()
        .heartbeat_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let start = Instant::now();
    let err = ctl
        .run("heed", "k", &policy, |ctx| async move {
            ctx.cancelled().await;
            Err::<u32, _>(RunError::msg("stopped"))
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "stuck");
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}
