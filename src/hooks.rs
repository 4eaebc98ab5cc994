//! Hooks: listeners for what runs do (started, succeeded, failed, skipped, retried, stuck).
//!
//! Why: alerts belong next to the jobs, but a slow or failing alert (an HTTP call to a pager)
//! must never hold up a job or the scheduler. So a run only *offers* its event: each listener has
//! a bounded channel and a task of its own that calls it, one event at a time. When the channel
//! is full the event is dropped and counted ([`Listening::overflowed`]) — never an unbounded
//! queue, never a wait. A listener that panics is counted and goes on with the next event.
//! With no listener, a run pays one atomic load per event point.
//!
//! ```
//! use job_runtime::hooks::EventKind;
//! use job_runtime::{JobPolicy, JobRuntimeController, RuntimeConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let ctl = JobRuntimeController::new(RuntimeConfig::default());
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let listening = ctl.listen(64, move |e| {
//!     let tx = tx.clone();
//!     async move {
//!         let _ = tx.send((e.kind, e.job.to_string()));
//!     }
//! });
//! ctl.run("scan", "k", &JobPolicy::default(), |_ctx| async { Ok(1) }).await.unwrap();
//! assert_eq!(rx.recv().await, Some((EventKind::Started, "scan".to_string())));
//! assert_eq!(rx.recv().await, Some((EventKind::Succeeded, "scan".to_string())));
//! assert_eq!(listening.overflowed(), 0);
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::error::JobError;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A run took its lock and starts its first attempt.
    Started,
    /// A run succeeded.
    Succeeded,
    /// A run failed (the error is in the event).
    Failed,
    /// A call was refused without running: busy (overlap `Skip`) or cooling down.
    Skipped,
    /// An attempt failed and another follows after a backoff.
    Retried,
    /// An attempt went silent past its heartbeat timeout.
    Stuck,
}

/// One event, as a listener receives it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JobEvent {
    /// What happened.
    pub kind: EventKind,
    /// Job name.
    pub job: Arc<str>,
    /// Key.
    pub key: Arc<str>,
    /// When (wall time, on the controller's clock).
    pub at: SystemTime,
    /// The attempt it concerns (0 for `Skipped`).
    pub attempt: u32,
    /// The run's duration, for `Succeeded` and `Failed`.
    pub duration: Option<Duration>,
    /// The error, for `Failed`, `Skipped`, `Retried` and `Stuck`.
    pub error: Option<JobError>,
}

#[derive(Debug, Default)]
struct Counts {
    delivered: AtomicU64,
    overflowed: AtomicU64,
    panicked: AtomicU64,
}

/// Counters of one listener; it keeps listening while this handle is dropped.
#[derive(Debug, Clone)]
pub struct Listening {
    counts: Arc<Counts>,
}

impl Listening {
    /// Events handed to the listener (its call returned or panicked).
    pub fn delivered(&self) -> u64 {
        self.counts.delivered.load(Ordering::Relaxed)
    }
    /// Events dropped because the listener's channel was full.
    pub fn overflowed(&self) -> u64 {
        self.counts.overflowed.load(Ordering::Relaxed)
    }
    /// Calls of the listener that panicked.
    pub fn panicked(&self) -> u64 {
        self.counts.panicked.load(Ordering::Relaxed)
    }
}

struct Sink {
    tx: mpsc::Sender<JobEvent>,
    counts: Arc<Counts>,
}

/// The controller's listeners.
pub(crate) struct Hooks {
    sinks: ArcSwap<Vec<Arc<Sink>>>,
    /// `true` while `sinks` is not empty: one plain load on the hot path (an `ArcSwap` load
    /// touches its debt list).
    any: AtomicBool,
    tasks: TaskTracker,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("listeners", &self.sinks.load().len())
            .finish()
    }
}

impl Hooks {
    pub(crate) fn new() -> Self {
        Self {
            sinks: ArcSwap::from_pointee(Vec::new()),
            any: AtomicBool::new(false),
            tasks: TaskTracker::new(),
        }
    }

    /// Whether anyone listens (one atomic load: the hot path's only cost without listeners).
    #[inline]
    pub(crate) fn active(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// Offers `event` to every listener; never waits.
    pub(crate) fn emit(&self, event: JobEvent) {
        let sinks = self.sinks.load();
        for s in sinks.iter() {
            if s.tx.try_send(event.clone()).is_err() {
                s.counts.overflowed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn listen<F, Fut>(&self, capacity: usize, f: F) -> Listening
    where
        F: Fn(JobEvent) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<JobEvent>(capacity.max(1));
        let counts = Arc::new(Counts::default());
        let sink = Arc::new(Sink {
            tx,
            counts: Arc::clone(&counts),
        });
        self.sinks.rcu(|v| {
            let mut v = Vec::clone(v);
            v.push(Arc::clone(&sink));
            v
        });
        self.any.store(true, Ordering::Relaxed);
        let task_counts = Arc::clone(&counts);
        self.tasks.spawn(async move {
            // Ends when the controller closes the channel (shutdown) and the queue is drained.
            while let Some(e) = rx.recv().await {
                let call = std::panic::catch_unwind(AssertUnwindSafe(|| f(e)));
                let ok = match call {
                    Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await.is_ok(),
                    Err(_) => false,
                };
                if !ok {
                    task_counts.panicked.fetch_add(1, Ordering::Relaxed);
                }
                task_counts.delivered.fetch_add(1, Ordering::Relaxed);
            }
        });
        Listening { counts }
    }

    /// Closes every listener's channel and waits (at most `wait`) for the queued events to be
    /// delivered.
    pub(crate) async fn close(&self, wait: Duration) -> bool {
        self.any.store(false, Ordering::Relaxed);
        self.sinks.store(Arc::new(Vec::new()));
        self.tasks.close();
        tokio::time::timeout(wait, self.tasks.wait()).await.is_ok()
    }
}
