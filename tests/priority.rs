//! Priority: attempts waiting for the same concurrency limit start in priority order (higher
//! first), then first come first served; a wait that is given up (budget, shutdown, replace)
//! leaves the queue, and no permit is ever lost or handed out twice.
//!
//! Ordering tests run on paused time (`start_paused = true`), so they are exact and
//! deterministic; the stress test runs on four worker threads in real time.

mod support;

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use job_runtime::error::CancelReason;
use job_runtime::time::Instant;
use job_runtime::{JobError, JobPolicy, JobRuntimeController, Overlap, RunError, RuntimeConfig};
use support::{Bodies, Gate, settle, within, yield_until};
use tokio::task::JoinHandle;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap()
}

/// A controller whose group `db` lets `n` attempts run at once.
fn db_of(n: usize) -> JobRuntimeController {
    JobRuntimeController::new(RuntimeConfig::default().concurrency_group("db", nz(n)))
}

/// A policy in group `db` with `priority`.
fn db(priority: i32) -> JobPolicy {
    JobPolicy::builder()
        .group("db")
        .priority(priority)
        .build()
        .unwrap()
}

/// Bodies' starts, in order, as (priority, arrival number).
type Log = Arc<Mutex<Vec<(i32, usize)>>>;

fn log() -> Log {
    Arc::default()
}

fn entries(log: &Log) -> Vec<(i32, usize)> {
    log.lock().unwrap().clone()
}

/// Starts a run (job `holder`) that takes a permit of `policy`'s limits and holds it until
/// `gate` opens or the run is cancelled; returns once its body runs.
async fn hold(
    ctl: &JobRuntimeController,
    policy: JobPolicy,
    bodies: &Arc<Bodies>,
    gate: &Gate,
) -> JoinHandle<Result<Arc<usize>, JobError>> {
    let before = bodies.started();
    let (ctl2, bodies2, gate) = (ctl.clone(), Arc::clone(bodies), gate.clone());
    let h = tokio::spawn(async move {
        ctl2.run("holder", "h", &policy, move |ctx| {
            let (bodies, gate) = (Arc::clone(&bodies2), gate.clone());
            async move {
                let running = bodies.enter();
                tokio::select! {
                    _ = gate.wait() => {}
                    _ = ctx.cancelled() => {}
                }
                Ok::<_, RunError>(running.nth)
            }
        })
        .await
    });
    yield_until("holder started", 1_000, || bodies.started() > before).await;
    h
}

/// Spawns a run of job `job` (key `w<arrival>`) under `policy`, whose body logs
/// (`policy.priority()`, `arrival`), counts itself in `bodies` and works for 10 ms; then lets
/// it run until it waits for its permit.
async fn queue(
    ctl: &JobRuntimeController,
    job: &'static str,
    policy: JobPolicy,
    arrival: usize,
    log: &Log,
    bodies: &Arc<Bodies>,
) -> JoinHandle<Result<Arc<usize>, JobError>> {
    let h = spawn_waiter(ctl, job, policy, arrival, log, bodies);
    settle(20).await;
    h
}

fn spawn_waiter(
    ctl: &JobRuntimeController,
    job: &'static str,
    policy: JobPolicy,
    arrival: usize,
    log: &Log,
    bodies: &Arc<Bodies>,
) -> JoinHandle<Result<Arc<usize>, JobError>> {
    let (ctl, log, bodies) = (ctl.clone(), Arc::clone(log), Arc::clone(bodies));
    let priority = policy.priority();
    tokio::spawn(async move {
        let key = format!("w{arrival}");
        ctl.run(job, &key, &policy, move |_ctx| {
            let (log, bodies) = (Arc::clone(&log), Arc::clone(&bodies));
            async move {
                let _running = bodies.enter();
                log.lock().unwrap().push((priority, arrival));
                tokio::time::sleep(ms(10)).await;
                Ok::<_, RunError>(arrival)
            }
        })
        .await
    })
}

/// With the limit of `policy(_)` full, runs with `priorities` arrive in that order; returns
/// the order their bodies started in once the holder ends.
async fn start_order(
    ctl: &JobRuntimeController,
    policy: impl Fn(i32) -> JobPolicy,
    priorities: &[i32],
) -> Vec<(i32, usize)> {
    let (log, bodies, gate) = (log(), Bodies::new(), Gate::new());
    let holder = hold(ctl, policy(0), &bodies, &gate).await;
    let mut waiters = Vec::new();
    for (arrival, &p) in priorities.iter().enumerate() {
        waiters.push(queue(ctl, "waiter", policy(p), arrival, &log, &bodies).await);
    }
    assert!(
        entries(&log).is_empty(),
        "nobody starts while the holder runs"
    );
    gate.open();
    holder.await.unwrap().unwrap();
    for (arrival, w) in waiters.into_iter().enumerate() {
        assert_eq!(*w.await.unwrap().unwrap(), arrival);
    }
    assert_eq!(bodies.max(), 1, "one permit: one body at a time");
    entries(&log)
}

// ---------------------------------------------------------------------------------------------
// 1. Priority order, 2. arrival order among equals

#[tokio::test(start_paused = true)]
async fn waiters_start_by_priority_then_by_arrival() {
    within("the test", secs(600), async {
        let ctl = db_of(1);
        let order = start_order(&ctl, db, &[0, 5, 1, 5, -2, 3]).await;
        assert_eq!(order, [(5, 1), (5, 3), (3, 5), (1, 2), (0, 0), (-2, 4)]);
        assert_eq!(ctl.available_permits(Some("db")), Some(1));
    })
    .await;
}

/// The global limit orders its waiters the same way.
#[tokio::test(start_paused = true)]
async fn the_global_limit_orders_waiters_by_priority_too() {
    within("the test", secs(600), async {
        let ctl = JobRuntimeController::new(RuntimeConfig::default().with_max_concurrency(nz(1)));
        let plain = |p| JobPolicy::builder().priority(p).build().unwrap();
        let order = start_order(&ctl, plain, &[0, 5, 1, 5, -2, 3]).await;
        assert_eq!(order, [(5, 1), (5, 3), (3, 5), (1, 2), (0, 0), (-2, 4)]);
        assert_eq!(ctl.available_permits(None), Some(1));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn equal_priorities_are_first_come_first_served() {
    within("the test", secs(600), async {
        let ctl = db_of(1);
        let order = start_order(&ctl, db, &[0; 8]).await;
        assert_eq!(order, (0..8).map(|a| (0, a)).collect::<Vec<_>>());
        let order = start_order(&ctl, db, &[7; 5]).await;
        assert_eq!(order, (0..5).map(|a| (7, a)).collect::<Vec<_>>());
        // Interleaved: each priority in arrival order.
        let order = start_order(&ctl, db, &[2, 1, 2, 1, 2, 1]).await;
        assert_eq!(order, [(2, 0), (2, 2), (2, 4), (1, 1), (1, 3), (1, 5)]);
        assert_eq!(ctl.available_permits(Some("db")), Some(1));
    })
    .await;
}

/// A group of two: as each permit frees, the best waiter takes it.
#[tokio::test(start_paused = true)]
async fn a_larger_group_serves_the_best_waiters_first() {
    within("the test", secs(600), async {
        let ctl = db_of(2);
        let (log, bodies, gate) = (log(), Bodies::new(), Gate::new());
        let h1 = hold(&ctl, db(0), &bodies, &gate).await;
        // The holder's run key is taken: a second holder needs its own key.
        let ctl2 = ctl.clone();
        let gate2 = gate.clone();
        let bodies2 = Arc::clone(&bodies);
        let h2 = tokio::spawn(async move {
            ctl2.run("holder", "h2", &db(0), move |_ctx| {
                let (bodies, gate) = (Arc::clone(&bodies2), gate2.clone());
                async move {
                    let _r = bodies.enter();
                    gate.wait().await;
                    Ok::<_, RunError>(0)
                }
            })
            .await
        });
        yield_until("second holder started", 1_000, || bodies.started() == 2).await;
        assert_eq!(ctl.available_permits(Some("db")), Some(0));
        let mut waiters = Vec::new();
        for (arrival, p) in [1, 4, 2, 4, 3].into_iter().enumerate() {
            waiters.push(queue(&ctl, "waiter", db(p), arrival, &log, &bodies).await);
        }
        gate.open();
        h1.await.unwrap().unwrap();
        h2.await.unwrap().unwrap();
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        // Both permits free at once: the two best start together, then the next two, …
        assert_eq!(entries(&log), [(4, 1), (4, 3), (3, 4), (2, 2), (1, 0)]);
        assert_eq!(bodies.max(), 2);
        assert_eq!(ctl.available_permits(Some("db")), Some(2));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. Waits given up: budget, shutdown, replace, and the permit handed over as one gives up

/// A queued waiter whose budget runs out fails at its deadline, and the waiters behind it
/// move up; it never starts.
#[tokio::test(start_paused = true)]
async fn a_waiter_whose_budget_expires_gives_its_place_up() {
    within("the test", secs(600), async {
        let ctl = db_of(1);
        let (log, bodies, gate) = (log(), Bodies::new(), Gate::new());
        let holder = hold(&ctl, db(0), &bodies, &gate).await;
        let t0 = Instant::now();
        let impatient = JobPolicy::builder()
            .group("db")
            .priority(9)
            .budget(ms(100))
            .build()
            .unwrap();
        let a = queue(&ctl, "waiter", impatient, 0, &log, &bodies).await;
        let b = queue(&ctl, "waiter", db(1), 1, &log, &bodies).await;
        let c = queue(&ctl, "waiter", db(5), 2, &log, &bodies).await;
        match a.await.unwrap() {
            Err(JobError::BudgetExceeded { budget, .. }) => assert_eq!(budget, ms(100)),
            other => panic!("{other:?}"),
        }
        assert_eq!(t0.elapsed(), ms(100), "it fails at its deadline, not later");
        assert_eq!(ctl.available_permits(Some("db")), Some(0), "the holder's");
        tokio::time::sleep(secs(1)).await;
        gate.open();
        holder.await.unwrap().unwrap();
        assert_eq!(*c.await.unwrap().unwrap(), 2);
        assert_eq!(*b.await.unwrap().unwrap(), 1);
        assert_eq!(entries(&log), [(5, 2), (1, 1)]);
        assert_eq!(ctl.available_permits(Some("db")), Some(1));
    })
    .await;
}

/// Shutdown cancels the holder and the queued waiters: none of them starts, every permit
/// comes back.
#[tokio::test(start_paused = true)]
async fn shutdown_cancels_queued_waiters_and_loses_no_permit() {
    within("the test", secs(600), async {
        let ctl = db_of(1);
        let (log, bodies, gate) = (log(), Bodies::new(), Gate::new());
        let holder = hold(&ctl, db(0), &bodies, &gate).await;
        let mut waiters = Vec::new();
        for (arrival, p) in [3, 0, 7].into_iter().enumerate() {
            waiters.push(queue(&ctl, "waiter", db(p), arrival, &log, &bodies).await);
        }
        within("shutdown", secs(5), ctl.shutdown(Duration::ZERO)).await;
        for w in std::iter::once(holder).chain(waiters) {
            match w.await.unwrap() {
                Err(JobError::Cancelled {
                    reason: CancelReason::Shutdown,
                    ..
                }) => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(entries(&log).is_empty(), "no queued waiter started");
        assert_eq!(ctl.available_permits(Some("db")), Some(1));
    })
    .await;
}

/// A queued run replaced by a new run of its key (`Overlap::Replace`) leaves the queue; the
/// new run queues by its own priority and arrival.
#[tokio::test(start_paused = true)]
async fn a_replaced_waiter_leaves_the_queue() {
    within("a replaced waiter leaves the queue", secs(600), async {
        let ctl = db_of(1);
        let (log, bodies, gate) = (log(), Bodies::new(), Gate::new());
        let holder = hold(&ctl, db(0), &bodies, &gate).await;
        let replace = |p| {
            JobPolicy::builder()
                .group("db")
                .priority(p)
                .overlap(Overlap::Replace)
                .build()
                .unwrap()
        };
        // Arrival 0 queues with priority 9; arrival 1 queues with 5; then a run of arrival 0's key
        // replaces it (key `w0`, logged as arrival 0 again) with priority 1.
        let old = queue(&ctl, "waiter", replace(9), 0, &log, &bodies).await;
        let mid = queue(&ctl, "waiter", db(5), 1, &log, &bodies).await;
        let new = queue(&ctl, "waiter", replace(1), 0, &log, &bodies).await;
        match old.await.unwrap() {
            Err(JobError::Cancelled {
                reason: CancelReason::Replaced,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        gate.open();
        holder.await.unwrap().unwrap();
        mid.await.unwrap().unwrap();
        new.await.unwrap().unwrap();
        assert_eq!(entries(&log), [(5, 1), (1, 0)]);
        assert_eq!(ctl.available_permits(Some("db")), Some(1));
    })
    .await;
}

/// The permit frees at the very instant the best waiter gives up (its budget runs out, or a
/// new run of its key replaces it): whichever happens first, the permit ends up with someone
/// (that waiter, or the next one), never nowhere, and never with two at once. Each kind in
/// both timer orders (the release's timer set before or after the give-up's).
#[tokio::test(start_paused = true)]
async fn a_permit_freed_as_its_waiter_gives_up_goes_on() {
    within("the test", secs(600), async {
        for (by_budget, release_timer_first) in
            [(true, true), (true, false), (false, true), (false, false)]
        {
            let what = format!("budget: {by_budget}, release timer first: {release_timer_first}");
            let ctl = db_of(1);
            let (log, bodies, gate) = (log(), Bodies::new(), Gate::new());
            let at = Instant::now() + ms(100);
            let release_at = || {
                let gate = gate.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    gate.open();
                })
            };
            let holder = hold(&ctl, db(0), &bodies, &gate).await;
            let opener = release_timer_first.then(release_at);
            settle(20).await;
            let mut first = JobPolicy::builder()
                .group("db")
                .priority(9)
                .overlap(Overlap::Replace);
            if by_budget {
                first = first.budget(ms(100)); // from now: ends at `at`
            }
            let a = queue(&ctl, "waiter", first.build().unwrap(), 0, &log, &bodies).await;
            let replacer = (!by_budget).then(|| {
                let (ctl, log, bodies) = (ctl.clone(), Arc::clone(&log), Arc::clone(&bodies));
                let policy = JobPolicy::builder()
                    .group("db")
                    .overlap(Overlap::Replace)
                    .build()
                    .unwrap();
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    spawn_waiter(&ctl, "waiter", policy, 0, &log, &bodies)
                        .await
                        .unwrap()
                })
            });
            settle(20).await;
            let opener = opener.unwrap_or_else(release_at);
            let b = queue(&ctl, "waiter", db(1), 1, &log, &bodies).await;
            opener.await.unwrap();
            holder.await.unwrap().unwrap();
            match a.await.unwrap() {
                Ok(_)
                | Err(JobError::BudgetExceeded { .. })
                | Err(JobError::Cancelled {
                    reason: CancelReason::Replaced,
                    ..
                }) => {}
                other => panic!("{what}: {other:?}"),
            }
            assert_eq!(
                *b.await.unwrap().unwrap(),
                1,
                "{what}: the next waiter runs"
            );
            if let Some(r) = replacer {
                r.await.unwrap().unwrap();
            }
            assert_eq!(bodies.max(), 1, "{what}: never two at once");
            assert_eq!(
                ctl.available_permits(Some("db")),
                Some(1),
                "{what}: no permit lost"
            );
        }
    })
    .await;
}

/// Many runs with random priorities, budgets, overlaps and work on four worker threads: no
/// permit is lost or duplicated (the limits hold inside the bodies, and every permit is back
/// at the end), and every run that succeeded held its permits. Waits are given up by budget,
/// by replacement, and (every other round) by a shutdown in the middle of the storm, which
/// cancels every queued waiter while the running bodies stop and hand their permits over:
/// the case of a permit handed to a waiter that is being dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_waits_given_up_lose_no_permit_under_stress() {
    const GROUP: usize = 3;
    const GLOBAL: usize = 4;
    const RUNS: usize = 400;
    for seed in 1..=4u64 {
        let shutdown_at = (seed % 2 == 0).then(|| Duration::from_micros(18_000 + seed * 1_000));
        let ctl = JobRuntimeController::new(
            RuntimeConfig::default()
                .with_max_concurrency(nz(GLOBAL))
                .concurrency_group("db", nz(GROUP)),
        );
        let all = Bodies::new();
        let in_db = Bodies::new();
        let held: Arc<Vec<AtomicBool>> =
            Arc::new((0..RUNS).map(|_| AtomicBool::new(false)).collect());
        let violations = Arc::new(AtomicUsize::new(0));
        let mut rng = fastrand::Rng::with_seed(seed);
        let tasks: Vec<_> = (0..RUNS)
            .map(|i| {
                let priority = rng.i32(-3..=3);
                let arrive = Duration::from_micros(rng.u64(0..30_000));
                let work = Duration::from_micros(rng.u64(0..3_000));
                let budget = rng
                    .bool()
                    .then(|| Duration::from_micros(rng.u64(200..30_000)));
                let grouped = rng.u8(0..4) != 0;
                // One run in five replaces whatever runs on one of four shared keys.
                let replace = rng.u8(0..5) == 0;
                let key = if replace {
                    format!("shared{}", rng.u8(0..4))
                } else {
                    format!("k{i}")
                };
                let mut b = JobPolicy::builder().priority(priority);
                if grouped {
                    b = b.group("db");
                }
                if let Some(d) = budget {
                    b = b.budget(d);
                }
                if replace {
                    b = b.overlap(Overlap::Replace);
                }
                let policy = b.build().unwrap();
                let (ctl, all, in_db) = (ctl.clone(), Arc::clone(&all), Arc::clone(&in_db));
                let (held, violations) = (Arc::clone(&held), Arc::clone(&violations));
                tokio::spawn(async move {
                    tokio::time::sleep(arrive).await;
                    let ctl2 = ctl.clone();
                    let res = ctl
                        .run("stress", &key, &policy, move |ctx| {
                            let (ctl, all, in_db) =
                                (ctl2.clone(), Arc::clone(&all), Arc::clone(&in_db));
                            let (held, violations) = (Arc::clone(&held), Arc::clone(&violations));
                            async move {
                                let _a = all.enter();
                                let _d = grouped.then(|| in_db.enter());
                                // This body holds a permit of each limit it is under, so
                                // fewer than all of them can be free.
                                let ok = ctl.available_permits(None).unwrap() < GLOBAL
                                    && (!grouped
                                        || ctl.available_permits(Some("db")).unwrap() < GROUP);
                                if !ok {
                                    violations.fetch_add(1, Ordering::SeqCst);
                                }
                                tokio::select! {
                                    _ = tokio::time::sleep(work) => {}
                                    _ = ctx.cancelled() => return Err(RunError::msg("stopped")),
                                }
                                held[i].store(ok, Ordering::SeqCst);
                                Ok(i)
                            }
                        })
                        .await;
                    (i, res)
                })
            })
            .collect();
        let stopper = shutdown_at.map(|at| {
            let ctl = ctl.clone();
            tokio::spawn(async move {
                tokio::time::sleep(at).await;
                ctl.shutdown(Duration::ZERO).await;
            })
        });
        let (mut ok, mut expired, mut replaced, mut shut) = (0, 0, 0, 0);
        for t in tasks {
            let (i, res) = within("stress run", secs(60), t).await.unwrap();
            match res {
                Ok(v) => {
                    assert_eq!(*v, i);
                    assert!(held[i].load(Ordering::SeqCst), "run {i} held no permit");
                    ok += 1;
                }
                Err(JobError::BudgetExceeded { .. }) => expired += 1,
                Err(JobError::Cancelled {
                    reason: CancelReason::Replaced,
                    ..
                }) => replaced += 1,
                Err(JobError::Cancelled {
                    reason: CancelReason::Shutdown,
                    ..
                }) if stopper.is_some() => shut += 1,
                Err(e) => panic!("run {i}: {e:?}"),
            }
        }
        assert_eq!(violations.load(Ordering::SeqCst), 0, "seed {seed}");
        assert!(in_db.max() <= GROUP, "seed {seed}: db saw {}", in_db.max());
        assert!(all.max() <= GLOBAL, "seed {seed}: global saw {}", all.max());
        assert_eq!(
            ctl.available_permits(Some("db")),
            Some(GROUP),
            "seed {seed}"
        );
        assert_eq!(ctl.available_permits(None), Some(GLOBAL), "seed {seed}");
        // The mix did what it is for: waits given up, runs replaced, runs done.
        if let Some(s) = stopper {
            s.await.unwrap();
            assert!(shut > 0, "seed {seed}: the shutdown cancelled nothing");
        }
        assert!(
            ok > 0 && expired > 0,
            "seed {seed}: {ok} ok, {expired} expired"
        );
        eprintln!(
            "seed {seed}: {ok} ok, {expired} budget exceeded, {replaced} replaced, {shut} shut down"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. No barging

/// A lower-priority (or equal-priority) run arriving exactly when the permit frees never
/// starts before the waiter already queued: the permit is handed over, not put back.
#[tokio::test(start_paused = true)]
async fn a_later_arrival_never_barges_past_a_queued_waiter() {
    within("the test", secs(600), async {
        for (late_priority, late_first) in [(0, true), (0, false), (5, true), (5, false)] {
            let ctl = db_of(1);
            let (log, bodies) = (log(), Bodies::new());
            let at = Instant::now() + secs(1);
            // The late arrival's timer is set before or after the holder's, so both orders of
            // firing at the same instant are exercised.
            let late_timer = |ctl: &JobRuntimeController, log: &Log, bodies: &Arc<Bodies>| {
                let (ctl, log, bodies) = (ctl.clone(), Arc::clone(log), Arc::clone(bodies));
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    spawn_waiter(&ctl, "late", db(late_priority), 1, &log, &bodies)
                        .await
                        .unwrap()
                })
            };
            let late = late_first.then(|| late_timer(&ctl, &log, &bodies));
            let (ctl2, bodies2) = (ctl.clone(), Arc::clone(&bodies));
            let holder = tokio::spawn(async move {
                ctl2.run("holder", "h", &db(0), move |_ctx| {
                    let bodies = Arc::clone(&bodies2);
                    async move {
                        let _r = bodies.enter();
                        tokio::time::sleep_until(at).await;
                        Ok::<_, RunError>(0)
                    }
                })
                .await
            });
            settle(20).await;
            let late = late.unwrap_or_else(|| late_timer(&ctl, &log, &bodies));
            let queued = queue(&ctl, "queued", db(5), 0, &log, &bodies).await;
            holder.await.unwrap().unwrap();
            queued.await.unwrap().unwrap();
            late.await.unwrap().unwrap();
            assert_eq!(
                entries(&log),
                [(5, 0), (late_priority, 1)],
                "late priority {late_priority}, late timer first: {late_first}"
            );
            assert_eq!(bodies.max(), 1);
            assert_eq!(ctl.available_permits(Some("db")), Some(1));
        }
    })
    .await;
}

/// A run arriving from inside the holder's body, right before the body returns (so it asks
/// while the permit is being given back), still queues behind the waiter.
#[tokio::test(start_paused = true)]
async fn an_arrival_at_the_moment_of_release_queues_behind() {
    within("the test", secs(600), async {
        let ctl = db_of(1);
        let (log, bodies) = (log(), Bodies::new());
        let late: Arc<Mutex<Option<JoinHandle<_>>>> = Arc::default();
        let (ctl2, bodies2, log2, late2) = (
            ctl.clone(),
            Arc::clone(&bodies),
            Arc::clone(&log),
            Arc::clone(&late),
        );
        let holder = tokio::spawn(async move {
            let ctl3 = ctl2.clone();
            ctl2.run("holder", "h", &db(0), move |_ctx| {
                let (ctl, bodies, log, late) = (
                    ctl3.clone(),
                    Arc::clone(&bodies2),
                    Arc::clone(&log2),
                    Arc::clone(&late2),
                );
                async move {
                    let _r = bodies.enter();
                    tokio::time::sleep(secs(1)).await;
                    let h = spawn_waiter(&ctl, "late", db(-1), 1, &log, &bodies);
                    *late.lock().unwrap() = Some(h);
                    Ok::<_, RunError>(0)
                }
            })
            .await
        });
        settle(20).await;
        let queued = queue(&ctl, "queued", db(0), 0, &log, &bodies).await;
        holder.await.unwrap().unwrap();
        queued.await.unwrap().unwrap();
        let late = late.lock().unwrap().take().unwrap();
        late.await.unwrap().unwrap();
        assert_eq!(entries(&log), [(0, 0), (-1, 1)]);
        assert_eq!(ctl.available_permits(Some("db")), Some(1));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// `JOBRT_JOB_<NAME>_PRIORITY` overrides the code's priority.
#[tokio::test(start_paused = true)]
async fn priority_variable_overrides_the_code() {
    within("priority variable overrides the code", secs(600), async {
        let cfg = RuntimeConfig::from_env_with([
            ("JOBRT_GROUP_DB_CONCURRENCY", "1"),
            ("JOBRT_JOB_URGENT_PRIORITY", "10"),
            ("JOBRT_PRIORITY", "-1"),
        ])
        .unwrap();
        let ctl = JobRuntimeController::new(cfg);
        let (log, bodies, gate) = (log(), Bodies::new(), Gate::new());
        let holder = hold(&ctl, db(0), &bodies, &gate).await;
        // All three say priority 0 in code; the variables make it -1, 10 and -1 (a job's own
        // variable wins over the global one).
        let code = db(0);
        let batch = queue(&ctl, "batch", code.clone(), 0, &log, &bodies).await;
        let urgent = queue(&ctl, "urgent", code.clone(), 1, &log, &bodies).await;
        let other = queue(&ctl, "other", code, 2, &log, &bodies).await;
        gate.open();
        holder.await.unwrap().unwrap();
        for w in [batch, urgent, other] {
            w.await.unwrap().unwrap();
        }
        // The log records the code's priority (0); the arrival numbers show the order.
        let order: Vec<usize> = entries(&log).into_iter().map(|(_, a)| a).collect();
        assert_eq!(
            order,
            [1, 0, 2],
            "urgent (10) first, then the -1s in arrival order"
        );
    })
    .await;
}
