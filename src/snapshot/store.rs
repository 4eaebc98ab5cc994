use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Weak;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, SystemTime};
use tracing::Instrument;

use arc_swap::ArcSwapOption;
use futures_util::future::Either;
use futures_util::task::AtomicWaker;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::controller::{JobRuntimeController, Progress, RunState};
use crate::error::{JobError, RunError};
use crate::job::{JobContext, JobPolicy};
use crate::snapshot::persist::{FileKind, FileStore, Loaded, PersistError, validate_name};
use crate::time::{Clock, Instant};

/// Where a snapshot's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// A scan of this process.
    Scan,
    /// The file written by an earlier scan (after a restart).
    Disk,
}

/// One read of a [`SnapshotStore`]: the shared value and what is known about it.
#[derive(Debug, Serialize)]
#[non_exhaustive]
pub struct Snapshot<T> {
    /// The value, shared with every reader of the same scan.
    pub data: Arc<T>,
    /// When the scan that produced it ended (wall time; RFC 3339 in serde).
    #[serde(serialize_with = "crate::time::serde_fmt::rfc3339_at")]
    pub generated_at: SystemTime,
    /// What [`age`](Self::age) is computed from (`age_ms` in serde, computed when serialized).
    #[serde(serialize_with = "age_ms", rename = "age_ms")]
    aged: Aged,
    /// Older than the store's ttl (or invalidated) when read: a refresh is due or under way.
    pub is_stale: bool,
    /// The scan that produced it; strictly increasing across scans, restarts included.
    pub scan_id: u64,
    /// Scan or disk.
    pub source: Origin,
}

impl<T> Snapshot<T> {
    /// How old the value is now: its age when it entered memory (a file's age at load, zero
    /// for a scan) plus the time since, on the crate clock.
    ///
    /// Computed when called, not when read from the store, so a read does not pay for a clock
    /// read it may never need: call it once and keep the result if you need the age at one
    /// instant.
    pub fn age(&self) -> Duration {
        self.aged.at(Instant::now())
    }
}

impl<T> Clone for Snapshot<T> {
    fn clone(&self) -> Self {
        Self {
            data: Arc::clone(&self.data),
            generated_at: self.generated_at,
            aged: self.aged,
            is_stale: self.is_stale,
            scan_id: self.scan_id,
            source: self.source,
        }
    }
}

/// A value's age, as what it takes to compute it at any instant.
#[derive(Debug, Clone, Copy)]
struct Aged {
    /// Age when it entered memory (a file's age at load; zero for a scan)…
    at_load: Duration,
    /// …and when that was.
    loaded: Instant,
}

impl Aged {
    #[inline]
    fn at(&self, now: Instant) -> Duration {
        self.at_load + now.saturating_duration_since(self.loaded)
    }
}

fn age_ms<S: serde::Serializer>(aged: &Aged, s: S) -> Result<S::Ok, S::Error> {
    crate::time::serde_fmt::millis_of(&aged.at(Instant::now()), s)
}

/// What a store's scan is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanState {
    /// No scan running; the last one (if any) succeeded.
    Idle,
    /// A scan is running.
    Scanning,
    /// The last scan failed; readers get the last good value.
    Failed,
    /// The last scan was cancelled (shutdown, replaced, lease lost) before it ended.
    Interrupted,
}

/// The scan status of one store: what a service returns from its scan-status endpoint.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct ScanStatus {
    /// The store's name.
    pub name: String,
    /// Idle, scanning, failed or interrupted.
    pub state: ScanState,
    /// The scan id of the value readers get (`None`: no value yet).
    pub scan_id: Option<u64>,
    /// Where that value came from.
    pub source: Option<Origin>,
    /// When that value was produced.
    #[serde(serialize_with = "crate::time::serde_fmt::rfc3339")]
    pub generated_at: Option<SystemTime>,
    /// When the last successful scan ended.
    #[serde(serialize_with = "crate::time::serde_fmt::rfc3339")]
    pub last_success: Option<SystemTime>,
    /// How long the last successful scan took (`last_duration_ms` in serde).
    #[serde(
        serialize_with = "crate::time::serde_fmt::millis",
        rename = "last_duration_ms"
    )]
    pub last_duration: Option<Duration>,
    /// When the last scan started.
    #[serde(serialize_with = "crate::time::serde_fmt::rfc3339")]
    pub last_attempt: Option<SystemTime>,
    /// The last failed scan's error (cleared by the next success).
    pub last_error: Option<String>,
    /// Items the last successful scan listed.
    pub items_seen: u64,
    /// Items it found new, changed or removed (all of them for a full scan).
    pub items_changed: u64,
    /// Progress of the scan running now.
    pub progress: Option<Progress>,
    /// The next scheduled refresh, when a schedule drives this store.
    #[serde(serialize_with = "crate::time::serde_fmt::rfc3339")]
    pub next_refresh: Option<SystemTime>,
    /// Problems with the files on disk: a quarantined file, a failed write, a newer file that
    /// makes the store run from memory only.
    pub persistence: Option<String>,
}

/// What a [`SnapshotSource`] is asked for: one attempt at producing the value.
#[derive(Debug)]
#[non_exhaustive]
pub struct Produce<T> {
    /// The attempt's context (cancellation, deadline, progress).
    pub ctx: JobContext,
    /// The value readers get now, if any.
    pub previous: Option<Arc<T>>,
    /// Its scan id.
    pub previous_scan_id: Option<u64>,
    /// A full rebuild was asked for (`refresh_now(_, true)`).
    pub full: bool,
    /// The id this scan's value will carry.
    pub scan_id: u64,
    /// The store's files, when it persists (a scan keeps its checkpoint there).
    pub files: Option<Arc<FileStore>>,
}

/// What a [`SnapshotSource`] produced.
#[derive(Debug)]
#[non_exhaustive]
pub struct Produced<T> {
    /// The new value.
    pub value: T,
    /// Items looked at.
    pub items_seen: u64,
    /// Items new, changed or removed.
    pub items_changed: u64,
}

impl<T> Produced<T> {
    /// A value with no item counts.
    pub fn new(value: T) -> Self {
        Self {
            value,
            items_seen: 0,
            items_changed: 0,
        }
    }

    /// Sets the item counts.
    #[must_use]
    pub fn items(mut self, seen: u64, changed: u64) -> Self {
        self.items_seen = seen;
        self.items_changed = changed;
        self
    }
}

/// What produces a store's value: an incremental scan ([`crate::scan::ScanPlugin`]), a fetch
/// ([`RefreshPlugin`]), or anything else.
pub trait SnapshotSource<T>: Send + Sync + 'static {
    /// The version of `T`'s serialized form; a file with another version is set aside and
    /// rebuilt. Raise it when `T` changes incompatibly.
    fn schema_version(&self) -> u32 {
        1
    }
    /// One attempt at producing the value.
    fn produce(
        &self,
        req: Produce<T>,
    ) -> impl Future<Output = Result<Produced<T>, RunError>> + Send;
}

/// A source from any async fetch: `RefreshPlugin::new(|ctx| async { fetch().await })`.
///
/// ```
/// use job_runtime::snapshot::{RefreshPlugin, SnapshotStore};
/// use job_runtime::{JobRuntimeController, RuntimeConfig};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let ctl = JobRuntimeController::new(RuntimeConfig::default());
/// let store = SnapshotStore::builder("prices")
///     .in_memory()
///     .build(&ctl, RefreshPlugin::new(|_ctx| async { Ok(vec![1.5_f64, 2.5]) }))
///     .unwrap();
/// let snap = store.get().await.unwrap();
/// assert_eq!(*snap.data, vec![1.5, 2.5]);
/// # }
/// ```
pub struct RefreshPlugin<F> {
    fetch: F,
    schema: u32,
}

impl<F> fmt::Debug for RefreshPlugin<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshPlugin")
            .field("schema", &self.schema)
            .finish()
    }
}

impl<F> RefreshPlugin<F> {
    /// A source that calls `fetch` once per attempt.
    pub fn new(fetch: F) -> Self {
        Self { fetch, schema: 1 }
    }

    /// Sets the schema version of the fetched value (default 1).
    #[must_use]
    pub fn schema_version(mut self, v: u32) -> Self {
        self.schema = v;
        self
    }
}

impl<T, F, Fut> SnapshotSource<T> for RefreshPlugin<F>
where
    T: Send + Sync + 'static,
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, RunError>> + Send + 'static,
{
    fn schema_version(&self) -> u32 {
        self.schema
    }
    async fn produce(&self, req: Produce<T>) -> Result<Produced<T>, RunError> {
        (self.fetch)(req.ctx).await.map(Produced::new)
    }
}

type BoxFuture<R> = Pin<Box<dyn Future<Output = R> + Send>>;

/// [`SnapshotSource`] behind a pointer (its `produce` is not object-safe).
trait ErasedSource<T>: Send + Sync {
    fn produce(self: Arc<Self>, req: Produce<T>) -> BoxFuture<Result<Produced<T>, RunError>>;
}

impl<T: Send + Sync + 'static, S: SnapshotSource<T>> ErasedSource<T> for S {
    fn produce(self: Arc<Self>, req: Produce<T>) -> BoxFuture<Result<Produced<T>, RunError>> {
        Box::pin(async move { SnapshotSource::produce(&*self, req).await })
    }
}

/// What a reader may conclude about a [`Current`] without reading the clock (its `phase`).
///
/// Only the store's task ([`StoreTask`]) sets `FRESH` and `STALE`, and only while it keeps a
/// timer that takes the phase back to `PRECISE` before the conclusion could turn false; a new
/// `Current` starts `PRECISE`, and so does every value of a store whose task is not running.
mod phase {
    /// Read the clock and decide (always right).
    pub(super) const PRECISE: u8 = 0;
    /// Certainly fresh: younger than `ttl - margin` and not invalidated.
    pub(super) const FRESH: u8 = 1;
    /// Certainly stale, and younger than `max_stale - margin`.
    pub(super) const STALE: u8 = 2;
    /// Set by `invalidate`: read like `PRECISE`; the task never moves it to `FRESH`.
    pub(super) const INVALIDATED: u8 = 3;
}

/// How long before a value turns stale (and before it passes `max_stale`) the store's task
/// sends readers back to the clock.
///
/// A tokio timer fires on the first 1 ms tick at or after its deadline, then its task must be
/// scheduled: the flip from `FRESH` lands a little after `stale_at - margin`, and it must land
/// before `stale_at`, or a reader in between would be told "fresh" about a stale value. 1 ms
/// would leave no room for the tick rounding; 10 ms leaves 9 ms for scheduling. Reads within
/// the margin read the clock, as every read did before phases (with a 60 s ttl, 0.02% of them).
/// A flip that lands late anyway (a worker blocked for longer) doubles the margin of that store,
/// up to [`MAX_FLIP_MARGIN`].
const FLIP_MARGIN: Duration = Duration::from_millis(10);

/// The most a store's margin grows to after late flips.
const MAX_FLIP_MARGIN: Duration = Duration::from_secs(1);

/// The phase a value has at `age`, and the age at which it changes next (`None`: never, for
/// this value). Pure: the store's task applies it.
fn plan(
    age: Duration,
    invalidated: bool,
    ttl: Duration,
    max_stale: Option<Duration>,
    margin: Duration,
) -> (u8, Option<Duration>) {
    if !invalidated && age < ttl {
        let fresh_until = ttl.saturating_sub(margin);
        return if age < fresh_until {
            (phase::FRESH, Some(fresh_until))
        } else {
            // Within the margin: readers decide; the flip to STALE happens at ttl exactly.
            (phase::PRECISE, Some(ttl))
        };
    }
    match max_stale {
        None => (phase::STALE, None),
        Some(max) => {
            let stale_until = max.saturating_sub(margin);
            if age < stale_until {
                (phase::STALE, Some(stale_until))
            } else {
                // Near or past max_stale: readers decide (and wait past it) until a new value.
                (phase::PRECISE, None)
            }
        }
    }
}

/// The value readers get, with what it takes to tell its age.
struct Current<T> {
    /// What a fresh read returns: a read is a clone of it (one `Arc` clone and a copy).
    snap: Snapshot<T>,
    /// See [`phase`].
    phase: AtomicU8,
    /// Set by `invalidate`: stale whatever its age (a new value starts clear).
    invalidated: AtomicBool,
}

impl<T> Current<T> {
    fn new(
        data: Arc<T>,
        aged: Aged,
        generated_at: SystemTime,
        scan_id: u64,
        source: Origin,
    ) -> Self {
        Self {
            snap: Snapshot {
                data,
                generated_at,
                aged,
                is_stale: false,
                scan_id,
                source,
            },
            phase: AtomicU8::new(phase::PRECISE),
            invalidated: AtomicBool::new(false),
        }
    }

    #[inline]
    fn age(&self, now: Instant) -> Duration {
        self.snap.aged.at(now)
    }

    #[inline]
    fn snapshot(&self, is_stale: bool) -> Snapshot<T> {
        let mut s = self.snap.clone();
        s.is_stale = is_stale;
        s
    }
}

#[derive(Debug, Default)]
struct StatusData {
    scanning: bool,
    failed: bool,
    interrupted: bool,
    last_success: Option<SystemTime>,
    last_duration: Option<Duration>,
    last_attempt: Option<SystemTime>,
    last_error: Option<String>,
    items_seen: u64,
    items_changed: u64,
    persistence: Option<String>,
    next_refresh: Option<SystemTime>,
}

struct Inner<T> {
    name: Arc<str>,
    key: Arc<str>,
    ttl: Duration,
    max_stale: Option<Duration>,
    max_stale_wait: Duration,
    policy: JobPolicy,
    ctl: JobRuntimeController,
    clock: Clock,
    source: Arc<dyn ErasedSource<T>>,
    files: Option<Arc<FileStore>>,
    current: ArcSwapOption<Current<T>>,
    /// A background refresh was asked for or is under way (so stale readers start one, not
    /// one each); the store's task runs it and clears this when it ends.
    refreshing: AtomicBool,
    /// The store's task (see [`StoreTask`]): not started, running, ended.
    task: AtomicU8,
    /// Wakes the store's task: a value published or invalidated (`changed`), a refresh asked
    /// for (`refreshing`), the store dropped.
    wake: AtomicWaker,
    /// A value was published or invalidated since the task last looked.
    changed: AtomicBool,
    /// The snapshot file was damaged and set aside: the next scan is a full one.
    rebuild: AtomicBool,
    next_scan_id: AtomicU64,
    status: Mutex<StatusData>,
    /// The `job.snapshot.age` gauge, observed at each metric export (kept alive here).
    _age_gauge: opentelemetry::metrics::ObservableGauge<f64>,
}

/// A value kept fresh by a job: stale-while-revalidate, single-flight refreshes through the
/// controller, crash-safe persistence, and a scan status (see the [module docs](super)).
///
/// Cheap to clone (an `Arc`).
///
/// ```
/// use job_runtime::snapshot::{RefreshPlugin, SnapshotStore};
/// use job_runtime::{JobRuntimeController, RuntimeConfig};
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let dir = tempfile::tempdir().unwrap();
/// let ctl = JobRuntimeController::new(RuntimeConfig::default());
/// let store = SnapshotStore::builder("achievements")
///     .ttl(Duration::from_secs(60))
///     .persist_dir(dir.path())
///     .build(&ctl, RefreshPlugin::new(|_ctx| async { Ok(42_u64) }))
///     .unwrap();
/// let first = store.get().await.unwrap(); // missing: waits for the first scan
/// assert_eq!((*first.data, first.scan_id, first.is_stale), (42, 1, false));
/// tokio::time::sleep(Duration::from_secs(61)).await;
/// let stale = store.get().await.unwrap(); // stale: answered at once, refresh in background
/// assert!(stale.is_stale);
/// assert!(dir.path().join("achievements/snapshot.json").exists());
/// # }
/// ```
pub struct SnapshotStore<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for SnapshotStore<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T> fmt::Debug for SnapshotStore<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cur = self.inner.current.load();
        f.debug_struct("SnapshotStore")
            .field("name", &self.inner.name)
            .field("scan_id", &cur.as_ref().map(|c| c.snap.scan_id))
            .field("files", &self.inner.files.as_ref().map(|f| f.dir()))
            .finish()
    }
}

/// Builds a [`SnapshotStore`]. Defaults: ttl 60 s, no `max_stale`, `max_stale_wait` 5 s,
/// persistence in `JOBRT_SNAPSHOT_DIR` (else the platform data directory), the default
/// [`JobPolicy`], key `"snapshot"`.
#[derive(Debug, Clone)]
#[must_use]
pub struct SnapshotStoreBuilder {
    name: String,
    ttl: Duration,
    max_stale: Option<Duration>,
    max_stale_wait: Duration,
    persist: Persist,
    policy: JobPolicy,
    key: String,
    max_load_bytes: Option<u64>,
}

#[derive(Debug, Clone)]
enum Persist {
    Default,
    Dir(PathBuf),
    Off,
}

impl SnapshotStoreBuilder {
    /// How long a value is fresh.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }
    /// Past this age, readers wait (up to [`max_stale_wait`](Self::max_stale_wait)) for the
    /// refresh instead of getting the stale value at once.
    pub fn max_stale(mut self, age: Duration) -> Self {
        self.max_stale = Some(age);
        self
    }
    /// How long a reader of a too-stale value waits for the refresh before taking the stale
    /// value.
    pub fn max_stale_wait(mut self, wait: Duration) -> Self {
        self.max_stale_wait = wait;
        self
    }
    /// Keeps the files in `<dir>/<name>/`.
    pub fn persist_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.persist = Persist::Dir(dir.into());
        self
    }
    /// The largest snapshot or checkpoint file read at `build()` (at least 1 byte); a larger
    /// one is moved aside unread (`<file>.too-large-<timestamp>`) and the first read rebuilds
    /// it. Default: `JOBRT_SNAPSHOT_MAX_BYTES`, else
    /// [`DEFAULT_SNAPSHOT_MAX_BYTES`](crate::config::DEFAULT_SNAPSHOT_MAX_BYTES) (1 GiB).
    pub fn max_load_bytes(mut self, bytes: u64) -> Self {
        self.max_load_bytes = Some(bytes);
        self
    }
    /// Keeps nothing on disk.
    pub fn in_memory(mut self) -> Self {
        self.persist = Persist::Off;
        self
    }
    /// The policy of the refresh job (overlap, cooldown, budget, retry, limits).
    pub fn policy(mut self, policy: JobPolicy) -> Self {
        self.policy = policy;
        self
    }
    /// The key refreshes run under (job name = the store's name); default `"snapshot"`.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = key.into();
        self
    }

    /// Builds the store, loading the value on disk if there is one (a restart answers from it
    /// at once). Fails on a name that is not one safe path component, or a directory that
    /// cannot be created.
    ///
    /// This reads and parses the files on the calling thread: call it at start-up, or from
    /// `spawn_blocking` for a large value.
    pub fn build<T, S>(
        self,
        ctl: &JobRuntimeController,
        source: S,
    ) -> Result<SnapshotStore<T>, JobError>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        S: SnapshotSource<T>,
    {
        let misconfigured = |message: String| JobError::Misconfigured {
            job: Arc::from(self.name.as_str()),
            message,
        };
        validate_name(&self.name).map_err(|e| misconfigured(format!("store name: {e}")))?;
        let schema = source.schema_version();
        let root = match &self.persist {
            Persist::Off => None,
            Persist::Dir(d) => Some(d.clone()),
            Persist::Default => Some(default_dir(ctl).ok_or_else(|| {
                misconfigured(
                    "no snapshot directory: set JOBRT_SNAPSHOT_DIR, RuntimeConfig::snapshot_dir or the store's persist_dir, or use in_memory()"
                        .into(),
                )
            })?),
        };
        let files = match root {
            None => None,
            Some(root) => Some(Arc::new(
                FileStore::open(&root, &self.name, schema)
                    .map_err(|e| misconfigured(format!("snapshot directory: {e}")))?
                    .with_max_load_bytes(
                        self.max_load_bytes
                            .or(ctl.config().snapshot_max_bytes)
                            .unwrap_or(crate::config::DEFAULT_SNAPSHOT_MAX_BYTES),
                    ),
            )),
        };
        let clock = ctl.clock().clone();
        let mut status = StatusData::default();
        let mut current = None;
        let mut next_scan_id = 1;
        let mut rebuild = false;
        if let Some(files) = &files {
            match files.load::<T>(FileKind::Snapshot) {
                Loaded::Missing => {}
                Loaded::Found(s) => {
                    let wall_age = clock
                        .wall_now()
                        .duration_since(s.generated_at)
                        .unwrap_or_default();
                    next_scan_id = s.scan_id + 1;
                    current = Some(Arc::new(Current::new(
                        Arc::new(s.value),
                        Aged {
                            at_load: wall_age,
                            loaded: Instant::now(),
                        },
                        s.generated_at,
                        s.scan_id,
                        Origin::Disk,
                    )));
                }
                Loaded::Quarantined { moved_to, reason } => {
                    rebuild = true;
                    tracing::warn!(store = %self.name, file = %moved_to.display(), %reason, "snapshot file set aside; a full scan rebuilds it");
                    status.persistence = Some(format!(
                        "snapshot file set aside as {} ({reason}); rebuilt by the next scan",
                        moved_to.display()
                    ));
                }
                Loaded::Newer { version } => {
                    tracing::warn!(store = %self.name, version, "snapshot file of a newer format; running from memory, not overwriting it");
                    status.persistence = Some(format!(
                        "snapshot file has format {version}, newer than this build's {}: left untouched, running from memory",
                        crate::snapshot::persist::FORMAT_VERSION
                    ));
                }
                Loaded::Refused { reason } => {
                    tracing::warn!(store = %self.name, %reason, "snapshot file not used");
                    status.persistence = Some(format!("snapshot file not used: {reason}"));
                }
            }
        }
        if let Some(files) = &files {
            // Ids go on from the checkpoint too, should the snapshot file have been lost.
            if let Loaded::Found(c) = files.load::<serde::de::IgnoredAny>(FileKind::Checkpoint) {
                next_scan_id = next_scan_id.max(c.scan_id + 1);
            }
        }
        let name: Arc<str> = Arc::from(self.name);
        Ok(SnapshotStore {
            inner: Arc::new_cyclic(|weak: &std::sync::Weak<Inner<T>>| Inner {
                _age_gauge: age_gauge(ctl, &name, weak.clone()),
                key: Arc::from(self.key.as_str()),
                name,
                ttl: self.ttl,
                max_stale: self.max_stale,
                max_stale_wait: self.max_stale_wait,
                policy: self.policy,
                ctl: ctl.clone(),
                clock,
                source: Arc::new(source),
                files,
                current: ArcSwapOption::new(current),
                refreshing: AtomicBool::new(false),
                task: AtomicU8::new(task::NOT_STARTED),
                wake: AtomicWaker::new(),
                changed: AtomicBool::new(false),
                rebuild: AtomicBool::new(rebuild),
                next_scan_id: AtomicU64::new(next_scan_id),
                status: Mutex::new(status),
            }),
        })
    }
}

/// `job.snapshot.age` for one store: the age of its value in memory, in seconds, whenever the
/// meter provider collects (nothing while the store has no value or is gone).
fn age_gauge<T: Send + Sync + 'static>(
    ctl: &JobRuntimeController,
    name: &Arc<str>,
    store: std::sync::Weak<Inner<T>>,
) -> opentelemetry::metrics::ObservableGauge<f64> {
    let attrs = [opentelemetry::KeyValue::new(
        crate::telemetry::attr::JOB,
        Arc::clone(name),
    )];
    ctl.metrics()
        .meter
        .f64_observable_gauge(crate::telemetry::metric::SNAPSHOT_AGE)
        .with_unit("s")
        .with_description("Age of a snapshot store's value")
        .with_callback(move |observer| {
            if let Some(inner) = store.upgrade()
                && let Some(cur) = inner.current.load().as_ref()
            {
                observer.observe(cur.age(Instant::now()).as_secs_f64(), &attrs);
            }
        })
        .build()
}

fn default_dir(ctl: &JobRuntimeController) -> Option<PathBuf> {
    ctl.config()
        .snapshot_dir
        .clone()
        .or_else(|| dirs::data_dir().map(|d| d.join("job-runtime")))
}

impl SnapshotStore<()> {
    /// A builder for a store named `name` (one safe path component, at most 128 bytes: it
    /// names the store's directory, its job and its status).
    pub fn builder(name: impl Into<String>) -> SnapshotStoreBuilder {
        SnapshotStoreBuilder {
            name: name.into(),
            ttl: Duration::from_secs(60),
            max_stale: None,
            max_stale_wait: Duration::from_secs(5),
            persist: Persist::Default,
            policy: JobPolicy::default(),
            key: "snapshot".into(),
            max_load_bytes: None,
        }
    }
}

/// Who asked for a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// `refresh_now`: always scans.
    Manual,
    /// A reader found nothing in memory: scans only if there is still nothing.
    Missing,
    /// A reader found a stale value: scans only if the value is still stale.
    Stale,
}

/// Clears the `refreshing` flag when the background refresh ends, however it ends.
struct Refreshing<T: Send + Sync + 'static>(Arc<Inner<T>>);

impl<T: Send + Sync + 'static> Drop for Refreshing<T> {
    fn drop(&mut self) {
        self.0.refreshing.store(false, Ordering::SeqCst);
    }
}

impl<T> SnapshotStore<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// The value: at once when fresh or stale (a stale read starts one background refresh),
    /// after the first scan when there is none yet. Errors only when there is no value at all
    /// and the first scan failed.
    ///
    /// A value in memory is returned without awaiting anything: the returned future is ready
    /// on its first poll, and nothing is allocated. Most reads do not read the clock either:
    /// the store's task marks the value certainly fresh or certainly stale between the instants
    /// where that changes (see `docs/snapshots.md`, "How freshness is decided").
    // Inlined into the caller: the snapshot is then built where the caller keeps it, instead
    // of being returned through memory and copied again (~10 ns of a ~40 ns read).
    #[inline(always)]
    pub fn get(&self) -> impl Future<Output = Result<Snapshot<T>, JobError>> + Send + 'static {
        match self.read() {
            Some(s) => Either::Left(std::future::ready(Ok(s))),
            None => Either::Right(self.wait()),
        }
    }

    /// `get`'s future when it has to wait (kept out of line: `get` is inlined).
    #[inline(never)]
    fn wait(
        &self,
    ) -> Pin<Box<impl Future<Output = Result<Snapshot<T>, JobError>> + Send + 'static>> {
        let this = self.clone();
        Box::pin(async move { this.get_slow().await })
    }

    /// The read of a value in memory; `None`: nothing in memory, or past `max_stale`.
    #[inline(always)]
    fn read(&self) -> Option<Snapshot<T>> {
        let cur = self.inner.current.load();
        let cur = cur.as_ref()?;
        match cur.phase.load(Ordering::Relaxed) {
            phase::FRESH => Some(cur.snapshot(false)),
            phase::STALE => {
                Inner::request_refresh(&self.inner);
                Some(cur.snapshot(true))
            }
            _ => self.read_precise(cur),
        }
    }

    /// A read that decides by the clock: no store task (yet, or any more), a value near a
    /// boundary (within the margin before ttl or max_stale), or an invalidated one.
    #[inline(never)]
    fn read_precise(&self, cur: &Current<T>) -> Option<Snapshot<T>> {
        let inner = &self.inner;
        if inner.task.load(Ordering::Relaxed) == task::NOT_STARTED {
            Inner::start_task(inner);
        }
        let age = cur.age(Instant::now());
        if !inner.is_stale(cur, age) {
            Some(cur.snapshot(false))
        } else if inner.max_stale.is_none_or(|max| age < max) {
            Inner::request_refresh(inner);
            Some(cur.snapshot(true))
        } else {
            None
        }
    }

    /// `get` with nothing in memory (wait for the first scan) or a value past `max_stale`
    /// (wait for the refresh a while, then take what there is).
    async fn get_slow(&self) -> Result<Snapshot<T>, JobError> {
        if self.inner.current.load().is_none() {
            return self.refresh(false, false, Why::Missing).await;
        }
        match tokio::time::timeout(
            self.inner.max_stale_wait,
            self.refresh(false, false, Why::Stale),
        )
        .await
        {
            Ok(Ok(s)) => Ok(s),
            _ => Ok(self.peek().expect("a value, once there, is never removed")),
        }
    }

    /// The value in memory, if any, without waiting or starting a refresh.
    pub fn peek(&self) -> Option<Snapshot<T>> {
        let cur = self.inner.current.load();
        let cur = cur.as_ref()?;
        Some(match cur.phase.load(Ordering::Relaxed) {
            phase::FRESH => cur.snapshot(false),
            phase::STALE => cur.snapshot(true),
            _ => cur.snapshot(self.inner.is_stale(cur, cur.age(Instant::now()))),
        })
    }

    /// A manual rescan: joins a refresh in flight, or runs one. `force` bypasses the cooldown;
    /// `full` asks the source for a full rebuild (an incremental scan recomputes every item).
    /// A failed rescan keeps the last good value; the error is returned and shown in status.
    pub async fn refresh_now(&self, force: bool, full: bool) -> Result<Snapshot<T>, JobError> {
        self.refresh(force, full, Why::Manual).await
    }

    /// Marks the value stale: the next read starts a refresh (and still gets this value).
    pub fn invalidate(&self) {
        let cur = self.inner.current.load();
        if let Some(cur) = cur.as_ref() {
            // Flag first, then phase: the task sets FRESH only from PRECISE and only on a
            // value it saw not invalidated, so it cannot undo this (see `StoreTask::replan`).
            cur.invalidated.store(true, Ordering::SeqCst);
            cur.phase.store(phase::INVALIDATED, Ordering::SeqCst);
            Inner::changed(&self.inner);
        }
    }

    /// The store's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// What the store's scans are doing and did.
    pub fn status(&self) -> ScanStatus {
        let inner = &self.inner;
        let cur = inner.current.load_full();
        let running = inner.ctl.status(&inner.name, &inner.key);
        let s = inner.status();
        let scanning = s.scanning
            || running
                .as_ref()
                .is_some_and(|r| r.state == RunState::Running);
        ScanStatus {
            name: inner.name.to_string(),
            state: if scanning {
                ScanState::Scanning
            } else if s.interrupted {
                ScanState::Interrupted
            } else if s.failed {
                ScanState::Failed
            } else {
                ScanState::Idle
            },
            scan_id: cur.as_ref().map(|c| c.snap.scan_id),
            source: cur.as_ref().map(|c| c.snap.source),
            generated_at: cur.as_ref().map(|c| c.snap.generated_at),
            last_success: s.last_success,
            last_duration: s.last_duration,
            last_attempt: s.last_attempt,
            last_error: s.last_error.clone(),
            items_seen: s.items_seen,
            items_changed: s.items_changed,
            progress: if scanning {
                running.and_then(|r| r.progress)
            } else {
                None
            },
            next_refresh: s.next_refresh,
            persistence: s.persistence.clone(),
        }
    }

    /// Whether a background refresh started by a stale read is under way.
    pub fn is_refreshing(&self) -> bool {
        self.inner.refreshing.load(Ordering::SeqCst)
    }

    /// Sets the next scheduled refresh shown in status (for schedulers driving the store).
    pub fn set_next_refresh(&self, at: Option<SystemTime>) {
        self.inner.status().next_refresh = at;
    }

    async fn refresh(&self, force: bool, full: bool, why: Why) -> Result<Snapshot<T>, JobError> {
        let inner = &self.inner;
        let job = {
            let inner = Arc::clone(inner);
            move |ctx: JobContext| Arc::clone(&inner).attempt(ctx, full, why)
        };
        let r = if force {
            inner
                .ctl
                .run_forced(&inner.name, &inner.key, &inner.policy, job)
                .await
        } else {
            inner
                .ctl
                .run(&inner.name, &inner.key, &inner.policy, job)
                .await
        };
        match r {
            Ok(cur) => {
                let age = cur.age(Instant::now());
                Ok(cur.snapshot(inner.is_stale(&cur, age)))
            }
            Err(e) => {
                let mut s = inner.status();
                match &e {
                    // Not a scan: nothing to record.
                    JobError::CoolingDown { .. } | JobError::Busy { .. } => {}
                    JobError::Cancelled { .. } => {
                        s.interrupted = true;
                        s.last_error = Some(e.to_string());
                    }
                    _ => {
                        s.failed = true;
                        s.interrupted = false;
                        s.last_error = Some(e.to_string());
                        inner.ctl.metrics().refresh_failures.add(
                            1,
                            &[opentelemetry::KeyValue::new(
                                crate::telemetry::attr::JOB,
                                Arc::clone(&inner.name),
                            )],
                        );
                    }
                }
                Err(e)
            }
        }
    }
}

impl<T> Inner<T> {
    fn status(&self) -> MutexGuard<'_, StatusData> {
        crate::lock::unpoisoned(&self.status)
    }

    /// Stale by age or by `invalidate`: the decision by the clock, which every phase agrees
    /// with.
    #[inline]
    fn is_stale(&self, cur: &Current<T>, age: Duration) -> bool {
        age >= self.ttl || cur.invalidated.load(Ordering::Relaxed)
    }
}

impl<T> Drop for Inner<T> {
    fn drop(&mut self) {
        // The last handle is gone: the store's task ends.
        self.wake.wake();
    }
}

/// States of a store's task (`Inner::task`).
mod task {
    /// Not started yet (no read or publish inside a runtime so far), or its runtime went away.
    pub(super) const NOT_STARTED: u8 = 0;
    pub(super) const RUNNING: u8 = 1;
    /// The controller is shutting down (or the task panicked): not started again.
    pub(super) const ENDED: u8 = 2;
}

impl<T> Inner<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// A stale read: asks for a background refresh, unless one is asked for or under way.
    #[inline]
    fn request_refresh(this: &Arc<Self>) {
        // A load before the swap: the stale reads while a refresh runs write nothing shared.
        if !this.refreshing.load(Ordering::Relaxed) {
            Self::start_refresh(this);
        }
    }

    #[inline(never)]
    fn start_refresh(this: &Arc<Self>) {
        if this.refreshing.swap(true, Ordering::SeqCst) {
            return;
        }
        // The store's task runs it: waking a task costs the reader less than spawning one.
        // (The flag first, then the task's state: a task ending after we looked clears the
        // flag itself, as it marks itself ended first.)
        if this.task.load(Ordering::SeqCst) == task::RUNNING {
            this.wake.wake();
        } else {
            Self::start_refresh_without_task(this);
        }
    }

    #[cold]
    fn start_refresh_without_task(this: &Arc<Self>) {
        // After shutdown began a refresh would only be refused; without a runtime there is
        // nothing to run it. Either way readers keep the value, and the next stale read inside
        // a runtime asks again.
        if this.ctl.is_closing() || !Self::start_task(this) {
            this.refreshing.store(false, Ordering::SeqCst);
        }
    }

    /// A value was published or invalidated: the store's task gives it its phase (and is
    /// started, if it was not).
    fn changed(this: &Arc<Self>) {
        this.changed.store(true, Ordering::SeqCst);
        match this.task.load(Ordering::SeqCst) {
            task::RUNNING => this.wake.wake(),
            task::NOT_STARTED => {
                Self::start_task(this);
            }
            _ => {}
        }
    }

    /// Starts the store's task, inside a runtime and before shutdown. `true`: it runs now.
    fn start_task(this: &Arc<Self>) -> bool {
        if let Err(state) = this.task.compare_exchange(
            task::NOT_STARTED,
            task::RUNNING,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            return state == task::RUNNING;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            this.task.store(task::NOT_STARTED, Ordering::SeqCst);
            return false;
        }
        if this.ctl.is_closing() {
            this.task.store(task::ENDED, Ordering::SeqCst);
            return false;
        }
        let task = StoreTask {
            inner: Arc::downgrade(this),
            tracked: None,
            margin: FLIP_MARGIN,
        };
        this.ctl.spawn_tracked(task.run(this.ctl.closing().clone()));
        true
    }
}

/// The store's one long-lived task: keeps the current value's [`phase`] by timers, and runs
/// the background refreshes stale readers ask for.
///
/// It holds the store weakly (a dropped store ends it), is spawned on the controller's tracker
/// the first time a read or a publish happens inside a runtime, and ends when the controller
/// begins shutdown — a refresh it is running goes on until it ends or the controller cancels
/// it, as a refresh of its own task would. Whenever it ends, it leaves its value `PRECISE`.
struct StoreTask<T> {
    inner: Weak<Inner<T>>,
    /// The value whose phase this task keeps.
    tracked: Option<Arc<Current<T>>>,
    /// See [`FLIP_MARGIN`].
    margin: Duration,
}

/// What woke a [`StoreTask`].
enum Wake {
    /// Shutdown began.
    Closing,
    /// The store was dropped.
    Gone,
    /// A timer fired, a value was published or invalidated, a refresh was asked for or ended.
    Look,
}

impl<T> StoreTask<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    async fn run(mut self, closing: tokio_util::sync::CancellationToken) {
        let mut closed = std::pin::pin!(closing.cancelled_owned());
        let mut timer = std::pin::pin!(tokio::time::sleep_until(Instant::now()));
        let mut armed;
        let mut refresh: Option<BoxFuture<()>> = None;
        loop {
            {
                let Some(inner) = self.inner.upgrade() else {
                    return;
                };
                if refresh.is_none()
                    && inner.refreshing.load(Ordering::SeqCst)
                    && !inner.ctl.is_closing()
                {
                    refresh = Some(Self::refresh(&inner));
                }
                match self.replan(&inner) {
                    Some(at) => {
                        timer.as_mut().reset(at);
                        armed = true;
                    }
                    None => armed = false,
                }
            }
            let wake = std::future::poll_fn(|cx| {
                if closed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Closing);
                }
                let mut look = false;
                if let Some(r) = refresh.as_mut()
                    && r.as_mut().poll(cx).is_ready()
                {
                    // Its guard cleared `refreshing`: the next stale read asks again.
                    refresh = None;
                    look = true;
                }
                let Some(inner) = self.inner.upgrade() else {
                    return Poll::Ready(Wake::Gone);
                };
                // Register, then look: a signal sent after the look wakes us again.
                inner.wake.register(cx.waker());
                look |= inner.changed.swap(false, Ordering::SeqCst);
                look |= refresh.is_none() && inner.refreshing.load(Ordering::SeqCst);
                if armed && timer.as_mut().poll(cx).is_ready() {
                    armed = false;
                    look = true;
                }
                if look {
                    Poll::Ready(Wake::Look)
                } else {
                    Poll::Pending
                }
            })
            .await;
            match wake {
                Wake::Look => {}
                Wake::Gone => return,
                Wake::Closing => {
                    // No timers from here on: readers decide by the clock.
                    self.end(refresh.is_some());
                    if let Some(r) = refresh.take() {
                        r.await;
                    }
                    return;
                }
            }
        }
    }

    /// Gives the current value the phase it has now (a new value starts `PRECISE`); returns
    /// when it changes next.
    fn replan(&mut self, inner: &Inner<T>) -> Option<Instant> {
        let Some(cur) = inner.current.load_full() else {
            self.tracked = None;
            return None;
        };
        if !self.tracked.as_ref().is_some_and(|t| Arc::ptr_eq(t, &cur)) {
            // The value before is read no more (a reader holding it loaded it before the
            // publish, as it could have loaded it a moment earlier).
            self.tracked = Some(Arc::clone(&cur));
        }
        let now = Instant::now();
        let age = cur.age(now);
        let invalidated = cur.invalidated.load(Ordering::SeqCst);
        let (next, until) = plan(age, invalidated, inner.ttl, inner.max_stale, self.margin);
        if next == phase::FRESH {
            // Only from PRECISE: an `invalidate` since we looked (INVALIDATED) wins, and its
            // signal brings us back here.
            let _ = cur.phase.compare_exchange(
                phase::PRECISE,
                phase::FRESH,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        } else {
            let was = cur.phase.swap(next, Ordering::SeqCst);
            if was == phase::FRESH && age >= inner.ttl && !invalidated {
                // The flip out of FRESH came after ttl: readers in between were told fresh.
                self.margin = (self.margin * 2).min(MAX_FLIP_MARGIN);
                tracing::debug!(store = %inner.name, late_by = ?(age - inner.ttl), margin = ?self.margin, "the end of a fresh phase came late; margin widened");
            }
        }
        until.and_then(|a| now.checked_add(a - age))
    }

    /// A background refresh, as a stale reader asks for it.
    fn refresh(inner: &Arc<Inner<T>>) -> BoxFuture<()> {
        let store = SnapshotStore {
            inner: Arc::clone(inner),
        };
        let guard = Refreshing(Arc::clone(inner));
        // A refresh on demand: a root span (the reader that asked for it did not wait).
        let span = tracing::info_span!(
            parent: None,
            "job.trigger",
            job.name = &*inner.name,
            job.trigger = "demand",
            job.outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        Box::pin(
            async move {
                let _guard = guard;
                // The outcome is in status; a stale reader does not see errors.
                let r = store.refresh(false, false, Why::Stale).await;
                crate::telemetry::record_outcome(&tracing::Span::current(), &r.map(|_| ()));
            }
            .instrument(span),
        )
    }
}

impl<T> StoreTask<T> {
    /// Timers stop: the value is left to the clock, and the store's task marked ended (or not
    /// started, when its runtime went away: the next read starts a new one). `refreshing` is
    /// cleared unless a refresh is still running (its guard clears it when it ends).
    fn end(&mut self, refresh_running: bool) {
        if let Some(inner) = self.inner.upgrade() {
            // A task that panicked (a runtime without timers, say) is not started again and
            // again: the store reads the clock from now on.
            let state = if inner.ctl.is_closing() || std::thread::panicking() {
                task::ENDED
            } else {
                task::NOT_STARTED
            };
            // State first: a reader that swaps `refreshing` after we clear it sees it.
            inner.task.store(state, Ordering::SeqCst);
            if let Some(cur) = self.tracked.take() {
                cur.phase.store(phase::PRECISE, Ordering::SeqCst);
            }
            if !refresh_running {
                inner.refreshing.store(false, Ordering::SeqCst);
            }
        }
    }
}

impl<T> Drop for StoreTask<T> {
    fn drop(&mut self) {
        // However the task ends (shutdown, its runtime dropped), no value stays FRESH or
        // STALE without a timer.
        self.end(false);
    }
}

/// Clears `scanning` when an attempt ends, however it ends.
struct Scanning<'a, T>(&'a Inner<T>);

impl<T> Drop for Scanning<'_, T> {
    fn drop(&mut self) {
        self.0.status().scanning = false;
    }
}

impl<T> Inner<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// One attempt of the refresh job: produce, publish, persist.
    async fn attempt(
        self: Arc<Self>,
        ctx: JobContext,
        full: bool,
        why: Why,
    ) -> Result<Arc<Current<T>>, RunError> {
        let prev = self.current.load_full();
        // A reader decided to refresh on what it saw before this run was admitted; another
        // run may have published since (between the reader's look and its call): then there
        // is nothing to do. Checked here, inside the run, where no other run can publish.
        if let Some(cur) = &prev {
            let fresh = !self.is_stale(cur, cur.age(Instant::now()));
            if why == Why::Missing || (why == Why::Stale && fresh) {
                return Ok(Arc::clone(cur));
            }
        }
        let scan_id = self.next_scan_id.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        {
            let mut s = self.status();
            s.scanning = true;
            s.last_attempt = Some(self.clock.wall_at(started));
        }
        let _scanning = Scanning(&self);
        let req = Produce {
            ctx,
            previous: prev.as_ref().map(|c| Arc::clone(&c.snap.data)),
            previous_scan_id: prev.as_ref().map(|c| c.snap.scan_id),
            full: full || self.rebuild.load(Ordering::Relaxed),
            scan_id,
            files: self.files.clone(),
        };
        let produced = Arc::clone(&self.source).produce(req).await?;
        let ended = Instant::now();
        let generated_at = self.clock.wall_at(ended);
        let cur = Arc::new(Current::new(
            Arc::new(produced.value),
            Aged {
                at_load: Duration::ZERO,
                loaded: ended,
            },
            generated_at,
            scan_id,
            Origin::Scan,
        ));
        self.current.store(Some(Arc::clone(&cur)));
        Inner::changed(&self);
        self.rebuild.store(false, Ordering::Relaxed);
        {
            let mut s = self.status();
            s.failed = false;
            s.interrupted = false;
            s.last_error = None;
            s.last_success = Some(generated_at);
            s.last_duration = Some(ended - started);
            s.items_seen = produced.items_seen;
            s.items_changed = produced.items_changed;
        }
        // On the attempt's span (the current one here).
        let span = tracing::Span::current();
        span.record("job.scan_id", crate::telemetry::int(scan_id));
        span.record(
            "job.items_changed",
            crate::telemetry::int(produced.items_changed),
        );
        if let Some(files) = &self.files {
            let (files, value) = (Arc::clone(files), Arc::clone(&cur.snap.data));
            let written = tokio::task::spawn_blocking(move || {
                files.save(FileKind::Snapshot, scan_id, generated_at, &*value)
            })
            .await;
            let problem = match written {
                Ok(Ok(())) => None,
                // Expected: a newer file is there; status already says the store runs from
                // memory.
                Ok(Err(PersistError::ReadOnly { .. })) => return Ok(cur),
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("the write task failed: {e}")),
            };
            if let Some(p) = &problem {
                tracing::warn!(store = %self.name, error = %p, "snapshot not written; the file on disk is the previous one");
            }
            let mut s = self.status();
            match problem {
                Some(p) => s.persistence = Some(format!("last write failed: {p}")),
                // A successful write clears an earlier failure, but not a note about a file
                // that was set aside or is newer.
                None => {
                    if s.persistence
                        .as_deref()
                        .is_some_and(|p| p.starts_with("last write failed"))
                    {
                        s.persistence = None;
                    }
                }
            }
        }
        Ok(cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuntimeConfig;
    use futures_util::FutureExt;
    use std::sync::atomic::AtomicU64;

    const MS: Duration = Duration::from_millis(1);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// A store of the call count; refreshes take `delay`; with `cooldown`, every refresh after
    /// the first scan is refused, so the first value stays.
    fn store(
        ctl: &JobRuntimeController,
        ttl: Duration,
        max_stale: Option<Duration>,
        delay: Duration,
        cooldown: Duration,
    ) -> (SnapshotStore<u64>, Arc<AtomicU64>) {
        let calls = Arc::new(AtomicU64::new(0));
        let c = Arc::clone(&calls);
        let mut b = SnapshotStore::builder("s")
            .ttl(ttl)
            .in_memory()
            .policy(JobPolicy::builder().cooldown(cooldown).build().unwrap());
        if let Some(m) = max_stale {
            b = b.max_stale(m);
        }
        let store = b
            .build(
                ctl,
                RefreshPlugin::new(move |_ctx| {
                    let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        tokio::time::sleep(delay).await;
                        Ok(n)
                    }
                }),
            )
            .unwrap();
        (store, calls)
    }

    fn phase_of(s: &SnapshotStore<u64>) -> u8 {
        s.inner
            .current
            .load()
            .as_ref()
            .unwrap()
            .phase
            .load(Ordering::SeqCst)
    }

    fn task_of(s: &SnapshotStore<u64>) -> u8 {
        s.inner.task.load(Ordering::SeqCst)
    }

    /// Lets the store's task run (no time passes).
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    /// A read that must be ready at once.
    fn read(s: &SnapshotStore<u64>) -> Snapshot<u64> {
        s.get().now_or_never().expect("at once").unwrap()
    }

    #[test]
    fn plan_marks_what_is_certain_and_leaves_the_margins_to_the_clock() {
        let (ttl, max, m) = (secs(60), Some(secs(600)), FLIP_MARGIN);
        let p = |age, inv| plan(age, inv, ttl, max, m);
        assert_eq!(p(Duration::ZERO, false), (phase::FRESH, Some(ttl - m)));
        assert_eq!(p(ttl - m - MS, false), (phase::FRESH, Some(ttl - m)));
        assert_eq!(p(ttl - m, false), (phase::PRECISE, Some(ttl)));
        assert_eq!(p(ttl - MS, false), (phase::PRECISE, Some(ttl)));
        assert_eq!(p(ttl, false), (phase::STALE, Some(secs(600) - m)));
        assert_eq!(p(secs(600) - m, false), (phase::PRECISE, None));
        assert_eq!(p(secs(700), false), (phase::PRECISE, None));
        // Invalidated: stale whatever the age, until max_stale - margin.
        assert_eq!(p(Duration::ZERO, true), (phase::STALE, Some(secs(600) - m)));
        // No max_stale: stale for good.
        assert_eq!(plan(ttl, false, ttl, None, m), (phase::STALE, None));
        assert_eq!(
            plan(Duration::ZERO, true, ttl, None, m),
            (phase::STALE, None)
        );
        // A ttl within the margin is never certainly fresh.
        assert_eq!(
            plan(Duration::ZERO, false, m, None, m),
            (phase::PRECISE, Some(m))
        );
        assert_eq!(
            plan(Duration::ZERO, false, Duration::ZERO, None, m).0,
            phase::STALE
        );
    }

    #[tokio::test(start_paused = true)]
    async fn phases_flip_at_their_instants_and_reads_near_ttl_read_the_clock() {
        let ctl = JobRuntimeController::new(RuntimeConfig::default());
        let (s, calls) = store(&ctl, secs(60), None, secs(100), Duration::ZERO);
        s.get().await.unwrap();
        assert_eq!(phase_of(&s), phase::PRECISE, "a new value starts precise");
        settle().await;
        assert_eq!(
            task_of(&s),
            task::RUNNING,
            "the first publish started the task"
        );
        assert_eq!(phase_of(&s), phase::FRESH);
        assert!(!read(&s).is_stale);

        tokio::time::sleep(secs(60) - FLIP_MARGIN - MS).await;
        settle().await;
        assert_eq!(phase_of(&s), phase::FRESH, "fresh until ttl - margin");
        let r = read(&s);
        assert_eq!((r.is_stale, r.age()), (false, secs(60) - FLIP_MARGIN - MS));

        tokio::time::sleep(MS).await;
        settle().await;
        assert_eq!(
            phase_of(&s),
            phase::PRECISE,
            "within the margin: the clock decides"
        );
        assert!(!read(&s).is_stale);
        tokio::time::sleep(FLIP_MARGIN - MS).await;
        let r = read(&s);
        assert_eq!((r.is_stale, r.age()), (false, secs(60) - MS));

        // At ttl exactly: stale, whether or not the task has flipped yet.
        tokio::time::sleep(MS).await;
        let r = read(&s);
        assert_eq!((r.is_stale, r.age()), (true, secs(60)));
        settle().await;
        assert_eq!(phase_of(&s), phase::STALE);
        assert!(
            s.is_refreshing(),
            "the stale read started the (100 s) refresh"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Stale reads while it runs start nothing more.
        for _ in 0..10 {
            assert!(read(&s).is_stale);
        }
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        tokio::time::sleep(secs(100)).await;
        settle().await;
        let r = read(&s);
        assert_eq!((*r.data, r.is_stale), (2, false));
        assert_eq!(phase_of(&s), phase::FRESH, "the new value got its phase");
        assert!(!s.is_refreshing());
    }

    #[tokio::test(start_paused = true)]
    async fn before_max_stale_the_phase_goes_back_to_the_clock() {
        let ctl = JobRuntimeController::new(RuntimeConfig::default());
        // Scans take 5 s; no reads until max_stale nears, so no refresh starts before.
        let (s, calls) = store(&ctl, secs(10), Some(secs(60)), secs(5), Duration::ZERO);
        s.get().await.unwrap();
        settle().await;
        assert_eq!(phase_of(&s), phase::FRESH);
        tokio::time::sleep(secs(10)).await;
        settle().await;
        assert_eq!(phase_of(&s), phase::STALE);
        tokio::time::sleep(secs(50) - FLIP_MARGIN).await;
        settle().await;
        assert_eq!(
            phase_of(&s),
            phase::PRECISE,
            "max_stale - margin: back to the clock"
        );
        tokio::time::sleep(FLIP_MARGIN - MS).await;
        let r = read(&s);
        assert_eq!(
            (*r.data, r.is_stale),
            (1, true),
            "just under max_stale: at once"
        );
        tokio::time::sleep(MS).await;
        let t = Instant::now();
        let mut waiting = Box::pin(s.get());
        assert!(
            (&mut waiting).now_or_never().is_none(),
            "at max_stale: the reader waits for the refresh"
        );
        let r = waiting.await.unwrap();
        assert_eq!((*r.data, r.is_stale), (2, false));
        assert_eq!(t.elapsed(), secs(5) - MS);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn invalidate_during_fresh_wins_over_the_task() {
        let ctl = JobRuntimeController::new(RuntimeConfig::default());
        let (s, calls) = store(&ctl, secs(3600), None, secs(1), Duration::ZERO);
        s.get().await.unwrap();
        settle().await;
        assert_eq!(phase_of(&s), phase::FRESH);
        s.invalidate();
        assert_eq!(phase_of(&s), phase::INVALIDATED);
        let r = read(&s);
        assert_eq!((*r.data, r.is_stale), (1, true));
        assert!(s.is_refreshing());
        settle().await;
        assert_eq!(
            phase_of(&s),
            phase::STALE,
            "the task agrees, and keeps it stale"
        );
        assert!(read(&s).is_stale);
        tokio::time::sleep(secs(1)).await;
        settle().await;
        let r = read(&s);
        assert_eq!((*r.data, r.is_stale), (2, false));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_task_at_once_and_leaves_the_value_to_the_clock() {
        let ctl = JobRuntimeController::new(RuntimeConfig::default());
        let (s, _) = store(&ctl, secs(60), None, Duration::ZERO, Duration::ZERO);
        s.get().await.unwrap();
        settle().await;
        assert_eq!(phase_of(&s), phase::FRESH);
        let t = Instant::now();
        assert!(ctl.shutdown(secs(30)).await);
        assert_eq!(
            t.elapsed(),
            Duration::ZERO,
            "the sleeping timer did not hold it up"
        );
        assert_eq!((task_of(&s), phase_of(&s)), (task::ENDED, phase::PRECISE));
        tokio::time::sleep(secs(60)).await;
        let r = read(&s);
        assert!(r.is_stale, "exact without the task");
        assert!(!s.is_refreshing());
        assert_eq!(task_of(&s), task::ENDED, "not started again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_end_of_fresh_widens_the_margin() {
        let ctl = JobRuntimeController::new(RuntimeConfig::default());
        let (s, _) = store(&ctl, secs(60), None, Duration::ZERO, Duration::ZERO);
        s.get().await.unwrap();
        settle().await;
        assert!(ctl.shutdown(secs(1)).await);
        // As if a task had set FRESH and its timer came 5 ms after ttl.
        let cur = s.inner.current.load_full().unwrap();
        cur.phase.store(phase::FRESH, Ordering::SeqCst);
        tokio::time::sleep(secs(60) + 5 * MS).await;
        let mut t = StoreTask {
            inner: Arc::downgrade(&s.inner),
            tracked: None,
            margin: FLIP_MARGIN,
        };
        t.replan(&s.inner);
        assert_eq!(cur.phase.load(Ordering::SeqCst), phase::STALE);
        assert_eq!(t.margin, FLIP_MARGIN * 2);
        drop(t);
        assert_eq!(cur.phase.load(Ordering::SeqCst), phase::PRECISE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_store_ends_its_task() {
        let ctl = JobRuntimeController::new(RuntimeConfig::default());
        let (s, _) = store(&ctl, secs(60), None, Duration::ZERO, Duration::ZERO);
        s.get().await.unwrap();
        settle().await;
        let weak = Arc::downgrade(&s.inner);
        drop(s);
        settle().await;
        assert!(weak.upgrade().is_none());
        let t = Instant::now();
        assert!(ctl.shutdown(secs(30)).await);
        assert_eq!(t.elapsed(), Duration::ZERO);
    }
}
