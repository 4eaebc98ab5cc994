//! Benchmarks of the hot paths, each beside its baseline in the same criterion group (one run,
//! same machine state), as `docs/PERFORMANCE.md` reports them.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-bench cargo bench --bench runtime
//! ```
//!
//! | module     | group                         | hot path vs baseline                                   |
//! |------------|-------------------------------|--------------------------------------------------------|
//! | `idle`     | (printed, not timed)          | heap left behind by idle keys after cooldown+housekeep |
//! | `lock`     | `lock`                        | `KeyedLocks::try_acquire` vs raw `DashMap` insert+remove |
//! | `run`      | `run/current_thread`, `run/multi_thread` | `ctl.run` of a trivial job vs `tokio::spawn` + join |
//! | `coalesce` | `coalesce/1000_callers`, `coalesce/single_call` | 1,000 callers on 1 ms of work vs hand-rolled `Shared`, async_singleflight, moka |
//! | `scaling`  | `scaling`                     | runs/s on distinct keys from 1 vs 2 threads             |
//! | `snapshot` | `snapshot/get`, `snapshot/refresh_100k_items`, `snapshot/load_10mb` | fresh/stale `get()` vs ArcSwap and moka; incremental vs full rescan; loading a 10 MB file vs `serde_json::from_slice` |

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};

#[path = "runtime/coalesce.rs"]
mod coalesce;
#[path = "common/heap.rs"]
mod heap;
#[path = "runtime/idle.rs"]
mod idle;
#[path = "runtime/lock.rs"]
mod lock;
#[path = "runtime/run.rs"]
mod run;
#[path = "runtime/scaling.rs"]
mod scaling;
#[path = "runtime/snapshot.rs"]
mod snapshot;
#[path = "runtime/support.rs"]
mod support;

/// Short runs: the whole suite must finish in a few minutes on two shared cores.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = idle::report, lock::bench, run::bench, coalesce::bench, scaling::bench, snapshot::bench
}
criterion_main!(benches);
