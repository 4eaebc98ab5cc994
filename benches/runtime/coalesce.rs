//! Target 3: 1,000 callers of one key while 1 ms of work runs, all on one current-thread
//! runtime, each caller a future in one `join_all` (so every caller is polled, registers, and
//! is woken once). Every implementation gets a fresh key per iteration, so each iteration is
//! one execution shared by 1,000 callers; a sanity check before timing asserts exactly that.
//!
//! * `ctl_run` — `JobRuntimeController::run`, default policy (coalesce).
//! * `baseline_shared` — the floor: one spawned task behind one `futures::future::Shared`,
//!   cloned 1,000 times; no key lookup at all.
//! * `hand_rolled_keyed` — the same `Shared` kept in a `DashMap<String, _>` that every caller
//!   looks up, and the task removes when done: the least a keyed single-flight must do.
//! * `async_singleflight` — `UnaryGroup::work` (the leader's future runs the work).
//! * `moka_get_with` — `future::Cache::get_with_by_ref` on a fresh key.
//!
//! Every loop runs inside a task of the runtime, as a caller inside a service does.
//!
//! The `single_call` group is the same five with one caller and no sleep: the fixed cost of
//! a call on a fresh key. Moka's entry is invalidated after each iteration, outside the timed
//! section (the others clean up inside the call).

use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_singleflight::UnaryGroup;
use criterion::{Criterion, SamplingMode};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use futures::FutureExt;
use futures::future::{Shared, join_all};
use job_runtime::{JobPolicy, JobRuntimeController, RuntimeConfig};
use moka::future::Cache;
use tokio::runtime::Runtime;

use crate::support::{current_thread, key_into, time_in_task, timed};

const CALLERS: usize = 1000;
const WORK: Duration = Duration::from_millis(1);

type SharedValue = Shared<Pin<Box<dyn Future<Output = Arc<u64>> + Send>>>;

/// Spawns `work` and shares its result.
fn spawn_shared<W>(work: W) -> SharedValue
where
    W: Future<Output = Arc<u64>> + Send + 'static,
{
    let handle = tokio::spawn(work);
    let fut: Pin<Box<dyn Future<Output = Arc<u64>> + Send>> =
        Box::pin(handle.map(|r| r.expect("work panicked")));
    fut.shared()
}

/// A minimal keyed single-flight: look the key up, or spawn the work and register it; the
/// work removes its entry when done.
#[derive(Default)]
struct HandRolled {
    map: Arc<DashMap<String, SharedValue>>,
}

impl HandRolled {
    async fn call<W>(&self, key: &str, work: W) -> Arc<u64>
    where
        W: Future<Output = Arc<u64>> + Send + 'static,
    {
        let shared = match self.map.get(key) {
            Some(s) => s.clone(),
            None => match self.map.entry(key.to_owned()) {
                Entry::Occupied(o) => o.get().clone(),
                Entry::Vacant(v) => {
                    let map = Arc::clone(&self.map);
                    let owned = v.key().clone();
                    let s = spawn_shared(async move {
                        let out = work.await;
                        map.remove(&owned);
                        out
                    });
                    v.insert(s.clone());
                    s
                }
            },
        };
        shared.await
    }
}

/// The work: 1 ms on the tokio timer (or nothing), counted when asked.
async fn work(sleep: bool, ran: Option<&AtomicUsize>) -> u64 {
    if let Some(r) = ran {
        r.fetch_add(1, Ordering::Relaxed);
    }
    if sleep {
        tokio::time::sleep(WORK).await;
    }
    42
}

/// The implementations, each with a fresh `key` per call and (for the sanity check) an
/// optional counter of executions.
struct Impls {
    ctl: JobRuntimeController,
    policy: JobPolicy,
    hand: HandRolled,
    group: UnaryGroup<String, Arc<u64>>,
    cache: Cache<String, Arc<u64>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Impl {
    Ctl,
    Shared,
    Keyed,
    Singleflight,
    Moka,
}

impl Impl {
    const ALL: [Impl; 5] = [
        Impl::Ctl,
        Impl::Shared,
        Impl::Keyed,
        Impl::Singleflight,
        Impl::Moka,
    ];

    fn name(self) -> &'static str {
        match self {
            Impl::Ctl => "ctl_run",
            Impl::Shared => "baseline_shared",
            Impl::Keyed => "hand_rolled_keyed",
            Impl::Singleflight => "async_singleflight",
            Impl::Moka => "moka_get_with",
        }
    }
}

impl Impls {
    fn new() -> Self {
        Self {
            ctl: JobRuntimeController::new(RuntimeConfig::default()),
            policy: JobPolicy::default(),
            hand: HandRolled::default(),
            group: UnaryGroup::new(),
            cache: Cache::new(100_000),
        }
    }

    /// `callers` concurrent calls of one fresh `key`, each offering the same work; returns the
    /// time from the first call to the last result, and every caller's result.
    async fn round(
        &self,
        which: Impl,
        key: &str,
        callers: usize,
        sleep: bool,
        ran: Option<Arc<AtomicUsize>>,
    ) -> (Duration, Vec<Arc<u64>>) {
        let job = |ran: Option<Arc<AtomicUsize>>| async move {
            Arc::new(work(sleep, ran.as_deref()).await)
        };
        match which {
            Impl::Ctl => {
                timed(async {
                    join_all((0..callers).map(|_| {
                        let ran = ran.clone();
                        self.ctl
                            .run("coalesce", key, &self.policy, move |_ctx| {
                                let ran = ran.clone();
                                async move { Ok(work(sleep, ran.as_deref()).await) }
                            })
                            .map(|r| r.expect("job succeeds"))
                    }))
                    .await
                })
                .await
            }
            Impl::Shared => {
                timed(async {
                    let s = spawn_shared(job(ran.clone()));
                    join_all((0..callers).map(|_| s.clone())).await
                })
                .await
            }
            Impl::Keyed => {
                timed(async {
                    join_all((0..callers).map(|_| self.hand.call(key, job(ran.clone())))).await
                })
                .await
            }
            Impl::Singleflight => {
                timed(async {
                    join_all((0..callers).map(|_| self.group.work(key, job(ran.clone())))).await
                })
                .await
            }
            Impl::Moka => {
                let out = timed(async {
                    join_all(
                        (0..callers).map(|_| self.cache.get_with_by_ref(key, job(ran.clone()))),
                    )
                    .await
                })
                .await;
                // Outside the timed section: the others clean up inside the call.
                self.cache.invalidate(key).await;
                out
            }
        }
    }
}

/// One execution, shared by every caller (checked once per implementation, untimed).
fn sanity(rt: &Runtime, impls: &Impls) {
    for which in Impl::ALL {
        let ran = Arc::new(AtomicUsize::new(0));
        let (_, out) =
            rt.block_on(impls.round(which, "sanity", CALLERS, true, Some(Arc::clone(&ran))));
        assert_eq!(out.len(), CALLERS);
        assert_eq!(
            ran.load(Ordering::Relaxed),
            1,
            "{which:?} ran more than once"
        );
        // The controller returns a fresh Arc around the job's value; the rest share the
        // job's own Arc. Either way all callers see one allocation.
        assert!(
            out.iter().all(|v| Arc::ptr_eq(v, &out[0])),
            "{which:?} did not share one value"
        );
    }
}

pub(crate) fn bench(c: &mut Criterion) {
    let rt = current_thread();
    let impls = Arc::new(Impls::new());
    sanity(&rt, &impls);

    for (group, callers, sleep) in [
        ("coalesce/1000_callers_1ms", CALLERS, true),
        ("coalesce/single_call", 1, false),
    ] {
        let mut g = c.benchmark_group(group);
        if sleep {
            g.sample_size(20).sampling_mode(SamplingMode::Flat);
        }
        let mut next = 0u64;
        for which in Impl::ALL {
            g.bench_function(which.name(), |b| {
                b.iter_custom(|iters| {
                    let impls = Arc::clone(&impls);
                    let first = next;
                    next += iters;
                    time_in_task(&rt, iters, move |iters| async move {
                        let mut buf = String::with_capacity(24);
                        let mut total = Duration::ZERO;
                        for n in first..first + iters {
                            let key = key_into(&mut buf, n);
                            let (t, out) = impls.round(which, key, callers, sleep, None).await;
                            total += t;
                            black_box(out);
                        }
                        total
                    })
                })
            });
        }
        g.finish();
    }
    let f = impls.ctl.footprint();
    assert_eq!((f.flights, f.locks), (0, 0), "{f:?}");
}
