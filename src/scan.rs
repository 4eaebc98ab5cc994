//! Incremental scans: recompute only what changed since the last scan.
//!
//! Why: a page computed over 100,000 session files must not reread all of them when 1% changed.
//! An [`IncrementalScan`] lists its items with a fingerprint each (an mtime and a size, a hash),
//! computes one item's *contribution*, and folds contributions into an aggregate with `add` and
//! `subtract`. [`ScanPlugin`] turns it into a [`SnapshotSource`]: it keeps a checkpoint — per
//! item its id, fingerprint and contribution — in memory and in `checkpoint.json` next to the
//! snapshot (same crash-safe protocol), and on a refresh recomputes only the new and changed
//! items, subtracts the old contributions of changed and removed ones, and adds the new.
//!
//! A full rebuild (every item recomputed, the aggregate folded from nothing) happens on demand
//! (`refresh_now(_, true)`), when there is no usable checkpoint (first scan, damaged file,
//! another schema version), and optionally every N incremental refreshes
//! ([`ScanPlugin::full_every`]). Incremental and full give the same aggregate as long as
//! `subtract` undoes `add` (the crate's property test checks that over random histories).
//!
//! The checkpoint and the snapshot are written once the scan has succeeded, checkpoint first;
//! a scan that fails or is cancelled midway leaves both files as they were. Should the process
//! die between the two writes, the checkpoint's scan id no longer matches the snapshot's, and
//! the next refresh folds its aggregate from the checkpoint instead of trusting the snapshot.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::RunError;
use crate::job::JobContext;
use crate::snapshot::persist::{FileKind, Loaded};
use crate::snapshot::{Produce, Produced, SnapshotSource};

/// One item a scan covers: a stable id and a fingerprint that changes when the item does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ItemRef {
    /// Stable id (a relative path, a primary key).
    pub id: String,
    /// Changes whenever the item's contribution may change (mtime + size, a hash, a version).
    pub fingerprint: String,
}

impl ItemRef {
    /// An item.
    pub fn new(id: impl Into<String>, fingerprint: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            fingerprint: fingerprint.into(),
        }
    }
}

/// A scan over many items whose results fold into one aggregate.
///
/// `subtract(add(a, c), c)` must give `a` back: that is what lets a refresh take a changed
/// item's old contribution out.
pub trait IncrementalScan: Send + Sync + 'static {
    /// The scan's result, served by the snapshot store.
    type Aggregate: Clone + Default + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What one item adds to the aggregate; kept in the checkpoint.
    type Contribution: Clone + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// The version of the aggregate's and contributions' form; a change forces a full rebuild.
    fn schema_version(&self) -> u32 {
        1
    }
    /// Lists every item with its fingerprint.
    fn list(&self, ctx: &JobContext)
    -> impl Future<Output = Result<Vec<ItemRef>, RunError>> + Send;
    /// Computes one item's contribution.
    fn compute(
        &self,
        item: &ItemRef,
        ctx: &JobContext,
    ) -> impl Future<Output = Result<Self::Contribution, RunError>> + Send;
    /// Folds a contribution in.
    fn add(&self, aggregate: &mut Self::Aggregate, c: &Self::Contribution);
    /// Takes a contribution out.
    fn subtract(&self, aggregate: &mut Self::Aggregate, c: &Self::Contribution);
}

/// The checkpoint: per item, its fingerprint and contribution.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "C: Serialize + DeserializeOwned")]
struct Checkpoint<C> {
    /// The scan whose aggregate these contributions add up to.
    scan_id: u64,
    /// Incremental refreshes since the last full one.
    since_full: u32,
    items: Vec<Entry<C>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry<C> {
    id: String,
    fingerprint: String,
    contribution: C,
}

/// Checkpoint in memory: by id.
struct Memo<C> {
    scan_id: u64,
    since_full: u32,
    items: HashMap<String, (String, C)>,
}

impl<C: Clone> Memo<C> {
    fn from_checkpoint(c: Checkpoint<C>) -> Self {
        Self {
            scan_id: c.scan_id,
            since_full: c.since_full,
            items: c
                .items
                .into_iter()
                .map(|e| (e.id, (e.fingerprint, e.contribution)))
                .collect(),
        }
    }
}

/// Serializes a [`Memo`] in the form of a [`Checkpoint`] (entries sorted by id), borrowing the
/// entries instead of copying them.
struct CheckpointView<'a, C>(&'a Memo<C>);

impl<C: Serialize> Serialize for CheckpointView<'_, C> {
    fn serialize<Se: serde::Serializer>(&self, s: Se) -> Result<Se::Ok, Se::Error> {
        use serde::ser::SerializeStruct;
        #[derive(Serialize)]
        struct EntryRef<'a, C> {
            id: &'a str,
            fingerprint: &'a str,
            contribution: &'a C,
        }
        let mut items: Vec<_> = self
            .0
            .items
            .iter()
            .map(|(id, (fp, c))| EntryRef {
                id,
                fingerprint: fp,
                contribution: c,
            })
            .collect();
        items.sort_unstable_by(|a, b| a.id.cmp(b.id));
        let mut st = s.serialize_struct("Checkpoint", 3)?;
        st.serialize_field("scan_id", &self.0.scan_id)?;
        st.serialize_field("since_full", &self.0.since_full)?;
        st.serialize_field("items", &items)?;
        st.end()
    }
}

/// An [`IncrementalScan`] as a snapshot source.
///
/// ```
/// use job_runtime::scan::{IncrementalScan, ItemRef, ScanPlugin};
/// use job_runtime::snapshot::SnapshotStore;
/// use job_runtime::{JobContext, JobRuntimeController, RunError, RuntimeConfig};
///
/// /// Sums the lengths of some words; each word is an item.
/// struct Lengths(Vec<&'static str>);
///
/// impl IncrementalScan for Lengths {
///     type Aggregate = u64;
///     type Contribution = u64;
///     async fn list(&self, _ctx: &JobContext) -> Result<Vec<ItemRef>, RunError> {
///         Ok(self.0.iter().map(|w| ItemRef::new(*w, "v1")).collect())
///     }
///     async fn compute(&self, item: &ItemRef, _ctx: &JobContext) -> Result<u64, RunError> {
///         Ok(item.id.len() as u64)
///     }
///     fn add(&self, total: &mut u64, c: &u64) { *total += c }
///     fn subtract(&self, total: &mut u64, c: &u64) { *total -= c }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let ctl = JobRuntimeController::new(RuntimeConfig::default());
/// let dir = tempfile::tempdir().unwrap();
/// let store = SnapshotStore::builder("lengths")
///     .persist_dir(dir.path())
///     .build(&ctl, ScanPlugin::new(Lengths(vec!["a", "bb", "ccc"])))
///     .unwrap();
/// assert_eq!(*store.get().await.unwrap().data, 6);
/// assert!(dir.path().join("lengths/checkpoint.json").exists());
/// # }
/// ```
pub struct ScanPlugin<S: IncrementalScan> {
    scan: S,
    parallelism: NonZeroUsize,
    full_every: Option<u32>,
    memo: Mutex<Option<Arc<Memo<S::Contribution>>>>,
}

impl<S: IncrementalScan> fmt::Debug for ScanPlugin<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScanPlugin")
            .field("parallelism", &self.parallelism)
            .field("full_every", &self.full_every)
            .finish()
    }
}

impl<S: IncrementalScan> ScanPlugin<S> {
    /// A plugin computing up to 8 contributions at once, with no periodic full rebuild.
    pub fn new(scan: S) -> Self {
        Self {
            scan,
            parallelism: NonZeroUsize::new(8).expect("non-zero"),
            full_every: None,
            memo: Mutex::new(None),
        }
    }

    /// How many contributions are computed at once.
    #[must_use]
    pub fn parallelism(mut self, n: NonZeroUsize) -> Self {
        self.parallelism = n;
        self
    }

    /// A full rebuild after every `n` incremental refreshes (catches a `subtract` that drifts).
    #[must_use]
    pub fn full_every(mut self, n: u32) -> Self {
        self.full_every = Some(n);
        self
    }

    /// The scan.
    pub fn scan(&self) -> &S {
        &self.scan
    }

    fn memo(&self) -> Option<Arc<Memo<S::Contribution>>> {
        crate::lock::unpoisoned(&self.memo).clone()
    }

    fn set_memo(&self, m: Option<Arc<Memo<S::Contribution>>>) {
        *crate::lock::unpoisoned(&self.memo) = m;
    }

    async fn run(&self, req: Produce<S::Aggregate>) -> Result<Produced<S::Aggregate>, RunError> {
        let ctx = &req.ctx;
        let items = self.scan.list(ctx).await?;
        let seen = items.len() as u64;

        // The checkpoint: in memory after the first scan of this process, else from disk.
        let mut memo = self.memo();
        if memo.is_none()
            && let Some(files) = &req.files
        {
            let files = Arc::clone(files);
            let loaded = tokio::task::spawn_blocking(move || {
                files.load::<Checkpoint<S::Contribution>>(FileKind::Checkpoint)
            })
            .await
            .map_err(|e| {
                RunError::from(std::io::Error::other(format!(
                    "reading the checkpoint: {e}"
                )))
            })?;
            match loaded {
                Loaded::Found(s) => memo = Some(Arc::new(Memo::from_checkpoint(s.value))),
                Loaded::Missing => {}
                Loaded::Quarantined { moved_to, reason } => {
                    tracing::warn!(file = %moved_to.display(), %reason, "damaged checkpoint set aside; full rebuild");
                }
                Loaded::Newer { version } => {
                    tracing::warn!(
                        version,
                        "checkpoint of a newer format left untouched; full rebuild"
                    );
                }
                Loaded::Refused { reason } => {
                    tracing::warn!(%reason, "checkpoint not used; full rebuild");
                }
            }
        }
        let due = |m: &Memo<S::Contribution>| self.full_every.is_some_and(|n| m.since_full >= n);
        // The aggregate the checkpoint adds up to: the value served now when it came from the
        // same scan, else folded from the checkpoint's contributions.
        let base = match &memo {
            Some(m) if !req.full && !due(m) => Some(match (&req.previous, req.previous_scan_id) {
                (Some(prev), Some(id)) if id == m.scan_id => (**prev).clone(),
                _ => {
                    let mut agg = S::Aggregate::default();
                    for (_, c) in m.items.values() {
                        self.scan.add(&mut agg, c);
                    }
                    agg
                }
            }),
            _ => None,
        };
        let incremental = base.is_some();
        let old = if incremental { memo.take() } else { None };

        // What to compute: every item for a full rebuild; else the new and changed ones. One
        // lookup per listed item; listed items that are in the checkpoint are counted, so
        // removals are looked for only when some checkpoint entry was not listed.
        // (Indices, not references: a stream of borrowed items trips the compiler's check
        // that this future is `Send`.)
        let mut in_checkpoint = 0usize;
        let todo: Vec<usize> = (0..items.len())
            .filter(|&i| {
                let it = &items[i];
                match old.as_ref().and_then(|m| m.items.get(&it.id)) {
                    Some((fp, _)) => {
                        in_checkpoint += 1;
                        *fp != it.fingerprint
                    }
                    None => true,
                }
            })
            .collect();
        let total = todo.len() as u64;
        ctx.progress(0, total);
        let mut computed = Vec::with_capacity(todo.len());
        {
            let (scan, items) = (&self.scan, &items);
            let mut results = futures_util::stream::iter(todo)
                .map(move |i| async move { (i, scan.compute(&items[i], ctx).await) })
                .buffer_unordered(self.parallelism.get());
            let mut done = 0;
            while let Some((i, r)) = results.next().await {
                computed.push((i, r?));
                done += 1;
                if done % 64 == 0 || done == total {
                    ctx.progress(done, total);
                }
            }
        }

        // Every contribution is in: fold them in, updating the checkpoint in place (the old
        // one is still the plugin's until the new one replaces it, so a failure above left
        // it untouched).
        let mut agg = base.unwrap_or_default();
        let (mut next, since_full) = match old {
            Some(m) => {
                // Drop the plugin's own reference, so the checkpoint is updated in place
                // rather than copied.
                self.set_memo(None);
                let m = Arc::try_unwrap(m).unwrap_or_else(|shared| Memo {
                    scan_id: shared.scan_id,
                    since_full: shared.since_full,
                    items: shared.items.clone(),
                });
                (m.items, m.since_full + 1)
            }
            None => (HashMap::with_capacity(items.len()), 0),
        };
        let mut changed = computed.len() as u64;
        if in_checkpoint < next.len() {
            let listed: std::collections::HashSet<&str> =
                items.iter().map(|i| i.id.as_str()).collect();
            next.retain(|id, (_, c)| {
                let keep = listed.contains(id.as_str());
                if !keep {
                    self.scan.subtract(&mut agg, c);
                    changed += 1;
                }
                keep
            });
        }
        for (i, c) in computed {
            let it = &items[i];
            self.scan.add(&mut agg, &c);
            if let Some((_, prev)) = next.insert(it.id.clone(), (it.fingerprint.clone(), c)) {
                self.scan.subtract(&mut agg, &prev);
            }
        }
        let memo = Arc::new(Memo {
            scan_id: req.scan_id,
            since_full,
            items: next,
        });
        if let Some(files) = &req.files {
            let (files, cp) = (Arc::clone(files), Arc::clone(&memo));
            let scan_id = req.scan_id;
            let at = ctx.wall_now();
            let written = tokio::task::spawn_blocking(move || {
                files.save(FileKind::Checkpoint, scan_id, at, &CheckpointView(&cp))
            })
            .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "checkpoint not written; the next refresh after a restart rebuilds")
                }
                Err(e) => tracing::warn!(error = %e, "checkpoint write task failed"),
            }
        }
        self.set_memo(Some(memo));
        Ok(Produced::new(agg).items(seen, changed))
    }
}

impl<S: IncrementalScan> SnapshotSource<S::Aggregate> for ScanPlugin<S> {
    fn schema_version(&self) -> u32 {
        self.scan.schema_version()
    }

    async fn produce(
        &self,
        req: Produce<S::Aggregate>,
    ) -> Result<Produced<S::Aggregate>, RunError> {
        self.run(req).await
    }
}
