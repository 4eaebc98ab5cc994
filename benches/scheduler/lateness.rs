//! Fire lateness and fires per second, on the wall clock: our runtime, tokio-cron-scheduler and
//! a plain tokio `sleep_until` loop, one after the other in the same process, each on a fresh
//! 2-worker runtime.
//!
//! Not criterion: a fire happens once a second whatever the harness does, so each scheduler
//! runs for a fixed number of seconds and every fire's body records the wall time it started
//! at. A fire's lateness is that time minus the whole second it was scheduled for (every
//! schedule here is `* * * * * *`, so the whole second the fire follows). Only the seconds of
//! a window that starts after every scheduler has been started and warmed up for a second
//! count.
//!
//! - `one_second`: one job on a one-second cron, a 10 s window, ten such schedulers started
//!   50 ms apart (100 fires each; see [`measure`] for why ten): median and max lateness.
//!   Target: median ≤ 2 ms, max ≤ 5 ms.
//! - `ten_thousand`: 10,000 jobs due every second, a 5 s window: fires delivered per second and
//!   p99 lateness. Target: 10,000 fires/s, p99 ≤ 20 ms. tokio-cron-scheduler runs twice: with
//!   its default channel size (200) and with channels big enough for every fire. One more
//!   baseline spawns `ctl.run` from the `sleep_until` loop: the floor for any scheduler that
//!   fires into the controller. Each also reports the process CPU time over the window per fire
//!   (`getrusage`), which the machine's other load disturbs far less than lateness, and how
//!   long the runtime's workers were runnable but waiting for a CPU (`schedstat`). Ours runs
//!   once more with its two workers pinned one per CPU: not a comparison, but the measure of how
//!   much of the burst's lateness is the kernel queueing both woken workers on one CPU.

use std::time::Duration;

use criterion::Criterion;
use job_runtime::runtime::Runtime;
use job_runtime::schedule::Trigger;
use job_runtime::{JobPolicy, JobRuntimeController, RuntimeConfig};
use tokio_cron_scheduler::{Job as TcsJob, JobScheduler};

use crate::support::{
    Lateness, Probe, Recorder, cpu_time, job_name, lateness, ms, multi_thread, multi_thread_pinned,
    next_whole_second, sleep_until_wall, summary_row, workers_waiting,
};

const EVERY_SECOND: &str = "* * * * * *";

/// The schedulers measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sched {
    /// `Runtime` with one `Trigger::cron("* * * * * *")` per job.
    Ours,
    /// tokio-cron-scheduler, `JobScheduler::new()` (broadcast channels of 200).
    Tcs,
    /// tokio-cron-scheduler with channels of `jobs + 1,000`.
    TcsBigChannels,
    /// A task per job looping on `tokio::time::sleep_until(next whole second)`.
    SleepUntil,
    /// The same loop, spawning `ctl.run` of the job for each fire: the floor for anything
    /// that fires into the controller without waiting for the run.
    SleepUntilRun,
}

impl Sched {
    fn label(self) -> &'static str {
        match self {
            Sched::Ours => "ours (Runtime + Trigger::cron)",
            Sched::Tcs => "tokio-cron-scheduler",
            Sched::TcsBigChannels => "tokio-cron-scheduler, channel size jobs+1000",
            Sched::SleepUntil => "tokio sleep_until loop",
            Sched::SleepUntilRun => "sleep_until loop + spawn(ctl.run)",
        }
    }
}

/// What keeps a scheduler running until it is stopped.
enum Running {
    Ours(job_runtime::runtime::RuntimeHandle),
    Tcs(JobScheduler),
    SleepUntil,
}

async fn start(which: Sched, jobs: usize, rec: &'static Recorder) -> Running {
    match which {
        Sched::Ours => {
            let ctl = JobRuntimeController::new(RuntimeConfig::default());
            let mut b = Runtime::builder(&ctl);
            for i in 0..jobs {
                let name = job_name(i);
                b = b
                    .trigger(&name, "all", Trigger::cron(EVERY_SECOND))
                    .job(Probe { name, rec });
            }
            Running::Ours(b.build().expect("valid registrations").start())
        }
        Sched::Tcs | Sched::TcsBigChannels => {
            let sched = if which == Sched::Tcs {
                JobScheduler::new().await
            } else {
                JobScheduler::new_with_channel_size(jobs + 1_000).await
            }
            .expect("scheduler");
            for _ in 0..jobs {
                let job = TcsJob::new_async(EVERY_SECOND, move |_id, _sched| {
                    Box::pin(async move { rec.record() })
                })
                .expect("valid cron");
                sched.add(job).await.expect("added");
            }
            sched.start().await.expect("started");
            Running::Tcs(sched)
        }
        Sched::SleepUntilRun => {
            let ctl = JobRuntimeController::new(RuntimeConfig::default());
            let policy = JobPolicy::default();
            for i in 0..jobs {
                let (ctl, policy, name) = (ctl.clone(), policy.clone(), job_name(i));
                tokio::spawn(async move {
                    loop {
                        sleep_until_wall(next_whole_second(), Duration::ZERO).await;
                        let (ctl, policy, name) = (ctl.clone(), policy.clone(), name.clone());
                        tokio::spawn(async move {
                            let run = ctl.run(&name, "all", &policy, move |_ctx| async move {
                                rec.record();
                                Ok(())
                            });
                            run.await.expect("a trivial run succeeds");
                        });
                    }
                });
            }
            Running::SleepUntil
        }
        Sched::SleepUntil => {
            for _ in 0..jobs {
                tokio::spawn(async move {
                    loop {
                        sleep_until_wall(next_whole_second(), Duration::ZERO).await;
                        rec.record();
                    }
                });
            }
            Running::SleepUntil
        }
    }
}

async fn stop(running: Running) {
    match running {
        Running::Ours(rt) => {
            rt.shutdown(Duration::from_secs(1)).await;
        }
        Running::Tcs(mut sched) => {
            let _ = sched.shutdown().await;
        }
        // Dropping the runtime drops the tasks.
        Running::SleepUntil => {}
    }
}

/// Runs `instances` schedulers of kind `which`, each with `jobs` every-second jobs, started
/// `500 ms / instances` apart, and measures the fires scheduled in a window of `secs` seconds
/// that starts `warm_up` whole seconds after the last was started.
///
/// Why several instances: tokio-cron-scheduler's lateness is the phase of its 500 ms poll
/// against the whole second, fixed for the life of a scheduler and set by when it was started;
/// one instance would measure one arbitrary phase. Staggered starts sample the phases evenly,
/// as services started at random times would. Ours and `sleep_until` do not depend on when they
/// were started; they get the same treatment.
fn measure(
    which: Sched,
    instances: usize,
    jobs: usize,
    warm_up: u64,
    secs: u64,
    pinned: bool,
) -> Lateness {
    let rt = if pinned {
        multi_thread_pinned(2)
    } else {
        multi_thread(2)
    };
    let rec = Recorder::leak(instances * jobs * (secs + warm_up + 3) as usize);
    let stagger = Duration::from_millis(500) / instances as u32;
    let (first, cpu, waiting) = rt.block_on(async move {
        let mut running = Vec::with_capacity(instances);
        for i in 0..instances {
            if i > 0 {
                tokio::time::sleep(stagger).await;
            }
            running.push(start(which, jobs, rec).await);
        }
        let first = next_whole_second() + warm_up;
        sleep_until_wall(first, Duration::ZERO).await;
        let (cpu, waiting) = (cpu_time(), workers_waiting());
        // Until the window's last second is over (a fire later than that is out of it).
        sleep_until_wall(first + secs, Duration::from_millis(50)).await;
        let (cpu, waiting) = (cpu_time() - cpu, workers_waiting() - waiting);
        for r in running {
            stop(r).await;
        }
        (first, cpu, waiting)
    });
    drop(rt);
    let mut l = lateness(rec, first, secs);
    l.cpu = cpu;
    l.waiting = waiting;
    l
}

fn show(test: &str, which: Sched, l: &Lateness) {
    println!(
        "lateness/{test}/{:<45} fires={:<6} fires/s={:<9.1} min/s={:<6} median={:>11} p99={:>11} max={:>11} early={} cpu/fire={:.2} µs workers waiting for a CPU={}",
        which.label(),
        l.fires,
        l.fires_per_sec,
        l.min_per_sec,
        ms(l.median),
        ms(l.p99),
        ms(l.max),
        l.early,
        l.cpu_per_fire_us(),
        ms(l.waiting)
    );
}

/// One job on a one-second cron, 10 s; ten such schedulers side by side (see [`measure`]).
pub(crate) fn one_second(_c: &mut Criterion) {
    const SECS: u64 = 10;
    const INSTANCES: usize = 10;
    let mut results = Vec::new();
    for which in [Sched::Ours, Sched::Tcs, Sched::SleepUntil] {
        let l = measure(which, INSTANCES, 1, 1, SECS, false);
        show("1_job", which, &l);
        results.push((which, l));
    }
    let ours = results[0].1;
    for (which, l) in &results {
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
        summary_row(format!(
            "| 1 s cron, {INSTANCES} schedulers × 1 job, {SECS} s: lateness median / max | {} | {} / {} ({} fires){} |",
            which.label(),
            ms(l.median),
            ms(l.max),
            l.fires,
            if *which == Sched::Ours {
                String::new()
            } else {
                format!(
                    "; ours ÷ this: median {:.3}×, max {:.3}×",
                    ratio(ours.median, l.median),
                    ratio(ours.max, l.max)
                )
            }
        ));
    }
}

/// 10,000 jobs due every second, 5 s each.
pub(crate) fn ten_thousand(_c: &mut Criterion) {
    const JOBS: usize = 10_000;
    const SECS: u64 = 5;
    for (which, pinned) in [
        (Sched::Ours, false),
        (Sched::Tcs, false),
        (Sched::TcsBigChannels, false),
        (Sched::SleepUntil, false),
        (Sched::SleepUntilRun, false),
        (Sched::Ours, true),
    ] {
        let l = measure(which, 1, JOBS, 2, SECS, pinned);
        let label = if pinned {
            format!("{}, workers pinned one per CPU", which.label())
        } else {
            which.label().to_owned()
        };
        show(
            if pinned {
                "10k_jobs_pinned"
            } else {
                "10k_jobs"
            },
            which,
            &l,
        );
        summary_row(format!(
            "| 10,000 jobs every second, {SECS} s: fires/s (fewest in a second), lateness median / p99 / max, process CPU per fire, workers' wait for a CPU | {label} | {:.0} ({}), {} / {} / {}, {:.2} µs, {} |",
            l.fires_per_sec,
            l.min_per_sec,
            ms(l.median),
            ms(l.p99),
            ms(l.max),
            l.cpu_per_fire_us(),
            ms(l.waiting)
        ));
    }
}
