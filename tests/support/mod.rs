//! Shared helpers for the integration tests: a gate jobs wait on, a counter of job bodies that
//! tracks how many run at once, and bounded polling. Small and generic on purpose; each test
//! file uses what it needs.

#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use job_runtime::{JobContext, RunError};
use tokio::sync::watch;

/// A one-way gate: closed until [`open`](Gate::open), then open for good. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Gate {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Gate {
    /// A closed gate.
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    /// Opens the gate, waking every waiter.
    pub fn open(&self) {
        self.tx.send_replace(true);
    }

    /// Whether the gate is open.
    pub fn is_open(&self) -> bool {
        *self.tx.borrow()
    }

    /// Waits until the gate is open (returns at once if it already is).
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        rx.wait_for(|open| *open).await.expect("sender kept alive");
    }
}

/// Counts job bodies: how many started, finished, run right now, and the most at once.
#[derive(Debug, Default)]
pub struct Bodies {
    started: AtomicUsize,
    finished: AtomicUsize,
    current: AtomicUsize,
    max: AtomicUsize,
}

/// One body in progress; leaving (drop, including on panic or when the future is dropped)
/// counts it out.
#[derive(Debug)]
pub struct Running {
    bodies: Arc<Bodies>,
    /// The body's number, from 1, in order of start.
    pub nth: usize,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.bodies.current.fetch_sub(1, Ordering::SeqCst);
        self.bodies.finished.fetch_add(1, Ordering::SeqCst);
    }
}

impl Bodies {
    /// A new counter.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts a body in; keep the guard for as long as the body runs.
    pub fn enter(self: &Arc<Self>) -> Running {
        let nth = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let now = self.current.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        Running {
            bodies: Arc::clone(self),
            nth,
        }
    }

    /// Bodies started.
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    /// Bodies that ended (returned, panicked or were dropped).
    pub fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }

    /// Bodies running right now.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::SeqCst)
    }

    /// The most bodies that ever ran at once.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

/// The future of a boxed job body.
pub type JobFuture<T> = Pin<Box<dyn Future<Output = Result<T, RunError>> + Send + 'static>>;

/// A job whose body counts itself in `bodies`, waits for `gate`, and returns its number
/// (1 for the first body that started, 2 for the next, …), which tells runs apart.
pub fn gated_job(
    bodies: &Arc<Bodies>,
    gate: &Gate,
) -> impl Fn(JobContext) -> JobFuture<usize> + Clone + Send + Sync + 'static {
    let (bodies, gate) = (Arc::clone(bodies), gate.clone());
    move |_ctx| {
        let (bodies, gate) = (Arc::clone(&bodies), gate.clone());
        Box::pin(async move {
            let running = bodies.enter();
            gate.wait().await;
            Ok(running.nth)
        })
    }
}

/// Polls `cond` with `tokio::task::yield_now` until it holds, at most `rounds` times; panics
/// with `what` otherwise. Never sleeps, so paused time does not move while it polls.
pub async fn yield_until(what: &str, rounds: usize, mut cond: impl FnMut() -> bool) {
    for _ in 0..rounds {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    assert!(cond(), "still not true after {rounds} yields: {what}");
}

/// Polls `cond` in real time (yielding, then sleeping 1 ms) until it holds, for at most
/// `limit`; panics with `what` otherwise. For multi-threaded tests.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    loop {
        if cond() {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "still not true after {limit:?}: {what}"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Lets every ready task run: yields `n` times (paused time does not move).
pub async fn settle(n: usize) {
    for _ in 0..n {
        tokio::task::yield_now().await;
    }
}

/// Runs `fut` with `limit` of (possibly paused) tokio time and panics if it does not finish.
pub async fn within<F: Future>(what: &str, limit: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("did not finish within {limit:?}: {what}"),
    }
}
