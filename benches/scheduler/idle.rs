//! CPU used while idle: 1,000 registered jobs whose next fire is over an hour away, and the
//! process's CPU time (`getrusage`, all threads) over 3 s of doing nothing else. Printed, not
//! timed. Target: none (no polling loop).
//!
//! Each scheduler gets a fresh 2-worker runtime, half a second to settle after registering,
//! then the 3 s window; an empty runtime is measured the same way, as the floor.
//!
//! Our timers are not quite silent: each timer shard (one per worker) looks at the clocks at
//! least once a minute to notice wall-clock jumps (`CLOCK_CHECK` in `src/runtime.rs`), so a 3 s
//! window right after the start sees none of it. `cap_wakes` measures that minute on paused
//! tokio time: the CPU the runtime with 1,000 idle timers spends when 61 s pass. The check
//! wakes no trigger unless the clock jumped, so it should not grow with the number of timers.

use std::time::Duration;

use criterion::Criterion;
use job_runtime::runtime::Runtime;
use job_runtime::schedule::Trigger;
use job_runtime::{JobRuntimeController, RuntimeConfig};
use tokio_cron_scheduler::{Job as TcsJob, JobScheduler};

use crate::support::{Probe, Recorder, cpu_time, far_cron, job_name, multi_thread, summary_row};

fn ours(
    ctl: &JobRuntimeController,
    far: &str,
    rec: &'static Recorder,
) -> job_runtime::runtime::RuntimeHandle {
    let mut b = Runtime::builder(ctl);
    for i in 0..JOBS {
        let name = job_name(i);
        b = b
            .trigger(&name, "all", Trigger::cron(far))
            .job(Probe { name, rec });
    }
    b.build().expect("valid").start()
}

const JOBS: usize = 1_000;
const WINDOW: Duration = Duration::from_secs(3);
const SETTLE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy)]
enum Who {
    Nothing,
    Ours,
    Tcs,
}

fn label(who: Who) -> &'static str {
    match who {
        Who::Nothing => "empty tokio runtime (floor)",
        Who::Ours => "ours (Runtime + Trigger::cron)",
        Who::Tcs => "tokio-cron-scheduler (started)",
    }
}

pub(crate) fn report(_c: &mut Criterion) {
    let rec = Recorder::leak(16);
    let far = far_cron();
    for who in [Who::Nothing, Who::Ours, Who::Tcs] {
        let rt = multi_thread(2);
        let (cpu, fires) = rt.block_on(async {
            // Kept alive through the window.
            let mut keep = (None, None);
            match who {
                Who::Nothing => {}
                Who::Ours => {
                    let ctl = JobRuntimeController::new(RuntimeConfig::default());
                    keep.0 = Some(ours(&ctl, &far, rec));
                }
                Who::Tcs => {
                    let sched = JobScheduler::new().await.expect("scheduler");
                    for _ in 0..JOBS {
                        let job = TcsJob::new_async(far.as_str(), move |_id, _sched| {
                            Box::pin(async move { rec.record() })
                        })
                        .expect("valid cron");
                        sched.add(job).await.expect("added");
                    }
                    sched.start().await.expect("started");
                    keep.1 = Some(sched);
                }
            }
            tokio::time::sleep(SETTLE).await;
            let before = cpu_time();
            tokio::time::sleep(WINDOW).await;
            let cpu = cpu_time() - before;
            if let Some(rt) = keep.0.take() {
                rt.shutdown(Duration::from_secs(1)).await;
            }
            if let Some(mut sched) = keep.1.take() {
                let _ = sched.shutdown().await;
            }
            (cpu, rec.count())
        });
        drop(rt);
        assert_eq!(fires, 0, "nothing may fire while idle");
        let share = cpu.as_secs_f64() / WINDOW.as_secs_f64() * 100.0;
        println!(
            "idle/{:<32} {JOBS} jobs, next fire > 1 h away: CPU {:.3} ms over {:?} ({share:.3} % of a core)",
            label(who),
            cpu.as_secs_f64() * 1e3,
            WINDOW
        );
        summary_row(format!(
            "| idle CPU over {} s, {} | {} | {:.3} ms ({share:.3} % of a core) |",
            WINDOW.as_secs(),
            if matches!(who, Who::Nothing) {
                "no jobs".to_owned()
            } else {
                format!("{JOBS} jobs")
            },
            label(who),
            cpu.as_secs_f64() * 1e3
        ));
    }
}

/// The once-a-minute clock check of a runtime with 1,000 idle timers, on paused time (61 s pass
/// at once).
pub(crate) fn cap_wakes(_c: &mut Criterion) {
    let rec = Recorder::leak(16);
    let far = far_cron();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let (cpu, fires) = rt.block_on(async {
        let ctl = JobRuntimeController::new(RuntimeConfig::default());
        let handle = ours(&ctl, &far, rec);
        // Every timer registers its sleep.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let before = cpu_time();
        tokio::time::sleep(Duration::from_secs(61)).await;
        let cpu = cpu_time() - before;
        handle.shutdown(Duration::from_secs(1)).await;
        (cpu, rec.count())
    });
    assert_eq!(fires, 0, "nothing may fire while idle");
    println!(
        "idle/ours: the once-a-minute clock check, {JOBS} idle timers (paused time, 61 s): CPU {:.3} ms ({:.2} µs per timer)",
        cpu.as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e6 / JOBS as f64
    );
    summary_row(format!(
        "| idle CPU per minute, {JOBS} jobs: the once-a-minute clock check (paused time) | ours (Runtime + Trigger::cron) | {:.3} ms per minute ({:.2} µs per timer) |",
        cpu.as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e6 / JOBS as f64
    ));
}
