//! Contracts of `SnapshotStore`: fresh / stale / missing reads, one refresh however many
//! readers, fail-safe refreshes, `max_stale`, manual rescans, scan ids and status; and, with
//! files, restarts that answer from disk and damaged files that are set aside and rebuilt.
//!
//! Timing runs on paused time, so ages and ttls are exact.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::future::join_all;
use job_runtime::snapshot::{Origin, RefreshPlugin, ScanState, SnapshotStore};
use job_runtime::{JobContext, JobError, JobPolicy, JobRuntimeController, RunError, RuntimeConfig};
use support::{Gate, yield_until};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// One fetch of a [`Counter`].
type Fetch = std::pin::Pin<Box<dyn Future<Output = Result<u64, RunError>> + Send>>;

/// A source counting its calls, returning the call number; fails while `fail` is set; waits
/// for `gate` when one is given.
#[derive(Clone, Default)]
struct Counter {
    calls: Arc<AtomicU64>,
    fail: Arc<AtomicBool>,
    gate: Option<Gate>,
    delay: Option<Duration>,
}

impl Counter {
    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn plugin(&self) -> RefreshPlugin<impl Fn(JobContext) -> Fetch + Send + Sync + 'static> {
        let me = self.clone();
        RefreshPlugin::new(move |_ctx: JobContext| {
            let me = me.clone();
            Box::pin(async move {
                let n = me.calls.fetch_add(1, Ordering::SeqCst) + 1;
                if let Some(g) = &me.gate {
                    g.wait().await;
                }
                if let Some(d) = me.delay {
                    tokio::time::sleep(d).await;
                }
                if me.fail.load(Ordering::SeqCst) {
                    return Err(RunError::from(std::io::Error::other(format!(
                        "source down (call {n})"
                    ))));
                }
                Ok(n)
            }) as Fetch
        })
    }
}

fn memory_store(ctl: &JobRuntimeController, src: &Counter, ttl: Duration) -> SnapshotStore<u64> {
    SnapshotStore::builder("s")
        .ttl(ttl)
        .in_memory()
        .build(ctl, src.plugin())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn fresh_reads_return_at_once_and_stale_reads_start_exactly_one_refresh() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src = Counter::default();
    let store = memory_store(&ctl, &src, secs(60));

    let first = store.get().await.unwrap();
    assert_eq!((*first.data, first.scan_id, first.is_stale), (1, 1, false));
    assert_eq!(first.source, Origin::Scan);

    tokio::time::sleep(secs(30)).await;
    let fresh = store.get().await.unwrap();
    assert_eq!(
        (*fresh.data, fresh.age(), fresh.is_stale),
        (1, secs(30), false)
    );
    assert!(Arc::ptr_eq(&first.data, &fresh.data), "one value shared");
    assert_eq!(src.calls(), 1, "a fresh read runs nothing");

    // Stale: 500 concurrent readers all get the old value at once, and one refresh starts.
    tokio::time::sleep(secs(31)).await;
    let reads = join_all((0..500).map(|_| store.get())).await;
    for r in &reads {
        let s = r.as_ref().unwrap();
        assert_eq!((*s.data, s.scan_id, s.is_stale), (1, 1, true));
        assert_eq!(s.age(), secs(61));
    }
    yield_until("the refresh ran", 100, || {
        store.peek().is_some_and(|s| s.scan_id == 2)
    })
    .await;
    assert_eq!(src.calls(), 2, "500 stale readers started one refresh");
    let after = store.get().await.unwrap();
    assert_eq!((*after.data, after.scan_id, after.is_stale), (2, 2, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_first_readers_cause_one_scan() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let gate = Gate::new();
    let src = Counter {
        gate: Some(gate.clone()),
        ..Counter::default()
    };
    let store = memory_store(&ctl, &src, secs(60));
    let readers: Vec<_> = (0..1000)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.get().await })
        })
        .collect();
    support::wait_until("the scan started", secs(10), || src.calls() == 1).await;
    support::wait_until("every reader joined", secs(10), || {
        ctl.status("s", "snapshot")
            .is_some_and(|s| s.coalesced >= 999)
    })
    .await;
    gate.open();
    let mut first: Option<Arc<u64>> = None;
    for r in readers {
        let s = r.await.unwrap().unwrap();
        assert_eq!(s.scan_id, 1);
        match &first {
            None => first = Some(s.data),
            Some(f) => assert!(Arc::ptr_eq(f, &s.data)),
        }
    }
    assert_eq!(src.calls(), 1, "1,000 first readers, one scan");
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_keeps_the_last_good_value_and_shows_the_error() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src = Counter::default();
    let store = memory_store(&ctl, &src, secs(10));
    assert_eq!(*store.get().await.unwrap().data, 1);

    src.fail.store(true, Ordering::SeqCst);
    tokio::time::sleep(secs(11)).await;
    let stale = store.get().await.unwrap();
    assert_eq!(
        (*stale.data, stale.is_stale),
        (1, true),
        "readers see no error"
    );
    yield_until("the refresh failed", 100, || {
        store.status().state == ScanState::Failed
    })
    .await;
    let st = store.status();
    assert!(
        st.last_error
            .as_deref()
            .unwrap()
            .contains("source down (call 2)"),
        "{st:?}"
    );
    assert_eq!(st.scan_id, Some(1), "still serving scan 1");
    assert_eq!(*store.get().await.unwrap().data, 1);

    // The next stale read tries again; once the source is back, the value moves on.
    src.fail.store(false, Ordering::SeqCst);
    let _ = store.get().await.unwrap();
    yield_until("the retry succeeded", 100, || {
        store.status().state == ScanState::Idle
    })
    .await;
    let st = store.status();
    assert_eq!((st.scan_id, st.last_error.as_deref()), (Some(3), None));
    let now = store.get().await.unwrap();
    assert_eq!((*now.data, now.scan_id, now.is_stale), (3, 3, false));
    // Scan 2 failed: ids are strictly increasing, not dense.
}

#[tokio::test(start_paused = true)]
async fn the_first_scan_failing_is_the_only_error_a_reader_sees() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src = Counter::default();
    src.fail.store(true, Ordering::SeqCst);
    let store = memory_store(&ctl, &src, secs(10));
    let err = store.get().await.unwrap_err();
    assert_eq!(err.kind(), "failed", "{err}");
    assert_eq!(store.status().state, ScanState::Failed);
    assert!(store.peek().is_none());
    src.fail.store(false, Ordering::SeqCst);
    assert_eq!(*store.get().await.unwrap().data, 2);
}

#[tokio::test(start_paused = true)]
async fn past_max_stale_readers_wait_for_the_refresh_up_to_a_timeout() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src = Counter {
        delay: Some(secs(2)),
        ..Counter::default()
    };
    let store = SnapshotStore::builder("s")
        .ttl(secs(10))
        .max_stale(secs(60))
        .max_stale_wait(secs(5))
        .in_memory()
        .build(&ctl, src.plugin())
        .unwrap();
    assert_eq!(*store.get().await.unwrap().data, 1);

    // Stale but under max_stale: at once.
    tokio::time::sleep(secs(20)).await;
    let t = tokio::time::Instant::now();
    assert_eq!(*store.get().await.unwrap().data, 1);
    assert_eq!(t.elapsed(), Duration::ZERO);
    tokio::time::sleep(secs(3)).await; // the background refresh (2 s) lands
    assert_eq!(store.peek().unwrap().scan_id, 2);

    // Past max_stale: the reader waits for the 2 s refresh and gets the new value.
    tokio::time::sleep(secs(61)).await;
    let t = tokio::time::Instant::now();
    let s = store.get().await.unwrap();
    assert_eq!((*s.data, s.is_stale), (3, false));
    assert_eq!(t.elapsed(), secs(2));

    // A refresh slower than max_stale_wait: the reader gives up after 5 s with the stale
    // value, and the refresh goes on.
    let slow = Counter {
        delay: Some(secs(30)),
        ..Counter::default()
    };
    let store = SnapshotStore::builder("slow")
        .ttl(secs(10))
        .max_stale(secs(60))
        .max_stale_wait(secs(5))
        .in_memory()
        .build(&ctl, slow.plugin())
        .unwrap();
    store.get().await.unwrap();
    tokio::time::sleep(secs(61)).await;
    let t = tokio::time::Instant::now();
    let s = store.get().await.unwrap();
    assert_eq!((*s.data, s.is_stale, s.scan_id), (1, true, 1));
    assert_eq!(t.elapsed(), secs(5));
    tokio::time::sleep(secs(26)).await;
    assert_eq!(store.peek().unwrap().scan_id, 2, "the refresh went on");
}

#[tokio::test(start_paused = true)]
async fn refresh_now_joins_a_refresh_in_flight_and_force_bypasses_the_cooldown() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src = Counter {
        delay: Some(secs(1)),
        ..Counter::default()
    };
    let policy = JobPolicy::builder().cooldown(secs(300)).build().unwrap();
    let store = SnapshotStore::builder("s")
        .ttl(secs(10))
        .in_memory()
        .policy(policy)
        .build(&ctl, src.plugin())
        .unwrap();
    store.get().await.unwrap();

    // Within the cooldown a manual rescan is refused with the time to wait, unless forced.
    let err = store.refresh_now(false, false).await.unwrap_err();
    assert!(matches!(err, JobError::CoolingDown { .. }), "{err}");
    assert_eq!(
        store.status().state,
        ScanState::Idle,
        "a refusal is not a failed scan"
    );
    let s = store.refresh_now(true, false).await.unwrap();
    assert_eq!((*s.data, s.scan_id), (2, 2));

    // Two manual rescans at once share one scan.
    let (a, b) = tokio::join!(
        store.refresh_now(true, false),
        store.refresh_now(true, true)
    );
    assert_eq!(a.unwrap().scan_id, b.unwrap().scan_id);
    assert_eq!(src.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn invalidate_makes_the_next_read_stale_and_refresh() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src = Counter::default();
    let store = memory_store(&ctl, &src, secs(3600));
    store.get().await.unwrap();
    store.invalidate();
    let s = store.get().await.unwrap();
    assert_eq!((*s.data, s.is_stale), (1, true));
    yield_until("refreshed", 100, || {
        store.peek().is_some_and(|s| s.scan_id == 2)
    })
    .await;
    let s = store.get().await.unwrap();
    assert_eq!((*s.data, s.is_stale), (2, false));
}

#[tokio::test(start_paused = true)]
async fn a_scan_cut_by_its_budget_or_by_shutdown_leaves_the_last_value_and_says_so() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src = Counter {
        delay: Some(secs(100)),
        ..Counter::default()
    };
    let policy = JobPolicy::builder().budget(secs(150)).build().unwrap();
    let store = SnapshotStore::builder("s")
        .ttl(secs(10))
        .in_memory()
        .policy(policy)
        .build(&ctl, src.plugin())
        .unwrap();
    store.get().await.unwrap();
    let slower = SnapshotStore::builder("t")
        .ttl(secs(10))
        .in_memory()
        .policy(JobPolicy::builder().budget(secs(50)).build().unwrap())
        .build(&ctl, src.plugin())
        .unwrap();
    let err = slower.get().await.unwrap_err();
    assert_eq!(err.kind(), "budget_exceeded", "{err}");
    assert_eq!(slower.status().state, ScanState::Failed);

    // A refresh in flight when the controller shuts down: interrupted, the value stays.
    tokio::time::sleep(secs(11)).await;
    assert!(store.get().await.unwrap().is_stale);
    yield_until("scanning", 100, || {
        store.status().state == ScanState::Scanning
    })
    .await;
    assert!(
        !ctl.shutdown(secs(1)).await,
        "the scan did not finish within grace"
    );
    assert_eq!(store.status().state, ScanState::Interrupted);
    assert_eq!(*store.peek().unwrap().data, 1);
    // After shutdown a stale read still answers, and starts nothing.
    let s = store.get().await.unwrap();
    assert_eq!((*s.data, s.is_stale), (1, true));
    assert!(!store.is_refreshing());
    assert_eq!(store.status().state, ScanState::Interrupted);
}

#[tokio::test(start_paused = true)]
async fn snapshots_and_status_serialize_with_rfc3339_times() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src = Counter::default();
    let store = memory_store(&ctl, &src, secs(60));
    let s = store.get().await.unwrap();
    let v = serde_json::to_value(&s).unwrap();
    assert_eq!(v["data"], 1);
    assert_eq!(v["scan_id"], 1);
    assert_eq!(v["source"], "scan");
    assert!(v["generated_at"].as_str().unwrap().ends_with('Z'), "{v}");
    let st = serde_json::to_value(store.status()).unwrap();
    assert_eq!(st["state"], "idle");
    assert_eq!(st["scan_id"], 1);
    assert!(st["last_success"].as_str().unwrap().ends_with('Z'), "{st}");
}

#[test]
fn unsafe_store_names_are_refused_at_build_time() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let long = "x".repeat(129);
    for bad in ["../x", "/abs", "a/b", "a\0b", "", ".", "..", long.as_str()] {
        let err = SnapshotStore::builder(bad)
            .persist_dir(dir.path())
            .build(&ctl, Counter::default().plugin())
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("store name"), "{bad:?}: {msg}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing created"
    );
}

// ---------------------------------------------------------------------------------------------
// How freshness is decided: the store's task marks values certainly fresh or stale between the
// instants where that changes, and readers near those instants read the clock. Exact either way.
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_read_at_exactly_ttl_is_stale_and_one_just_before_is_fresh() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src = Counter {
        delay: Some(secs(100)),
        ..Counter::default()
    };
    let store = memory_store(&ctl, &src, secs(60));
    store.get().await.unwrap();
    let ms = Duration::from_millis(1);
    for (at, stale) in [
        (secs(1), false),
        (secs(59), false),
        (secs(60) - ms, false),
        (secs(60), true),
    ] {
        let since = store.peek().unwrap().age();
        tokio::time::sleep(at - since).await;
        let s = store.get().await.unwrap();
        assert_eq!((s.age(), s.is_stale), (at, stale), "read at {at:?}");
    }
    yield_until("the refresh started", 100, || src.calls() == 2).await;
    assert!(store.is_refreshing());
}

#[tokio::test(start_paused = true)]
async fn a_read_at_max_stale_waits_and_one_just_before_does_not() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src = Counter {
        delay: Some(secs(2)),
        ..Counter::default()
    };
    let store = SnapshotStore::builder("s")
        .ttl(secs(10))
        .max_stale(secs(60))
        .max_stale_wait(secs(5))
        .in_memory()
        .build(&ctl, src.plugin())
        .unwrap();
    store.get().await.unwrap();
    let ms = Duration::from_millis(1);
    tokio::time::sleep(secs(60) - ms).await;
    let t = tokio::time::Instant::now();
    let s = store.get().await.unwrap();
    assert_eq!(
        (*s.data, s.is_stale, t.elapsed()),
        (1, true, Duration::ZERO)
    );
    // That read started the 2 s refresh; a read at max_stale joins it and waits.
    tokio::time::sleep(ms).await;
    let t = tokio::time::Instant::now();
    let s = store.get().await.unwrap();
    assert_eq!((*s.data, s.is_stale), (2, false));
    assert_eq!(t.elapsed(), secs(2) - ms);
    assert_eq!(src.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn invalidate_while_the_value_is_certainly_fresh() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src = Counter {
        delay: Some(secs(1)),
        ..Counter::default()
    };
    let store = memory_store(&ctl, &src, secs(3600));
    store.get().await.unwrap();
    // Well inside the ttl: the store's task has marked the value fresh by now.
    tokio::time::sleep(secs(30)).await;
    assert!(!store.get().await.unwrap().is_stale);
    store.invalidate();
    assert!(store.peek().unwrap().is_stale);
    let s = store.get().await.unwrap();
    assert_eq!((*s.data, s.is_stale), (1, true), "answered with the value");
    assert!(store.is_refreshing(), "and a refresh started");
    for _ in 0..100 {
        assert!(store.get().await.unwrap().is_stale);
    }
    tokio::time::sleep(secs(1)).await;
    yield_until("refreshed", 100, || {
        store.peek().is_some_and(|s| s.scan_id == 2)
    })
    .await;
    assert_eq!(src.calls(), 2, "one refresh");
    tokio::time::sleep(secs(30)).await;
    let s = store.get().await.unwrap();
    assert_eq!((*s.data, s.is_stale), (2, false), "the new value is fresh");
}

#[tokio::test(start_paused = true)]
async fn shutdown_is_not_held_up_by_a_store_timer_and_reads_go_on_after_it() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src = Counter::default();
    let store = memory_store(&ctl, &src, secs(3600));
    store.get().await.unwrap();
    tokio::time::sleep(secs(1)).await;
    assert!(!store.get().await.unwrap().is_stale);
    // The store's task sleeps until just before the ttl; shutdown does not wait for it (nor
    // for the grace period).
    let t = tokio::time::Instant::now();
    assert!(ctl.shutdown(secs(30)).await, "clean");
    assert_eq!(t.elapsed(), Duration::ZERO);
    // Reads go on, decided by the clock: fresh, then stale at the ttl, and nothing starts.
    let s = store.get().await.unwrap();
    assert_eq!((*s.data, s.is_stale), (1, false));
    tokio::time::sleep(secs(3599)).await;
    let s = store.get().await.unwrap();
    assert_eq!((*s.data, s.is_stale, s.age()), (1, true, secs(3600)));
    assert!(!store.is_refreshing());
    assert_eq!(src.calls(), 1);
}

#[test]
fn a_store_loaded_from_disk_outside_a_runtime_answers_exactly() {
    use futures::FutureExt;
    let dir = tempfile::tempdir().unwrap();
    let paused = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    };
    let src = Counter::default();
    {
        let rt = paused();
        let ctl = rt.block_on(async { JobRuntimeController::new(RuntimeConfig::default()) });
        rt.block_on(disk_store(&ctl, &src, dir.path()).get())
            .unwrap();
    }
    // Built at start-up, before any runtime: no task can start; reads decide by the clock.
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let store = disk_store(&ctl, &src, dir.path());
    let s = store.get().now_or_never().expect("at once").unwrap();
    assert_eq!((*s.data, s.source, s.is_stale), (1, Origin::Disk, false));
    assert!(s.age() < secs(60));

    let rt = paused();
    rt.block_on(async {
        // The file's age at load plus paused time: exact from here on. (`advance`, not
        // `sleep`: the age is not a whole number of milliseconds, and sleeps end on a tick.)
        let since = store.peek().unwrap().age();
        let ms = Duration::from_millis(1);
        tokio::time::advance(secs(60) - since - ms).await;
        assert!(!store.get().await.unwrap().is_stale, "just before the ttl");
        tokio::time::advance(ms).await;
        let s = store.get().await.unwrap();
        assert_eq!((*s.data, s.is_stale, s.age()), (1, true, secs(60)));
        yield_until("refreshed", 100, || {
            store.peek().is_some_and(|s| s.scan_id == 2)
        })
        .await;
        assert!(!store.get().await.unwrap().is_stale);
    });
    assert_eq!(src.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_stale_readers_start_one_refresh() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let gate = Gate::new();
    let calls = Arc::new(AtomicU64::new(0));
    let store = {
        let (gate, calls) = (gate.clone(), Arc::clone(&calls));
        SnapshotStore::builder("s")
            .ttl(Duration::from_millis(50))
            .in_memory()
            .build(
                &ctl,
                RefreshPlugin::new(move |_ctx| {
                    let (gate, n) = (gate.clone(), calls.fetch_add(1, Ordering::SeqCst) + 1);
                    async move {
                        // The refresh (call 2) waits until every reader has read.
                        if n > 1 {
                            gate.wait().await;
                        }
                        Ok(n)
                    }
                }),
            )
            .unwrap()
    };
    store.get().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let readers: Vec<_> = (0..1000)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.get().await })
        })
        .collect();
    for r in readers {
        let s = r.await.unwrap().unwrap();
        assert_eq!((*s.data, s.scan_id, s.is_stale), (1, 1, true));
    }
    support::wait_until("the refresh started", secs(10), || {
        calls.load(Ordering::SeqCst) == 2
    })
    .await;
    assert!(store.is_refreshing());
    gate.open();
    support::wait_until("refreshed", secs(10), || {
        store.peek().is_some_and(|s| s.scan_id == 2)
    })
    .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "1,000 stale readers, one refresh"
    );
    assert!(!store.get().await.unwrap().is_stale);
}

// ---------------------------------------------------------------------------------------------
// Files: restarts, damage, newer formats, failed writes
// ---------------------------------------------------------------------------------------------

fn disk_store(
    ctl: &JobRuntimeController,
    src: &Counter,
    dir: &std::path::Path,
) -> SnapshotStore<u64> {
    SnapshotStore::builder("s")
        .ttl(secs(60))
        .persist_dir(dir)
        .build(ctl, src.plugin())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_restart_answers_from_disk_at_once_and_scan_ids_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src = Counter::default();
    let store = disk_store(&ctl, &src, dir.path());
    store.get().await.unwrap();
    store.refresh_now(true, false).await.unwrap();
    assert_eq!(store.peek().unwrap().scan_id, 2);
    drop(store);

    // A new process: a new controller and store on the same directory.
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src2 = Counter::default();
    let store = disk_store(&ctl, &src2, dir.path());
    let t = tokio::time::Instant::now();
    let s = store.get().await.unwrap();
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert_eq!((*s.data, s.scan_id, s.source), (2, 2, Origin::Disk));
    assert_eq!(src2.calls(), 0, "no scan before the first answer");
    assert_eq!(store.status().source, Some(Origin::Disk));
    let next = store.refresh_now(true, false).await.unwrap();
    assert_eq!((next.scan_id, next.source), (3, Origin::Scan));
}

#[tokio::test(start_paused = true)]
async fn a_damaged_file_is_set_aside_and_rebuilt_by_a_scan() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src = Counter::default();
    disk_store(&ctl, &src, dir.path()).get().await.unwrap();
    let path = dir.path().join("s/snapshot.json");
    let good = std::fs::read(&path).unwrap();
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();

    let store = disk_store(&ctl, &src, dir.path());
    let note = store.status().persistence.unwrap();
    assert!(note.contains("set aside"), "{note}");
    assert!(
        store.peek().is_none(),
        "nothing trusted from a damaged file"
    );
    let aside: Vec<_> = std::fs::read_dir(dir.path().join("s"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("snapshot.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let s = store.get().await.unwrap();
    assert_eq!((*s.data, s.source), (2, Origin::Scan));
    assert_eq!(src.calls(), 2, "rebuilt by one scan");
    // And the rebuilt file loads.
    let again = disk_store(&ctl, &Counter::default(), dir.path());
    assert_eq!(again.peek().unwrap().scan_id, s.scan_id);
}

/// `JOBRT_SNAPSHOT_MAX_BYTES` (or the store's `max_load_bytes`, which wins) caps what a store
/// reads at start-up: a larger file is moved aside unread and rebuilt by a scan.
#[tokio::test(start_paused = true)]
async fn a_file_over_the_size_limit_is_set_aside_unread_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let src = Counter::default();
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    disk_store(&ctl, &src, dir.path()).get().await.unwrap();
    let path = dir.path().join("s/snapshot.json");
    let good = std::fs::read(&path).unwrap();

    // The variable is below the file's size, but the store's own limit is above it.
    let tight = RuntimeConfig::from_env_with([("JOBRT_SNAPSHOT_MAX_BYTES", "16")]).unwrap();
    let ctl = JobRuntimeController::new(tight);
    let roomy = SnapshotStore::builder("s")
        .persist_dir(dir.path())
        .max_load_bytes(good.len() as u64)
        .build(&ctl, src.plugin())
        .unwrap();
    assert_eq!(
        roomy.peek().unwrap().scan_id,
        1,
        "read: the store's limit wins"
    );
    drop(roomy);

    let store = disk_store(&ctl, &src, dir.path());
    let note = store.status().persistence.unwrap();
    assert!(
        note.contains("set aside") && note.contains("16 bytes"),
        "{note}"
    );
    assert!(store.peek().is_none(), "nothing read from it");
    let aside: Vec<_> = std::fs::read_dir(dir.path().join("s"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("snapshot.json.too-large-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let moved = std::fs::read(dir.path().join("s").join(&aside[0])).unwrap();
    assert_eq!(moved, good, "nothing lost");
    let s = store.get().await.unwrap();
    assert_eq!((*s.data, s.source), (2, Origin::Scan));
}

#[tokio::test(start_paused = true)]
async fn a_file_of_a_newer_format_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("s")).unwrap();
    let path = dir.path().join("s/snapshot.json");
    let newer = br#"{"format": 99, "something": "from the future"}"#;
    std::fs::write(&path, newer).unwrap();
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src = Counter::default();
    let store = disk_store(&ctl, &src, dir.path());
    let s = store.get().await.unwrap();
    assert_eq!(*s.data, 1, "served from a scan, from memory");
    let note = store.status().persistence.unwrap();
    assert!(note.contains("newer") && note.contains("memory"), "{note}");
    assert_eq!(std::fs::read(&path).unwrap(), newer, "left untouched");
}

#[tokio::test(start_paused = true)]
async fn a_failed_write_keeps_serving_and_shows_in_status() {
    let dir = tempfile::tempdir().unwrap();
    // A non-empty directory where the file should be: it cannot be read or renamed over.
    std::fs::create_dir_all(dir.path().join("s/snapshot.json/x")).unwrap();
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let src = Counter::default();
    let store = disk_store(&ctl, &src, dir.path());
    let s = store.get().await.unwrap();
    assert_eq!(*s.data, 1);
    let st = store.status();
    assert_eq!(st.state, ScanState::Idle, "the scan itself succeeded");
    let note = st.persistence.unwrap();
    assert!(note.contains("last write failed"), "{note}");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("s"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["snapshot.json"], "no temp file left behind");
}

#[cfg(unix)]
#[tokio::test(start_paused = true)]
async fn a_symlink_at_the_snapshot_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("s")).unwrap();
    let target = dir.path().join("elsewhere.json");
    std::fs::write(&target, b"precious").unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join("s/snapshot.json")).unwrap();
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let store = disk_store(&ctl, &Counter::default(), dir.path());
    assert!(store.status().persistence.unwrap().contains("symlink"));
    store.get().await.unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    assert!(store.status().persistence.unwrap().contains("symlink"));
}
