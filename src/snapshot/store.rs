use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use futures_util::future::Either;
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
    /// How old it was when read (`age_ms` in serde).
    #[serde(
        serialize_with = "crate::time::serde_fmt::millis_of",
        rename = "age_ms"
    )]
    pub age: Duration,
    /// Older than the store's ttl (or invalidated): a refresh is due or under way.
    pub is_stale: bool,
    /// The scan that produced it; strictly increasing across scans, restarts included.
    pub scan_id: u64,
    /// Scan or disk.
    pub source: Origin,
}

impl<T> Clone for Snapshot<T> {
    fn clone(&self) -> Self {
        Self {
            data: Arc::clone(&self.data),
            generated_at: self.generated_at,
            age: self.age,
            is_stale: self.is_stale,
            scan_id: self.scan_id,
            source: self.source,
        }
    }
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

/// The value readers get, with what it takes to tell its age.
struct Current<T> {
    data: Arc<T>,
    /// Age when it entered memory (a file's age at load; zero for a scan)…
    age_at_load: Duration,
    /// …and when that was.
    loaded: Instant,
    generated_at: SystemTime,
    scan_id: u64,
    source: Origin,
}

impl<T> Current<T> {
    #[inline]
    fn age(&self, now: Instant) -> Duration {
        self.age_at_load + now.saturating_duration_since(self.loaded)
    }

    #[inline]
    fn snapshot(&self, age: Duration, is_stale: bool) -> Snapshot<T> {
        Snapshot {
            data: Arc::clone(&self.data),
            generated_at: self.generated_at,
            age,
            is_stale,
            scan_id: self.scan_id,
            source: self.source,
        }
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
    /// Set by `invalidate`: the value is stale whatever its age, until the next scan.
    invalidated: AtomicBool,
    /// A background refresh is under way (so stale readers start one, not one each).
    refreshing: AtomicBool,
    /// The snapshot file was damaged and set aside: the next scan is a full one.
    rebuild: AtomicBool,
    next_scan_id: AtomicU64,
    status: Mutex<StatusData>,
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
            .field("scan_id", &cur.as_ref().map(|c| c.scan_id))
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
                    .map_err(|e| misconfigured(format!("snapshot directory: {e}")))?,
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
                    current = Some(Arc::new(Current {
                        data: Arc::new(s.value),
                        age_at_load: wall_age,
                        loaded: Instant::now(),
                        generated_at: s.generated_at,
                        scan_id: s.scan_id,
                        source: Origin::Disk,
                    }));
                }
                Loaded::Quarantined { moved_to, reason } => {
                    rebuild = true;
                    tracing::warn!(store = %self.name, file = %moved_to.display(), %reason, "damaged snapshot file set aside; a full scan rebuilds it");
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
        Ok(SnapshotStore {
            inner: Arc::new(Inner {
                key: Arc::from(self.key.as_str()),
                name: Arc::from(self.name),
                ttl: self.ttl,
                max_stale: self.max_stale,
                max_stale_wait: self.max_stale_wait,
                policy: self.policy,
                ctl: ctl.clone(),
                clock,
                source: Arc::new(source),
                files,
                current: ArcSwapOption::new(current),
                invalidated: AtomicBool::new(false),
                refreshing: AtomicBool::new(false),
                rebuild: AtomicBool::new(rebuild),
                next_scan_id: AtomicU64::new(next_scan_id),
                status: Mutex::new(status),
            }),
        })
    }
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
        self.0.refreshing.store(false, Ordering::Release);
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
    /// on its first poll, and nothing is allocated.
    pub fn get(&self) -> impl Future<Output = Result<Snapshot<T>, JobError>> + Send + 'static {
        let inner = &self.inner;
        let fast = {
            let cur = inner.current.load();
            cur.as_ref().and_then(|cur| {
                let age = cur.age(Instant::now());
                if age < inner.ttl && !inner.invalidated.load(Ordering::Relaxed) {
                    Some(cur.snapshot(age, false))
                } else if inner.max_stale.is_none_or(|max| age < max) {
                    self.refresh_in_background();
                    Some(cur.snapshot(age, true))
                } else {
                    None
                }
            })
        };
        match fast {
            Some(s) => Either::Left(std::future::ready(Ok(s))),
            None => {
                let this = self.clone();
                Either::Right(Box::pin(async move { this.get_slow().await }))
            }
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
        let age = cur.age(Instant::now());
        Some(cur.snapshot(age, self.is_stale(age)))
    }

    fn is_stale(&self, age: Duration) -> bool {
        age >= self.inner.ttl || self.inner.invalidated.load(Ordering::Relaxed)
    }

    /// A manual rescan: joins a refresh in flight, or runs one. `force` bypasses the cooldown;
    /// `full` asks the source for a full rebuild (an incremental scan recomputes every item).
    /// A failed rescan keeps the last good value; the error is returned and shown in status.
    pub async fn refresh_now(&self, force: bool, full: bool) -> Result<Snapshot<T>, JobError> {
        self.refresh(force, full, Why::Manual).await
    }

    /// Marks the value stale: the next read starts a refresh (and still gets this value).
    pub fn invalidate(&self) {
        self.inner.invalidated.store(true, Ordering::Relaxed);
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
            scan_id: cur.as_ref().map(|c| c.scan_id),
            source: cur.as_ref().map(|c| c.source),
            generated_at: cur.as_ref().map(|c| c.generated_at),
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
        self.inner.refreshing.load(Ordering::Acquire)
    }

    /// Sets the next scheduled refresh shown in status (for schedulers driving the store).
    pub fn set_next_refresh(&self, at: Option<SystemTime>) {
        self.inner.status().next_refresh = at;
    }

    fn refresh_in_background(&self) {
        let inner = &self.inner;
        // After shutdown began a refresh would only be refused; readers keep the value.
        if inner.ctl.is_closing() || inner.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let guard = Refreshing(Arc::clone(inner));
        let this = self.clone();
        inner.ctl.spawn_tracked(async move {
            let _guard = guard;
            // The outcome is in status; a stale reader does not see errors.
            let _ = this.refresh(false, false, Why::Stale).await;
        });
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
                Ok(cur.snapshot(age, self.is_stale(age)))
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
                    }
                }
                Err(e)
            }
        }
    }
}

impl<T> Inner<T> {
    fn status(&self) -> MutexGuard<'_, StatusData> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
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
            let fresh =
                cur.age(Instant::now()) < self.ttl && !self.invalidated.load(Ordering::Relaxed);
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
            previous: prev.as_ref().map(|c| Arc::clone(&c.data)),
            previous_scan_id: prev.as_ref().map(|c| c.scan_id),
            full: full || self.rebuild.load(Ordering::Relaxed),
            scan_id,
            files: self.files.clone(),
        };
        let produced = Arc::clone(&self.source).produce(req).await?;
        let ended = Instant::now();
        let generated_at = self.clock.wall_at(ended);
        let cur = Arc::new(Current {
            data: Arc::new(produced.value),
            age_at_load: Duration::ZERO,
            loaded: ended,
            generated_at,
            scan_id,
            source: Origin::Scan,
        });
        self.current.store(Some(Arc::clone(&cur)));
        self.invalidated.store(false, Ordering::Relaxed);
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
        if let Some(files) = &self.files {
            let (files, value) = (Arc::clone(files), Arc::clone(&cur.data));
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
