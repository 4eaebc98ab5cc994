//! Snapshot store targets, each beside its baseline:
//! - a warm `get()` of a fresh snapshot vs an `ArcSwap` load + `Arc` clone (the floor) and
//!   moka's future `Cache::get` (the alternative a service would reach for);
//! - a stale `get()` (the read that starts the background refresh, and one that finds a
//!   refresh already running) vs a fresh one;
//! - an incremental refresh with 1% of 100,000 items changed vs a full rescan of the same data;
//! - loading a 10 MB snapshot file at start vs `serde_json::from_slice` on its payload bytes.
//!
//! The reads run where a service's reads run: in a task on a runtime worker (each timing loop
//! is one task, [`time_in_task`]), the baselines and every store case alike. That matters for
//! the read that starts a refresh: waking (or spawning) a task from a worker puts it in that
//! worker's LIFO slot, while from any other thread it goes to the shared queue and wakes a
//! parked worker with a futex. The old placement — reads on the bench thread, outside any
//! worker — is kept for the fresh read and the starting read, labelled `off_worker`.
//!
//! `get()` on a value in memory never awaits (its future is ready on the first poll), so a
//! read is one poll either way.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::{BatchSize, Criterion};
use futures::FutureExt;
use job_runtime::scan::{IncrementalScan, ItemRef, ScanPlugin};
use job_runtime::snapshot::{RefreshPlugin, SnapshotStore};
use job_runtime::{JobContext, JobPolicy, JobRuntimeController, RunError, RuntimeConfig};
use serde::{Deserialize, Serialize};

use crate::support::{multi_thread, time_in_task};

pub(crate) fn bench(c: &mut Criterion) {
    reads(c);
    incremental(c);
    load(c);
}

fn reads(c: &mut Criterion) {
    let rt = multi_thread(2);
    let _guard = rt.enter();
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let payload: Vec<u64> = (0..100).collect();
    let fresh = {
        let p = payload.clone();
        SnapshotStore::builder("fresh")
            .ttl(Duration::from_secs(3600))
            .in_memory()
            .build(
                &ctl,
                RefreshPlugin::new(move |_ctx| {
                    let p = p.clone();
                    async move { Ok(p) }
                }),
            )
            .expect("store")
    };
    rt.block_on(fresh.get()).expect("first scan");
    // Stale at once (ttl 0); its refresh waits for a long time, so every read finds one running.
    let slow = SnapshotStore::builder("stale")
        .ttl(Duration::ZERO)
        .in_memory()
        .build(
            &ctl,
            RefreshPlugin::new(|_ctx| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(7_u64)
            }),
        )
        .expect("store");
    rt.block_on(slow.get()).expect("first scan");
    // Stale at once, and its refresh is refused at once (cooldown): every read starts one.
    let starting = SnapshotStore::builder("starting")
        .ttl(Duration::ZERO)
        .in_memory()
        .policy(
            JobPolicy::builder()
                .cooldown(Duration::from_secs(3600))
                .build()
                .expect("policy"),
        )
        .build(&ctl, RefreshPlugin::new(|_ctx| async { Ok(7_u64) }))
        .expect("store");
    rt.block_on(starting.get()).expect("first scan");
    // Let anything the first reads started settle (timers, the first refresh of `slow`).
    rt.block_on(tokio::time::sleep(Duration::from_millis(50)));

    let swap = Arc::new(ArcSwap::from_pointee(payload.clone()));
    let moka: moka::future::Cache<u64, Arc<Vec<u64>>> = moka::future::Cache::new(100);
    rt.block_on(moka.insert(1, Arc::new(payload)));

    let mut g = c.benchmark_group("snapshot/get");
    g.bench_function("baseline/arcswap_load_full", |b| {
        b.iter_custom(|iters| {
            let swap = Arc::clone(&swap);
            time_in_task(&rt, iters, move |iters| async move {
                let t = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(swap.load_full());
                }
                t.elapsed()
            })
        })
    });
    g.bench_function("baseline/moka_get", |b| {
        b.iter_custom(|iters| {
            let moka = moka.clone();
            time_in_task(&rt, iters, move |iters| async move {
                let t = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(moka.get(&1).await);
                }
                t.elapsed()
            })
        })
    });
    g.bench_function("store/fresh", |b| {
        b.iter_custom(|iters| {
            let store = fresh.clone();
            time_in_task(&rt, iters, move |iters| async move {
                let t = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(store.get().await.expect("a value"));
                }
                t.elapsed()
            })
        })
    });
    g.bench_function("store/stale_refresh_running", |b| {
        b.iter_custom(|iters| {
            let store = slow.clone();
            time_in_task(&rt, iters, move |iters| async move {
                let t = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(store.get().await.expect("a value"));
                }
                t.elapsed()
            })
        })
    });
    // Each timed read starts a refresh; between reads (untimed) the task yields until the
    // refresh has ended. Timing one read at a time adds a clock read (~30 ns here) to each,
    // so the fresh read is also timed that way, beside it: the like-for-like comparison.
    g.bench_function("store/stale_starting_refresh", |b| {
        b.iter_custom(|iters| one_by_one(&rt, &starting, &starting, iters))
    });
    g.bench_function("store/fresh_one_by_one", |b| {
        b.iter_custom(|iters| one_by_one(&rt, &fresh, &starting, iters))
    });
    // The old placement: reads on the bench thread (inside the runtime's context, outside its
    // workers), as a caller on a thread of its own would read.
    g.bench_function("store/fresh_off_worker", |b| {
        b.iter(|| std::hint::black_box(fresh.get().now_or_never().expect("never waits")))
    });
    g.bench_function("store/stale_starting_refresh_off_worker", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                while starting.is_refreshing() {
                    std::thread::yield_now();
                }
                let t = Instant::now();
                let s = starting.get().now_or_never().expect("never waits");
                total += t.elapsed();
                std::hint::black_box(s.expect("a value"));
            }
            total
        })
    });
    g.finish();
}

/// `iters` reads of `store`, each timed on its own, in a task of `rt`; before each (untimed),
/// the task yields until `starting`'s refresh has ended.
fn one_by_one<T>(
    rt: &tokio::runtime::Runtime,
    store: &SnapshotStore<T>,
    starting: &SnapshotStore<u64>,
    iters: u64,
) -> Duration
where
    T: Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, starting) = (store.clone(), starting.clone());
    time_in_task(rt, iters, move |iters| async move {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            while starting.is_refreshing() {
                tokio::task::yield_now().await;
            }
            let t = Instant::now();
            let s = store.get().await;
            total += t.elapsed();
            std::hint::black_box(s.expect("a value"));
        }
        total
    })
}

thread_local! {
    /// One session's text: ten JSON lines, about 1 KB.
    static SESSION: String = (0..10)
        .map(|i| format!(
            r#"{{"ts":"2024-03-0{}T10:00:00Z","role":"user","chars":{},"tools":["bash","edit"],"text":"{}"}}"#,
            i % 9 + 1,
            40 + i,
            "x".repeat(40)
        ))
        .collect::<Vec<_>>()
        .join("\n");
}

/// 100,000 items; an item's contribution is a small histogram of its value.
#[derive(Clone)]
struct Items(Arc<Mutex<Vec<(u64, u32)>>>);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Agg {
    count: u64,
    sum: u64,
    buckets: BTreeMap<u32, u64>,
}

impl IncrementalScan for Items {
    type Aggregate = Agg;
    type Contribution = u32;

    async fn list(&self, _ctx: &JobContext) -> Result<Vec<ItemRef>, RunError> {
        let items = self.0.lock().expect("items");
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, (v, _))| ItemRef::new(format!("item-{i:06}"), v.to_string()))
            .collect())
    }

    async fn compute(&self, item: &ItemRef, _ctx: &JobContext) -> Result<u32, RunError> {
        let i: usize = item.id[5..].parse().expect("id");
        let x = self.0.lock().expect("items")[i].1;
        // Stands in for parsing one session file (the demo's are ~1 KB of JSON lines): parse
        // a 1 KB JSON-lines text and count what is in it.
        let tools = SESSION.with(|s| {
            s.lines()
                .map(|line| {
                    let v: serde_json::Value = serde_json::from_str(line).expect("json");
                    v["tools"].as_array().map_or(0, |t| t.len() as u64)
                })
                .sum::<u64>()
        });
        std::hint::black_box(tools);
        Ok(x)
    }

    fn add(&self, a: &mut Agg, c: &u32) {
        a.count += 1;
        a.sum += u64::from(*c);
        *a.buckets.entry(*c % 16).or_default() += 1;
    }

    fn subtract(&self, a: &mut Agg, c: &u32) {
        a.count -= 1;
        a.sum -= u64::from(*c);
        if let Some(e) = a.buckets.get_mut(&(*c % 16)) {
            *e -= 1;
            if *e == 0 {
                a.buckets.remove(&(*c % 16));
            }
        }
    }
}

fn incremental(c: &mut Criterion) {
    const N: usize = 100_000;
    let rt = multi_thread(2);
    let _guard = rt.enter();
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let items = Items(Arc::new(Mutex::new(
        (0..N).map(|i| (0, i as u32)).collect(),
    )));
    let store = SnapshotStore::builder("hundred-thousand")
        .ttl(Duration::from_secs(3600))
        .in_memory()
        .build(
            &ctl,
            ScanPlugin::new(items.clone()).parallelism(NonZeroUsize::new(2).expect("non-zero")),
        )
        .expect("store");
    rt.block_on(store.get()).expect("first scan");
    let mut version = 0;
    let mut g = c.benchmark_group("snapshot/refresh_100k_items");
    g.sample_size(10);
    g.bench_function("incremental_1pct_changed", |b| {
        b.iter_batched(
            || {
                version += 1;
                let mut it = items.0.lock().expect("items");
                for i in (0..N).step_by(100) {
                    it[i].0 = version;
                }
            },
            |()| {
                rt.block_on(store.refresh_now(true, false))
                    .expect("refresh")
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("full_rescan", |b| {
        b.iter(|| rt.block_on(store.refresh_now(true, true)).expect("refresh"))
    });
    g.finish();
}

fn load(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = multi_thread(2);
    let _guard = rt.enter();
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    // About 10 MB of JSON: 100,000 records of a few fields.
    #[derive(Clone, Serialize, Deserialize)]
    struct Row {
        id: u64,
        name: String,
        tags: Vec<String>,
        score: f64,
    }
    let rows: Vec<Row> = (0..100_000)
        .map(|i| Row {
            id: i,
            name: format!("session-{i:08}-with-a-longer-name"),
            tags: vec!["bash".into(), "edit".into(), format!("t{}", i % 97)],
            score: i as f64 / 7.0,
        })
        .collect();
    // The plugin shares the rows: a load runs no scan, so the rows are never cloned while a
    // load is timed (cloning and dropping 500,000 strings per `build()` would be the bench's
    // fixture, not the store's loading).
    let build = {
        let rows = Arc::new(rows.clone());
        move || {
            let rows = Arc::clone(&rows);
            SnapshotStore::builder("big")
                .persist_dir(dir.path())
                .build(
                    &ctl,
                    RefreshPlugin::new(move |_ctx| {
                        let rows = Vec::clone(&rows);
                        async move { Ok(rows) }
                    }),
                )
                .expect("store")
        }
    };
    rt.block_on(build().get())
        .expect("first scan writes the file");
    let payload = serde_json::to_vec(&rows).expect("json");
    println!(
        "snapshot/load_10mb: payload {:.1} MB",
        payload.len() as f64 / 1e6
    );
    let mut g = c.benchmark_group("snapshot/load_10mb");
    g.sample_size(10);
    g.bench_function("baseline/serde_json_from_slice", |b| {
        b.iter_with_large_drop(|| serde_json::from_slice::<Vec<Row>>(&payload).expect("json"))
    });
    g.bench_function("store/build_from_disk", |b| {
        b.iter_with_large_drop(|| {
            let s = build();
            assert!(s.peek().is_some(), "loaded from disk");
            s
        })
    });
    g.finish();
}
