//! Target 1: taking and releasing a per-key lock vs a raw `DashMap` insert + remove.
//!
//! `KeyedLocks<u64>` is a `DashMap<u64, Held>` plus a fencing-token counter and an `Arc` in the
//! guard, so the raw map with the same key type is the floor. `ctl.try_acquire(job, key)` adds
//! building a `RunKey` (two `Arc<str>`) and hashing two strings; it is shown beside a
//! `DashMap<String, u64>` for context. Keys cycle through 1,024 values so every shard is used.

use std::hint::black_box;
use std::sync::Arc;

use criterion::Criterion;
use dashmap::DashMap;
use job_runtime::lock::KeyedLocks;
use job_runtime::{JobRuntimeController, RuntimeConfig};

const KEYS: u64 = 1024;

pub(crate) fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("lock");

    let locks = Arc::new(KeyedLocks::<u64>::new());
    let mut k = 0u64;
    g.bench_function("keyed_locks_u64/try_acquire+drop", |b| {
        b.iter(|| {
            k = (k + 1) % KEYS;
            let guard = locks.try_acquire(black_box(k));
            black_box(guard.as_ref().map(|g| g.token()));
            drop(guard);
        })
    });
    assert!(locks.is_empty());

    let mut k = 0u64;
    g.bench_function("keyed_locks_u64/try_lock+drop", |b| {
        b.iter(|| {
            k = (k + 1) % KEYS;
            let key = black_box(k);
            let guard = locks.try_lock(&key);
            black_box(guard.as_ref().map(|g| g.token()));
            drop(guard);
        })
    });
    assert!(locks.is_empty());

    let map = DashMap::<u64, u64>::new();
    let mut k = 0u64;
    g.bench_function("baseline_dashmap_u64/insert+remove", |b| {
        b.iter(|| {
            k = (k + 1) % KEYS;
            black_box(map.insert(black_box(k), k));
            black_box(map.remove(&k));
        })
    });

    let keys: Vec<String> = (0..KEYS).map(|i| format!("k{i}")).collect();
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let mut i = 0usize;
    g.bench_function("ctl_string/try_acquire+drop", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let guard = ctl.try_acquire("lock", black_box(&keys[i]));
            black_box(guard.as_ref().map(|g| g.token()));
            drop(guard);
        })
    });
    assert_eq!(ctl.footprint().locks, 0);

    let map = DashMap::<String, u64>::new();
    let mut i = 0usize;
    g.bench_function("baseline_dashmap_string/insert+remove", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let key = black_box(&keys[i]);
            black_box(map.insert(key.clone(), 1));
            black_box(map.remove(key.as_str()));
        })
    });

    g.finish();
}
