//! Shared helpers: runtimes, distinct keys, timing a loop inside a task.

use std::fmt::Write as _;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;

/// A single-threaded runtime (every task on the bench thread).
pub(crate) fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A work-stealing runtime with `workers` threads.
pub(crate) fn multi_thread(workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Writes key number `n` into `buf` without allocating (once `buf` has grown), so distinct
/// keys cost the hot path a few nanoseconds of formatting and nothing else.
pub(crate) fn key_into(buf: &mut String, n: u64) -> &str {
    buf.clear();
    write!(buf, "k{n}").expect("writing to a String");
    buf
}

/// Runs `body(iters)` as a task of `rt` (so spawned work lands on the same worker, as it does
/// for a caller inside a service) and returns the time it reports.
pub(crate) fn time_in_task<F, Fut>(rt: &Runtime, iters: u64, body: F) -> Duration
where
    F: FnOnce(u64) -> Fut,
    Fut: Future<Output = Duration> + Send + 'static,
{
    let fut = body(iters);
    rt.block_on(async move { tokio::spawn(fut).await.expect("bench task panicked") })
}

/// Elapsed time of `f`.
pub(crate) async fn timed<Fut: Future>(f: Fut) -> (Duration, Fut::Output) {
    let start = Instant::now();
    let out = f.await;
    (start.elapsed(), out)
}
