//! Target 5: an idle key costs nothing. Not a timing: a measurement printed at the start of
//! the bench run (`idle:` lines), from `ctl.footprint()` and from a counting allocator.
//!
//! Two waves of `KEYS` distinct keys run with a cooldown. The first wave warms up whatever the
//! runtime and allocator keep (timer wheel, task lists); live heap bytes are read after it has
//! been cleaned up, after the second wave's runs (every key cooling down: what a key with
//! state costs), and after the cooldown has passed and `housekeep` ran (what an idle key
//! costs: the difference to the first reading).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::time::Duration;

use criterion::Criterion;
use job_runtime::controller::Footprint;
use job_runtime::{JobPolicy, JobRuntimeController, RuntimeConfig};

use crate::support::{current_thread, key_into};

/// Counts live heap bytes while `COUNTING` is on. Off (one relaxed load per call) for every
/// timed bench, so it costs them nothing measurable and shares no written cache line.
struct CountingAlloc;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn count(delta: isize) {
    if COUNTING.load(Ordering::Relaxed) {
        LIVE.fetch_add(delta, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; only a counter is added.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

const KEYS: u64 = 10_000;
const COOLDOWN: Duration = Duration::from_millis(50);

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn show(label: &str, f: Footprint, bytes: isize) {
    println!(
        "idle: {label:<34} keys={:<6} key_capacity={:<6} flights={} flight_capacity={:<5} locks={} lock_capacity={:<5} live_heap_delta={bytes} B",
        f.keys, f.key_capacity, f.flights, f.flight_capacity, f.locks, f.lock_capacity
    );
}

/// Prints the measurement; registered as a criterion target so it runs with the benches.
pub(crate) fn report(_c: &mut Criterion) {
    LIVE.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
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
    COUNTING.store(false, Ordering::Relaxed);
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
