//! Contracts of the controller on a shared coordination backend (replicas): leases and their
//! fencing tokens, a lease held elsewhere, a lost lease, the shared cooldown clock, and two
//! replicas on the in-process coordinator never running one key at once.
//!
//! `FakeBackend` is a scriptable `Coordinator`: it hands out tokens from a counter of its own,
//! can hold a key "for another replica", and can be told to lose a lease (renew says `false`).

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures::future::join_all;
use job_runtime::coord::{Acquire, BackendError, BoxFuture, InProcessCoordinator, Lease};
use job_runtime::error::CancelReason;
use job_runtime::time::Instant;
use job_runtime::{
    Coordinator, JobContext, JobError, JobPolicy, JobRuntimeController, RunError, RunState,
    RuntimeConfig,
};
use support::{Bodies, Gate, gated_job, settle, within, yield_until};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

type Pair = (String, String);

#[derive(Debug, Default)]
struct State {
    next_token: u64,
    /// Current holder's token per key.
    leases: HashMap<Pair, u64>,
    /// "Not before" per key, on the backend's clock.
    cooldowns: HashMap<Pair, Instant>,
    acquires: usize,
    renews: usize,
    releases: usize,
}

/// A scriptable coordination backend shared by "replicas" (controllers) in one test.
#[derive(Debug)]
struct FakeBackend {
    state: Mutex<State>,
}

fn pair(job: &str, key: &str) -> Pair {
    (job.to_string(), key.to_string())
}

fn ready<T: Send + 'static>(v: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(v))
}

impl FakeBackend {
    /// A backend whose first fencing token is `first_token`.
    fn new(first_token: u64) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                next_token: first_token,
                ..State::default()
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Another replica takes the key; returns its token.
    fn hold_elsewhere(&self, job: &str, key: &str) -> u64 {
        let mut s = self.state();
        let t = s.next_token;
        s.next_token += 1;
        assert!(s.leases.insert(pair(job, key), t).is_none(), "key was free");
        t
    }

    /// The other replica lets go of the key.
    fn release_elsewhere(&self, job: &str, key: &str) {
        self.state().leases.remove(&pair(job, key));
    }

    /// The current lease on the key expires and is gone: its holder's next renew says `false`.
    fn lose(&self, job: &str, key: &str) -> u64 {
        self.state()
            .leases
            .remove(&pair(job, key))
            .expect("a lease to lose")
    }

    /// Who holds the key.
    fn holder(&self, job: &str, key: &str) -> Option<u64> {
        self.state().leases.get(&pair(job, key)).copied()
    }
}

impl Coordinator for FakeBackend {
    fn acquire<'a>(
        &'a self,
        job: &'a str,
        key: &'a str,
        _ttl: Duration,
    ) -> BoxFuture<'a, Result<Acquire, BackendError>> {
        let mut s = self.state();
        s.acquires += 1;
        let r = if s.leases.contains_key(&pair(job, key)) {
            Acquire::Held {
                free_in: Some(secs(1)),
            }
        } else {
            let token = s.next_token;
            s.next_token += 1;
            s.leases.insert(pair(job, key), token);
            Acquire::Acquired(Lease {
                job: job.into(),
                key: key.into(),
                token,
            })
        };
        ready(Ok(r))
    }

    fn renew<'a>(
        &'a self,
        lease: &'a Lease,
        _ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        let mut s = self.state();
        s.renews += 1;
        let ours = s.leases.get(&pair(&lease.job, &lease.key)) == Some(&lease.token);
        ready(Ok(ours))
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), BackendError>> {
        let mut s = self.state();
        s.releases += 1;
        let k = pair(&lease.job, &lease.key);
        if s.leases.get(&k) == Some(&lease.token) {
            s.leases.remove(&k);
        }
        ready(Ok(()))
    }

    fn record_finish<'a>(
        &'a self,
        job: &'a str,
        key: &'a str,
        cooldown: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        let mut s = self.state();
        let k = pair(job, key);
        if cooldown.is_zero() {
            s.cooldowns.remove(&k);
        } else {
            s.cooldowns.insert(k, Instant::now() + cooldown);
        }
        ready(Ok(()))
    }

    fn cooldown_remaining<'a>(
        &'a self,
        job: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Duration>, BackendError>> {
        let now = Instant::now();
        let left = self
            .state()
            .cooldowns
            .get(&pair(job, key))
            .filter(|t| **t > now)
            .map(|t| *t - now);
        ready(Ok(left))
    }

    fn now(&self) -> BoxFuture<'_, Result<SystemTime, BackendError>> {
        ready(Ok(SystemTime::UNIX_EPOCH))
    }
}

fn replica(backend: &Arc<FakeBackend>) -> JobRuntimeController {
    JobRuntimeController::with_coordinator(RuntimeConfig::default(), Arc::clone(backend) as _)
}

/// A job returning the fencing token it was given.
fn token_job(
    bodies: &Arc<Bodies>,
) -> impl Fn(JobContext) -> support::JobFuture<u64> + Clone + Send + Sync + 'static {
    let bodies = Arc::clone(bodies);
    move |ctx: JobContext| {
        let bodies = Arc::clone(&bodies);
        Box::pin(async move {
            let _in = bodies.enter();
            Ok(ctx.fencing_token())
        })
    }
}

#[tokio::test(start_paused = true)]
async fn the_fencing_token_the_job_sees_is_the_backend_lease() {
    let backend = FakeBackend::new(7_000);
    let ctl = replica(&backend);
    let policy = JobPolicy::default();
    let bodies = Bodies::new();

    // While the job runs the backend holds its lease, under the token the job sees.
    let gate = Gate::new();
    let seen = Arc::new(Mutex::new(None));
    let job = {
        let (gate, seen) = (gate.clone(), Arc::clone(&seen));
        move |ctx: JobContext| {
            let (gate, seen) = (gate.clone(), Arc::clone(&seen));
            async move {
                *seen.lock().unwrap() = Some(ctx.fencing_token());
                gate.wait().await;
                Ok::<_, RunError>(ctx.fencing_token())
            }
        }
    };
    let h = {
        let (ctl, policy) = (ctl.clone(), policy.clone());
        tokio::spawn(async move { ctl.run("fence", "k", &policy, job).await })
    };
    yield_until("body started", 1_000, || seen.lock().unwrap().is_some()).await;
    assert_eq!(*seen.lock().unwrap(), Some(7_000));
    assert_eq!(backend.holder("fence", "k"), Some(7_000));
    assert_eq!(ctl.status("fence", "k").unwrap().fencing_token, Some(7_000));
    gate.open();
    assert_eq!(*h.await.unwrap().unwrap(), 7_000);
    assert_eq!(backend.holder("fence", "k"), None, "released after the run");

    // Tokens strictly increase per key, whichever replica takes the lease.
    let other = replica(&backend);
    let t2 = other
        .run("fence", "k", &policy, token_job(&bodies))
        .await
        .unwrap();
    let t3 = ctl
        .run("fence", "k", &policy, token_job(&bodies))
        .await
        .unwrap();
    assert_eq!((*t2, *t3), (7_001, 7_002));
    assert_eq!(ctl.status("fence", "k").unwrap().fencing_token, Some(7_002));
    let s = backend.state();
    assert_eq!((s.acquires, s.releases), (3, 3));
    assert!(s.leases.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_lease_held_elsewhere_makes_the_run_busy() {
    let backend = FakeBackend::new(1);
    let ctl = replica(&backend);
    let bodies = Bodies::new();
    let other = backend.hold_elsewhere("busy", "k");

    let t0 = Instant::now();
    let err = ctl
        .run("busy", "k", &JobPolicy::default(), token_job(&bodies))
        .await
        .unwrap_err();
    assert!(matches!(err, JobError::Busy { .. }), "{err:?}");
    assert_eq!(Instant::now(), t0, "Busy at once with no lock wait");
    assert_eq!(bodies.started(), 0, "the job did not run");
    assert_eq!(
        backend.holder("busy", "k"),
        Some(other),
        "the other lease is untouched"
    );
    let st = ctl.status("busy", "k").unwrap();
    assert_eq!((st.runs, st.state), (0, RunState::Idle));

    // With a lock wait, the run gives up after it…
    let wait = JobPolicy::builder().lock_wait(secs(3)).build().unwrap();
    let err = ctl
        .run("busy", "k", &wait, token_job(&bodies))
        .await
        .unwrap_err();
    assert!(matches!(err, JobError::LockTimeout { .. }), "{err:?}");
    assert_eq!(Instant::now() - t0, secs(3));
    assert_eq!(bodies.started(), 0);

    // …or runs once the other replica lets go within it.
    let h = {
        let (ctl, wait, job) = (ctl.clone(), wait.clone(), token_job(&bodies));
        tokio::spawn(async move { ctl.run("busy", "k", &wait, job).await })
    };
    tokio::time::sleep(ms(1_500)).await;
    assert_eq!(bodies.started(), 0, "still waiting");
    backend.release_elsewhere("busy", "k");
    let token = within("waiting run", secs(5), h).await.unwrap().unwrap();
    assert!(*token > other, "a newer token than the other replica's");
    assert_eq!(bodies.started(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_cancels_the_running_job() {
    let backend = FakeBackend::new(1);
    let ctl = replica(&backend);
    // Renewed every third of the lease: at 1 s, 2 s, …
    let policy = JobPolicy::builder().lease(secs(3)).build().unwrap();
    let bodies = Bodies::new();
    let saw_cancel = Arc::new(AtomicBool::new(false));
    let job = {
        let (bodies, saw_cancel) = (Arc::clone(&bodies), Arc::clone(&saw_cancel));
        move |ctx: JobContext| {
            let (bodies, saw_cancel) = (Arc::clone(&bodies), Arc::clone(&saw_cancel));
            async move {
                let _in = bodies.enter();
                ctx.cancelled().await;
                saw_cancel.store(true, Ordering::SeqCst);
                // A little cleanup before stopping.
                tokio::time::sleep(ms(10)).await;
                Ok::<u64, RunError>(0)
            }
        }
    };
    let t0 = Instant::now();
    let h = {
        let (ctl, policy) = (ctl.clone(), policy.clone());
        tokio::spawn(async move { ctl.run("lease", "k", &policy, job).await })
    };
    yield_until("body started", 1_000, || bodies.started() == 1).await;
    tokio::time::sleep(ms(1_500)).await;
    assert_eq!(backend.state().renews, 1, "renewed once at 1 s");
    assert!(
        !saw_cancel.load(Ordering::SeqCst),
        "a renewed lease keeps the job going"
    );

    let lost = backend.lose("lease", "k");
    let err = within("run", secs(10), h).await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            JobError::Cancelled {
                reason: CancelReason::LeaseLost,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(saw_cancel.load(Ordering::SeqCst), "ctx.cancelled() fired");
    assert_eq!(
        Instant::now() - t0,
        secs(2) + ms(10),
        "cancelled at the next renew"
    );
    assert_eq!(bodies.current(), 0);
    let st = ctl.status("lease", "k").unwrap();
    assert_eq!((st.runs, st.failures), (1, 1));
    assert_eq!(st.last_error_kind, Some("cancelled"));
    assert_eq!(st.fencing_token, Some(lost));

    // The key can be taken again afterwards.
    let t = ctl
        .run("lease", "k", &policy, token_job(&bodies))
        .await
        .unwrap();
    assert!(*t > lost);
}

#[tokio::test(start_paused = true)]
async fn the_backend_cooldown_is_honoured_by_another_replica() {
    let backend = FakeBackend::new(1);
    let (a, b) = (replica(&backend), replica(&backend));
    let policy = JobPolicy::builder().cooldown(secs(60)).build().unwrap();
    let bodies = Bodies::new();

    a.run("cool", "k", &policy, token_job(&bodies))
        .await
        .unwrap();
    assert_eq!(bodies.started(), 1);
    assert!(
        b.status("cool", "k").is_none(),
        "replica b has no local state for the key"
    );

    tokio::time::sleep(secs(20)).await;
    let t0 = Instant::now();
    let err = b
        .run("cool", "k", &policy, token_job(&bodies))
        .await
        .unwrap_err();
    assert!(
        matches!(err, JobError::CoolingDown { remaining, .. } if remaining == secs(40)),
        "{err:?}"
    );
    assert_eq!(Instant::now(), t0, "refused at once");
    assert_eq!(bodies.started(), 1, "b did not run the job");

    tokio::time::sleep(secs(40)).await;
    b.run("cool", "k", &policy, token_job(&bodies))
        .await
        .unwrap();
    assert_eq!(bodies.started(), 2);
    // And now a refuses, on b's record.
    let err = a
        .run("cool", "k", &policy, token_job(&bodies))
        .await
        .unwrap_err();
    assert_eq!(err.retry_after(), Some(secs(60)));
}

#[tokio::test(start_paused = true)]
async fn two_replicas_on_the_in_process_coordinator_never_run_one_key_at_once() {
    let coord = Arc::new(InProcessCoordinator::new());
    let replicas = [
        JobRuntimeController::with_coordinator(RuntimeConfig::default(), Arc::clone(&coord) as _),
        JobRuntimeController::with_coordinator(RuntimeConfig::default(), Arc::clone(&coord) as _),
    ];

    // Deterministic part: while replica 0 runs a key, replica 1 is Busy on it.
    let bodies = Bodies::new();
    let gate = Gate::new();
    let h = {
        let (ctl, job) = (replicas[0].clone(), gated_job(&bodies, &gate));
        tokio::spawn(async move { ctl.run("pair", "held", &JobPolicy::default(), job).await })
    };
    yield_until("replica 0 runs", 1_000, || bodies.started() == 1).await;
    let err = within(
        "replica 1 on a key replica 0 runs",
        secs(5),
        replicas[1].run(
            "pair",
            "held",
            &JobPolicy::default(),
            gated_job(&bodies, &gate),
        ),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, JobError::Busy { .. }), "{err:?}");
    gate.open();
    assert_eq!(*h.await.unwrap().unwrap(), 1);

    // Random part: both replicas hammer four keys; per key, never two bodies at once.
    const KEYS: usize = 4;
    let per_key: Vec<_> = (0..KEYS).map(|_| Bodies::new()).collect();
    let per_replica = [Bodies::new(), Bodies::new()];
    let wait = JobPolicy::builder().lock_wait(secs(60)).build().unwrap();
    let mut rng = fastrand::Rng::with_seed(11);
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let r = rng.usize(0..2);
            let k = rng.usize(0..KEYS);
            let arrive = ms(rng.u64(0..200));
            let work = ms(rng.u64(1..20));
            let (ctl, wait) = (replicas[r].clone(), wait.clone());
            let (key_bodies, replica_bodies) =
                (Arc::clone(&per_key[k]), Arc::clone(&per_replica[r]));
            tokio::spawn(async move {
                tokio::time::sleep(arrive).await;
                ctl.run("pair", &format!("k{k}"), &wait, move |_ctx| {
                    let (key_bodies, replica_bodies) =
                        (Arc::clone(&key_bodies), Arc::clone(&replica_bodies));
                    async move {
                        let _k = key_bodies.enter();
                        let _r = replica_bodies.enter();
                        tokio::time::sleep(work).await;
                        Ok::<_, RunError>(r)
                    }
                })
                .await
            })
        })
        .collect();
    let results = within("both replicas", secs(600), join_all(calls)).await;
    assert!(
        results.into_iter().all(|r| r.unwrap().is_ok()),
        "every call ran or joined a run"
    );
    for (k, b) in per_key.iter().enumerate() {
        assert_eq!(b.max(), 1, "key k{k} ran on two replicas at once");
        assert!(b.started() >= 2, "key k{k} ran several times");
    }
    assert!(
        per_replica.iter().all(|b| b.started() > 0),
        "both replicas ran jobs"
    );
    settle(10).await;
    for ctl in &replicas {
        let fp = ctl.footprint();
        assert_eq!(fp.flights, 0, "{fp:?}");
    }
}

/// Regression (see the same case in `tests/controller.rs`): a job that stops as soon as it sees
/// the lost lease is still `Cancelled { reason: LeaseLost }`, never a success published by a
/// holder that lost its lease.
#[tokio::test(start_paused = true)]
async fn a_lost_lease_cancels_a_job_that_stops_at_once() {
    let backend = FakeBackend::new(1);
    let ctl = replica(&backend);
    let policy = JobPolicy::builder().lease(secs(3)).build().unwrap();
    let bodies = Bodies::new();
    let job = {
        let bodies = Arc::clone(&bodies);
        move |ctx: JobContext| {
            let bodies = Arc::clone(&bodies);
            async move {
                let _in = bodies.enter();
                ctx.cancelled().await;
                Ok::<u64, RunError>(0)
            }
        }
    };
    let h = {
        let (ctl, policy) = (ctl.clone(), policy.clone());
        tokio::spawn(async move { ctl.run("lease", "k", &policy, job).await })
    };
    yield_until("body started", 1_000, || bodies.started() == 1).await;
    backend.lose("lease", "k");
    let r = within("run", secs(10), h).await.unwrap();
    assert!(
        matches!(
            r,
            Err(JobError::Cancelled {
                reason: CancelReason::LeaseLost,
                ..
            })
        ),
        "{r:?}"
    );
    let st = ctl.status("lease", "k").unwrap();
    assert_eq!((st.successes, st.failures), (0, 1));
}
