//! Target 4: throughput of runs on distinct keys from 1 vs 2 threads sharing one controller.
//!
//! Each thread has its own current-thread runtime and runs its share of a fixed batch
//! sequentially, so the only thing the threads share is the controller (its maps, counters,
//! root cancellation token and task tracker) — exactly what limits scaling. The baseline does
//! the same with `tokio::spawn` + join, which shares nothing but the allocator: its ratio is
//! what this machine can give at all.
//!
//! One criterion iteration is a batch of `BATCH` runs; threads and runtimes are built before the
//! clock starts and torn down after it stops (a barrier at each end). Reported throughput is
//! runs per second.
//!
//! On a shared machine the wall-clock ratio says as much about the neighbours as about us, so
//! after the timed group a few batches are run again and each thread's scheduler statistics
//! (`/proc/thread-self/schedstat`) are printed (`scaling:` lines): time on a CPU, time runnable
//! but waiting for one (the machine was busy), and the rest (blocked: our own contention, e.g. a
//! parked lock). Runs per CPU-second at 2 threads vs 1 is the scaling this code would get with
//! two free cores.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use job_runtime::{JobPolicy, JobRuntimeController, RuntimeConfig};

use crate::support::{current_thread, key_into};

const BATCH: u64 = 20_000;

/// One thread's scheduler statistics over its share of a batch.
#[derive(Debug, Default, Clone, Copy)]
struct Sched {
    /// Nanoseconds on a CPU.
    on_cpu: u64,
    /// Nanoseconds runnable, waiting for a CPU.
    waiting: u64,
    /// Nanoseconds of wall time.
    wall: u64,
}

fn schedstat() -> Sched {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let mut it = s.split_whitespace().map(|v| v.parse().unwrap_or(0));
    Sched {
        on_cpu: it.next().unwrap_or(0),
        waiting: it.next().unwrap_or(0),
        wall: 0,
    }
}

/// Runs `iters` batches split over `threads` threads; `ctl: None` is the spawn baseline.
/// Returns the wall time and each thread's scheduler statistics.
fn batch(
    threads: u64,
    iters: u64,
    ctl: Option<&JobRuntimeController>,
    next: &AtomicU64,
) -> (Duration, Vec<Sched>) {
    let per_thread = iters * BATCH / threads;
    let base = next.fetch_add(iters * BATCH, Ordering::Relaxed);
    let barrier = Arc::new(Barrier::new(threads as usize + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let ctl = ctl.cloned();
            let barrier = Arc::clone(&barrier);
            let first = base + t * per_thread;
            std::thread::spawn(move || {
                let rt = current_thread();
                let policy = JobPolicy::default();
                let mut buf = String::with_capacity(24);
                barrier.wait();
                let (before, started) = (schedstat(), Instant::now());
                // The loop is a task, as a caller inside a service is (awaiting from `block_on`
                // itself would add a driver wake-up per run).
                rt.block_on(async move {
                    tokio::spawn(async move {
                        for i in first..first + per_thread {
                            match &ctl {
                                Some(ctl) => {
                                    let key = key_into(&mut buf, i);
                                    let v = ctl
                                        .run(
                                            "scale",
                                            key,
                                            &policy,
                                            move |_ctx| async move { Ok(i) },
                                        )
                                        .await
                                        .expect("trivial job succeeds");
                                    std::hint::black_box(v);
                                }
                                None => {
                                    let v = tokio::spawn(async move { i }).await.expect("join");
                                    std::hint::black_box(v);
                                }
                            }
                        }
                    })
                    .await
                    .expect("bench task panicked");
                });
                let (after, wall) = (schedstat(), started.elapsed());
                // Stop the clock before the runtime is torn down.
                barrier.wait();
                Sched {
                    on_cpu: after.on_cpu.saturating_sub(before.on_cpu),
                    waiting: after.waiting.saturating_sub(before.waiting),
                    wall: wall.as_nanos() as u64,
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    barrier.wait();
    let elapsed = start.elapsed();
    let sched = handles
        .into_iter()
        .map(|h| h.join().expect("bench thread panicked"))
        .collect();
    (elapsed, sched)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

pub(crate) fn bench(c: &mut Criterion) {
    println!("scaling: load average before: {}", loadavg());
    let mut g = c.benchmark_group("scaling");
    g.sample_size(15)
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(BATCH));
    let next = AtomicU64::new(0);
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    for threads in [1u64, 2] {
        g.bench_function(BenchmarkId::new("baseline_spawn_join", threads), |b| {
            b.iter_custom(|iters| batch(threads, iters, None, &next).0)
        });
        g.bench_function(BenchmarkId::new("ctl_run_distinct_keys", threads), |b| {
            b.iter_custom(|iters| batch(threads, iters, Some(&ctl), &next).0)
        });
    }
    g.finish();
    println!("scaling: load average after: {}", loadavg());
    cpu_report(&ctl, &next);
    let f = ctl.footprint();
    assert_eq!((f.flights, f.locks), (0, 0), "{f:?}");
}

/// Prints wall and per-thread CPU figures for a few batches at 1 and 2 threads (best of
/// `ROUNDS` by wall time, so a neighbour's burst does not decide the result).
fn cpu_report(ctl: &JobRuntimeController, next: &AtomicU64) {
    const ROUNDS: usize = 5;
    const BATCHES: u64 = 5;
    let runs = (BATCHES * BATCH) as f64;
    for (name, ctl) in [
        ("baseline_spawn_join", None),
        ("ctl_run_distinct_keys", Some(ctl)),
    ] {
        let mut per_cpu_s = [0.0f64; 2];
        for threads in [1u64, 2] {
            let (wall, sched) = (0..ROUNDS)
                .map(|_| batch(threads, BATCHES, ctl, next))
                .min_by_key(|(wall, _)| *wall)
                .expect("at least one round");
            let on_cpu: u64 = sched.iter().map(|s| s.on_cpu).sum();
            let waiting: u64 = sched.iter().map(|s| s.waiting).sum();
            let wall_ns: u64 = sched.iter().map(|s| s.wall).sum();
            let blocked = wall_ns.saturating_sub(on_cpu + waiting);
            per_cpu_s[threads as usize - 1] = runs / (on_cpu as f64 / 1e9);
            println!(
                "scaling: {name} threads={threads}: {:.0} runs/s wall; per run {:.0} ns on a CPU; of the threads' wall time {:.0}% on a CPU, {:.0}% waiting for one, {:.0}% blocked",
                runs / wall.as_secs_f64(),
                on_cpu as f64 / runs,
                100.0 * on_cpu as f64 / wall_ns as f64,
                100.0 * waiting as f64 / wall_ns as f64,
                100.0 * blocked as f64 / wall_ns as f64,
            );
        }
        println!(
            "scaling: {name}: CPU cost per run at 2 threads vs 1: {:.2}x (1.00 = no contention; 2-thread throughput with two free cores = 2 / this)",
            per_cpu_s[0] / per_cpu_s[1]
        );
    }
}
