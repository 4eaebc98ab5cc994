//! Contracts of `JobRuntimeController` in one process: single-flight under load, callers that
//! give up, panics, bounded per-key state, concurrency limits and permits, overlap policies,
//! cooldowns and status.
//!
//! Everything timing-based runs on paused time (`start_paused = true`), so it is exact and
//! deterministic; the two multi-threaded tests use real time only to poll, with a bound.

mod support;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use job_runtime::error::CancelReason;
use job_runtime::time::{Clock, Instant};
use job_runtime::{
    JobContext, JobError, JobPolicy, JobRuntimeController, Overlap, RunError, RunState,
    RuntimeConfig,
};
use support::{Bodies, Gate, gated_job, settle, wait_until, within, yield_until};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap()
}

/// A job body that panics (its return type says what it would have returned).
fn explode() -> Result<usize, RunError> {
    panic!("job exploded on purpose")
}

fn coalesced(ctl: &JobRuntimeController, job: &str, key: &str) -> u64 {
    ctl.status(job, key).map_or(0, |s| s.coalesced)
}

fn assert_idle_maps(ctl: &JobRuntimeController) {
    let fp = ctl.footprint();
    assert_eq!(fp.flights, 0, "no run in flight: {fp:?}");
    assert_eq!(fp.locks, 0, "no lock held: {fp:?}");
}

// ---------------------------------------------------------------------------------------------
// 1. Single-flight under load
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_concurrent_callers_share_one_run_and_one_arc() {
    const CALLERS: usize = 10_000;
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let policy = Arc::new(JobPolicy::default());
    let bodies = Bodies::new();
    let gate = Gate::new();

    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (ctl, policy) = (ctl.clone(), Arc::clone(&policy));
            let job = gated_job(&bodies, &gate);
            tokio::spawn(async move { ctl.run("fanout", "k", &policy, job).await })
        })
        .collect();

    // The body holds the run open until every follower has joined it.
    wait_until("all 9,999 followers joined", secs(60), || {
        coalesced(&ctl, "fanout", "k") == (CALLERS - 1) as u64
    })
    .await;
    wait_until("the body started", secs(10), || bodies.started() == 1).await;
    let st = ctl.status("fanout", "k").unwrap();
    assert_eq!(st.state, RunState::Running);
    assert_eq!(st.runs, 1);
    gate.open();

    let mut results = Vec::with_capacity(CALLERS);
    for t in tasks {
        results.push(t.await.expect("caller task").expect("run succeeded"));
    }
    let first = &results[0];
    assert_eq!(**first, 1, "the value of the first (and only) body");
    assert!(
        results.iter().all(|r| Arc::ptr_eq(first, r)),
        "every caller got the same Arc"
    );
    assert_eq!(bodies.started(), 1, "the body ran exactly once");
    assert_eq!(bodies.max(), 1);
    let st = ctl.status("fanout", "k").unwrap();
    assert_eq!((st.runs, st.successes, st.failures), (1, 1, 0));
    assert_eq!(st.coalesced, (CALLERS - 1) as u64);
    assert_idle_maps(&ctl);
}

// ---------------------------------------------------------------------------------------------
// Per-key locks: `try_acquire` / `acquire` take the same lock as the key's runs
// ---------------------------------------------------------------------------------------------

/// A manual lock and the key's runs exclude each other both ways, a waiter gets the lock when
/// it is given back (not by polling), and every holder's fencing token is larger than the one
/// before, run or not. A key that never ran keeps no state once its lock is given back.
#[tokio::test(start_paused = true)]
async fn manual_locks_and_runs_take_one_lock_per_key() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let token_job = |ctx: JobContext| async move { Ok::<_, RunError>(ctx.fencing_token()) };

    // A key that never ran: its entry exists while the lock is held, and goes with it.
    let manual = ctl.try_acquire("j", "k").expect("free");
    assert_eq!((manual.job(), manual.key()), ("j", "k"));
    assert!(ctl.try_acquire("j", "k").is_none(), "held");
    assert!(
        ctl.try_acquire("j", "other").is_some(),
        "other keys are free"
    );
    assert!(
        ctl.try_acquire("other", "k").is_some(),
        "other jobs' keys too"
    );
    assert_eq!((ctl.len(), ctl.footprint().locks), (1, 1));
    assert!(ctl.status("j", "k").is_none(), "a lock alone is no status");
    assert!(ctl.statuses().is_empty());
    let err = ctl.acquire("j", "k", ms(50)).await.unwrap_err();
    assert!(
        matches!(&err, JobError::LockTimeout { job, key, waited } if &**job == "j" && &**key == "k" && *waited == ms(50)),
        "{err:?}"
    );
    assert!(
        ctl.acquire("j", "k", Duration::ZERO).await.is_err(),
        "zero: try once"
    );

    // A run meets the manual lock: `Busy` at once, or waits with a `lock_wait`.
    let busy = ctl.run("j", "k", &JobPolicy::default(), token_job).await;
    assert!(matches!(busy, Err(JobError::Busy { .. })), "{busy:?}");
    let patient = JobPolicy::builder().lock_wait(secs(10)).build().unwrap();
    let waiting = {
        let (ctl, patient) = (ctl.clone(), patient.clone());
        tokio::spawn(async move { ctl.run("j", "k", &patient, token_job).await })
    };
    tokio::time::sleep(secs(3)).await;
    assert!(!waiting.is_finished(), "the run waits for the lock");
    let t_manual = manual.token();
    drop(manual);
    let t_run = *within("run", secs(1), waiting).await.unwrap().unwrap();
    assert!(t_run > t_manual, "{t_run} > {t_manual}");

    // A manual caller meets a run holding the lock: none at once, or waits for the run's end.
    let (bodies, gate) = (Arc::new(Bodies::default()), Gate::new());
    let run = {
        let (ctl, job) = (ctl.clone(), gated_job(&bodies, &gate));
        tokio::spawn(async move { ctl.run("j", "k", &JobPolicy::default(), job).await })
    };
    yield_until("the run started", 1_000, || bodies.started() == 1).await;
    assert!(
        ctl.try_acquire("j", "k").is_none(),
        "the run holds the lock"
    );
    assert_eq!(ctl.footprint().locks, 1);
    let run_token = ctl.status("j", "k").unwrap().fencing_token.unwrap();
    assert!(run_token > t_run);
    let waiter = {
        let ctl = ctl.clone();
        tokio::spawn(async move { ctl.acquire("j", "k", secs(60)).await.map(|l| l.token()) })
    };
    tokio::time::sleep(secs(5)).await;
    assert!(!waiter.is_finished(), "the manual caller waits for the run");
    gate.open();
    assert_eq!(*within("run", secs(1), run).await.unwrap().unwrap(), 1);
    let t_after = within("waiter", secs(1), waiter).await.unwrap().unwrap();
    assert!(t_after > run_token, "{t_after} > {run_token}");

    // Nothing held; the runs' status stays for its retention as usual, then goes.
    let fp = ctl.footprint();
    assert_eq!((fp.flights, fp.locks), (0, 0), "{fp:?}");
    ctl.housekeep();
    assert!(ctl.is_empty(), "{:?}", ctl.footprint());
}

/// Runs and manual lockers on a few keys from many tasks on a 4-worker runtime: inside each
/// key's lock nobody else is (counted by both), and the tokens seen inside a key's lock,
/// in the order they were held, strictly increase. Afterwards no lock, run or entry is left.
#[test]
fn locks_exclude_runs_and_manual_holders_across_threads() {
    const KEYS: usize = 4;
    const TASKS: usize = 64;
    const ROUNDS: usize = 40;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let inside: Arc<Vec<AtomicUsize>> = Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    let seen: Arc<Vec<std::sync::Mutex<Vec<u64>>>> = Arc::new(
        (0..KEYS)
            .map(|_| std::sync::Mutex::new(Vec::new()))
            .collect(),
    );
    // Entered with the key's lock held: nobody else may be inside; the token is recorded in
    // the order the lock was held.
    fn enter(inside: &[AtomicUsize], seen: &[std::sync::Mutex<Vec<u64>>], k: usize, token: u64) {
        assert_eq!(
            inside[k].fetch_add(1, Ordering::SeqCst),
            0,
            "two holders of key {k}"
        );
        seen[k].lock().unwrap().push(token);
    }
    fn leave(inside: &[AtomicUsize], k: usize) {
        inside[k].fetch_sub(1, Ordering::SeqCst);
    }
    let (runs, manual) = rt.block_on(async {
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let (ctl, inside, seen) = (ctl.clone(), Arc::clone(&inside), Arc::clone(&seen));
                tokio::spawn(async move {
                    let (mut runs, mut manual) = (0usize, 0usize);
                    let patient = JobPolicy::builder().lock_wait(secs(60)).build().unwrap();
                    for r in 0..ROUNDS {
                        let k = (t + r) % KEYS;
                        let key = k.to_string();
                        match (t * 7 + r) % 4 {
                            0 => {
                                let lock = ctl.acquire("mix", &key, secs(60)).await.unwrap();
                                enter(&inside, &seen, k, lock.token());
                                tokio::task::yield_now().await;
                                leave(&inside, k);
                                manual += 1;
                            }
                            1 => {
                                if let Some(lock) = ctl.try_acquire("mix", &key) {
                                    enter(&inside, &seen, k, lock.token());
                                    leave(&inside, k);
                                    manual += 1;
                                }
                            }
                            _ => {
                                let (inside, seen) = (Arc::clone(&inside), Arc::clone(&seen));
                                let res = ctl
                                    .run("mix", &key, &patient, move |ctx: JobContext| {
                                        let (inside, seen) =
                                            (Arc::clone(&inside), Arc::clone(&seen));
                                        async move {
                                            enter(&inside, &seen, k, ctx.fencing_token());
                                            tokio::task::yield_now().await;
                                            leave(&inside, k);
                                            Ok::<_, RunError>(())
                                        }
                                    })
                                    .await;
                                assert!(res.is_ok(), "{res:?}");
                                runs += 1;
                            }
                        }
                    }
                    (runs, manual)
                })
            })
            .collect();
        let mut total = (0, 0);
        for t in tasks {
            let (r, m) = t.await.unwrap();
            total = (total.0 + r, total.1 + m);
        }
        total
    });
    assert!(
        runs > 0 && manual > 0,
        "both kinds ran: {runs} runs, {manual} manual"
    );
    for (k, tokens) in seen.iter().enumerate() {
        let tokens = tokens.lock().unwrap();
        assert!(
            tokens.windows(2).all(|w| w[0] < w[1]),
            "key {k}: tokens not increasing: {tokens:?}"
        );
    }
    let fp = ctl.footprint();
    assert_eq!((fp.flights, fp.locks), (0, 0), "{fp:?}");
    ctl.housekeep();
    assert!(ctl.is_empty(), "{:?}", ctl.footprint());
}

// ---------------------------------------------------------------------------------------------
// 2. Callers that give up
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn aborting_the_leader_neither_cancels_the_run_nor_lets_a_duplicate_start() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let bodies = Bodies::new();
    let gate = Gate::new();
    let call = || {
        let (ctl, job) = (ctl.clone(), gated_job(&bodies, &gate));
        async move { ctl.run("j", "k", &JobPolicy::default(), job).await }
    };

    let leader = tokio::spawn(call());
    yield_until("leader's body started", 1_000, || bodies.started() == 1).await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());

    // The run goes on without its leader.
    settle(100).await;
    assert_eq!(bodies.current(), 1, "the body was not dropped");
    let st = ctl.status("j", "k").unwrap();
    assert_eq!((st.state, st.runs), (RunState::Running, 1));
    let fp = ctl.footprint();
    assert_eq!(
        (fp.flights, fp.locks),
        (1, 1),
        "the run still holds its key"
    );

    // A caller arriving now joins that run instead of starting a second one.
    let follower = tokio::spawn(call());
    yield_until("follower joined", 1_000, || coalesced(&ctl, "j", "k") == 1).await;
    settle(100).await;
    assert_eq!(bodies.started(), 1);
    gate.open();
    let v = within("follower", secs(1), follower)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*v, 1, "the follower got the leader's run");
    assert_eq!((bodies.started(), bodies.max()), (1, 1));
    let st = ctl.status("j", "k").unwrap();
    assert_eq!((st.runs, st.successes, st.failures), (1, 1, 0));
    assert_idle_maps(&ctl);
}

#[tokio::test(start_paused = true)]
async fn callers_aborted_or_timed_out_in_waves_never_start_a_second_run() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let bodies = Bodies::new();
    let gate = Gate::new();
    let call = || {
        let (ctl, job) = (ctl.clone(), gated_job(&bodies, &gate));
        async move { ctl.run("j", "k", &JobPolicy::default(), job).await }
    };

    for wave in 0..5 {
        // Ten callers that are aborted once they wait…
        let aborted: Vec<_> = (0..10).map(|_| tokio::spawn(call())).collect();
        settle(50).await;
        for h in aborted {
            h.abort();
            assert!(h.await.unwrap_err().is_cancelled());
        }
        // …and ten that time out.
        let timed = join_all((1..=10).map(|i| tokio::time::timeout(ms(i), call()))).await;
        assert!(timed.iter().all(Result::is_err), "every timeout fired");

        assert_eq!(bodies.started(), 1, "wave {wave}: still one body");
        assert_eq!(bodies.current(), 1, "wave {wave}: the body runs on");
        let st = ctl.status("j", "k").unwrap();
        assert_eq!((st.state, st.runs), (RunState::Running, 1), "wave {wave}");
    }
    assert_eq!(coalesced(&ctl, "j", "k"), 99, "all but the first joined");

    let late = tokio::spawn(call());
    yield_until("late caller joined", 1_000, || {
        coalesced(&ctl, "j", "k") == 100
    })
    .await;
    gate.open();
    let v = within("late caller", secs(1), late).await.unwrap().unwrap();
    assert_eq!(*v, 1);
    assert_eq!((bodies.started(), bodies.max()), (1, 1));
    let st = ctl.status("j", "k").unwrap();
    assert_eq!((st.runs, st.successes), (1, 1));
    assert_idle_maps(&ctl);
}

#[tokio::test(start_paused = true)]
async fn when_every_caller_gives_up_the_run_still_completes_and_the_next_call_runs_again() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let bodies = Bodies::new();
    let job = {
        let bodies = Arc::clone(&bodies);
        move |_ctx: JobContext| {
            let bodies = Arc::clone(&bodies);
            async move {
                let me = bodies.enter();
                tokio::time::sleep(secs(1)).await;
                Ok::<_, RunError>(me.nth)
            }
        }
    };
    let policy = JobPolicy::default();

    let gave_up = join_all(
        (0..20).map(|_| tokio::time::timeout(ms(100), ctl.run("j", "k", &policy, job.clone()))),
    )
    .await;
    assert!(gave_up.iter().all(Result::is_err), "all 20 callers gave up");
    let st = ctl.status("j", "k").unwrap();
    assert_eq!((st.state, st.runs, st.successes), (RunState::Running, 1, 0));

    tokio::time::sleep(secs(1)).await;
    assert_eq!(bodies.finished(), 1, "the body ran to its end");
    let st = ctl.status("j", "k").unwrap();
    assert_eq!(st.state, RunState::Idle);
    assert_eq!((st.runs, st.successes, st.failures), (1, 1, 0));
    assert_idle_maps(&ctl);

    // Nothing is cached: the next call runs the body again.
    let v = ctl.run("j", "k", &policy, job.clone()).await.unwrap();
    assert_eq!(*v, 2);
    assert_eq!((bodies.started(), bodies.max()), (2, 1));
    assert_eq!(ctl.status("j", "k").unwrap().successes, 2);
}

/// The caller that starts a run polls it in its own task; when a runtime is dropped with that
/// task (and the run) half-way, the run ends as cancelled, its waiters hear so, and the key is
/// free for the next runtime: no lock or in-flight entry outlives the runtime.
#[test]
fn a_runtime_dropped_mid_run_ends_the_run_as_cancelled_and_frees_the_key() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let (bodies, gate) = (Bodies::new(), Gate::new());
    for flavour in ["current_thread", "multi_thread"] {
        let rt = match flavour {
            "current_thread" => tokio::runtime::Builder::new_current_thread(),
            _ => tokio::runtime::Builder::new_multi_thread(),
        }
        .enable_all()
        .build()
        .unwrap();
        let (leader, follower) = rt.block_on(async {
            let spawn = || {
                let (ctl, job) = (ctl.clone(), gated_job(&bodies, &gate));
                tokio::spawn(async move { ctl.run("rt", "k", &JobPolicy::default(), job).await })
            };
            let leader = spawn();
            let before = bodies.started();
            wait_until("the run started", secs(10), || bodies.started() > before).await;
            let follower = spawn();
            wait_until("the follower joined", secs(10), || {
                ctl.status("rt", "k").is_some_and(|s| s.coalesced >= 1)
            })
            .await;
            (leader, follower)
        });
        drop(rt);
        for h in [leader, follower] {
            assert!(h.is_finished(), "{flavour}: the runtime dropped its tasks");
        }
        assert_idle_maps(&ctl);
        assert_eq!(bodies.current(), 0, "{flavour}: the body was dropped");
        let st = ctl.status("rt", "k").unwrap();
        assert_eq!(st.state, RunState::Idle, "{flavour}");
        assert_eq!(st.last_error_kind, Some("cancelled"), "{flavour}");
    }
    // The key is free for a run on a new runtime.
    let rt = tokio::runtime::Runtime::new().unwrap();
    gate.open();
    let v = rt
        .block_on(ctl.run("rt", "k", &JobPolicy::default(), gated_job(&bodies, &gate)))
        .unwrap();
    assert_eq!(*v, 3);
    let st = ctl.status("rt", "k").unwrap();
    assert_eq!((st.runs, st.successes, st.failures), (3, 1, 2));
}

// ---------------------------------------------------------------------------------------------
// 3. Panics
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_panicking_job_fails_every_waiter_frees_the_key_and_caches_nothing() {
    const WAITERS: usize = 100;
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let bodies = Bodies::new();
    let gate = Gate::new();
    let panicking = {
        let (bodies, gate) = (Arc::clone(&bodies), gate.clone());
        move |_ctx: JobContext| {
            let (bodies, gate) = (Arc::clone(&bodies), gate.clone());
            async move {
                let _in = bodies.enter();
                gate.wait().await;
                explode()
            }
        }
    };
    let tasks: Vec<_> = (0..WAITERS)
        .map(|_| {
            let (ctl, job) = (ctl.clone(), panicking.clone());
            tokio::spawn(async move { ctl.run("boom", "k", &JobPolicy::default(), job).await })
        })
        .collect();
    yield_until("all waiters joined", 10_000, || {
        bodies.started() == 1 && coalesced(&ctl, "boom", "k") == (WAITERS - 1) as u64
    })
    .await;
    gate.open();
    for t in tasks {
        let err = within("waiter", secs(1), t).await.unwrap().unwrap_err();
        assert!(
            matches!(&err, JobError::Panicked { message, .. } if message.contains("job exploded on purpose")),
            "{err:?}"
        );
    }
    assert_eq!(bodies.started(), 1);

    // The key is free and nothing was left behind.
    assert_idle_maps(&ctl);
    let lock = ctl.try_acquire("boom", "k");
    assert!(lock.is_some(), "the lock was released");
    drop(lock);
    let st = ctl.status("boom", "k").unwrap();
    assert_eq!(
        (st.state, st.runs, st.successes, st.failures),
        (RunState::Idle, 1, 0, 1)
    );
    assert_eq!(st.last_error_kind, Some("panicked"));
    assert!(st.last_error.unwrap().contains("job exploded on purpose"));

    // The next call runs again (nothing cached), and other keys are unaffected.
    let again = Bodies::new();
    gate.open();
    let v = ctl
        .run("boom", "k", &JobPolicy::default(), gated_job(&again, &gate))
        .await
        .unwrap();
    assert_eq!((*v, again.started()), (1, 1));
    let other = ctl
        .run(
            "boom",
            "other",
            &JobPolicy::default(),
            gated_job(&again, &gate),
        )
        .await
        .unwrap();
    assert_eq!(*other, 2);
    assert_eq!(ctl.status("boom", "k").unwrap().successes, 1);
    assert_idle_maps(&ctl);
}

#[tokio::test(start_paused = true)]
async fn a_closure_that_panics_before_returning_a_future_is_a_failed_run() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let calls = Arc::new(AtomicUsize::new(0));
    let job = {
        let calls = Arc::clone(&calls);
        move |_ctx: JobContext| -> std::future::Ready<Result<usize, RunError>> {
            calls.fetch_add(1, Ordering::SeqCst);
            panic!("closure exploded synchronously")
        }
    };
    // The closure panics in its first poll, so two callers can only share its run if they
    // wait for it together: both queue behind a run already in flight (overlap QueueOne), and
    // the queued run — started from the task of the run before it — is the panicking one.
    let policy = JobPolicy::builder()
        .overlap(Overlap::QueueOne)
        .build()
        .unwrap();
    let (bodies, gate) = (Bodies::new(), Gate::new());
    let first = tokio::spawn({
        let (ctl, policy, job) = (ctl.clone(), policy.clone(), gated_job(&bodies, &gate));
        async move { ctl.run("sync", "k", &policy, job).await }
    });
    yield_until("the first run started", 100, || bodies.started() == 1).await;
    let queued = || {
        let (ctl, policy, job) = (ctl.clone(), policy.clone(), job.clone());
        tokio::spawn(async move { ctl.run("sync", "k", &policy, job).await })
    };
    let (a, b) = (queued(), queued());
    yield_until("both callers queued", 100, || {
        ctl.status("sync", "k").is_some_and(|s| s.coalesced == 2)
    })
    .await;
    gate.open();
    assert_eq!(*first.await.unwrap().unwrap(), 1);
    for r in [a.await.unwrap(), b.await.unwrap()] {
        let err = r.unwrap_err();
        assert!(
            matches!(&err, JobError::Panicked { message, .. } if message.contains("closure exploded synchronously")),
            "{err:?}"
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the two callers shared one run"
    );
    assert_idle_maps(&ctl);
    assert!(ctl.try_acquire("sync", "k").is_some());

    // Next call runs again; the controller goes on.
    let err = ctl
        .run("sync", "k", &JobPolicy::default(), job.clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "panicked");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let v = ctl
        .run("sync", "k", &JobPolicy::default(), |_ctx| async {
            Ok::<usize, RunError>(7)
        })
        .await
        .unwrap();
    assert_eq!(*v, 7);
    let st = ctl.status("sync", "k").unwrap();
    assert_eq!((st.runs, st.successes, st.failures), (4, 2, 2));
}

// ---------------------------------------------------------------------------------------------
// 4. Per-key state is bounded
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_million_idle_keys_cost_nothing_once_their_cooldown_has_passed() {
    const KEYS: usize = 1_000_000;
    const BATCH: usize = 10_000;
    let started = std::time::Instant::now();
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let policy = JobPolicy::builder().cooldown(secs(1)).build().unwrap();
    let t0 = Instant::now();

    let mut peak = ctl.footprint();
    for batch in 0..KEYS / BATCH {
        let (ctl, policy) = (&ctl, &policy);
        let results = join_all((batch * BATCH..(batch + 1) * BATCH).map(|i| async move {
            let key = i.to_string();
            ctl.run("bulk", &key, policy, |_ctx| async { Ok::<u8, RunError>(1) })
                .await
        }))
        .await;
        assert!(results.iter().all(Result::is_ok), "batch {batch}");
        let fp = ctl.footprint();
        peak.key_capacity = peak.key_capacity.max(fp.key_capacity);
    }
    assert!(
        Instant::now() - t0 < secs(1),
        "no cooldown passed while driving the keys"
    );

    // Before the cooldown passes every key is retained (and refuses to run again).
    assert_eq!(ctl.len(), KEYS);
    assert_eq!(ctl.housekeep(), 0, "cooling keys are kept");
    assert_eq!(ctl.footprint().keys, KEYS);
    assert_idle_maps(&ctl);
    assert_eq!(
        ctl.status("bulk", "123456").unwrap().state,
        RunState::CoolingDown
    );
    assert!(peak.key_capacity >= KEYS, "{peak:?}");

    tokio::time::advance(secs(1) + ms(1)).await;
    assert_eq!(ctl.housekeep(), KEYS);
    let fp = ctl.footprint();
    assert_eq!((fp.keys, fp.flights, fp.locks), (0, 0, 0), "{fp:?}");
    assert!(ctl.is_empty());
    assert!(
        fp.key_capacity < 1024 && fp.key_capacity * 1000 < peak.key_capacity,
        "key capacity shrank: {fp:?}, peak {peak:?}"
    );
    assert!(ctl.status("bulk", "123456").is_none());

    // The controller still works afterwards.
    let v = ctl
        .run("bulk", "123456", &policy, |_ctx| async {
            Ok::<u8, RunError>(2)
        })
        .await
        .unwrap();
    assert_eq!(*v, 2);
    eprintln!(
        "a million keys: {:?} wall, peak {peak:?}",
        started.elapsed()
    );
}

/// Without a cooldown or status retention, an idle key's record is removed by the thread that
/// ran it a few hundred runs later (no sweep, no `housekeep`); until then its status is there.
#[tokio::test(start_paused = true)]
async fn idle_keys_are_removed_by_their_own_thread_a_few_hundred_runs_later() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let policy = JobPolicy::default();
    let run = |key: String| {
        let (ctl, policy) = (ctl.clone(), policy.clone());
        async move {
            ctl.run("stream", &key, &policy, |_ctx| async {
                Ok::<u8, RunError>(1)
            })
            .await
            .unwrap();
        }
    };
    run("first".into()).await;
    assert_eq!(
        ctl.status("stream", "first").unwrap().runs,
        1,
        "kept at first"
    );
    for i in 0..10_000 {
        run(format!("k{i}")).await;
        assert!(ctl.len() <= 1_024, "after {i} keys: {}", ctl.len());
    }
    assert!(ctl.status("stream", "first").is_none(), "removed by now");
    assert_eq!(
        ctl.status("stream", "k9999").unwrap().runs,
        1,
        "recent keys kept"
    );
    assert_idle_maps(&ctl);
    assert!(ctl.housekeep() <= 1_024);
    assert!(ctl.is_empty());
}

/// A key that keeps running among a stream of others keeps its record (its counts go on), and
/// a key cooling down or retained is never removed early: its cooldown still refuses a run.
#[tokio::test(start_paused = true)]
async fn busy_cooling_and_retained_keys_keep_their_records() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let plain = JobPolicy::default();
    let cooling = JobPolicy::builder().cooldown(secs(60)).build().unwrap();
    let ok = |_ctx| async { Ok::<u8, RunError>(1) };
    ctl.run("cool", "c", &cooling, ok).await.unwrap();
    for i in 0..5_000u32 {
        ctl.run("stream", &i.to_string(), &plain, ok).await.unwrap();
        if i % 100 == 0 {
            ctl.run("busy", "b", &plain, ok).await.unwrap();
        }
    }
    assert_eq!(
        ctl.status("busy", "b").unwrap().runs,
        50,
        "counted across every run"
    );
    let st = ctl.status("cool", "c").unwrap();
    assert_eq!(st.state, RunState::CoolingDown);
    assert!(matches!(
        ctl.run("cool", "c", &cooling, ok).await,
        Err(JobError::CoolingDown { .. })
    ));

    let kept = JobRuntimeController::new(
        RuntimeConfig::from_env_with([("JOBRT_STATUS_RETENTION", "1h")]).unwrap(),
    );
    kept.run("kept", "first", &plain, ok).await.unwrap();
    for i in 0..2_000u32 {
        kept.run("kept", &i.to_string(), &plain, ok).await.unwrap();
    }
    assert_eq!(kept.status("kept", "first").unwrap().runs, 1, "retained");
    assert_eq!(kept.len(), 2_001);
    tokio::time::advance(secs(3601)).await;
    assert_eq!(kept.housekeep(), 2_001);
}

/// Two controllers used in turn from one thread: each one's keys are left for its own
/// housekeeping when the thread moves to the other, and both go on working.
#[tokio::test(start_paused = true)]
async fn controllers_used_in_turn_from_one_thread_each_keep_their_own_keys() {
    let (a, b) = (
        JobRuntimeController::new(RuntimeConfig::default()),
        JobRuntimeController::new(RuntimeConfig::default()),
    );
    let policy = JobPolicy::default();
    let ok = |_ctx| async { Ok::<u8, RunError>(1) };
    for i in 0..3_000u32 {
        let ctl = if i % 2 == 0 { &a } else { &b };
        ctl.run("turns", &i.to_string(), &policy, ok).await.unwrap();
    }
    assert_eq!(a.len() + b.len(), 3_000, "none removed while alternating");
    assert_eq!(a.housekeep() + b.housekeep(), 3_000);
    assert!(a.is_empty() && b.is_empty());
    drop(a);
    for i in 0..2_000u32 {
        b.run("turns", &i.to_string(), &policy, ok).await.unwrap();
    }
    assert!(b.len() <= 1_024, "{}", b.len());
}

/// Distinct keys from many tasks on a multi-threaded runtime: whichever thread a run ends on
/// removes it later; what is left is bounded by the threads' queues, and housekeeping clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_keys_from_many_threads_stay_bounded() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let tasks: Vec<_> = (0..8u32)
        .map(|t| {
            let ctl = ctl.clone();
            tokio::spawn(async move {
                let policy = JobPolicy::default();
                for i in 0..5_000u32 {
                    let key = format!("{t}-{i}");
                    let v = ctl
                        .run("many", &key, &policy, move |_ctx| async move {
                            tokio::task::yield_now().await;
                            Ok::<u32, RunError>(i)
                        })
                        .await
                        .unwrap();
                    assert_eq!(*v, i);
                }
            })
        })
        .collect();
    for t in join_all(tasks).await {
        t.unwrap();
    }
    // At most a queue's worth per thread that ran a run, plus what the sweep left above its
    // floor; far below the 40,000 keys that ran.
    assert!(ctl.len() < 10_000, "{}", ctl.len());
    assert_idle_maps(&ctl);
    ctl.housekeep();
    assert!(ctl.is_empty(), "{}", ctl.len());
}

// ---------------------------------------------------------------------------------------------
// 6. Concurrency limits and permits
// ---------------------------------------------------------------------------------------------

fn limited() -> JobRuntimeController {
    JobRuntimeController::new(
        RuntimeConfig::default()
            .with_max_concurrency(nz(3))
            .concurrency_group("db", nz(2)),
    )
}

fn db() -> JobPolicy {
    JobPolicy::builder().group("db").build().unwrap()
}

fn assert_all_permits_back(ctl: &JobRuntimeController) {
    assert_eq!(ctl.available_permits(None), Some(3), "global permits");
    assert_eq!(ctl.available_permits(Some("db")), Some(2), "db permits");
}

/// Drives `n` runs on distinct keys, arriving at seeded random times with seeded random work,
/// half in group `db`; returns the counters of all bodies and of `db` bodies.
async fn random_arrivals(
    ctl: &JobRuntimeController,
    n: usize,
    seed: u64,
) -> (Arc<Bodies>, Arc<Bodies>) {
    let all = Bodies::new();
    let in_db = Bodies::new();
    let mut rng = fastrand::Rng::with_seed(seed);
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let arrive = ms(rng.u64(0..40));
            let work = Duration::from_micros(rng.u64(0..4_000));
            let group = rng.bool();
            let (ctl, all, in_db) = (ctl.clone(), Arc::clone(&all), Arc::clone(&in_db));
            tokio::spawn(async move {
                tokio::time::sleep(arrive).await;
                let policy = if group { db() } else { JobPolicy::default() };
                let key = format!("k{i}");
                ctl.run("limited", &key, &policy, move |_ctx| {
                    let (all, in_db) = (Arc::clone(&all), Arc::clone(&in_db));
                    async move {
                        let _a = all.enter();
                        let _d = group.then(|| in_db.enter());
                        tokio::time::sleep(work).await;
                        Ok::<_, RunError>(i)
                    }
                })
                .await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(*t.await.unwrap().unwrap(), i);
    }
    (all, in_db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_flight_attempts_never_exceed_the_limits_under_random_arrivals() {
    let ctl = limited();
    let (all, in_db) = within("random arrivals", secs(60), random_arrivals(&ctl, 400, 7)).await;
    assert_eq!(all.started(), 400);
    assert!(all.max() <= 3, "global limit 3, saw {}", all.max());
    assert!(in_db.max() <= 2, "db limit 2, saw {}", in_db.max());
    assert!(all.max() >= 1 && in_db.max() >= 1);
    assert_all_permits_back(&ctl);
    assert_idle_maps(&ctl);
}

#[tokio::test(start_paused = true)]
async fn limits_are_reached_exactly_and_never_exceeded_on_paused_time() {
    for seed in 1..=5 {
        let ctl = limited();
        let (all, in_db) = within(
            "random arrivals",
            secs(60),
            random_arrivals(&ctl, 200, seed),
        )
        .await;
        assert_eq!(all.started(), 200);
        // Deterministic on paused time: 200 arrivals in 40 ms saturate both limits.
        assert_eq!(all.max(), 3, "seed {seed}");
        assert_eq!(in_db.max(), 2, "seed {seed}");
        assert_all_permits_back(&ctl);
    }
}

/// Starts a `db` run of `job` for `key` in a task and waits until its body holds its permits.
async fn start_db_run<F, Fut>(
    ctl: &JobRuntimeController,
    policy: JobPolicy,
    key: &'static str,
    bodies: &Arc<Bodies>,
    job: F,
) -> tokio::task::JoinHandle<Result<Arc<usize>, JobError>>
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<usize, RunError>> + Send + 'static,
{
    let before = bodies.started();
    let ctl2 = ctl.clone();
    let h = tokio::spawn(async move { ctl2.run("permits", key, &policy, job).await });
    yield_until("body started", 1_000, || bodies.started() > before).await;
    assert_eq!(
        ctl.available_permits(None),
        Some(2),
        "the body holds a global permit"
    );
    assert_eq!(
        ctl.available_permits(Some("db")),
        Some(1),
        "and a db permit"
    );
    h
}

/// A body that counts itself, waits for its cancellation, cleans up for `cleanup` (none: it
/// returns in the same poll that saw the cancellation), then returns its number.
fn cooperative(
    bodies: &Arc<Bodies>,
    cleanup: Duration,
) -> impl Fn(JobContext) -> support::JobFuture<usize> + Clone + Send + Sync + 'static {
    let bodies = Arc::clone(bodies);
    move |ctx: JobContext| {
        let bodies = Arc::clone(&bodies);
        Box::pin(async move {
            let me = bodies.enter();
            ctx.cancelled().await;
            if !cleanup.is_zero() {
                tokio::time::sleep(cleanup).await;
            }
            Ok(me.nth)
        })
    }
}

#[tokio::test(start_paused = true)]
async fn permits_come_back_after_a_panic() {
    let ctl = limited();
    let bodies = Bodies::new();
    let gate = Gate::new();
    let job = {
        let (bodies, gate) = (Arc::clone(&bodies), gate.clone());
        move |_ctx: JobContext| {
            let (bodies, gate) = (Arc::clone(&bodies), gate.clone());
            async move {
                let _in = bodies.enter();
                gate.wait().await;
                explode()
            }
        }
    };
    let h = start_db_run(&ctl, db(), "panic", &bodies, job).await;
    gate.open();
    assert_eq!(h.await.unwrap().unwrap_err().kind(), "panicked");
    assert_all_permits_back(&ctl);
}

#[tokio::test(start_paused = true)]
async fn permits_come_back_after_a_replace() {
    let ctl = limited();
    let bodies = Bodies::new();
    let replace = JobPolicy::builder()
        .group("db")
        .overlap(Overlap::Replace)
        .build()
        .unwrap();
    let old = start_db_run(
        &ctl,
        replace.clone(),
        "replace",
        &bodies,
        cooperative(&bodies, ms(10)),
    )
    .await;
    let gate = Gate::new();
    gate.open();
    let new = within(
        "the replacing run",
        secs(5),
        ctl.run("permits", "replace", &replace, gated_job(&bodies, &gate)),
    )
    .await
    .unwrap();
    assert_eq!(*new, 2);
    let old = old.await.unwrap();
    assert!(
        matches!(
            old,
            Err(JobError::Cancelled {
                reason: CancelReason::Replaced,
                ..
            })
        ),
        "{old:?}"
    );
    assert_eq!(bodies.max(), 1);
    assert_all_permits_back(&ctl);
}

#[tokio::test(start_paused = true)]
async fn permits_come_back_after_shutdown() {
    let ctl = limited();
    let bodies = Bodies::new();
    let h = start_db_run(
        &ctl,
        db(),
        "shutdown",
        &bodies,
        cooperative(&bodies, ms(10)),
    )
    .await;
    // A second run ignores its cancellation and is abandoned after its grace.
    let stubborn = {
        let bodies = Arc::clone(&bodies);
        move |_ctx: JobContext| {
            let bodies = Arc::clone(&bodies);
            async move {
                let _in = bodies.enter();
                tokio::time::sleep(secs(3_600)).await;
                Ok::<usize, RunError>(0)
            }
        }
    };
    let policy = JobPolicy::builder()
        .group("db")
        .abandon_grace(ms(500))
        .build()
        .unwrap();
    let ctl2 = ctl.clone();
    let h2 = tokio::spawn(async move { ctl2.run("permits", "stubborn", &policy, stubborn).await });
    yield_until("both bodies run", 1_000, || bodies.current() == 2).await;
    assert_eq!(ctl.available_permits(Some("db")), Some(0));

    let t0 = Instant::now();
    let clean = within("shutdown", secs(10), ctl.shutdown(secs(1))).await;
    assert!(!clean, "neither run ended within the grace by itself");
    assert_eq!(
        Instant::now() - t0,
        secs(1) + ms(500),
        "grace, then the abandon grace"
    );
    for h in [h, h2] {
        let r = h.await.unwrap();
        assert!(
            matches!(
                r,
                Err(JobError::Cancelled {
                    reason: CancelReason::Shutdown,
                    ..
                })
            ),
            "{r:?}"
        );
    }
    assert_eq!(bodies.current(), 0, "the stubborn body was dropped");
    assert_all_permits_back(&ctl);
    assert_idle_maps(&ctl);
    // New calls are refused after shutdown.
    let err = ctl
        .run("permits", "late", &db(), cooperative(&bodies, ms(10)))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        JobError::Cancelled {
            reason: CancelReason::Shutdown,
            ..
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn permits_come_back_after_an_attempt_timeout() {
    let ctl = limited();
    let bodies = Bodies::new();
    let policy = JobPolicy::builder()
        .group("db")
        .attempt_timeout(secs(2))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let h = start_db_run(
        &ctl,
        policy,
        "timeout",
        &bodies,
        cooperative(&bodies, Duration::ZERO),
    )
    .await;
    let err = within("timed-out run", secs(10), h)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, JobError::AttemptTimeout { attempt: 1, timeout, .. } if timeout == secs(2)),
        "{err:?}"
    );
    assert_eq!(
        Instant::now() - t0,
        secs(2),
        "the cooperative job stopped at once"
    );
    assert_all_permits_back(&ctl);
}

#[tokio::test(start_paused = true)]
async fn permits_come_back_after_a_job_ignoring_cancellation_is_abandoned() {
    let ctl = limited();
    let bodies = Bodies::new();
    let policy = JobPolicy::builder()
        .group("db")
        .attempt_timeout(secs(2))
        .abandon_grace(ms(500))
        .build()
        .unwrap();
    let saw_cancel = Arc::new(AtomicBool::new(false));
    let stubborn = {
        let (bodies, saw_cancel) = (Arc::clone(&bodies), Arc::clone(&saw_cancel));
        move |ctx: JobContext| {
            let (bodies, saw_cancel) = (Arc::clone(&bodies), Arc::clone(&saw_cancel));
            async move {
                let _in = bodies.enter();
                // Ignores the token: keeps sleeping after it fires.
                tokio::time::sleep(secs(3)).await;
                saw_cancel.store(ctx.is_cancelled(), Ordering::SeqCst);
                tokio::time::sleep(secs(3_600)).await;
                Ok::<usize, RunError>(0)
            }
        }
    };
    let t0 = Instant::now();
    let h = start_db_run(&ctl, policy, "abandon", &bodies, stubborn).await;
    let err = within("abandoned run", secs(10), h)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), "attempt_timeout", "{err:?}");
    assert_eq!(
        Instant::now() - t0,
        secs(2) + ms(500),
        "timeout plus abandon grace"
    );
    assert_eq!(bodies.current(), 0, "the body was dropped");
    assert!(
        !saw_cancel.load(Ordering::SeqCst),
        "dropped before it woke up"
    );
    assert_all_permits_back(&ctl);
    assert_idle_maps(&ctl);
}

// ---------------------------------------------------------------------------------------------
// Overlap policies
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn skip_returns_busy_at_once_while_a_run_is_in_flight() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let skip = JobPolicy::builder().overlap(Overlap::Skip).build().unwrap();
    let bodies = Bodies::new();
    let gate = Gate::new();
    let first = {
        let (ctl, skip, job) = (ctl.clone(), skip.clone(), gated_job(&bodies, &gate));
        tokio::spawn(async move { ctl.run("skip", "k", &skip, job).await })
    };
    yield_until("first body started", 1_000, || bodies.started() == 1).await;

    let t0 = Instant::now();
    for _ in 0..10 {
        let err = within(
            "a skipped call",
            secs(5),
            ctl.run("skip", "k", &skip, gated_job(&bodies, &gate)),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, JobError::Busy { .. }), "{err:?}");
        assert!(err.is_rejection());
    }
    assert_eq!(Instant::now(), t0, "Busy came at once");
    assert_eq!(bodies.started(), 1);
    assert_eq!(coalesced(&ctl, "skip", "k"), 0);

    gate.open();
    assert_eq!(*first.await.unwrap().unwrap(), 1);
    // Once the run has ended, Skip runs normally.
    let v = ctl
        .run("skip", "k", &skip, gated_job(&bodies, &gate))
        .await
        .unwrap();
    assert_eq!(*v, 2);
}

#[tokio::test(start_paused = true)]
async fn queue_one_shares_one_extra_run_that_starts_after_the_first_ends() {
    const QUEUED: usize = 20;
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let queue = JobPolicy::builder()
        .overlap(Overlap::QueueOne)
        .build()
        .unwrap();
    let bodies = Bodies::new();
    let gate = Gate::new();
    let spawn = || {
        let (ctl, queue, job) = (ctl.clone(), queue.clone(), gated_job(&bodies, &gate));
        tokio::spawn(async move { ctl.run("queue", "k", &queue, job).await })
    };
    let first = spawn();
    yield_until("first body started", 1_000, || bodies.started() == 1).await;
    let later: Vec<_> = (0..QUEUED).map(|_| spawn()).collect();
    yield_until("all queued", 10_000, || {
        coalesced(&ctl, "queue", "k") == QUEUED as u64
    })
    .await;
    settle(100).await;
    assert_eq!(bodies.started(), 1, "the queued run waits for the first");

    gate.open();
    let first = first.await.unwrap().unwrap();
    let later: Vec<_> = join_all(later)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(*first, 1);
    assert_eq!(*later[0], 2, "the later callers got the second run");
    for v in &later {
        assert!(Arc::ptr_eq(v, &later[0]), "one shared extra run");
        assert!(!Arc::ptr_eq(v, &first));
    }
    assert_eq!(bodies.started(), 2, "exactly one extra run");
    assert_eq!(bodies.max(), 1, "never two at once");
    let st = ctl.status("queue", "k").unwrap();
    assert_eq!((st.runs, st.successes), (2, 2));
    assert_idle_maps(&ctl);
}

#[tokio::test(start_paused = true)]
async fn replace_cancels_the_old_run_and_starts_the_new_one_only_after_it_ended() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let replace = JobPolicy::builder()
        .overlap(Overlap::Replace)
        .build()
        .unwrap();
    let coalesce = JobPolicy::default();
    let bodies = Bodies::new();
    let gate = Gate::new();
    // The body finishes at the gate; when cancelled it takes 300 ms to clean up first.
    let job = {
        let (bodies, gate) = (Arc::clone(&bodies), gate.clone());
        move |ctx: JobContext| {
            let (bodies, gate) = (Arc::clone(&bodies), gate.clone());
            async move {
                let me = bodies.enter();
                tokio::select! {
                    _ = gate.wait() => {}
                    _ = ctx.cancelled() => tokio::time::sleep(ms(300)).await,
                }
                Ok::<_, RunError>(me.nth)
            }
        }
    };
    let spawn = |policy: &JobPolicy| {
        let (ctl, policy, job) = (ctl.clone(), policy.clone(), job.clone());
        tokio::spawn(async move { ctl.run("replace", "k", &policy, job).await })
    };

    let mut old = vec![spawn(&replace)];
    yield_until("old body started", 1_000, || bodies.started() == 1).await;
    old.extend((0..5).map(|_| spawn(&coalesce)));
    yield_until("old joiners", 1_000, || {
        coalesced(&ctl, "replace", "k") == 5
    })
    .await;

    let t0 = Instant::now();
    let mut new = vec![spawn(&replace)];
    settle(100).await;
    new.extend((0..5).map(|_| spawn(&coalesce)));
    yield_until("new joiners", 1_000, || {
        coalesced(&ctl, "replace", "k") == 10
    })
    .await;
    assert_eq!(
        bodies.started(),
        1,
        "the new run waits while the old one cleans up"
    );
    tokio::time::sleep(ms(299)).await;
    settle(100).await;
    assert_eq!(bodies.started(), 1, "still cleaning up");
    tokio::time::sleep(ms(1)).await;
    yield_until("the new body started", 1_000, || bodies.started() == 2).await;
    assert_eq!(Instant::now() - t0, ms(300));

    for h in old {
        let err = h.await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                JobError::Cancelled {
                    reason: CancelReason::Replaced,
                    ..
                }
            ),
            "{err:?}"
        );
    }
    gate.open();
    let new: Vec<_> = join_all(new)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(*new[0], 2);
    assert!(new.iter().all(|v| Arc::ptr_eq(v, &new[0])));
    assert_eq!(bodies.max(), 1, "never two bodies at once");
    let st = ctl.status("replace", "k").unwrap();
    assert_eq!((st.runs, st.successes, st.failures), (2, 1, 1));
    assert_idle_maps(&ctl);
}

// ---------------------------------------------------------------------------------------------
// Cooldown and status
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn cooldown_rejects_at_once_and_a_forced_run_bypasses_it() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let policy = JobPolicy::builder()
        .cooldown(secs(10))
        .failure_cooldown(secs(2))
        .build()
        .unwrap();
    let bodies = Bodies::new();
    let gate = Gate::new();
    gate.open();
    let job = gated_job(&bodies, &gate);

    assert_eq!(
        *ctl.run("cool", "k", &policy, job.clone()).await.unwrap(),
        1
    );
    let t0 = Instant::now();
    let err = ctl
        .run("cool", "k", &policy, job.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, JobError::CoolingDown { remaining, .. } if remaining == secs(10)),
        "{err:?}"
    );
    assert_eq!(err.retry_after(), Some(secs(10)));
    assert_eq!(Instant::now(), t0, "refused at once, no wait");
    assert_eq!(bodies.started(), 1);

    tokio::time::sleep(secs(4)).await;
    let err = ctl
        .run("cool", "k", &policy, job.clone())
        .await
        .unwrap_err();
    assert_eq!(err.retry_after(), Some(secs(6)));
    let st = ctl.status("cool", "k").unwrap();
    assert_eq!(st.state, RunState::CoolingDown);
    assert_eq!(st.cooldown_rejections, 2);
    assert_eq!(st.cooldown_remaining, Some(secs(6)));

    // A forced run bypasses the cooldown, and restarts it.
    assert_eq!(
        *ctl.run_forced("cool", "k", &policy, job.clone())
            .await
            .unwrap(),
        2
    );
    let err = ctl
        .run("cool", "k", &policy, job.clone())
        .await
        .unwrap_err();
    assert_eq!(err.retry_after(), Some(secs(10)));

    tokio::time::sleep(secs(10)).await;
    assert_eq!(ctl.status("cool", "k").unwrap().state, RunState::Idle);
    assert_eq!(
        *ctl.run("cool", "k", &policy, job.clone()).await.unwrap(),
        3
    );

    // A failure sets the failure cooldown.
    let err = ctl
        .run_forced("cool", "k", &policy, |_ctx| async {
            Err::<usize, _>(RunError::permanent(std::io::Error::other("disk on fire")))
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "failed");
    let err = ctl
        .run("cool", "k", &policy, job.clone())
        .await
        .unwrap_err();
    assert_eq!(err.retry_after(), Some(secs(2)));
    assert_eq!(bodies.started(), 3);
}

#[tokio::test(start_paused = true)]
async fn status_tracks_runs_and_serializes_with_rfc3339_timestamps() {
    // 2024-05-06T07:08:09Z
    let wall0 = UNIX_EPOCH + Duration::from_secs(1_714_979_289);
    let ctl =
        JobRuntimeController::with_clock(RuntimeConfig::default(), Clock::with_wall_start(wall0));
    let policy = JobPolicy::builder().cooldown(secs(60)).build().unwrap();
    assert!(
        ctl.status("status", "k").is_none(),
        "no state before the first run"
    );

    let gate = Gate::new();
    let job = {
        let gate = gate.clone();
        move |ctx: JobContext| {
            let gate = gate.clone();
            async move {
                ctx.progress(3, 10);
                gate.wait().await;
                tokio::time::sleep(ms(1_500)).await;
                Ok::<_, RunError>(ctx.fencing_token())
            }
        }
    };
    tokio::time::sleep(secs(1)).await;
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let (ctl, policy, job) = (ctl.clone(), policy.clone(), job.clone());
            tokio::spawn(async move { ctl.run("status", "k", &policy, job).await })
        })
        .collect();
    yield_until("two joined", 1_000, || coalesced(&ctl, "status", "k") == 2).await;
    settle(10).await;

    let st = ctl.status("status", "k").unwrap();
    assert_eq!(st.state, RunState::Running);
    assert_eq!(
        (st.runs, st.successes, st.failures, st.coalesced),
        (1, 0, 0, 2)
    );
    assert_eq!(st.last_start, Some(wall0 + secs(1)));
    assert_eq!(st.progress.map(|p| (p.done, p.total)), Some((3, 10)));
    assert_eq!(st.last_heartbeat, Some(wall0 + secs(1)));
    let token = st
        .fencing_token
        .expect("a run in flight has a fencing token");
    let json = serde_json::to_value(&st).unwrap();
    assert_eq!(json["state"], "running");
    assert_eq!(json["last_start"], "2024-05-06T07:08:10.000Z");
    assert!(json["last_success"].is_null());

    gate.open();
    for c in calls {
        assert_eq!(
            *c.await.unwrap().unwrap(),
            token,
            "the job saw the lock's token"
        );
    }

    let st = ctl.status("status", "k").unwrap();
    assert_eq!(st.state, RunState::CoolingDown);
    assert_eq!((st.runs, st.successes, st.failures), (1, 1, 0));
    assert_eq!(st.last_duration, Some(ms(1_500)));
    assert_eq!(st.last_success, Some(wall0 + ms(2_500)));
    assert_eq!(st.cooldown_remaining, Some(secs(60)));
    assert_eq!(st.last_error, None);

    let json = serde_json::to_value(&st).unwrap();
    assert_eq!(json["job"], "status");
    assert_eq!(json["key"], "k");
    assert_eq!(json["state"], "cooling_down");
    assert_eq!(json["runs"], 1);
    assert_eq!(json["successes"], 1);
    assert_eq!(json["coalesced"], 2);
    assert_eq!(json["last_duration_ms"], 1_500.0);
    assert_eq!(json["cooldown_remaining_ms"], 60_000.0);
    for field in ["last_start", "last_success", "last_heartbeat"] {
        let s = json[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} is a string: {json}"));
        let t: SystemTime = humantime::parse_rfc3339(s)
            .unwrap_or_else(|e| panic!("{field} = {s:?} is not RFC 3339: {e}"));
        assert!(t >= wall0 && t <= wall0 + secs(3), "{field} = {s}");
    }
    assert_eq!(json["last_success"], "2024-05-06T07:08:11.500Z");

    // A failed (forced) run: failures, last error and its kind.
    let err = ctl
        .run_forced("status", "k", &policy, |_ctx| async {
            Err::<u64, _>(RunError::permanent(std::io::Error::other(
                "upstream said no",
            )))
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("upstream said no"));
    let st = ctl.status("status", "k").unwrap();
    assert_eq!((st.runs, st.successes, st.failures), (2, 1, 1));
    assert!(
        st.last_error
            .as_deref()
            .unwrap()
            .contains("upstream said no")
    );
    assert_eq!(st.last_error_kind, Some("failed"));
    assert_eq!(
        st.last_success,
        Some(wall0 + ms(2_500)),
        "kept from the good run"
    );
    let json = serde_json::to_value(&st).unwrap();
    assert_eq!(json["failures"], 1);
    assert_eq!(json["last_error_kind"], "failed");
    assert!(
        json["last_error"]
            .as_str()
            .unwrap()
            .contains("upstream said no")
    );

    let all = ctl.statuses();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].key, "k");
}

// ---------------------------------------------------------------------------------------------
// Regression: a job that returns in the same poll that sees an outside cancellation was still
// cancelled. `budget::run_bounded` once polled the job first and published its result, so the
// callers of a replaced or shut-down run got `Ok` and status counted a success.
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn replaced_callers_get_cancelled_even_when_the_old_job_returns_at_once() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let replace = JobPolicy::builder()
        .overlap(Overlap::Replace)
        .build()
        .unwrap();
    let bodies = Bodies::new();
    let old = {
        let (ctl, replace, job) = (
            ctl.clone(),
            replace.clone(),
            cooperative(&bodies, Duration::ZERO),
        );
        tokio::spawn(async move { ctl.run("bug", "replace", &replace, job).await })
    };
    yield_until("old body started", 1_000, || bodies.started() == 1).await;
    let gate = Gate::new();
    gate.open();
    let new = within(
        "the replacing run",
        secs(5),
        ctl.run("bug", "replace", &replace, gated_job(&bodies, &gate)),
    )
    .await
    .unwrap();
    assert_eq!(*new, 2);
    let old = old.await.unwrap();
    assert!(
        matches!(
            old,
            Err(JobError::Cancelled {
                reason: CancelReason::Replaced,
                ..
            })
        ),
        "{old:?}"
    );
    let st = ctl.status("bug", "replace").unwrap();
    assert_eq!((st.runs, st.successes, st.failures), (2, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn shutdown_cancels_a_job_that_returns_at_once_when_cancelled() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let bodies = Bodies::new();
    let h = {
        let (ctl, job) = (ctl.clone(), cooperative(&bodies, Duration::ZERO));
        tokio::spawn(async move { ctl.run("bug", "shutdown", &JobPolicy::default(), job).await })
    };
    yield_until("body started", 1_000, || bodies.started() == 1).await;
    assert!(!within("shutdown", secs(10), ctl.shutdown(secs(1))).await);
    let r = h.await.unwrap();
    assert!(
        matches!(
            r,
            Err(JobError::Cancelled {
                reason: CancelReason::Shutdown,
                ..
            })
        ),
        "{r:?}"
    );
}

/// Regression: a finished run used to publish its result before removing its in-flight entry,
/// so on a multi-threaded runtime a caller arriving in that window joined the finished run and
/// got its old result without the job running. Sequential calls must each run the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_calls_never_join_a_run_that_already_ended() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let policy = JobPolicy::default();
    let bodies = Arc::new(AtomicUsize::new(0));
    for call in 1..=2_000usize {
        let b = Arc::clone(&bodies);
        let n = ctl
            .run("seq", "k", &policy, move |_ctx| {
                let b = Arc::clone(&b);
                async move { Ok::<_, job_runtime::RunError>(b.fetch_add(1, Ordering::SeqCst) + 1) }
            })
            .await
            .unwrap();
        assert_eq!(*n, call, "call {call} got the result of an earlier run");
    }
    assert_eq!(bodies.load(Ordering::SeqCst), 2_000);
}

/// The run's cancellation token is made only when something asks for it: a token taken from
/// the context before the cancel, one taken after it, and a child of the first all see it.
#[tokio::test(start_paused = true)]
async fn a_context_token_taken_before_or_after_a_replace_is_cancelled_with_the_run() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let replace = JobPolicy::builder()
        .overlap(Overlap::Replace)
        .abandon_grace(secs(1))
        .build()
        .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let first = {
        let (ctl, replace, seen) = (ctl.clone(), replace.clone(), Arc::clone(&seen));
        tokio::spawn(async move {
            ctl.run("tok", "k", &replace, move |ctx: JobContext| {
                let seen = Arc::clone(&seen);
                async move {
                    let early = ctx.token().clone();
                    let child = early.child_token();
                    assert!(!ctx.is_cancelled() && !early.is_cancelled());
                    ctx.cancelled().await;
                    let late = ctx.token().clone();
                    seen.lock().unwrap().extend([
                        early.is_cancelled(),
                        child.is_cancelled(),
                        late.is_cancelled(),
                        ctx.is_cancelled(),
                    ]);
                    Ok(1)
                }
            })
            .await
        })
    };
    settle(10).await;
    let second = ctl
        .run("tok", "k", &replace, |_ctx| async { Ok(2) })
        .await
        .unwrap();
    assert_eq!(*second, 2);
    let first = first.await.unwrap();
    assert!(
        matches!(
            first,
            Err(JobError::Cancelled {
                reason: CancelReason::Replaced,
                ..
            })
        ),
        "{first:?}"
    );
    assert_eq!(*seen.lock().unwrap(), vec![true; 4]);
    assert_idle_maps(&ctl);
}

/// A job that never asks for a token still sees a cancel through `is_cancelled` and
/// `cancelled()`; the token made lazily after the cancel (by another thread, racing it) is
/// cancelled too. Many runs on a multi-threaded runtime, each cancelled by a shutdown.
/// A run polled by its caller (no tracker task) is still waited for: shutdown returns only
/// once it has ended, and says whether that was within the grace.
#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_a_run_its_caller_is_polling() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let policy = JobPolicy::default();
    let done = Arc::new(AtomicBool::new(false));
    let caller = {
        let (ctl, done) = (ctl.clone(), Arc::clone(&done));
        async move {
            ctl.run("slow", "k", &policy, move |_ctx| {
                let done = Arc::clone(&done);
                async move {
                    tokio::time::sleep(secs(3)).await;
                    done.store(true, Ordering::SeqCst);
                    Ok::<u8, RunError>(1)
                }
            })
            .await
        }
    };
    let shutdown = async {
        tokio::task::yield_now().await; // the caller has admitted and polled its run
        let t0 = Instant::now();
        let clean = ctl.shutdown(secs(10)).await;
        (clean, Instant::now() - t0, done.load(Ordering::SeqCst))
    };
    // Both on this task: the run is never a tracker task.
    let (r, (clean, took, finished)) = tokio::join!(caller, shutdown);
    assert_eq!(*r.unwrap(), 1);
    assert!(clean, "ended within the grace");
    assert!(finished, "shutdown returned only after the run ended");
    assert_eq!(took, secs(3));
    assert_idle_maps(&ctl);

    // Past the grace: the run is cancelled, and shutdown still waits for it to end.
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let policy = JobPolicy::default();
    let caller = ctl.run("slow", "k", &policy, |ctx: JobContext| async move {
        ctx.cancelled().await;
        tokio::time::sleep(secs(1)).await; // cleans up after the cancel
        Ok::<u8, RunError>(1)
    });
    let shutdown = async {
        tokio::task::yield_now().await;
        let t0 = Instant::now();
        (ctl.shutdown(secs(2)).await, Instant::now() - t0)
    };
    let (r, (clean, took)) = tokio::join!(caller, shutdown);
    assert!(!clean);
    assert_eq!(took, secs(3), "the grace, then the job's own second");
    assert!(
        matches!(r, Err(JobError::Cancelled { .. }) | Ok(_)),
        "{r:?}"
    );
    assert_idle_maps(&ctl);
}

/// Many callers polling their own runs on a multi-threaded runtime while shutdown begins:
/// when shutdown returns, no run is in flight and none starts afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_racing_many_caller_driven_runs_leaves_none_running() {
    for round in 0..20u32 {
        let ctl = JobRuntimeController::new(RuntimeConfig::default());
        let running = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..64u32)
            .map(|i| {
                let (ctl, running) = (ctl.clone(), Arc::clone(&running));
                tokio::spawn(async move {
                    let policy = JobPolicy::default();
                    for j in 0..50u32 {
                        let running = Arc::clone(&running);
                        let r = ctl
                            .run("race", &format!("{i}-{j}"), &policy, move |_ctx| {
                                let running = Arc::clone(&running);
                                async move {
                                    running.fetch_add(1, Ordering::SeqCst);
                                    tokio::task::yield_now().await;
                                    running.fetch_sub(1, Ordering::SeqCst);
                                    Ok::<u32, RunError>(j)
                                }
                            })
                            .await;
                        if r.is_err() {
                            return; // refused or cancelled by the shutdown
                        }
                    }
                })
            })
            .collect();
        tokio::task::yield_now().await;
        ctl.shutdown(secs(5)).await;
        assert_eq!(
            running.load(Ordering::SeqCst),
            0,
            "round {round}: a run still going"
        );
        assert_eq!(ctl.footprint().flights, 0, "round {round}");
        for c in join_all(callers).await {
            c.unwrap();
        }
        assert_eq!(
            running.load(Ordering::SeqCst),
            0,
            "round {round}: a run started after"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_reaches_every_run_whether_or_not_it_made_its_token() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let policy = JobPolicy::builder().abandon_grace(secs(5)).build().unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let runs: Vec<_> = (0..200)
        .map(|i| {
            let (ctl, policy, started) = (ctl.clone(), policy.clone(), Arc::clone(&started));
            tokio::spawn(async move {
                ctl.run("sd", &format!("k{i}"), &policy, move |ctx: JobContext| {
                    let started = Arc::clone(&started);
                    async move {
                        started.fetch_add(1, Ordering::SeqCst);
                        if i % 2 == 0 {
                            // Asks for the token only once the cancel may be under way.
                            tokio::task::yield_now().await;
                            ctx.token().cancelled().await;
                        } else {
                            ctx.cancelled().await;
                        }
                        assert!(ctx.is_cancelled() && ctx.token().is_cancelled());
                        Ok(i)
                    }
                })
                .await
            })
        })
        .collect();
    wait_until("every run started", secs(10), || {
        started.load(Ordering::SeqCst) == 200
    })
    .await;
    assert!(!ctl.shutdown(ms(1)).await, "no run ends within the grace");
    for r in join_all(runs).await {
        let r = r.expect("no run panicked");
        assert!(
            matches!(
                r,
                Err(JobError::Cancelled {
                    reason: CancelReason::Shutdown,
                    ..
                })
            ),
            "{r:?}"
        );
    }
    assert_eq!(ctl.abandoned_runs(), 0, "every run saw its cancel in time");
    assert_idle_maps(&ctl);
}
