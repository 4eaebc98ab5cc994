//! Target 5: an idle key costs nothing. Not a timing: a measurement printed at the start of
//! the bench run (`idle:` lines), from `ctl.footprint()` and from a counting allocator.
//!
//! Two waves of `KEYS` distinct keys run with a cooldown. The first wave warms up whatever the
//! runtime and allocator keep (timer wheel, task lists); live heap bytes are read after it has
//! been cleaned up, after the second wave's runs (every key cooling down: what a key with
//! state costs), and after the cooldown has passed and `housekeep` ran (what an idle key
//! costs: the difference to the first reading).

use std::time::Duration;

use criterion::Criterion;
use job_runtime::controller::Footprint;
use job_runtime::{JobPolicy, JobRuntimeController, RuntimeConfig};

use crate::heap;
use crate::support::{current_thread, key_into};

const KEYS: u64 = 10_000;
const COOLDOWN: Duration = Duration::from_millis(50);

fn live() -> isize {
    heap::live_bytes()
}

fn show(label: &str, f: Footprint, bytes: isize) {
    println!(
        "idle: {label:<34} keys={:<6} key_capacity={:<6} flights={} locks={} live_heap_delta={bytes} B",
        f.keys, f.key_capacity, f.flights, f.locks
    );
}

/// Prints the measurement; registered as a criterion target so it runs with the benches.
pub(crate) fn report(_c: &mut Criterion) {
    heap::start_counting();
    let rt = current_thread();
    let (cooling, idle, footprints) = rt.block_on(async {
        let ctl = JobRuntimeController::new(RuntimeConfig::default());
        let policy = JobPolicy::builder()
            .cooldown(COOLDOWN)
            .build()
            .expect("valid policy");
        let mut buf = String::with_capacity(24);
        let mut wave = |first: u64| {
            let (ctl, policy) = (ctl.clone(), policy.clone());
            let mut keys: Vec<String> = Vec::new();
            for i in first..first + KEYS {
                keys.push(key_into(&mut buf, i).to_owned());
            }
            async move {
                for key in &keys {
                    ctl.run("idle", key, &policy, |_ctx| async { Ok(1u64) })
                        .await
                        .expect("trivial job succeeds");
                }
                drop(keys);
                ctl.footprint()
            }
        };
        let settle = || async {
            tokio::time::sleep(COOLDOWN * 2).await;
            ctl.housekeep();
            ctl.footprint()
        };

        wave(0).await;
        let warm = settle().await;
        let before = live();
        let after_runs = wave(KEYS).await;
        let cooling = live() - before;
        let after_housekeep = settle().await;
        let idle = live() - before;
        (cooling, idle, [warm, after_runs, after_housekeep])
    });
    heap::stop_counting();
    let [warm, after_runs, after_housekeep] = footprints;
    show("after warm-up wave + housekeep", warm, 0);
    show(
        &format!("after {KEYS} more runs (cooling)"),
        after_runs,
        cooling,
    );
    show("after cooldown + housekeep", after_housekeep, idle);
    println!(
        "idle: per key while cooling ≈ {} B; per idle key = {} B ({} B left for {KEYS} keys)",
        cooling / KEYS as isize,
        idle / KEYS as isize,
        idle
    );
    assert_eq!(after_housekeep.keys, 0, "idle keys must leave no state");
}
