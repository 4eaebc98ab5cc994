//! The controller: one run per key at a time, through the pipeline below.
//!
//! ```text
//! 1. cooldown    cheap check; a rejection is a value (CoolingDown { remaining }), not a wait
//! 2. in-flight?  join the run already going for the key, or skip / queue one / replace
//! 3. lock        per-key lock with a fencing token (here: a concurrent map; across replicas: a
//!                lease from a Coordinator)
//! 4. budget      one deadline for the whole run, all attempts included
//! 5. attempts    retry loop with backoff + jitter; each attempt takes a concurrency permit and
//!                a rate token, runs under min(attempt timeout, budget left) with a child
//!                cancellation token, and gives both back before any backoff sleep
//! 6. outcome     per-key status, cooldown clock, then the shared result is published
//! ```
//!
//! Why this order: a cooldown rejection costs nothing, so it comes first. Joining the run in
//! flight before taking the lock makes followers share the leader's result instead of queueing
//! to run again. The per-key lock comes before any global permit, so no global slot is held
//! while waiting on one key. Permits and rate tokens are per attempt, so nothing is held during
//! backoff and every call to the guarded system spends a token. `docs/pipeline.md` says the
//! same at length; this file is the only place the order is implemented (`Inner::pipeline`).
//!
//! The caller that starts a run polls it in its own task (no spawn, no wake-up across threads);
//! if that caller gives up, the run moves to a task of the controller's `TaskTracker` and goes
//! on, so no caller can cancel it by giving up. The in-flight entry stays until the run has
//! ended, so giving up never lets a duplicate start either.

use std::any::Any;
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use crossbeam_utils::CachePadded;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use futures_util::FutureExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::{AttemptEnd, Deadline, Limit, RunSignal, run_attempt, run_limited};
use crate::config::RuntimeConfig;
use crate::cooldown::{self, Cooldown};
use crate::coord::{Acquire, Coordinator, Lease};
use crate::error::{CancelReason, Decision, JobError, RunError};
use crate::flight::{Flight, Shared};
use crate::hooks::{EventKind, Hooks, JobEvent, Listening};
use crate::job::{Job, JobContext, JobPolicy, Overlap};
use crate::limit::{Gate, LimitError, Limits, Permits};
use crate::lock::{EntryLock, FencingToken, LockTimeout};
use crate::telemetry::{Metrics, attr};
use crate::time::{Clock, Instant, add_saturating, serde_fmt};
use tracing::Instrument;
use tracing::field::Empty;

/// A job name and a key: what one run is about.
#[derive(Clone, Eq)]
pub struct RunKey {
    /// Hash of (job, key), computed once: every map the key visits hashes 8 bytes instead of
    /// two strings.
    hash: u64,
    job: Arc<str>,
    key: Arc<str>,
}

/// Equal (job, key), the hash first. A key mostly meets its own copies (a trigger's pinned
/// key, a record's), which share their strings: those compare by pointer (`Arc<str>`'s own
/// `==` compares the bytes, as `str` is unsized).
impl PartialEq for RunKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && (Arc::ptr_eq(&self.job, &other.job) || self.job == other.job)
            && (Arc::ptr_eq(&self.key, &other.key) || self.key == other.key)
    }
}

impl std::hash::Hash for RunKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Hashes a [`RunKey`] by the hash it carries, so the controller's maps do not hash it again.
///
/// That hash was computed once, with process-wide random keys, in [`RunKey::new`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RunKeyHash;

impl std::hash::BuildHasher for RunKeyHash {
    type Hasher = PassThrough;
    fn build_hasher(&self) -> PassThrough {
        PassThrough(0)
    }
}

/// The hasher of [`RunKeyHash`]: keeps the `u64` it is given (other input is folded in, for
/// completeness; the maps only ever give it a `RunKey`).
#[derive(Debug, Default)]
pub struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Process-wide random keys for [`RunKey`] hashes (as `HashMap`'s default, so keys chosen by
/// an attacker still cannot be made to collide).
fn run_key_hasher() -> &'static std::hash::RandomState {
    static STATE: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    STATE.get_or_init(std::hash::RandomState::new)
}

/// `job` as an `Arc<str>`, shared with the last key this thread made for the same job: runs
/// on ever new keys of one job (a scan per user) would otherwise allocate and free the job's
/// name with each key. Per thread, so two threads never write one reference count.
fn shared_job_name(job: &str) -> Arc<str> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<Arc<str>>> = const { std::cell::RefCell::new(None) };
    }
    LAST.try_with(|last| {
        let mut last = last.try_borrow_mut().ok()?;
        match &*last {
            Some(name) if **name == *job => Some(Arc::clone(name)),
            _ => {
                let name: Arc<str> = job.into();
                *last = Some(Arc::clone(&name));
                Some(name)
            }
        }
    })
    .ok()
    .flatten()
    .unwrap_or_else(|| job.into())
}

impl RunKey {
    /// A run key.
    pub fn new(job: &str, key: &str) -> Self {
        Self::with_hash(Self::hash_of(job, key), job, key)
    }

    /// SipHash (keyed per process) of `job`, a 0xFF byte, `key`: the byte never occurs in
    /// UTF-8, so distinct pairs hash distinct strings. A short pair is copied into one buffer
    /// and hashed in one `write` (each `write` costs the hasher its own tail handling); a
    /// long one is written in three, which hashes the same bytes to the same value.
    fn hash_of(job: &str, key: &str) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let (j, k) = (job.as_bytes(), key.as_bytes());
        let mut h = run_key_hasher().build_hasher();
        let mut buf = [0u8; 64];
        let n = j.len() + 1 + k.len();
        if n <= buf.len() {
            buf[..j.len()].copy_from_slice(j);
            buf[j.len()] = 0xff;
            buf[j.len() + 1..n].copy_from_slice(k);
            h.write(&buf[..n]);
        } else {
            h.write(j);
            h.write_u8(0xff);
            h.write(k);
        }
        h.finish()
    }

    fn with_hash(hash: u64, job: &str, key: &str) -> Self {
        Self {
            hash,
            job: shared_job_name(job),
            key: key.into(),
        }
    }
    /// The job name.
    pub fn job(&self) -> &str {
        &self.job
    }
    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// A (job, key) a [`RunKey`] map can be searched by without building a `RunKey` (which
/// allocates both strings): `map.get(&Probe { .. } as &dyn KeyParts)`.
trait KeyParts {
    fn parts(&self) -> (u64, &str, &str);
}

impl KeyParts for RunKey {
    fn parts(&self) -> (u64, &str, &str) {
        (self.hash, &self.job, &self.key)
    }
}

/// A borrowed (job, key) with its hash.
struct Probe<'a> {
    hash: u64,
    job: &'a str,
    key: &'a str,
}

impl KeyParts for Probe<'_> {
    fn parts(&self) -> (u64, &str, &str) {
        (self.hash, self.job, self.key)
    }
}

impl<'a> std::borrow::Borrow<dyn KeyParts + 'a> for RunKey {
    fn borrow(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}

/// Hashes as [`RunKey`] does (its stored hash), so both find the same entries.
impl std::hash::Hash for dyn KeyParts + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.parts().0);
    }
}

impl PartialEq for dyn KeyParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyParts + '_ {}

impl fmt::Debug for RunKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.job, self.key)
    }
}

/// A held per-key lock from [`JobRuntimeController::try_acquire`] or
/// [`acquire`](JobRuntimeController::acquire); released on drop.
///
/// It is the lock runs of the key take: while it is held, a run of the key is `Busy` (or
/// waits, with a `lock_wait`), and while a run holds it, it cannot be taken. Its fencing token
/// is larger than that of every earlier holder of the key, run or not.
///
/// ```
/// use job_runtime::{JobRuntimeController, RuntimeConfig};
///
/// let ctl = JobRuntimeController::new(RuntimeConfig::default());
/// let lock = ctl.try_acquire("report", "2024-05").expect("free");
/// assert_eq!((lock.job(), lock.key()), ("report", "2024-05"));
/// assert!(ctl.try_acquire("report", "2024-05").is_none());
/// let first = lock.token();
/// drop(lock);
/// assert!(ctl.try_acquire("report", "2024-05").unwrap().token() > first);
/// assert!(ctl.is_empty()); // a key that never ran keeps no state once its lock is given back
/// ```
#[must_use = "the lock is released as soon as it is dropped"]
pub struct KeyLock {
    inner: Arc<Inner>,
    rk: RunKey,
    token: FencingToken,
}

impl KeyLock {
    /// This acquisition's fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The job whose key is held.
    pub fn job(&self) -> &str {
        &self.rk.job
    }

    /// The key held.
    pub fn key(&self) -> &str {
        &self.rk.key
    }
}

impl fmt::Debug for KeyLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyLock")
            .field("key", &self.rk)
            .field("token", &self.token)
            .finish()
    }
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        self.inner.unlock_key(&self.rk, self.token);
    }
}

/// What a key is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Nothing running and no cooldown.
    Idle,
    /// A run is in flight.
    Running,
    /// A run is in flight but went silent past its heartbeat timeout: it has been told to stop
    /// and is ending as `Stuck`.
    Stuck,
    /// The last run ended and the cooldown has not passed.
    CoolingDown,
}

/// Progress reported by a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Items done.
    pub done: u64,
    /// Items in all.
    pub total: u64,
}

/// The status of one job and key.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct KeyStatus {
    /// Job name.
    pub job: String,
    /// Key.
    pub key: String,
    /// Idle, running or cooling down.
    pub state: RunState,
    /// Runs started (attempted at least once).
    pub runs: u64,
    /// Runs that succeeded.
    pub successes: u64,
    /// Runs that failed.
    pub failures: u64,
    /// Callers that joined a run instead of starting one: the run in flight (`Coalesce`) or
    /// the one queued behind it (`QueueOne`).
    pub coalesced: u64,
    /// Calls refused because the key was cooling down.
    pub cooldown_rejections: u64,
    /// Retries (attempts after the first).
    pub retries: u64,
    /// When the last run started.
    #[serde(serialize_with = "serde_fmt::rfc3339")]
    pub last_start: Option<SystemTime>,
    /// When the last successful run ended.
    #[serde(serialize_with = "serde_fmt::rfc3339")]
    pub last_success: Option<SystemTime>,
    /// How long the last run took (`last_duration_ms` in serde).
    #[serde(serialize_with = "serde_fmt::millis", rename = "last_duration_ms")]
    pub last_duration: Option<Duration>,
    /// The last error's message.
    pub last_error: Option<String>,
    /// The last error's kind (`failed`, `panicked`, …).
    pub last_error_kind: Option<&'static str>,
    /// The trace id of the run that ended with the last error (32 hex digits), to find it in
    /// the tracing backend; `None` without feature `otel` or an OpenTelemetry layer.
    pub last_error_trace_id: Option<String>,
    /// Cooldown left (`cooldown_remaining_ms` in serde).
    #[serde(serialize_with = "serde_fmt::millis", rename = "cooldown_remaining_ms")]
    pub cooldown_remaining: Option<Duration>,
    /// Progress of the run in flight (or the last one).
    pub progress: Option<Progress>,
    /// The last heartbeat or progress report.
    #[serde(serialize_with = "serde_fmt::rfc3339")]
    pub last_heartbeat: Option<SystemTime>,
    /// Details given with the last heartbeat.
    pub heartbeat_details: Option<String>,
    /// The fencing token of the run in flight (or the last one).
    pub fencing_token: Option<FencingToken>,
}

#[derive(Debug, Default)]
struct KeyData {
    running: bool,
    not_before: Option<Instant>,
    keep_until: Option<Instant>,
    runs: u64,
    successes: u64,
    failures: u64,
    cooldown_rejections: u64,
    retries: u64,
    /// Monotonic, turned into wall time by `status` (a run does not pay for the conversion).
    last_start: Option<Instant>,
    last_success: Option<Instant>,
    last_duration: Option<Duration>,
    fencing: Option<FencingToken>,
    /// The attempt's last sign of life (its start, a heartbeat or a progress report), for
    /// the heartbeat timeout.
    last_beat: Option<Instant>,
    /// What only some keys ever have (an error, progress, heartbeats), boxed so that a key
    /// without them (most scheduled and cooling keys) does not carry ~140 bytes of `None`s.
    rare: Option<Box<RareData>>,
}

impl KeyData {
    fn rare(&mut self) -> &mut RareData {
        self.rare.get_or_insert_with(Default::default)
    }
}

/// The part of [`KeyData`] that is boxed.
#[derive(Debug, Default)]
struct RareData {
    last_error: Option<String>,
    last_error_kind: Option<&'static str>,
    last_error_trace_id: Option<String>,
    progress: Option<Progress>,
    last_heartbeat: Option<SystemTime>,
    heartbeat_details: Option<String>,
    /// Set when the heartbeat timeout fired, with how long the job had been silent.
    stuck_for: Option<Duration>,
}

/// Per-key state: status counters and the cooldown clock. Lives while the key is running,
/// cooling down or retained; housekeeping removes it after that.
#[derive(Debug)]
pub(crate) struct KeyRecord {
    coalesced: AtomicU64,
    /// Runs of the key that have ended (for [`Inner::retire`]: a key that ran again since it
    /// was queued is not removed).
    ended: AtomicU64,
    /// Whether `data.not_before` is set, written with it (under the lock): a key whose runs
    /// have no cooldown (the default) is checked without taking the lock. A reader that
    /// admits a run looks again under the key's map entry, which the ending run's
    /// `Finisher::finish` takes after setting both, so it never misses a cooldown.
    cooling: AtomicBool,
    data: Mutex<KeyData>,
}

impl KeyRecord {
    fn new() -> Self {
        Self {
            coalesced: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            cooling: AtomicBool::new(false),
            data: Mutex::new(KeyData::default()),
        }
    }

    fn data(&self) -> MutexGuard<'_, KeyData> {
        // A panic never happens while this lock is held; recover the data if one ever did.
        crate::lock::unpoisoned(&self.data)
    }

    /// Cooldown left; reads the clock only when a cooldown was set.
    fn cooldown_remaining(&self) -> Option<Duration> {
        if !self.cooling.load(Ordering::Acquire) {
            return None;
        }
        let not_before = self.data().not_before?;
        cooldown::remaining(Some(not_before), Instant::now())
    }

    pub(crate) fn progress(&self, done: u64, total: u64) {
        self.data().rare().progress = Some(Progress { done, total });
    }

    pub(crate) fn heartbeat(&self, at: SystemTime, details: Option<&str>) {
        let mut d = self.data();
        d.last_beat = Some(Instant::now());
        let rare = d.rare();
        rare.last_heartbeat = Some(at);
        if let Some(s) = details {
            rare.heartbeat_details = Some(s.to_string());
        }
    }

    fn removable(&self, now: Instant) -> bool {
        let d = self.data();
        !d.running && d.not_before.is_none_or(|t| t <= now) && d.keep_until.is_none_or(|t| t <= now)
    }

    fn status(&self, rk: &RunKey, now: Instant, clock: &Clock) -> KeyStatus {
        let d = self.data();
        let cooldown_remaining = cooldown::remaining(d.not_before, now);
        let none = RareData::default();
        let rare = d.rare.as_deref().unwrap_or(&none);
        KeyStatus {
            job: rk.job.to_string(),
            key: rk.key.to_string(),
            state: if d.running && rare.stuck_for.is_some() {
                RunState::Stuck
            } else if d.running {
                RunState::Running
            } else if cooldown_remaining.is_some() {
                RunState::CoolingDown
            } else {
                RunState::Idle
            },
            runs: d.runs,
            successes: d.successes,
            failures: d.failures,
            coalesced: self.coalesced.load(Ordering::Relaxed),
            cooldown_rejections: d.cooldown_rejections,
            retries: d.retries,
            last_start: d.last_start.map(|t| clock.wall_at(t)),
            last_success: d.last_success.map(|t| clock.wall_at(t)),
            last_duration: d.last_duration,
            last_error: rare.last_error.clone(),
            last_error_kind: rare.last_error_kind,
            last_error_trace_id: rare.last_error_trace_id.clone(),
            cooldown_remaining,
            progress: rare.progress,
            last_heartbeat: rare.last_heartbeat,
            heartbeat_details: rare.heartbeat_details.clone(),
            fencing_token: d.fencing,
        }
    }
}

/// Sizes of the controller's per-key maps, for leak tests and monitoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Footprint {
    /// Keys with status or cooldown state.
    pub keys: usize,
    /// Slots allocated for them.
    pub key_capacity: usize,
    /// Runs in flight (keys whose entry holds a run; they have no map of their own).
    pub flights: usize,
    /// Locks held, by runs and through [`JobRuntimeController::try_acquire`] (they are part
    /// of the keys' entries and have no map of their own).
    pub locks: usize,
}

/// One run: its controller, its cancellation and its end.
pub(crate) struct RunHandle {
    /// The controller the run belongs to. Held here, once per run, rather than by the run's
    /// future and (for its clock) by every attempt's `JobContext`: each clone and drop of a
    /// controller-wide `Arc` is a write to a line every thread's runs write.
    inner: Arc<Inner>,
    /// Cancellation from outside (replace, shutdown, lease lost), with its reason.
    pub(crate) signal: RunSignal,
    /// Set once the run has fully ended (its lock released); a flag and a `Notify` rather than
    /// a `CancellationToken`, which would cost an allocation per run.
    ended: AtomicBool,
    ended_notify: tokio::sync::Notify,
    /// Set by a caller about to wait for the end (a replacing run, rare): a run nobody waits
    /// for ends without taking the `Notify`'s lock.
    awaited: AtomicBool,
}

impl fmt::Debug for RunHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunHandle")
            .field("signal", &self.signal)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl RunHandle {
    /// Not a child of a controller-wide token: adding and removing children takes the parent's
    /// lock, which would serialise runs on distinct keys. Shutdown cancels runs through the
    /// key map (each key's run in flight) instead.
    fn new(inner: &Arc<Inner>) -> Arc<Self> {
        Arc::new(Self {
            inner: Arc::clone(inner),
            signal: RunSignal::default(),
            ended: AtomicBool::new(false),
            ended_notify: tokio::sync::Notify::new(),
            awaited: AtomicBool::new(false),
        })
    }

    /// The controller's clock.
    pub(crate) fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        // Store, fence, load here and in `wait_ended`: at least one side sees the other's
        // store, so either the waiter sees `ended` or this sees `awaited` and wakes it (its
        // `Notified` was enabled before its store).
        fence(Ordering::SeqCst);
        if self.awaited.load(Ordering::Relaxed) {
            self.ended_notify.notify_waiters();
        }
    }

    async fn wait_ended(&self) {
        loop {
            let n = self.ended_notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            self.awaited.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            if self.ended.load(Ordering::Acquire) {
                return;
            }
            n.await;
        }
    }

    fn cancel(&self, reason: CancelReason) {
        self.signal.cancel(reason);
    }
}

/// A flight with its output type erased, so runs of every job share one map.
trait ErasedFlight: Send + Sync {
    fn fail(&self, e: JobError);
    fn any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

impl<T: Send + Sync + 'static> ErasedFlight for Flight<T> {
    fn fail(&self, e: JobError) {
        self.complete(Err(e));
    }
    fn any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

type Starter = Box<dyn FnOnce(u64, Arc<RunHandle>, tracing::Span) + Send + Sync>;

/// The run queued behind the one in flight (overlap `QueueOne`).
struct Queued {
    flight: Arc<dyn ErasedFlight>,
    start: Option<Starter>,
    /// Its `job.run` span, made when it was queued (in the queuing caller's context).
    span: tracing::Span,
    job: Arc<str>,
    key: Arc<str>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        if self.start.is_some() {
            // Never started (the current run was replaced, or the controller went away).
            self.flight.fail(JobError::Cancelled {
                job: self.job.clone(),
                key: self.key.clone(),
                reason: CancelReason::Replaced,
            });
        }
    }
}

/// When the amortised sweep last ran ([`Inner::maybe_sweep`]).
struct Sweep {
    /// The run id at the last sweep.
    last: AtomicU64,
    /// Keys left after it.
    keys: AtomicUsize,
}

/// A key's entry in the controller's map: its record, and its run in flight if there is one.
///
/// One map for both, so that a run looks its key up once at admission and once at its end:
/// with two threads each write to a shard of a shared map costs a cache-line transfer most of
/// the time, whatever the number of shards (PERFORMANCE.md §4).
///
/// The key's lock is here too: a run takes it in the same shard lock that puts the run in the
/// slot, and gives it back in the one that takes the run out, so a run on a free key costs no
/// map operation for its lock at all (a map of its own cost two per run).
struct KeyEntry {
    /// `None` only for a key that no run has used, made for its lock (`try_acquire`): it has
    /// no status. Always there while the key has a run.
    record: Option<Arc<KeyRecord>>,
    slot: Option<Slot>,
    lock: EntryLock,
}

impl KeyEntry {
    fn with(record: Option<Arc<KeyRecord>>) -> Self {
        Self {
            record,
            slot: None,
            lock: EntryLock::default(),
        }
    }

    /// Whether the entry holds nothing but an idle record nobody else holds (or none): it can
    /// go.
    fn idle(&self, now: Instant) -> bool {
        self.slot.is_none()
            && !self.lock.is_held()
            && self
                .record
                .as_ref()
                .is_none_or(|r| Arc::strong_count(r) == 1 && r.removable(now))
    }

    /// The record of a key with a run in flight.
    fn running(&self) -> &Arc<KeyRecord> {
        self.record.as_ref().expect("a key with a run has a record")
    }
}

/// The owner number, in a key's [`EntryLock`], of a lock held through
/// [`JobRuntimeController::try_acquire`] or [`acquire`](JobRuntimeController::acquire); a run
/// holds it under its run id (they start at 1).
const MANUAL: u64 = 0;

/// The run in flight of a key.
struct Slot {
    id: u64,
    /// The run's `job.run` span, for links from the callers that join it.
    span: tracing::Span,
    run: Arc<RunHandle>,
    flight: Arc<dyn ErasedFlight>,
    /// Boxed: most slots never have one, and a slot is moved out of the map at every run's
    /// end.
    queued: Option<Box<Queued>>,
}

struct Inner {
    config: RuntimeConfig,
    /// `config` overrides some policy field (for all jobs or for one): when it does not, a
    /// caller's policy is used as it is, without looking at the overrides per call.
    overrides: bool,
    clock: Clock,
    keys: DashMap<RunKey, KeyEntry, RunKeyHash>,
    limits: Limits,
    coord: Option<Arc<dyn Coordinator>>,
    tracker: TaskTracker,
    /// Woken by each run that ends after shutdown began (see [`Inner::drained`]).
    drain_wake: tokio::sync::Notify,
    /// Set when shutdown begins: new runs are refused from then on. `closed` says the same in
    /// one load (a token's `is_cancelled` takes its mutex); the token is for tasks that wait.
    closing: CancellationToken,
    closed: AtomicBool,
    /// Set once shutdown has begun cancelling the runs in flight: a run admitted after that
    /// cancels itself.
    cancelling: AtomicBool,
    /// Written by every run from every thread: on cache lines of its own, so the fields read
    /// on every run (maps, limits, `sweep`) are not invalidated by each write (false
    /// sharing).
    next_run: CachePadded<AtomicU64>,
    /// The keys' fencing tokens: one counter, so that a key's tokens increase even though its
    /// entry (and its lock) goes when it is idle. On lines of its own, as `next_run`.
    next_token: CachePadded<AtomicU64>,
    /// The amortised sweep's state (read by every run, written by a sweep).
    sweep: CachePadded<Sweep>,
    /// Below this many keys the amortised sweep does not run: the keys' own threads remove
    /// them ([`Inner::retire`]); a sweep would free records other threads allocated.
    sweep_floor: usize,
    /// Runs whose job ignored an outside cancellation past its grace and was dropped.
    abandoned: AtomicU64,
    hooks: Hooks,
    metrics: Metrics,
}

/// The heart of the crate: runs jobs per key through the pipeline (see the module docs).
///
/// Cheap to clone (an `Arc`), `Send + Sync`.
///
/// ```
/// use job_runtime::{JobPolicy, JobRuntimeController, RuntimeConfig};
/// use std::sync::Arc;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let ctl = JobRuntimeController::new(RuntimeConfig::default());
/// let policy = JobPolicy::default();
/// // Two concurrent callers of one key share one run and one Arc. (The job yields once, so
/// // the second caller arrives while the first caller's run is in flight.)
/// let scan = |_ctx| async {
///     tokio::task::yield_now().await;
///     Ok(vec![1, 2, 3])
/// };
/// let (a, b) = tokio::join!(
///     ctl.run("scan", "user-1", &policy, scan),
///     ctl.run("scan", "user-1", &policy, |_ctx| async { Ok(vec![9]) }),
/// );
/// assert!(Arc::ptr_eq(&a.unwrap(), &b.unwrap()));
/// # }
/// ```
#[derive(Clone)]
pub struct JobRuntimeController {
    inner: Arc<Inner>,
}

impl fmt::Debug for JobRuntimeController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobRuntimeController")
            .field("footprint", &self.footprint())
            .field("coordinator", &self.inner.coord)
            .finish()
    }
}

impl JobRuntimeController {
    /// A controller coordinating in this process.
    pub fn new(config: RuntimeConfig) -> Self {
        Self::build(config, None, Clock::new())
    }

    /// A controller coordinating through a shared backend (locks as leases, shared cooldowns).
    pub fn with_coordinator(config: RuntimeConfig, coord: Arc<dyn Coordinator>) -> Self {
        Self::build(config, Some(coord), Clock::new())
    }

    /// A controller whose wall time comes from `clock` (for tests with a set wall start).
    pub fn with_clock(config: RuntimeConfig, clock: Clock) -> Self {
        Self::build(config, None, clock)
    }

    fn build(config: RuntimeConfig, coord: Option<Arc<dyn Coordinator>>, clock: Clock) -> Self {
        let global = Gate::new(config.max_concurrency.map(|n| n.get()), config.rate_limit);
        let groups = config.groups.iter().map(|(name, g)| {
            (
                Arc::<str>::from(name.as_str()),
                Gate::new(g.concurrency.map(|n| n.get()), g.rate),
            )
        });
        let overrides = config.has_overrides();
        Self {
            inner: Arc::new(Inner {
                limits: Limits::new(global, groups),
                config,
                overrides,
                clock,
                keys: DashMap::with_hasher(RunKeyHash),
                coord,
                tracker: TaskTracker::new(),
                drain_wake: tokio::sync::Notify::new(),
                closing: CancellationToken::new(),
                closed: AtomicBool::new(false),
                cancelling: AtomicBool::new(false),
                next_run: CachePadded::new(AtomicU64::new(1)),
                next_token: CachePadded::new(AtomicU64::new(1)),
                sweep: CachePadded::new(Sweep {
                    last: AtomicU64::new(0),
                    keys: AtomicUsize::new(0),
                }),
                sweep_floor: 2
                    * RETIRE_AFTER
                    * std::thread::available_parallelism().map_or(1, |n| n.get()),
                abandoned: AtomicU64::new(0),
                hooks: Hooks::new(),
                metrics: Metrics::new(),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// The clock.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// Runs `f` for (`job`, `key`) through the pipeline and returns the shared result.
    ///
    /// `f` is called once per attempt. Dropping the returned future never cancels the run.
    pub fn run<T, F, Fut>(
        &self,
        job: &str,
        key: &str,
        policy: &JobPolicy,
        f: F,
    ) -> impl Future<Output = Result<Arc<T>, JobError>> + Send
    where
        T: Send + Sync + 'static,
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, RunError>> + Send + 'static,
    {
        // `start`'s future itself (nothing runs before the first poll): an `async fn` here
        // would wrap it in a second state machine holding a copy of every argument.
        self.start(job, key, policy, false, f)
    }

    /// Like [`run`](Self::run), bypassing the cooldown (a manual rescan).
    pub fn run_forced<T, F, Fut>(
        &self,
        job: &str,
        key: &str,
        policy: &JobPolicy,
        f: F,
    ) -> impl Future<Output = Result<Arc<T>, JobError>> + Send
    where
        T: Send + Sync + 'static,
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, RunError>> + Send + 'static,
    {
        // `start`'s future itself (nothing runs before the first poll): an `async fn` here
        // would wrap it in a second state machine holding a copy of every argument.
        self.start(job, key, policy, true, f)
    }

    /// Runs a [`Job`] plugin for `key` under its own policy.
    pub async fn run_job<J: Job>(
        &self,
        job: &Arc<J>,
        key: &str,
    ) -> Result<Arc<J::Output>, JobError> {
        let j = Arc::clone(job);
        let policy = job.policy();
        self.run(job.name(), key, &policy, move |ctx| {
            let j = Arc::clone(&j);
            async move { j.run(ctx).await }
        })
        .await
    }

    /// Takes the lock of (`job`, `key`) if free — the same lock runs take. Never waits.
    pub fn try_acquire(&self, job: &str, key: &str) -> Option<KeyLock> {
        let rk = RunKey::new(job, key);
        let token = self.inner.try_lock_key(&rk, MANUAL)?;
        Some(KeyLock {
            inner: Arc::clone(&self.inner),
            rk,
            token,
        })
    }

    /// Takes the lock of (`job`, `key`), waiting at most `wait` (zero: try once).
    pub async fn acquire(&self, job: &str, key: &str, wait: Duration) -> Result<KeyLock, JobError> {
        let rk = RunKey::new(job, key);
        match self.inner.lock_key(&rk, MANUAL, wait).await {
            Ok(token) => Ok(KeyLock {
                inner: Arc::clone(&self.inner),
                rk,
                token,
            }),
            Err(e) => Err(JobError::LockTimeout {
                job: rk.job,
                key: rk.key,
                waited: e.waited,
            }),
        }
    }

    /// The record of (`job`, `key`), made if there is none. Housekeeping keeps a record while
    /// anything else holds it: the runtime holds its triggers' records for its whole life.
    /// The key's strings are shared with the caller's, not copied.
    pub(crate) fn pin(&self, job: &Arc<str>, key: &Arc<str>) -> PinnedKey {
        let rk = RunKey {
            hash: RunKey::hash_of(job, key),
            job: Arc::clone(job),
            key: Arc::clone(key),
        };
        let record = Arc::clone(
            self.inner
                .keys
                .entry(rk.clone())
                .or_insert_with(|| KeyEntry::with(None))
                .record
                .get_or_insert_with(|| Arc::new(KeyRecord::new())),
        );
        PinnedKey { rk, record }
    }

    /// The status of (`job`, `key`), or `None` when the key has no state (never ran, or idle
    /// and pruned after its cooldown and retention).
    pub fn status(&self, job: &str, key: &str) -> Option<KeyStatus> {
        let rk = RunKey::new(job, key);
        let e = self.inner.keys.get(&rk)?;
        Some(
            e.record
                .as_ref()?
                .status(&rk, Instant::now(), &self.inner.clock),
        )
    }

    /// The status of every key with state, sorted by job and key.
    pub fn statuses(&self) -> Vec<KeyStatus> {
        let now = Instant::now();
        let mut v: Vec<_> = self
            .inner
            .keys
            .iter()
            .filter_map(|e| Some(e.record.as_ref()?.status(e.key(), now, &self.inner.clock)))
            .collect();
        v.sort_by(|a, b| (&a.job, &a.key).cmp(&(&b.job, &b.key)));
        v
    }

    /// Keys with state (running, cooling down or retained).
    pub fn len(&self) -> usize {
        self.inner.keys.len()
    }

    /// `true` when no key has state.
    pub fn is_empty(&self) -> bool {
        self.inner.keys.is_empty()
    }

    /// Sizes of every per-key map.
    pub fn footprint(&self) -> Footprint {
        let i = &self.inner;
        let (mut flights, mut locks) = (0, 0);
        for e in i.keys.iter() {
            flights += usize::from(e.slot.is_some());
            locks += usize::from(e.lock.is_held());
        }
        Footprint {
            keys: i.keys.len(),
            key_capacity: i.keys.capacity(),
            flights,
            locks,
        }
    }

    /// Removes the state of idle keys whose cooldown and retention have passed, and gives
    /// memory back after bulk removal. As runs finish, each thread removes the keys it ran a
    /// few hundred runs earlier if they are idle by then, and an amortised sweep the rest (see
    /// `docs/pipeline.md`, "Per-key state"); call this to prune everything now. Returns the
    /// number of keys removed.
    pub fn housekeep(&self) -> usize {
        self.inner.housekeep()
    }

    /// Calls `f` with every event of every run (started, succeeded, failed, skipped, retried,
    /// stuck) on a task of its own, through a channel of `capacity` events: a slow or failing
    /// listener never delays a run; when its channel is full, events are dropped and counted.
    /// Must be called inside a tokio runtime. See [`crate::hooks`].
    pub fn listen<F, Fut>(&self, capacity: usize, f: F) -> Listening
    where
        F: Fn(JobEvent) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.inner.hooks.listen(capacity, f)
    }

    /// `true` once `shutdown` has begun (new runs are refused).
    pub(crate) fn is_closing(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// The controller's metric instruments (for the snapshot stores built on it).
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Cancelled when `shutdown` begins: long-lived helper tasks end on it.
    pub(crate) fn closing(&self) -> &CancellationToken {
        &self.inner.closing
    }

    /// Spawns `fut` on the controller's `TaskTracker`, so `shutdown` waits for it.
    pub(crate) fn spawn_tracked<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.inner.tracker.spawn(fut);
    }

    /// Free permits of the global limit (`None`) or a group; `None` if that scope has no
    /// concurrency limit.
    pub fn available_permits(&self, group: Option<&str>) -> Option<usize> {
        let g = group.map(crate::job::normalize_name);
        self.inner.limits.available(g.as_deref())
    }

    /// Runs, over the controller's life, whose job ignored an outside cancellation (shutdown,
    /// `Replace`, a lost lease) past its policy's `abandon_grace`, so its future was dropped.
    /// Such a job may have left work half done: the count is there to be alerted on.
    pub fn abandoned_runs(&self) -> u64 {
        self.inner.abandoned.load(Ordering::Relaxed)
    }

    /// Stops accepting runs (new calls get `Cancelled { reason: Shutdown }`), lets runs in
    /// flight go on for `grace`, then cancels them and waits for them to end (a job ignoring
    /// its token is abandoned after its policy's grace). Returns `true` if every run finished
    /// within `grace`.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.closing.cancel();
        self.inner.tracker.close();
        let clean = tokio::time::timeout(grace, self.inner.drained())
            .await
            .is_ok();
        self.inner.cancelling.store(true, Ordering::SeqCst);
        for e in self.inner.keys.iter() {
            if let Some(slot) = &e.slot {
                slot.run.cancel(CancelReason::Shutdown);
            }
        }
        self.inner.drained().await;
        // Listeners get the events already queued, within the same grace.
        self.inner.hooks.close(grace).await;
        clean
    }

    /// Admission (steps 1 and 2) is synchronous, so the future a caller holds keeps little
    /// across its awaits: the flight and, for the leader, the boxed run. (A thousand callers
    /// joining one run hold a thousand of these futures.) Only a coordinator's cooldown check
    /// awaits before admission, in a boxed future of its own.
    pub(crate) async fn start<T, F, Fut>(
        &self,
        job: &str,
        key: &str,
        policy: &JobPolicy,
        force: bool,
        f: F,
    ) -> Result<Arc<T>, JobError>
    where
        T: Send + Sync + 'static,
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, RunError>> + Send + 'static,
    {
        if !force
            && let Some(c) = &self.inner.coord
            && !self.inner.closed.load(Ordering::Acquire)
            && !self.inner.cooling_locally(job, key)
        {
            Box::pin(self.inner.backend_cooldown(c, job, key)).await?;
        }
        // Taken apart in a statement of its own: a `match` on `admit(..)?` with the awaits in
        // its arms would keep the `Admitted` and the `?`'s temporary in the future's state
        // across them (160 bytes of each caller's future, moved with it).
        let (flight, lead) = match self.admit(job, key, None, policy, force, f)? {
            Admitted::Join(flight) => (flight, None),
            Admitted::Lead(flight, lead) => (flight, Some(lead)),
        };
        if let Some(lead) = lead {
            lead.await;
        }
        flight.wait().await
    }

    /// [`start`](Self::start) for a caller that polls once and spawns only what has to wait
    /// (the runtime's timer): admission and the run's first poll happen here, synchronously,
    /// and a run that ends in that poll (a quick job, a refusal, a join of a finished run)
    /// costs no future of the caller's and no reference to the controller. What has to wait
    /// comes back boxed, to be polled from a task. A coordinator's cooldown check awaits before
    /// admission, so with a coordinator the whole call comes back boxed, unpolled.
    pub(crate) fn start_now<T, F, Fut>(
        &self,
        job: &str,
        key: &str,
        pinned: Option<&PinnedKey>,
        policy: &JobPolicy,
        force: bool,
        f: F,
    ) -> Started<T>
    where
        T: Send + Sync + 'static,
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, RunError>> + Send + 'static,
    {
        if !force && self.inner.coord.is_some() {
            let (ctl, job, key, policy) =
                (self.clone(), job.to_owned(), key.to_owned(), policy.clone());
            return Started::Waiting(Box::pin(async move {
                ctl.start(&job, &key, &policy, force, f).await
            }));
        }
        match self.admit(job, key, pinned, policy, force, f) {
            Err(e) => Started::Done(Err(e)),
            Ok(Admitted::Join(flight)) => match flight.peek() {
                Some(r) => Started::Done(r.clone()),
                None => Started::Waiting(Box::pin(async move { flight.wait().await })),
            },
            Ok(Admitted::Lead(flight, mut lead)) => {
                if (&mut lead).now_or_never().is_some()
                    && let Some(r) = flight.peek()
                {
                    return Started::Done(r.clone());
                }
                let lead = lead.into_owned();
                Started::Waiting(Box::pin(async move {
                    lead.await;
                    flight.wait().await
                }))
            }
        }
    }

    /// Steps 1 and 2 for one call: refuse it, join the run in flight, or start (lead) one.
    /// `pinned`, when given, is (`job`, `key`)'s.
    fn admit<T, F, Fut>(
        &self,
        job: &str,
        key: &str,
        pinned: Option<&PinnedKey>,
        policy: &JobPolicy,
        force: bool,
        f: F,
    ) -> Result<Admitted<'_, T>, JobError>
    where
        T: Send + Sync + 'static,
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, RunError>> + Send + 'static,
    {
        let inner = &self.inner;
        debug_assert!(pinned.is_none_or(|p| (&*p.rk.job, &*p.rk.key) == (job, key)));
        let hash = pinned.map_or_else(|| RunKey::hash_of(job, key), |p| p.rk.hash);
        let policy = if inner.overrides {
            inner.config.effective_policy(job, policy)
        } else {
            Cow::Borrowed(policy)
        };
        if let Some(g) = &policy.group
            && !inner.limits.has_group(g)
        {
            return Err(inner.unknown_group(&RunKey::with_hash(hash, job, key), g));
        }
        if inner.closed.load(Ordering::Acquire) {
            return Err(JobError::Cancelled {
                job: job.into(),
                key: key.into(),
                reason: CancelReason::Shutdown,
            });
        }
        // A caller that joins the run in flight needs no key of its own: it looks the key's
        // entry up under the shard's read lock with borrowed strings, and checks the cooldown
        // on the entry's record. A caller that starts a run takes the entry's `RunKey` (two
        // reference counts instead of two string allocations) and record from the same look.
        // A pinned key (a trigger's) has both already and goes straight to the entry below,
        // which joins the same way: one shard lock, not two.
        //
        // 1. cooldown (a backend's, if any, was asked before admission unless this one says
        //    the key is cooling).
        let (rk, existing) = match pinned {
            Some(p) => (p.rk.clone(), Some(Arc::clone(&p.record))),
            None => match inner.keys.get(&Probe { hash, job, key } as &dyn KeyParts) {
                Some(e) => {
                    if policy.overlap == Overlap::Coalesce
                        && let Some(slot) = &e.slot
                    {
                        let (rk, record) = (e.key(), e.running());
                        let joined = match record.cooldown_remaining().filter(|_| !force) {
                            Some(remaining) => {
                                record.data().cooldown_rejections += 1;
                                Err(cooling(rk, remaining))
                            }
                            None => downcast::<T>(&slot.flight, rk)
                                .inspect(|_| inner.coalesced(rk, record, slot.id, &slot.span)),
                        };
                        drop(e);
                        return match joined {
                            Ok(flight) => Ok(Admitted::Join(flight)),
                            Err(e @ JobError::CoolingDown { .. }) => Err(inner.skipped(e)),
                            Err(e) => Err(e),
                        };
                    }
                    (e.key().clone(), e.record.clone())
                }
                None => (RunKey::with_hash(hash, job, key), None),
            },
        };
        if !force
            && let Some(rec) = &existing
            && let Some(remaining) = rec.cooldown_remaining()
        {
            rec.data().cooldown_rejections += 1;
            return Err(inner.skipped(cooling(&rk, remaining)));
        }

        // 2. in flight?
        let (flight, launch) = match inner.keys.entry(rk.clone()) {
            Entry::Occupied(mut o) if o.get().slot.is_some() => {
                let KeyEntry { record, slot, .. } = o.get_mut();
                let record = record.as_ref().expect("a key with a run has a record");
                let slot = slot.as_mut().expect("matched a slot");
                match policy.overlap {
                    Overlap::Skip => {
                        return Err(inner.skipped(JobError::Busy {
                            job: rk.job,
                            key: rk.key,
                        }));
                    }
                    Overlap::Coalesce => {
                        let flight = downcast::<T>(&slot.flight, &rk)?;
                        inner.coalesced(&rk, record, slot.id, &slot.span);
                        (flight, None)
                    }
                    Overlap::QueueOne => match &slot.queued {
                        Some(q) => {
                            let flight = downcast::<T>(&q.flight, &rk)?;
                            inner.coalesced(&rk, record, slot.id, &slot.span);
                            (flight, None)
                        }
                        None => {
                            downcast::<T>(&slot.flight, &rk)?;
                            record.coalesced.fetch_add(1, Ordering::Relaxed);
                            let flight = Arc::new(Flight::<T>::new());
                            let span = inner.run_span(&rk, None, "queued", force);
                            let start = self.starter(&rk, &policy, record, &flight, f);
                            slot.queued = Some(Box::new(Queued {
                                flight: flight.clone(),
                                start: Some(start),
                                span,
                                job: rk.job.clone(),
                                key: rk.key.clone(),
                            }));
                            (flight, None)
                        }
                    },
                    Overlap::Replace => {
                        downcast::<T>(&slot.flight, &rk)?;
                        slot.run.cancel(CancelReason::Replaced);
                        let prev_ended = Arc::clone(&slot.run);
                        let flight = Arc::new(Flight::<T>::new());
                        let run = RunHandle::new(inner);
                        let id = inner.next_run.fetch_add(1, Ordering::Relaxed);
                        let span = inner.run_span(&rk, Some(id), "replace", force);
                        slot.id = id;
                        slot.span = span.clone();
                        slot.run = Arc::clone(&run);
                        slot.flight = flight.clone();
                        slot.queued = None;
                        let record = Arc::clone(record);
                        (
                            flight.clone(),
                            Some((id, None, run, record, flight, f, Some(prev_ended), span)),
                        )
                    }
                }
            }
            entry => {
                // No run in flight: the entry's record is the key's (it may have been made
                // or pruned since the look above), or a new one.
                let record = match &entry {
                    Entry::Occupied(o) => o.get().record.clone(),
                    Entry::Vacant(_) => existing,
                }
                .unwrap_or_else(|| Arc::new(KeyRecord::new()));
                // Re-check under the entry: a run that ended since the first check has set
                // its cooldown before taking its slot out.
                if !force && let Some(remaining) = record.cooldown_remaining() {
                    record.data().cooldown_rejections += 1;
                    drop(entry);
                    return Err(inner.skipped(cooling(&rk, remaining)));
                }
                let flight = Arc::new(Flight::<T>::new());
                let run = RunHandle::new(inner);
                let id = inner.next_run.fetch_add(1, Ordering::Relaxed);
                let span = inner.run_span(&rk, Some(id), "start", force);
                let slot = Slot {
                    id,
                    span: span.clone(),
                    run: Arc::clone(&run),
                    flight: flight.clone(),
                    queued: None,
                };
                // 3. lock, here when the key's lock is free (usually): taken with the slot,
                // and given back with it at the run's end. A backend's lease is taken later.
                let mut e = match entry {
                    Entry::Occupied(o) => o.into_ref(),
                    Entry::Vacant(v) => v.insert(KeyEntry::with(None)),
                };
                e.record.get_or_insert_with(|| Arc::clone(&record));
                e.slot = Some(slot);
                let locked = if inner.coord.is_none() {
                    e.lock.try_take(id, || inner.next_token())
                } else {
                    None
                };
                drop(e);
                (
                    flight.clone(),
                    Some((id, locked, run, record, flight, f, None, span)),
                )
            }
        };
        if let Some((id, locked, run, record, flight, f, prev, span)) = launch {
            let policy = policy.into_owned();
            let run = Inner::run_future(
                rk,
                policy,
                record,
                id,
                locked,
                run,
                flight.clone(),
                f,
                prev,
                span,
            );
            let lead = Lead {
                run: Some(run),
                tracker: Cow::Borrowed(&inner.tracker),
            };
            return Ok(Admitted::Lead(flight, lead));
        }
        Ok(Admitted::Join(flight))
    }

    /// A closure that starts a queued run later, from the task of the run before it.
    fn starter<T, F, Fut>(
        &self,
        rk: &RunKey,
        policy: &JobPolicy,
        record: &Arc<KeyRecord>,
        flight: &Arc<Flight<T>>,
        f: F,
    ) -> Starter
    where
        T: Send + Sync + 'static,
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, RunError>> + Send + 'static,
    {
        let inner = Arc::downgrade(&self.inner);
        let (rk, record, flight) = (rk.clone(), Arc::clone(record), Arc::clone(flight));
        let policy = policy.clone();
        Box::new(move |id, run, span| {
            span.record("job.run_id", crate::telemetry::int(id));
            if let Some(inner) = inner.upgrade() {
                let run =
                    Inner::run_future(rk, policy, record, id, None, run, flight, f, None, span);
                inner.tracker.spawn(run);
            }
        })
    }
}

/// A key's `RunKey` (with its hash) and record, from [`JobRuntimeController::pin`], held by a
/// caller that starts runs of it often (a runtime's trigger). Housekeeping keeps a held record
/// in the map, so it stays the key's record; admission takes both from here instead of hashing
/// the key and looking the record up.
pub(crate) struct PinnedKey {
    rk: RunKey,
    record: Arc<KeyRecord>,
}

impl PinnedKey {
    /// The key.
    pub(crate) fn key(&self) -> &str {
        &self.rk.key
    }
}

/// What [`JobRuntimeController::start_now`] got to: the call's result, or what is left of it.
pub(crate) enum Started<T> {
    /// The call ended in its first poll.
    Done(Shared<T>),
    /// The rest of the call, to be polled from a task.
    Waiting(Pin<Box<dyn Future<Output = Shared<T>> + Send>>),
}

/// What admission decided for one call.
enum Admitted<'a, T> {
    /// Wait for this run's result (the run in flight, or the one queued behind it).
    Join(Arc<Flight<T>>),
    /// This caller started the run: poll it, then read its result.
    Lead(Arc<Flight<T>>, Lead<'a>),
}

fn cooling(rk: &RunKey, remaining: Duration) -> JobError {
    JobError::CoolingDown {
        job: rk.job.clone(),
        key: rk.key.clone(),
        remaining,
    }
}

fn downcast<T: Send + Sync + 'static>(
    flight: &Arc<dyn ErasedFlight>,
    rk: &RunKey,
) -> Result<Arc<Flight<T>>, JobError> {
    Arc::clone(flight)
        .any()
        .downcast::<Flight<T>>()
        .map_err(|_| JobError::Misconfigured {
            job: rk.job.clone(),
            message: format!(
                "key `{}` is in flight with another output type; one job name must always produce the same type",
                rk.key
            ),
        })
}

/// Resolves once the attempt has been silent for `timeout`: no heartbeat or progress report
/// since the last one (or since its start). Records how long it was silent.
async fn watchdog(record: &KeyRecord, timeout: Duration) {
    loop {
        let last = record.data().last_beat.unwrap_or_else(Instant::now);
        let due = add_saturating(last, timeout);
        let now = Instant::now();
        if now >= due {
            record.data().rare().stuck_for = Some(now - last);
            return;
        }
        tokio::time::sleep_until(due).await;
    }
}

fn panic_message(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Ends a run exactly once: records the outcome, publishes the result, hands the slot to the
/// queued run or removes it. On drop without `finish` (the task was dropped by a runtime
/// shutting down, or the pipeline panicked) it ends the run as cancelled, so no waiter hangs
/// and no entry leaks.
struct Finisher<T: Send + Sync + 'static> {
    rk: RunKey,
    id: u64,
    run: Arc<RunHandle>,
    record: Arc<KeyRecord>,
    flight: Option<Arc<Flight<T>>>,
}

impl<T: Send + Sync + 'static> Finisher<T> {
    fn finish(&mut self, result: Shared<T>) {
        let Some(flight) = self.flight.take() else {
            return;
        };
        let me = self.id;
        let inner = &self.run.inner;
        // Usually nothing is queued: the slot is taken out of the key's entry (looked up by
        // reference: no key to clone), and dropped outside the shard lock. The run's lock, if
        // it holds the key's, is given back in the same shard lock.
        let mut removed = None;
        let mut next = None;
        let mut waiters = None;
        if let Some(mut e) = inner.keys.get_mut(&self.rk) {
            let e = &mut *e;
            waiters = e.lock.release_if(|_, owner| owner == me);
            match e
                .slot
                .as_mut()
                .filter(|s| s.id == me)
                .map(|s| s.queued.take())
            {
                // Replaced: the slot is the replacing run's.
                None => {}
                Some(None) => removed = e.slot.take(),
                // Only this run takes its queued run, and a `Replace` changes the id, so one
                // is there.
                Some(Some(mut q)) => {
                    let slot = e.slot.as_mut().expect("matched a slot");
                    let id = inner.next_run.fetch_add(1, Ordering::Relaxed);
                    let run = RunHandle::new(inner);
                    slot.id = id;
                    slot.span = q.span.clone();
                    slot.run = Arc::clone(&run);
                    slot.flight = Arc::clone(&q.flight);
                    next = q.start.take().map(|s| (s, id, run, q.span.clone()));
                }
            }
        }
        if let Some(w) = waiters {
            w.wake();
        }
        // Published only once the entry is gone (or handed to the queued run): a caller who
        // arrives after the run has ended must start a new run, not join the finished one.
        flight.complete(result);
        self.run.end();
        if inner.closed.load(Ordering::SeqCst) {
            // Shutdown may be waiting for the runs in flight to end.
            inner.drain_wake.notify_waiters();
        }
        if let Some((start, id, run, span)) = next {
            start(id, run, span);
        }
        // The slot (and its reference to the record) goes before the record is looked at.
        drop(removed);
        Inner::retire(inner, &self.rk, &self.record);
        inner.maybe_sweep(me);
    }
}

/// How many later runs on the same thread a finished key's record waits before that thread
/// removes it, if it is idle by then ([`Inner::retire`]).
const RETIRE_AFTER: usize = 256;

/// The keys whose runs ended on this thread, oldest first, for one controller at a time.
struct Retiring {
    /// The controller they belong to (compared by address; a `Weak` keeps the address from
    /// being reused while it is compared, without keeping the controller alive).
    owner: Weak<Inner>,
    keys: VecDeque<Retiree>,
}

/// A key queued by [`Inner::retire`].
struct Retiree {
    key: RunKey,
    /// Its record (a `Weak`: the map's reference count is what says the key is idle).
    record: Weak<KeyRecord>,
    /// The record's `ended` count after the run that queued it.
    ended: u64,
}

thread_local! {
    static RETIRING: RefCell<Retiring> = const {
        RefCell::new(Retiring {
            owner: Weak::new(),
            keys: VecDeque::new(),
        })
    };
}

impl<T: Send + Sync + 'static> Drop for Finisher<T> {
    fn drop(&mut self) {
        if self.flight.is_some() {
            let err = JobError::Cancelled {
                job: self.rk.job.clone(),
                key: self.rk.key.clone(),
                reason: CancelReason::Shutdown,
            };
            let now = Instant::now();
            {
                let mut d = self.record.data();
                d.running = false;
                d.failures += 1;
                let rare = d.rare();
                rare.last_error = Some(err.to_string());
                rare.last_error_kind = Some(err.kind());
                d.keep_until = Some(add_saturating(now, self.run.inner.config.status_retention));
            }
            self.finish(Err(err));
        }
    }
}

/// A run holding its lock: one more in the in-flight gauge until it ends (or is dropped).
struct Active<'a>(&'a Inner, &'a [opentelemetry::KeyValue; 1]);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.metrics.in_flight.add(-1, self.1);
    }
}

/// An admitted run: steps 3 to 6 and its end, boxed once.
type RunFuture = tracing::instrument::Instrumented<Pin<Box<dyn Future<Output = ()> + Send>>>;

/// The run as polled by the caller that started it.
///
/// Polling the run in the caller's own task costs no spawn and no wake-up across threads. If
/// the caller gives up (drops its future) before the run has ended, the run moves to a task of
/// the controller's tracker and goes on for everyone else: giving up never cancels it.
///
/// While the caller polls it, the run is counted by its in-flight entry, which shutdown waits
/// for ([`Inner::drained`]), not by a tracker token: a token is two shared counters written
/// twice per run from every thread, which cost two threads as much as a map operation.
struct Lead<'a> {
    run: Option<RunFuture>,
    /// The controller's tracker: borrowed while the caller's future borrows the controller (a
    /// `ctl.run` call), a clone once the lead is boxed to be polled from a task.
    tracker: Cow<'a, TaskTracker>,
}

impl Lead<'_> {
    /// The same lead, owning a clone of the tracker.
    fn into_owned(mut self) -> Lead<'static> {
        Lead {
            run: self.run.take(),
            tracker: Cow::Owned(self.tracker.as_ref().clone()),
        }
    }
}

impl Future for Lead<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(run) = self.run.as_mut() else {
            return Poll::Ready(());
        };
        ready!(Pin::new(run).poll(cx));
        self.run = None;
        Poll::Ready(())
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if let Some(run) = self.run.take() {
            // Outside a runtime (it is being torn down) the run is dropped instead, and its
            // `Finisher` ends it as cancelled.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                self.tracker.spawn_on(run, &rt);
            }
        }
    }
}

/// A lock held for one run: the key's own (in its entry, given back with the run's slot when
/// the run ends), or a lease on a shared backend kept alive by a renew task (boxed: it is
/// rare, and this is kept across the run's awaits).
enum HeldLock {
    Key(FencingToken),
    Lease(Box<(Lease, CancellationToken)>),
}

impl HeldLock {
    fn token(&self) -> FencingToken {
        match self {
            HeldLock::Key(t) => *t,
            HeldLock::Lease(held) => held.0.token,
        }
    }
}

impl Inner {
    /// Offers an event to the listeners, if there are any.
    fn event(
        &self,
        kind: EventKind,
        rk: &RunKey,
        attempt: u32,
        duration: Option<Duration>,
        error: Option<JobError>,
    ) {
        if self.hooks.active() {
            self.hooks.emit(JobEvent {
                kind,
                job: rk.job.clone(),
                key: rk.key.clone(),
                at: self.clock.wall_now(),
                attempt,
                duration,
                error,
            });
        }
    }

    /// Whether this process's record of the key says it is cooling down (then admission
    /// refuses the call without asking a backend).
    fn cooling_locally(&self, job: &str, key: &str) -> bool {
        let hash = RunKey::hash_of(job, key);
        self.keys
            .get(&Probe { hash, job, key } as &dyn KeyParts)
            .is_some_and(|e| {
                e.record
                    .as_ref()
                    .is_some_and(|r| r.cooldown_remaining().is_some())
            })
    }

    /// Step 1 on a shared backend: the cooldown recorded there (by any replica).
    async fn backend_cooldown(
        &self,
        c: &Arc<dyn Coordinator>,
        job: &str,
        key: &str,
    ) -> Result<(), JobError> {
        match c.cooldown_remaining(job, key).await {
            Ok(None) => Ok(()),
            Ok(Some(remaining)) => {
                let rk = RunKey::new(job, key);
                if let Some(r) = self.keys.get(&rk).and_then(|e| e.record.clone()) {
                    r.data().cooldown_rejections += 1;
                }
                Err(self.skipped(cooling(&rk, remaining)))
            }
            Err(e) => Err(JobError::Backend {
                job: job.into(),
                key: key.into(),
                source: e.0,
            }),
        }
    }

    /// A refused call (busy, cooling down): counted, shown as an event of the caller's span,
    /// offered to the listeners, then returned.
    fn skipped(&self, e: JobError) -> JobError {
        let remaining = match &e {
            JobError::CoolingDown { job, remaining, .. } => {
                self.metrics.cooldown_rejections.add(
                    1,
                    &[opentelemetry::KeyValue::new(attr::JOB, Arc::clone(job))],
                );
                Some(remaining.as_secs_f64() * 1e3)
            }
            _ => None,
        };
        // Debug level: a refusal is ordinary control flow, and a busy service refuses often.
        tracing::debug!(
            job.name = e.job(),
            job.outcome = e.kind(),
            job.cooldown_remaining_ms = remaining,
            "job.skipped"
        );
        if self.hooks.active() {
            self.hooks.emit(JobEvent {
                kind: EventKind::Skipped,
                job: Arc::from(e.job()),
                key: Arc::from(e.key()),
                at: self.clock.wall_now(),
                attempt: 0,
                duration: None,
                error: Some(e.clone()),
            });
        }
        e
    }

    /// The `job.run` span of a run (`id` is recorded later for a queued run). Its parent is the
    /// caller's current span: a request's, or a runtime's `job.trigger`.
    fn run_span(
        &self,
        rk: &RunKey,
        id: Option<u64>,
        overlap: &'static str,
        forced: bool,
    ) -> tracing::Span {
        let span = tracing::info_span!(
            "job.run",
            job.name = &*rk.job,
            job.key = Empty,
            job.run_id = id.map(crate::telemetry::int),
            job.overlap = overlap,
            job.forced = forced,
            job.outcome = Empty,
            job.attempts = Empty,
            job.lock_wait_ms = Empty,
            job.fencing_token = Empty,
            "error.type" = Empty,
            otel.status_code = Empty,
            otel.status_description = Empty,
            trace_id = Empty,
        );
        if !span.is_disabled() {
            // (A `let`, not an `if let` alone in the block: without feature `otel` clippy
            // would ask to collapse the two `if`s.)
            let key = self.config.telemetry_keys.render(&rk.key);
            if let Some(k) = key {
                span.record("job.key", k);
            }
            #[cfg(feature = "otel")]
            if let Some(t) = crate::telemetry::trace_id_of(&span) {
                span.record("trace_id", t);
            }
        }
        span
    }

    /// A caller joined run `id`: counted (in the key's status and the metrics), an event of
    /// the caller's span and (feature `otel`) a link from the caller's span to the run's.
    fn coalesced(&self, rk: &RunKey, record: &KeyRecord, id: u64, run_span: &tracing::Span) {
        record.coalesced.fetch_add(1, Ordering::Relaxed);
        self.metrics.coalesced.add(1, &Metrics::job(&rk.job));
        tracing::debug!(
            job.name = &*rk.job,
            job.run_id = crate::telemetry::int(id),
            "job.coalesced"
        );
        #[cfg(feature = "otel")]
        crate::telemetry::link(&tracing::Span::current(), run_span);
        #[cfg(not(feature = "otel"))]
        let _ = run_span;
    }

    fn unknown_group(&self, rk: &RunKey, group: &str) -> JobError {
        let known: Vec<_> = self.limits.group_names().collect();
        JobError::Misconfigured {
            job: rk.job.clone(),
            message: format!(
                "group `{group}` is not configured (configured: [{}]); define it with RuntimeConfig::concurrency_group / rate_limit_group or JOBRT_GROUP_{group}_CONCURRENCY / _RATE_LIMIT",
                known.join(", ")
            ),
        }
    }

    /// Steps 3 to 6 of an admitted run and its end, as one boxed future: the caller that
    /// started the run polls it (see [`Lead`]), or a task of the tracker does.
    #[allow(clippy::too_many_arguments)]
    fn run_future<T, F, Fut>(
        rk: RunKey,
        policy: JobPolicy,
        record: Arc<KeyRecord>,
        id: u64,
        locked: Option<FencingToken>,
        run: Arc<RunHandle>,
        flight: Arc<Flight<T>>,
        f: F,
        prev_ended: Option<Arc<RunHandle>>,
        span: tracing::Span,
    ) -> RunFuture
    where
        T: Send + Sync + 'static,
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, RunError>> + Send + 'static,
    {
        let mut fin = Finisher {
            rk,
            id,
            run,
            record,
            flight: Some(flight),
        };
        // Boxed first and instrumented outside the box: the future is large (the whole
        // pipeline), and each wrapper around it before boxing would be one more copy of it.
        let run_span = span.clone();
        let run: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
            if let Some(prev) = prev_ended {
                prev.wait_ended().await;
            }
            let result = AssertUnwindSafe(fin.run.inner.pipeline(
                &run_span,
                &fin.rk,
                &policy,
                &fin.record,
                &fin.run,
                id,
                locked,
                &f,
            ))
            .catch_unwind()
            .await
            .unwrap_or_else(|p| {
                Err(JobError::Panicked {
                    job: fin.rk.job.clone(),
                    key: fin.rk.key.clone(),
                    message: format!("inside the runtime: {}", panic_message(&*p)),
                })
            });
            fin.finish(result);
        });
        run.instrument(span)
    }

    /// Step 3 for a run that did not take its key's lock at admission (the key was locked
    /// then, or the run replaces one, or is a queued one, or there is a backend). Boxed by its
    /// caller, waits and all, so that every run's future stays small.
    async fn lock(
        &self,
        rk: &RunKey,
        policy: &JobPolicy,
        run: &Arc<RunHandle>,
        id: u64,
    ) -> Result<HeldLock, JobError> {
        match &self.coord {
            None => {
                let r = if policy.lock_wait.is_zero() {
                    self.try_lock_key(rk, id).map(HeldLock::Key).ok_or(None)
                } else {
                    self.lock_key(rk, id, policy.lock_wait)
                        .await
                        .map(HeldLock::Key)
                        .map_err(Some)
                };
                match r {
                    Ok(held) => Ok(held),
                    Err(None) => Err(JobError::Busy {
                        job: rk.job.clone(),
                        key: rk.key.clone(),
                    }),
                    Err(Some(e)) => Err(JobError::LockTimeout {
                        job: rk.job.clone(),
                        key: rk.key.clone(),
                        waited: e.waited,
                    }),
                }
            }
            Some(c) => self.lease(c, rk, policy, run).await,
        }
    }

    fn next_token(&self) -> FencingToken {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes `rk`'s lock for `owner` (a run id, or [`MANUAL`]) if it is free; never waits. A
    /// key with no entry gets one without a record (a manual lock on a key that never ran),
    /// which goes again with the lock if no run used it meanwhile ([`Inner::unlock_key`]).
    fn try_lock_key(&self, rk: &RunKey, owner: u64) -> Option<FencingToken> {
        let mut e = self
            .keys
            .entry(rk.clone())
            .or_insert_with(|| KeyEntry::with(None));
        e.lock.try_take(owner, || self.next_token())
    }

    /// Takes `rk`'s lock for `owner`, waiting at most `wait` (zero: try once), without
    /// polling: see [`EntryLock`].
    async fn lock_key(
        &self,
        rk: &RunKey,
        owner: u64,
        wait: Duration,
    ) -> Result<FencingToken, LockTimeout> {
        let start = Instant::now();
        let deadline = add_saturating(start, wait);
        loop {
            let notified = {
                let mut e = self
                    .keys
                    .entry(rk.clone())
                    .or_insert_with(|| KeyEntry::with(None));
                if let Some(token) = e.lock.try_take(owner, || self.next_token()) {
                    return Ok(token);
                }
                if wait.is_zero() || Instant::now() >= deadline {
                    None
                } else {
                    e.lock.wait()
                }
            };
            let Some(notified) = notified else {
                return Err(LockTimeout {
                    waited: start.elapsed(),
                });
            };
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(LockTimeout {
                    waited: start.elapsed(),
                });
            }
        }
    }

    /// Gives back a [`KeyLock`]'s lock (token `token`), wakes its waiters, and removes the
    /// key's entry if no run has used it (it was made for a lock). One shard lock.
    fn unlock_key(&self, rk: &RunKey, token: FencingToken) {
        let mut waiters = None;
        let removed = self.keys.remove_if_mut(rk, |_, e| {
            waiters = e.lock.release_if(|t, owner| t == token && owner == MANUAL);
            // A key a run has used keeps its record (its status) for its thread's retirement
            // or the sweep, as without a lock.
            waiters.is_some() && e.record.is_none() && e.slot.is_none()
        });
        drop(removed);
        if let Some(w) = waiters {
            w.wake();
        }
    }

    /// Step 3 on a shared backend: a lease, polled for until `lock_wait`, then renewed by a task.
    async fn lease(
        &self,
        c: &Arc<dyn Coordinator>,
        rk: &RunKey,
        policy: &JobPolicy,
        run: &Arc<RunHandle>,
    ) -> Result<HeldLock, JobError> {
        let start = Instant::now();
        let give_up = add_saturating(start, policy.lock_wait);
        loop {
            let backend = |e: crate::coord::BackendError| JobError::Backend {
                job: rk.job.clone(),
                key: rk.key.clone(),
                source: e.0,
            };
            match c
                .acquire(&rk.job, &rk.key, policy.lease)
                .await
                .map_err(backend)?
            {
                Acquire::Acquired(lease) => {
                    let stop_renew = CancellationToken::new();
                    self.spawn_renewal(
                        Arc::clone(c),
                        lease.clone(),
                        policy.lease,
                        Arc::clone(run),
                        stop_renew.clone(),
                    );
                    return Ok(HeldLock::Lease(Box::new((lease, stop_renew))));
                }
                Acquire::Held { free_in } => {
                    let now = Instant::now();
                    if policy.lock_wait.is_zero() {
                        return Err(JobError::Busy {
                            job: rk.job.clone(),
                            key: rk.key.clone(),
                        });
                    }
                    if now >= give_up {
                        return Err(JobError::LockTimeout {
                            job: rk.job.clone(),
                            key: rk.key.clone(),
                            waited: now - start,
                        });
                    }
                    let poll = free_in
                        .unwrap_or(Duration::from_millis(100))
                        .clamp(Duration::from_millis(10), Duration::from_secs(1));
                    tokio::time::sleep_until(add_saturating(now, poll).min(give_up)).await;
                }
            }
        }
    }

    fn spawn_renewal(
        &self,
        coord: Arc<dyn Coordinator>,
        lease: Lease,
        ttl: Duration,
        run: Arc<RunHandle>,
        stop: CancellationToken,
    ) {
        self.tracker.spawn(async move {
            let every = (ttl / 3).max(Duration::from_millis(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                match coord.renew(&lease, ttl).await {
                    Ok(true) => {}
                    Ok(false) | Err(_) => {
                        tracing::warn!(job = %lease.job, key = %lease.key, token = lease.token, "lease lost; cancelling the run");
                        run.cancel(CancelReason::LeaseLost);
                        return;
                    }
                }
            }
        });
    }

    /// Gives a lease back. The key's own lock stays held until the run's end takes its slot out
    /// ([`Finisher::finish`]), in the same shard lock.
    async fn unlock(&self, held: HeldLock) {
        match held {
            HeldLock::Key(_) => {}
            HeldLock::Lease(held) => {
                let (lease, stop_renew) = *held;
                stop_renew.cancel();
                if let Some(c) = &self.coord
                    && let Err(e) = c.release(&lease).await
                {
                    tracing::warn!(job = %lease.job, key = %lease.key, error = %e, "lease release failed; it will expire");
                }
            }
        }
    }

    /// Steps 3 to 6 of the pipeline, for a run that was admitted (steps 1 and 2).
    #[allow(clippy::too_many_arguments)]
    async fn pipeline<T, F, Fut>(
        &self,
        span: &tracing::Span,
        rk: &RunKey,
        policy: &JobPolicy,
        record: &Arc<KeyRecord>,
        run: &Arc<RunHandle>,
        id: u64,
        locked: Option<FencingToken>,
        f: &F,
    ) -> Shared<T>
    where
        T: Send + Sync + 'static,
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, RunError>> + Send + 'static,
    {
        // 3. lock (usually taken at admission, with the run's slot)
        let waits = locked.is_none() && (!policy.lock_wait.is_zero() || self.coord.is_some());
        let admitted = waits.then(Instant::now);
        let held = match locked {
            Some(token) => HeldLock::Key(token),
            // Boxed: the rare path keeps its future out of every run's.
            None => match Box::pin(self.lock(rk, policy, run, id)).await {
                Ok(h) => h,
                Err(e) => {
                    span.record("job.outcome", e.kind());
                    self.metrics.runs.add(
                        1,
                        &[
                            opentelemetry::KeyValue::new(attr::JOB, Arc::clone(&rk.job)),
                            opentelemetry::KeyValue::new(attr::OUTCOME, e.kind()),
                        ],
                    );
                    return Err(e);
                }
            },
        };
        let started = Instant::now();
        let lock_wait = admitted.map_or(Duration::ZERO, |a| started - a);
        // One attribute set for every instrument of this run (each costs a reference count).
        let job_attr = Metrics::job(&rk.job);
        self.metrics
            .lock_wait
            .record(lock_wait.as_secs_f64(), &job_attr);
        self.metrics.in_flight.add(1, &job_attr);
        let active = Active(self, &job_attr);
        if !span.is_disabled() {
            span.record("job.lock_wait_ms", lock_wait.as_secs_f64() * 1e3);
            span.record("job.fencing_token", crate::telemetry::int(held.token()));
        }
        {
            let mut d = record.data();
            d.running = true;
            d.runs += 1;
            d.last_start = Some(started);
            if let Some(rare) = &mut d.rare {
                rare.progress = None;
            }
            d.fencing = Some(held.token());
        }
        self.event(EventKind::Started, rk, 1, None, None);
        // 4. budget
        let deadline = Deadline::new(started, policy.budget);
        // 5. attempts
        // Boxed on its own: the attempts' future is most of a run's, and two allocations that
        // each fit the allocator's per-thread cache (under ~1 KB) cost less than one that does
        // not (glibc's tcache; a larger block goes through its bins and is copied in whole).
        let result =
            Box::pin(self.attempts(span, rk, policy, record, run, id, held.token(), deadline, f))
                .await;
        self.unlock(held).await;
        // 6. outcome
        let ended = Instant::now();
        let took = ended - started;
        let success = result.is_ok();
        let cooldown = policy.cooldown.span(success);
        if let Some(c) = &self.coord
            && let Err(e) = c.record_finish(&rk.job, &rk.key, cooldown).await
        {
            tracing::warn!(job = %rk.job, key = %rk.key, error = %e, "could not record the cooldown on the backend");
        }
        self.record_outcome(record, policy.cooldown, took, ended, &result);
        drop(active);
        let outcome = result.as_ref().map_or_else(|e| e.kind(), |_| "success");
        let [job] = job_attr;
        self.metrics.run_ended(job, outcome, took);
        span.record("job.outcome", outcome);
        if let Err(e) = &result {
            crate::telemetry::record_error(span, e);
        }
        let kind = if result.is_ok() {
            EventKind::Succeeded
        } else {
            EventKind::Failed
        };
        let error = result.as_ref().err().cloned();
        self.event(kind, rk, 0, Some(took), error);
        result
    }

    fn record_outcome<T>(
        &self,
        record: &KeyRecord,
        cooldown: Cooldown,
        took: Duration,
        ended: Instant,
        result: &Shared<T>,
    ) {
        let mut d = record.data();
        d.running = false;
        if let Some(rare) = &mut d.rare {
            rare.stuck_for = None;
        }
        d.last_duration = Some(took);
        let success = result.is_ok();
        let span = cooldown.span(success);
        d.not_before = (!span.is_zero()).then(|| cooldown.not_before(ended, success));
        record
            .cooling
            .store(d.not_before.is_some(), Ordering::Release);
        d.keep_until = Some(add_saturating(ended, self.config.status_retention));
        match result {
            Ok(_) => {
                d.successes += 1;
                d.last_success = Some(ended);
            }
            Err(e) => {
                d.failures += 1;
                let rare = d.rare();
                rare.last_error = Some(e.to_string());
                rare.last_error_kind = Some(e.kind());
                rare.last_error_trace_id = crate::telemetry::current_trace_id();
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempts<T, F, Fut>(
        &self,
        span: &tracing::Span,
        rk: &RunKey,
        policy: &JobPolicy,
        record: &Arc<KeyRecord>,
        run: &Arc<RunHandle>,
        id: u64,
        fencing: FencingToken,
        deadline: Deadline,
        f: &F,
    ) -> Shared<T>
    where
        T: Send + Sync + 'static,
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, RunError>> + Send + 'static,
    {
        let budget_exceeded = |last: Option<Box<JobError>>| JobError::BudgetExceeded {
            job: rk.job.clone(),
            key: rk.key.clone(),
            budget: deadline.budget().unwrap_or_default(),
            last,
        };
        let cancelled = || JobError::Cancelled {
            job: rk.job.clone(),
            key: rk.key.clone(),
            reason: run.signal.reason(),
        };
        let Some(scope) = self.limits.scope(policy.group.as_deref()) else {
            return Err(self.unknown_group(rk, policy.group.as_deref().unwrap_or_default()));
        };
        let max = policy.retry.max_attempts.get();
        // Both boxed, and the backoff made at the first retry: most runs never retry, and every
        // byte here is a byte of every run's future.
        let mut backoff: Option<Box<crate::retry::Backoff>> = None;
        let mut last: Option<Box<JobError>> = None;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if self.cancelling.load(Ordering::SeqCst) {
                // Shutdown began after this run was admitted (it may have missed the sweep).
                run.cancel(CancelReason::Shutdown);
            }
            if run.signal.is_cancelled() {
                return Err(cancelled());
            }
            if deadline.at().is_some() && deadline.expired(Instant::now()) {
                return Err(budget_exceeded(last));
            }
            let permits = if scope.is_open() {
                Ok(Permits::default())
            } else {
                // Permits and tokens are usually there at once: only a wait needs a future and
                // a watch on the run's signal, boxed so that the run's own future stays small.
                match scope.try_acquire() {
                    Ok(p) => Ok(p),
                    Err(partial) => {
                        self.metrics.limit_waits.add(1, &Metrics::job(&rk.job));
                        let wait = Box::pin(async {
                            tokio::select! {
                                biased;
                                _ = run.signal.cancelled() => None,
                                p = scope.acquire_rest(partial, policy.priority, deadline.at()) => Some(p),
                            }
                        });
                        match wait.await {
                            Some(p) => p,
                            None => return Err(cancelled()),
                        }
                    }
                }
            };
            let permits = match permits {
                Ok(p) => p,
                Err(LimitError::Deadline) => return Err(budget_exceeded(last)),
            };
            let bound = if deadline.at().is_some() || policy.attempt_timeout.is_some() {
                deadline.for_attempt(Instant::now(), policy.attempt_timeout)
            } else {
                None
            };
            // An attempt needs a token of its own only when a limit may stop it alone (a
            // deadline, a heartbeat timeout); otherwise it follows the run's signal, whose token
            // is made only if someone asks for it.
            let own = (bound.is_some() || policy.heartbeat_timeout.is_some())
                .then(|| run.signal.token().child_token());
            let ctx = JobContext {
                job: rk.job.clone(),
                key: rk.key.clone(),
                attempt,
                deadline,
                run: Arc::clone(run),
                own: own.clone(),
                fencing,
                record: Arc::clone(record),
            };
            if policy.heartbeat_timeout.is_some() {
                let mut d = record.data();
                d.last_beat = Some(Instant::now());
                if let Some(rare) = &mut d.rare {
                    rare.stuck_for = None;
                }
            }
            // The job's own spans (and the future's) are children of this attempt's span.
            let aspan = tracing::info_span!(
                "job.attempt",
                job.name = &*rk.job,
                job.attempt = crate::telemetry::int(attempt),
                job.outcome = Empty,
                job.retry_in_ms = Empty,
                job.scan_id = Empty,
                job.items_changed = Empty,
                "error.type" = Empty,
                otel.status_code = Empty,
                otel.status_description = Empty,
            );
            span.record("job.attempts", crate::telemetry::int(attempt));
            // The job's future, pinned here once (the attempt's runner borrows it). Made in the
            // `let` so that no temporary of its making outlives the statement: a `match` on
            // `catch_unwind(..)` around the `.await` kept a second copy of the future.
            let mut panicked = None;
            let mut job = std::pin::pin!(match std::panic::catch_unwind(AssertUnwindSafe(
                || aspan.in_scope(|| f(ctx))
            )) {
                Ok(fut) => Some(AssertUnwindSafe(fut.instrument(aspan.clone())).catch_unwind()),
                Err(p) => {
                    panicked = Some(p);
                    None
                }
            });
            let end = match job.as_mut().as_pin_mut() {
                // `f` panicked while making the future: `panicked` holds the payload (always
                // set on this path; the fallback only keeps this total).
                None => AttemptEnd::Done(Err(panicked
                    .take()
                    .unwrap_or_else(|| Box::new("the job panicked")))),
                Some(fut) => {
                    if own.is_none() {
                        run_attempt(fut, &run.signal, policy.abandon_grace).await
                    } else {
                        // A deadline or a heartbeat timeout: sleeps, which are large, so boxed
                        // (the usual attempt has neither and keeps the run's future small).
                        let stuck = policy.heartbeat_timeout.map(|t| watchdog(record, t));
                        Box::pin(run_limited(
                            fut,
                            bound,
                            stuck,
                            own.as_ref(),
                            &run.signal,
                            policy.abandon_grace,
                        ))
                        .await
                    }
                }
            };
            drop(permits);
            let step: Result<(JobError, Decision), Shared<T>> = match end {
                AttemptEnd::Done(Ok(Ok(v))) => Err(Ok(Arc::new(v))),
                AttemptEnd::Done(Ok(Err(e))) => {
                    let decision = policy.retry.classify(&e, attempt);
                    let err = JobError::Failed {
                        job: rk.job.clone(),
                        key: rk.key.clone(),
                        source: e.source_error().clone(),
                    };
                    Ok((err, decision))
                }
                AttemptEnd::Done(Err(p)) => Err(Err(JobError::Panicked {
                    job: rk.job.clone(),
                    key: rk.key.clone(),
                    message: panic_message(&*p),
                })),
                AttemptEnd::TimedOut(Limit::Budget) | AttemptEnd::Abandoned(Limit::Budget) => {
                    Err(Err(budget_exceeded(last.take())))
                }
                AttemptEnd::TimedOut(Limit::Heartbeat)
                | AttemptEnd::Abandoned(Limit::Heartbeat) => {
                    let timeout = policy.heartbeat_timeout.unwrap_or_default();
                    let silent_for = (record.data().rare.as_ref())
                        .and_then(|r| r.stuck_for)
                        .unwrap_or(timeout);
                    let err = JobError::Stuck {
                        job: rk.job.clone(),
                        key: rk.key.clone(),
                        attempt,
                        silent_for,
                        timeout,
                    };
                    self.event(EventKind::Stuck, rk, attempt, None, Some(err.clone()));
                    Err(Err(err))
                }
                AttemptEnd::TimedOut(Limit::Attempt) | AttemptEnd::Abandoned(Limit::Attempt) => {
                    let timeout = policy.attempt_timeout.unwrap_or_default();
                    let err = JobError::AttemptTimeout {
                        job: rk.job.clone(),
                        key: rk.key.clone(),
                        attempt,
                        timeout,
                    };
                    Ok((err, Decision::Retry))
                }
                AttemptEnd::Cancelled { abandoned } => {
                    if abandoned {
                        self.abandoned.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Err(cancelled()))
                }
            };
            match &step {
                Err(Ok(_)) => {
                    aspan.record("job.outcome", "success");
                }
                Err(Err(e)) | Ok((e, _)) => crate::telemetry::record_error(&aspan, e),
            }
            let (err, decision) = match step {
                Ok(x) => x,
                Err(r) => return r,
            };
            if decision == Decision::Abort || attempt >= max {
                if attempt == 1 {
                    return Err(err);
                }
                return Err(JobError::RetriesExhausted {
                    job: rk.job.clone(),
                    key: rk.key.clone(),
                    attempts: attempt,
                    last: Box::new(err),
                });
            }
            let delay = match decision {
                Decision::RetryAfter(d) => d,
                _ => backoff
                    .get_or_insert_with(|| {
                        Box::new(policy.retry.backoff(id.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
                    })
                    .next()
                    .unwrap_or_default(),
            };
            let now = Instant::now();
            if deadline.remaining(now).is_some_and(|left| delay >= left) {
                return Err(budget_exceeded(Some(Box::new(err))));
            }
            record.data().retries += 1;
            self.metrics.retries.add(1, &Metrics::job(&rk.job));
            aspan.record("job.retry_in_ms", delay.as_secs_f64() * 1e3);
            self.event(EventKind::Retried, rk, attempt, None, Some(err.clone()));
            // Boxed: a sleep is large, and most runs never retry.
            let slept = Box::pin(async {
                tokio::select! {
                    biased;
                    _ = run.signal.cancelled() => false,
                    _ = tokio::time::sleep_until(add_saturating(now, delay)) => true,
                }
            });
            if !slept.await {
                return Err(cancelled());
            }
            last = Some(Box::new(err));
        }
    }

    /// Waits until no run is in flight and the tracker has no task left. A run its caller
    /// polls holds no tracker token: its in-flight entry counts it (from admission to its
    /// end), and each run that ends after shutdown began wakes this. A queued or replacing run
    /// keeps the key's entry, so it is counted too.
    async fn drained(&self) {
        loop {
            self.tracker.wait().await;
            let ended = self.drain_wake.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            // Stops at the first run in flight: with r runs left among k keys, each look reads
            // about k / r entries, and the wake-ups as r goes down read k·ln(r) in all.
            if !self.keys.iter().any(|e| e.slot.is_some()) {
                if self.tracker.is_empty() {
                    return;
                }
                // A caller gave up and its run moved to a tracker task meanwhile.
                continue;
            }
            ended.await;
        }
    }

    /// Called by every run as it ends, on the thread it ends on: queues the key on that
    /// thread and, `RETIRE_AFTER` runs later, removes its record there if it is idle by then
    /// (not running, not pinned, its cooldown and status retention over) and has not run
    /// since (a key run again was queued again: a busy key keeps its record); one that is not
    /// idle is left to the amortised sweep or `housekeep`.
    ///
    /// So a key's record is usually freed by the thread that ran it, often the one that made
    /// it, one entry at a time. Left to a sweep, one thread freed (under glibc's arena lock of
    /// the thread that allocated them) thousands of records at once, and at 2 threads each
    /// spent ~20 % of its time blocked: two threads did no more runs per second than one.
    fn retire(this: &Arc<Inner>, rk: &RunKey, record: &Arc<KeyRecord>) {
        let ended = record.ended.fetch_add(1, Ordering::Relaxed) + 1;
        if Arc::strong_count(record) > 2 {
            // Held by more than the map and the ending run: pinned by a trigger (never
            // removed here) or already running again (queued again when that run ends).
            return;
        }
        let due = RETIRING.try_with(|r| {
            let mut r = r.try_borrow_mut().ok()?;
            if !std::ptr::eq(r.owner.as_ptr(), Arc::as_ptr(this)) {
                // Another controller's keys: they stay in its map for its own sweep.
                r.keys.clear();
                r.owner = Arc::downgrade(this);
            }
            if let Some(last) = r.keys.back_mut()
                && std::ptr::eq(last.record.as_ptr(), Arc::as_ptr(record))
            {
                // The same key again (a key run over and over): one entry is enough.
                last.ended = ended;
                return None;
            }
            r.keys.push_back(Retiree {
                key: rk.clone(),
                record: Arc::downgrade(record),
                ended,
            });
            if r.keys.len() > RETIRE_AFTER {
                r.keys.pop_front()
            } else {
                None
            }
        });
        let Ok(Some(old)) = due else {
            return;
        };
        // Only a key that has not run since, whose record is still the map's and held by no
        // one else (the map and `rec`: not running, not pinned), is looked up in the map.
        let Some(rec) = old.record.upgrade() else {
            return;
        };
        if rec.ended.load(Ordering::Relaxed) != old.ended || Arc::strong_count(&rec) != 2 {
            return;
        }
        drop(rec);
        let now = Instant::now();
        // The removed entry is dropped here, after the shard lock.
        let _removed = this.keys.remove_if(&old.key, |_, e| {
            e.record
                .as_ref()
                .is_some_and(|r| std::ptr::eq(Arc::as_ptr(r), old.record.as_ptr()))
                && e.idle(now)
        });
    }

    /// Sweeps once at least 4,096 runs, and as many runs as there were keys after the last
    /// sweep, have started since it (`id` is this run's, from `next_run`): amortised O(1) per
    /// run, as keys grow by at most one per run. Skipped while there are no more keys than the
    /// runs' own threads keep for [`retire`](Self::retire). Only reads a shared line per run; it
    /// is written once per sweep.
    fn maybe_sweep(&self, id: u64) {
        let last = self.sweep.last.load(Ordering::Relaxed);
        let n = id.saturating_sub(last);
        if n < 4096
            || n < self.sweep.keys.load(Ordering::Relaxed) as u64
            || self
                .sweep
                .last
                .compare_exchange(last, id, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if self.keys.len() > self.sweep_floor {
            // Amortised sweep: drop idle keys but keep the tables' capacity, so a steady stream
            // of new keys does not shrink and regrow them every 4,096 runs.
            self.prune(false);
        }
        self.sweep.keys.store(self.keys.len(), Ordering::Relaxed);
    }

    fn housekeep(&self) -> usize {
        self.prune(true)
    }

    fn prune(&self, shrink: bool) -> usize {
        let now = Instant::now();
        let before = self.keys.len();
        self.keys.retain(|_, e| !e.idle(now));
        let removed = before.saturating_sub(self.keys.len());
        if !shrink {
            return removed;
        }
        if self.keys.len() * 4 < self.keys.capacity() {
            self.keys.shrink_to_fit();
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three-`write` form of [`RunKey::hash_of`], for any length.
    fn streamed(job: &str, key: &str) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = run_key_hasher().build_hasher();
        h.write(job.as_bytes());
        h.write_u8(0xff);
        h.write(key.as_bytes());
        h.finish()
    }

    #[test]
    fn a_key_hashes_the_same_whichever_way_it_is_written_and_pairs_do_not_run_together() {
        for (j, k) in [
            ("bench", "same"),
            ("", ""),
            ("job", &"k".repeat(62)[..]), // 64 bytes in all: one buffer
            ("job", &"k".repeat(63)[..]), // 65: three writes
            ("scan", &"ü".repeat(100)[..]), // long, multi-byte
        ] {
            assert_eq!(RunKey::hash_of(j, k), streamed(j, k), "{j:?} {k:?}");
            assert_eq!(RunKey::new(j, k).hash, RunKey::hash_of(j, k));
        }
        assert_ne!(RunKey::hash_of("ab", "c"), RunKey::hash_of("a", "bc"));
        assert_ne!(RunKey::hash_of("a", ""), RunKey::hash_of("", "a"));
    }

    #[test]
    fn keys_of_one_job_share_its_name_on_a_thread_and_only_there() {
        let (a, b) = (RunKey::new("scan", "u1"), RunKey::new("scan", "u2"));
        assert!(
            Arc::ptr_eq(&a.job, &b.job),
            "one allocation for the job's name"
        );
        let other = RunKey::new("refresh", "u1");
        assert_eq!(&*other.job, "refresh");
        let c = RunKey::new("scan", "u3");
        assert_eq!(&*c.job, "scan");
        assert!(!Arc::ptr_eq(&a.job, &c.job), "the last name only is kept");
        let elsewhere = std::thread::spawn(|| RunKey::new("scan", "u1"))
            .join()
            .unwrap();
        assert!(!Arc::ptr_eq(&elsewhere.job, &c.job), "a thread has its own");
        assert_eq!(elsewhere, a, "equal keys whatever their allocations");
    }
}
