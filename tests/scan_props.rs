//! Incremental scans give the same aggregate as a full rebuild, over random histories of
//! items added, changed and removed (with refreshes in between), with and without files, and
//! across restarts from the checkpoint on disk.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use job_runtime::scan::{IncrementalScan, ItemRef, ScanPlugin};
use job_runtime::snapshot::SnapshotStore;
use job_runtime::{JobContext, JobRuntimeController, RunError, RuntimeConfig};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

/// The items: id → (version, value). The fingerprint is the version.
type Items = Arc<Mutex<BTreeMap<String, (u64, u32)>>>;

/// Count, sum, and a histogram of values (a map, so `subtract` must remove emptied entries for
/// the aggregates to compare equal).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Agg {
    count: u64,
    sum: u64,
    hist: BTreeMap<u32, u64>,
}

struct Scan {
    items: Items,
    computed: Arc<Mutex<u64>>,
}

impl IncrementalScan for Scan {
    type Aggregate = Agg;
    type Contribution = u32;

    async fn list(&self, _ctx: &JobContext) -> Result<Vec<ItemRef>, RunError> {
        let items = self.items.lock().unwrap();
        Ok(items
            .iter()
            .map(|(id, (v, _))| ItemRef::new(id.clone(), v.to_string()))
            .collect())
    }

    async fn compute(&self, item: &ItemRef, _ctx: &JobContext) -> Result<u32, RunError> {
        *self.computed.lock().unwrap() += 1;
        let items = self.items.lock().unwrap();
        Ok(items.get(&item.id).map_or(0, |(_, x)| *x))
    }

    fn add(&self, a: &mut Agg, c: &u32) {
        a.count += 1;
        a.sum += u64::from(*c);
        *a.hist.entry(*c % 7).or_default() += 1;
    }

    fn subtract(&self, a: &mut Agg, c: &u32) {
        a.count -= 1;
        a.sum -= u64::from(*c);
        let e = a
            .hist
            .get_mut(&(*c % 7))
            .expect("subtracting what was added");
        *e -= 1;
        if *e == 0 {
            a.hist.remove(&(*c % 7));
        }
    }
}

fn oracle(items: &Items) -> Agg {
    let scan = Scan {
        items: Arc::clone(items),
        computed: Arc::default(),
    };
    let mut a = Agg::default();
    for (_, x) in items.lock().unwrap().values() {
        scan.add(&mut a, x);
    }
    a
}

#[derive(Debug, Clone)]
enum Op {
    Add(u8, u32),
    Change(u8, u32),
    Remove(u8),
    Refresh,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<u8>(), any::<u32>()).prop_map(|(i, x)| Op::Add(i % 40, x % 1000)),
        3 => (any::<u8>(), any::<u32>()).prop_map(|(i, x)| Op::Change(i % 40, x % 1000)),
        2 => any::<u8>().prop_map(|i| Op::Remove(i % 40)),
        2 => Just(Op::Refresh),
        1 => Just(Op::Restart),
    ]
}

fn build(
    ctl: &JobRuntimeController,
    items: &Items,
    computed: &Arc<Mutex<u64>>,
    dir: Option<&std::path::Path>,
) -> SnapshotStore<Agg> {
    let b = SnapshotStore::builder("props").ttl(Duration::from_secs(3600));
    let b = match dir {
        Some(d) => b.persist_dir(d),
        None => b.in_memory(),
    };
    b.build(
        ctl,
        ScanPlugin::new(Scan {
            items: Arc::clone(items),
            computed: Arc::clone(computed),
        })
        .parallelism(std::num::NonZeroUsize::new(3).unwrap()),
    )
    .unwrap()
}

fn check(ops: Vec<Op>, persist: bool) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let dir = persist.then(|| dir.path());
        let ctl = JobRuntimeController::new(RuntimeConfig::default());
        let items: Items = Arc::default();
        let computed = Arc::new(Mutex::new(0));
        let mut store = build(&ctl, &items, &computed, dir);
        let mut version = 0u64;
        for op in ops {
            version += 1;
            match op {
                Op::Add(i, x) | Op::Change(i, x) => {
                    items
                        .lock()
                        .unwrap()
                        .insert(format!("item-{i}"), (version, x));
                }
                Op::Remove(i) => {
                    items.lock().unwrap().remove(&format!("item-{i}"));
                }
                Op::Restart => {
                    // Only meaningful with files: a new store answers from disk, and its next
                    // refresh starts from the checkpoint on disk.
                    if persist {
                        store = build(&ctl, &items, &computed, dir);
                    }
                }
                Op::Refresh => {
                    let before = *computed.lock().unwrap();
                    let changed_items = {
                        // Not known here; the check below is the aggregate.
                        0
                    };
                    let _ = changed_items;
                    let s = store.refresh_now(true, false).await.unwrap();
                    prop_assert_eq!(&*s.data, &oracle(&items), "incremental == oracle");
                    let after = *computed.lock().unwrap();
                    prop_assert!(after - before <= items.lock().unwrap().len() as u64);
                }
            }
        }
        let inc = store.refresh_now(true, false).await.unwrap();
        let full = store.refresh_now(true, true).await.unwrap();
        prop_assert_eq!(&*inc.data, &*full.data, "incremental == full rebuild");
        prop_assert_eq!(&*full.data, &oracle(&items));
        prop_assert!(full.scan_id > inc.scan_id);
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn incremental_equals_full_rebuild_in_memory(ops in proptest::collection::vec(op(), 1..60)) {
        check(ops, false)?;
    }

    #[test]
    fn incremental_equals_full_rebuild_with_files_and_restarts(ops in proptest::collection::vec(op(), 1..40)) {
        check(ops, true)?;
    }
}

/// Only new and changed items are recomputed; removed ones are subtracted without a call.
#[tokio::test]
async fn a_refresh_recomputes_only_new_and_changed_items() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let items: Items = Arc::default();
    for i in 0..100 {
        items.lock().unwrap().insert(format!("item-{i:03}"), (0, i));
    }
    let computed = Arc::new(Mutex::new(0));
    let store = build(&ctl, &items, &computed, None);
    store.get().await.unwrap();
    assert_eq!(*computed.lock().unwrap(), 100);
    {
        let mut it = items.lock().unwrap();
        it.insert("item-000".into(), (1, 500)); // changed
        it.insert("item-new".into(), (1, 7)); // new
        it.remove("item-050"); // removed
    }
    let s = store.refresh_now(true, false).await.unwrap();
    assert_eq!(*computed.lock().unwrap(), 102, "two computed");
    assert_eq!(*s.data, oracle(&items));
    let st = store.status();
    assert_eq!((st.items_seen, st.items_changed), (100, 3));
    // A full rebuild recomputes all of them.
    store.refresh_now(true, true).await.unwrap();
    assert_eq!(*computed.lock().unwrap(), 202);
    assert_eq!(store.status().items_changed, 100);
}

/// Scan ids go on after a restart even when the snapshot file was lost (the checkpoint knows
/// the last id), and the value is rebuilt by a full scan.
#[tokio::test]
async fn after_a_damaged_snapshot_ids_go_on_and_the_checkpoint_rebuilds_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let items: Items = Arc::default();
    for i in 0..50 {
        items
            .lock()
            .unwrap()
            .insert(format!("item-{i:03}"), (0, i * 3));
    }
    let computed = Arc::new(Mutex::new(0));
    let store = build(&ctl, &items, &computed, Some(dir.path()));
    store.get().await.unwrap();
    store.refresh_now(true, false).await.unwrap();
    let last = store.refresh_now(true, false).await.unwrap();
    assert_eq!(last.scan_id, 3);
    assert_eq!(
        *computed.lock().unwrap(),
        50,
        "nothing changed after the first scan"
    );
    drop(store);

    std::fs::write(dir.path().join("props/snapshot.json"), b"{\"format\":1,").unwrap();
    let store = build(&ctl, &items, &computed, Some(dir.path()));
    assert!(store.peek().is_none(), "the damaged snapshot was set aside");
    let s = store.get().await.unwrap();
    assert_eq!(s.scan_id, 4, "ids go on from the checkpoint");
    assert_eq!(*s.data, oracle(&items));
    assert_eq!(
        *computed.lock().unwrap(),
        100,
        "a full scan recomputed every item"
    );
    assert_eq!(store.status().items_changed, 50);
}
