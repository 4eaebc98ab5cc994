//! The scheduler side by side with tokio-cron-scheduler and a plain tokio `sleep_until` loop,
//! in the same run (same process, one after the other), as `docs/PERFORMANCE.md` ("Scheduling
//! (issue 4)") reports it.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-bench cargo bench --features tokio-cron-scheduler --bench scheduler
//! ```
//!
//! About two minutes. Lateness, fires per second and idle CPU are wall-clock measurements over
//! fixed seconds (printed, not criterion-timed); registration is timed by criterion; bytes per
//! job come from a counting allocator. A summary table is printed at the end.
//!
//! | module     | what                                         | vs                                    |
//! |------------|----------------------------------------------|---------------------------------------|
//! | `lateness` | 1 job on a 1 s cron, 10 s (ten such schedulers): median / max lateness; 10,000 jobs every second, 5 s: fires/s, p99, CPU per fire | tokio-cron-scheduler, `sleep_until` loop (alone, and spawning `ctl.run`) |
//! | `register` | `register/*` (criterion): job + trigger + build (+ start), per job; parsing alone; bytes per job | `Job::new_async` + `JobScheduler::add` |
//! | `idle`     | process CPU over 3 s with 1,000 jobs due in over an hour | tokio-cron-scheduler, empty runtime |

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};

#[path = "common/heap.rs"]
mod heap;
#[path = "scheduler/idle.rs"]
mod idle;
#[path = "scheduler/lateness.rs"]
mod lateness;
#[path = "scheduler/register.rs"]
mod register;
#[path = "scheduler/support.rs"]
mod support;

/// Short criterion runs: the wall-clock parts take most of the time.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = lateness::one_second, lateness::ten_thousand, idle::report, idle::cap_wakes,
        register::bytes,
        register::bench, support::print_summary
}
criterion_main!(benches);
