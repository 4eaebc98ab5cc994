//! Registering a job: time (criterion) and heap bytes (counting allocator).
//!
//! One registration here is what a service does per scheduled job: for us a plugin and its
//! trigger (`RuntimeBuilder::job` + `trigger`, then `build`, and `start` with the timer shards'
//! first poll); for tokio-cron-scheduler `Job::new_async` + `JobScheduler::add`. Each timed
//! iteration registers `BATCH` jobs into a new runtime (ours) or an unstarted scheduler
//! (tokio-cron-scheduler, whose jobs are removed again untimed), so the figures are per job.
//! Target: ≤ 2 µs plus parsing, and ≤ 1 KB.
//!
//! Parsing is measured on its own (`parse/*`), and ours is also timed with `Trigger::every`,
//! which parses nothing. Cron triggers are registered two ways: `cron`, every job on one
//! expression (the triggers of a runtime that share an expression and zone share one parse,
//! so this is one parse per batch), and `cron_distinct`, every job on its own expression (a
//! parse each; the expressions differ in their time of day, as most schedules do). The byte
//! count also registers expressions whose date fields differ too (`distinct date fields`).

use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput};
use job_runtime::runtime::{Runtime, RuntimeBuilder, RuntimeHandle};
use job_runtime::schedule::{Schedule, Trigger};
use job_runtime::{JobRuntimeController, RuntimeConfig};
use tokio_cron_scheduler::{Job as TcsJob, JobScheduler};

use crate::heap::{live_bytes, start_counting, stop_counting};
use crate::support::{
    Probe, Recorder, current_thread, far_cron, far_cron_distinct, far_cron_distinct_dates,
    job_name, summary_row,
};

const BATCH: usize = 1_000;

/// An hour, so nothing registered here fires while measured.
const HOUR: Duration = Duration::from_secs(3600);

fn every_hour(_: usize) -> Trigger {
    Trigger::every(HOUR).initial_delay(HOUR)
}

fn probes(n: usize, rec: &'static Recorder) -> Vec<Probe> {
    (0..n)
        .map(|i| Probe {
            name: job_name(i),
            rec,
        })
        .collect()
}

/// Registers every probe with a trigger made by `trigger` (the probes' buffer is drained, not
/// freed, so a counting allocator sees only the registration).
fn register(
    ctl: &JobRuntimeController,
    probes: &mut Vec<Probe>,
    trigger: &dyn Fn(usize) -> Trigger,
) -> RuntimeBuilder {
    let mut b = Runtime::builder(ctl);
    for (i, p) in probes.drain(..).enumerate() {
        b = b.trigger(&p.name, "all", trigger(i)).job(p);
    }
    b
}

fn tcs_job(cron: &str, rec: &'static Recorder) -> TcsJob {
    TcsJob::new_async(cron, move |_id, _sched| {
        Box::pin(async move { rec.record() })
    })
    .expect("valid cron")
}

pub(crate) fn bench(c: &mut Criterion) {
    let rec = Recorder::leak(0);
    let rt = current_thread();
    let far = far_cron();
    let mut g = c.benchmark_group("register");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);

    // Ours: builder + `BATCH` × (job + trigger) + build.
    for (name, trigger) in [
        ("ours/build/every", &every_hour as &dyn Fn(usize) -> Trigger),
        ("ours/build/cron", &|_| Trigger::cron(far.clone())),
        ("ours/build/cron_distinct", &|i| {
            Trigger::cron(far_cron_distinct(i))
        }),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let ctl = JobRuntimeController::new(RuntimeConfig::default());
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut ps = probes(BATCH, rec);
                    let start = Instant::now();
                    let built = register(&ctl, &mut ps, trigger).build().expect("valid");
                    total += start.elapsed();
                    drop(built);
                }
                total
            })
        });
    }

    // Ours, up and running: + `start` (the timer shards, one task per worker) and their first poll.
    for (name, trigger) in [
        (
            "ours/build+start/every",
            &every_hour as &dyn Fn(usize) -> Trigger,
        ),
        ("ours/build+start/cron", &|_| Trigger::cron(far.clone())),
        ("ours/build+start/cron_distinct", &|i| {
            Trigger::cron(far_cron_distinct(i))
        }),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let ctl = JobRuntimeController::new(RuntimeConfig::default());
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let mut ps = probes(BATCH, rec);
                        let start = Instant::now();
                        let handle = register(&ctl, &mut ps, trigger)
                            .build()
                            .expect("valid")
                            .start();
                        // Current-thread runtime: every timer shard runs once before this
                        // task is polled again.
                        tokio::task::yield_now().await;
                        total += start.elapsed();
                        stop(handle).await;
                    }
                    total
                })
            })
        });
    }

    // Parsing alone: our cron (validated and anchored) and tokio-cron-scheduler's `Job`.
    let now = SystemTime::now();
    g.bench_function("parse/ours_cron_schedule_new", |b| {
        b.iter_custom(|iters| {
            let trigger = Trigger::cron(far.clone());
            let start = Instant::now();
            for _ in 0..iters * BATCH as u64 {
                std::hint::black_box(Schedule::new(&trigger, now).expect("valid"));
            }
            start.elapsed()
        })
    });
    g.bench_function("parse/tcs_job_new_async", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters * BATCH as u64 {
                std::hint::black_box(tcs_job(&far, rec));
            }
            start.elapsed()
        })
    });

    // tokio-cron-scheduler: `Job::new_async` + `add`, into one unstarted scheduler; the jobs
    // are removed again after each timed batch.
    g.bench_function("tcs/new_async+add", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let sched = JobScheduler::new().await.expect("scheduler");
                let mut total = Duration::ZERO;
                let mut ids = Vec::with_capacity(BATCH);
                for _ in 0..iters {
                    let start = Instant::now();
                    for _ in 0..BATCH {
                        ids.push(sched.add(tcs_job(&far, rec)).await.expect("added"));
                    }
                    total += start.elapsed();
                    for id in ids.drain(..) {
                        sched.remove(&id).await.expect("removed");
                    }
                }
                total
            })
        })
    });
    g.finish();
}

async fn stop(handle: RuntimeHandle) {
    handle.shutdown(Duration::from_secs(1)).await;
}

/// Heap bytes per registered job, with 10,000 jobs. Printed, not timed.
pub(crate) fn bytes(_c: &mut Criterion) {
    const N: usize = 10_000;
    let rec = Recorder::leak(0);
    let rt = current_thread();
    let far = far_cron();
    let per = |b: isize| b as f64 / N as f64;

    for (label, trigger) in [
        (
            "ours, Trigger::every",
            &every_hour as &dyn Fn(usize) -> Trigger,
        ),
        ("ours, Trigger::cron, one expression", &|_| {
            Trigger::cron(far.clone())
        }),
        ("ours, Trigger::cron, distinct expressions", &|i| {
            Trigger::cron(far_cron_distinct(i))
        }),
        ("ours, Trigger::cron, distinct date fields", &|i| {
            Trigger::cron(far_cron_distinct_dates(i))
        }),
    ] {
        let (built, started) = rt.block_on(async {
            let ctl = JobRuntimeController::new(RuntimeConfig::default());
            let mut ps = probes(N, rec);
            start_counting();
            let runtime = register(&ctl, &mut ps, trigger).build().expect("valid");
            let built = live_bytes();
            let handle = runtime.start();
            tokio::task::yield_now().await;
            let started = live_bytes();
            stop_counting();
            stop(handle).await;
            drop(ps);
            (built, started)
        });
        println!(
            "bytes/{label}: {N} jobs: after build {built} B ({:.0} B/job), after start + first poll of every timer {started} B ({:.0} B/job)",
            per(built),
            per(started)
        );
        summary_row(format!(
            "| bytes per registered job ({N} jobs) | {label} | {:.0} B built, {:.0} B started |",
            per(built),
            per(started)
        ));
    }

    let added = rt.block_on(async {
        let sched = JobScheduler::new().await.expect("scheduler");
        // The scheduler's actors start on the first `add`: warm them up outside the count.
        let id = sched.add(tcs_job(&far, rec)).await.expect("added");
        sched.remove(&id).await.expect("removed");
        start_counting();
        for _ in 0..N {
            sched.add(tcs_job(&far, rec)).await.expect("added");
        }
        let added = live_bytes();
        stop_counting();
        added
    });
    println!(
        "bytes/tokio-cron-scheduler: {N} jobs: after add {added} B ({:.0} B/job)",
        per(added)
    );
    summary_row(format!(
        "| bytes per registered job ({N} jobs) | tokio-cron-scheduler | {:.0} B added |",
        per(added)
    ));
}
