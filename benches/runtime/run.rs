//! Target 2: one run of a trivial job, end to end (admission, lock, attempt polled by the caller,
//! outcome, shared result), vs `tokio::spawn(async { .. }).await` on the same runtime flavour.
//!
//! Each loop runs inside a task of the runtime, so the job's task is spawned from a worker, as
//! it is for a caller inside a service. Runs are sequential: this is latency per run, not
//! throughput (see `scaling`).

use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use criterion::Criterion;
use job_runtime::{JobPolicy, JobRuntimeController, RateLimit, RuntimeConfig};
use tokio::runtime::Runtime;

use crate::support::{current_thread, key_into, multi_thread, time_in_task};

/// The "db" group: 1,000 permits and a rate limit far above anything reachable, so the bench
/// measures the cost of taking a permit and a token, never a wait.
pub(crate) fn limited_config() -> RuntimeConfig {
    RuntimeConfig::default()
        .concurrency_group("db", NonZeroUsize::new(1000).expect("non-zero"))
        .rate_limit_group(
            "db",
            RateLimit::per_second(NonZeroU32::new(1_000_000_000).expect("non-zero")),
        )
}

/// Calls made and job executions, per bench (a static: capturing it costs the job nothing).
static CALLS: AtomicU64 = AtomicU64::new(0);
static EXECUTED: AtomicU64 = AtomicU64::new(0);

pub(crate) fn bench(c: &mut Criterion) {
    for (flavour, rt) in [
        ("current_thread", current_thread()),
        ("multi_thread_2_workers", multi_thread(2)),
    ] {
        flavour_group(c, flavour, &rt);
    }
}

fn flavour_group(c: &mut Criterion, flavour: &str, rt: &Runtime) {
    let mut g = c.benchmark_group(format!("run/{flavour}"));

    g.bench_function("baseline/spawn+join", |b| {
        b.iter_custom(|iters| {
            time_in_task(rt, iters, |iters| async move {
                let start = Instant::now();
                for i in 0..iters {
                    let v = tokio::spawn(async move { i }).await.expect("join");
                    std::hint::black_box(v);
                }
                start.elapsed()
            })
        })
    });

    let default = Arc::new(JobPolicy::default());
    let grouped = Arc::new(JobPolicy::builder().group("db").build().expect("valid"));
    let plain = JobRuntimeController::new(RuntimeConfig::default());
    let limited = JobRuntimeController::new(limited_config());
    let next = Arc::new(AtomicU64::new(0));

    for (name, ctl, policy, distinct) in [
        ("ctl/default/distinct_key", &plain, &default, true),
        ("ctl/default/same_key", &plain, &default, false),
        ("ctl/group_limited/distinct_key", &limited, &grouped, true),
    ] {
        CALLS.store(0, Ordering::Relaxed);
        EXECUTED.store(0, Ordering::Relaxed);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let (ctl, policy) = (ctl.clone(), Arc::clone(policy));
                let base = next.fetch_add(iters, Ordering::Relaxed);
                time_in_task(rt, iters, move |iters| async move {
                    let mut buf = String::with_capacity(24);
                    let start = Instant::now();
                    CALLS.fetch_add(iters, Ordering::Relaxed);
                    for i in 0..iters {
                        let key = if distinct {
                            key_into(&mut buf, base + i)
                        } else {
                            "same"
                        };
                        let v = ctl
                            .run("bench", key, &policy, move |_ctx| {
                                EXECUTED.fetch_add(1, Ordering::Relaxed);
                                async move { Ok(i) }
                            })
                            .await
                            .expect("trivial job succeeds");
                        std::hint::black_box(v);
                    }
                    start.elapsed()
                })
            })
        });
        // A sequential caller should always start a run of its own; anything else joined a
        // run that had already published its result.
        let (calls, executed) = (
            CALLS.load(Ordering::Relaxed),
            EXECUTED.load(Ordering::Relaxed),
        );
        println!(
            "run/{flavour}/{name}: the job ran for {executed} of {calls} calls ({:.1}%)",
            100.0 * executed as f64 / calls.max(1) as f64
        );
    }
    g.finish();
    // Nothing may be left in flight or locked once the loops are done.
    for ctl in [&plain, &limited] {
        let f = ctl.footprint();
        assert_eq!((f.flights, f.locks), (0, 0), "{f:?}");
    }
}
