//! Single-flight: one run per key, its result shared with everyone who asked.
//!
//! A [`Flight`] is the shared end of one run. The caller that started the run (the leader)
//! polls it, but holds no power over it: if the leader gives up — drops its future — the run
//! moves to a task of its own and goes on for the followers, and because the flight stays
//! registered until the run has ended, giving up never lets a duplicate start.
//!
//! The result is stored once and then broadcast. A waiter marks the flight as waited for, then
//! (under the flight's waiter lock, after a `SeqCst` fence) looks at the result slot again
//! before it registers its waker; the run stores the result, fences, and takes the lock to
//! wake the registered waiters only if the flight was marked. A result published between a
//! waiter's first look and its registration is therefore seen by the second look, and a run
//! nobody waited for never takes the lock (no lost wake-up; `tests/loom_model.rs` checks it).
//! Success is shared as one `Arc<T>` (every caller gets a pointer-equal value) and failure as
//! one cloneable [`JobError`].
//!
//! Why not `tokio::sync::Notify`: a flight is broadcast to once, and its waiters never need
//! `Notify`'s intrusive list, its per-waiter state machine or its batched wake-ups; a plain
//! list of wakers costs a third of the instructions per joining caller (PERFORMANCE.md §3).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use crate::error::JobError;

/// The result every caller of one run receives.
pub type Shared<T> = Result<Arc<T>, JobError>;

/// The shared end of one run.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use job_runtime::flight::Flight;
/// use std::sync::Arc;
///
/// let flight = Arc::new(Flight::<u32>::new());
/// let follower = { let f = flight.clone(); tokio::spawn(async move { f.wait().await }) };
/// flight.complete(Ok(Arc::new(7)));
/// let a = follower.await.unwrap().unwrap();
/// let b = flight.wait().await.unwrap();
/// assert!(Arc::ptr_eq(&a, &b));
/// # }
/// ```
pub struct Flight<T> {
    result: OnceLock<Shared<T>>,
    /// The wakers of the callers waiting for the result, by the slot each registered in;
    /// taken (left empty for good) by [`complete`](Self::complete). A waiter that gives up
    /// empties its slot.
    waiters: Mutex<Vec<Option<Waker>>>,
    /// Set (under the lock) by the first waiter that goes to register: a run nobody waited
    /// for (a caller-polled run that ended in its first poll, most runs) publishes without
    /// taking the lock.
    registered: AtomicBool,
}

impl<T> fmt::Debug for Flight<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flight")
            .field("done", &self.result.get().is_some())
            .finish()
    }
}

impl<T> Default for Flight<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Flight<T> {
    /// A flight with no result yet.
    pub fn new() -> Self {
        Self {
            result: OnceLock::new(),
            waiters: Mutex::new(Vec::new()),
            registered: AtomicBool::new(false),
        }
    }

    /// Publishes the result and wakes every waiter. Only the first call has an effect.
    pub fn complete(&self, result: Shared<T>) {
        if self.result.set(result).is_ok() {
            // Store, fence, load here; store, fence, load in `Wait::poll`: of two such
            // sequences at least one sees the other's store. So either a waiter sees the result
            // and does not register, or this sees `registered` and takes the lock, after which
            // no waiter registers (each looks at the result under the lock first).
            fence(Ordering::SeqCst);
            if !self.registered.load(Ordering::Relaxed) {
                return;
            }
            let waiters = std::mem::take(&mut *crate::lock::unpoisoned(&self.waiters));
            if !waiters.is_empty() {
                for w in waiters.into_iter().flatten() {
                    w.wake();
                }
            }
        }
    }

    /// The result, if the run has ended.
    pub fn peek(&self) -> Option<&Shared<T>> {
        self.result.get()
    }

    /// Waits for the result. Cancel-safe: dropping this future affects nobody else.
    pub fn wait(&self) -> Wait<'_, T> {
        Wait {
            flight: self,
            slot: None,
        }
    }
}

/// The future of [`Flight::wait`].
#[must_use = "futures do nothing unless polled"]
pub struct Wait<'a, T> {
    flight: &'a Flight<T>,
    /// Where this waiter's waker is registered, once it is.
    slot: Option<usize>,
}

impl<T> fmt::Debug for Wait<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wait")
            .field("registered", &self.slot.is_some())
            .finish()
    }
}

impl<T> Future for Wait<'_, T> {
    type Output = Shared<T>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Shared<T>> {
        let flight = self.flight;
        if let Some(r) = flight.result.get() {
            return Poll::Ready(r.clone());
        }
        let mut waiters = crate::lock::unpoisoned(&flight.waiters);
        // Looked at again, under the lock and after the fence (see `complete`): either this
        // sees the result or `complete` sees `registered` and the waker registered below.
        flight.registered.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if let Some(r) = flight.result.get() {
            return Poll::Ready(r.clone());
        }
        match self.slot {
            Some(i) => match &mut waiters[i] {
                Some(w) => w.clone_from(cx.waker()),
                empty => *empty = Some(cx.waker().clone()),
            },
            None => {
                waiters.push(Some(cx.waker().clone()));
                let i = waiters.len() - 1;
                drop(waiters);
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl<T> Drop for Wait<'_, T> {
    #[inline]
    fn drop(&mut self) {
        if let Some(i) = self.slot
            && self.flight.result.get().is_none()
        {
            // Still registered (the list is emptied for good once the result is stored).
            if let Some(w) = crate::lock::unpoisoned(&self.flight.waiters).get_mut(i) {
                *w = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::waker;

    fn poll<T>(w: &mut Wait<'_, T>, waker: &Waker) -> Poll<Shared<T>> {
        Pin::new(w).poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn a_waiter_is_woken_once_with_its_latest_waker_and_a_dropped_one_never() {
        let flight = Flight::<u32>::new();
        let ((first, w1), (second, w2), (gone, w3)) = (waker(), waker(), waker());
        let mut a = flight.wait();
        let mut b = flight.wait();
        assert!(poll(&mut a, &w1).is_pending());
        assert!(
            poll(&mut a, &w2).is_pending(),
            "re-polled: same slot, new waker"
        );
        assert!(poll(&mut b, &w3).is_pending());
        drop(b);
        flight.complete(Ok(Arc::new(7)));
        assert_eq!(first.woken(), 0);
        assert_eq!(second.woken(), 1);
        assert_eq!(gone.woken(), 0, "a waiter that gave up is not woken");
        let Poll::Ready(Ok(v)) = poll(&mut a, &w2) else {
            panic!("the result is there")
        };
        assert_eq!(*v, 7);
        // Later calls: no registration, the same `Arc`; a second `complete` changes nothing.
        flight.complete(Ok(Arc::new(8)));
        let Poll::Ready(Ok(w)) = poll(&mut flight.wait(), &w1) else {
            panic!("the result is there")
        };
        assert!(Arc::ptr_eq(&v, &w));
        assert!(crate::lock::unpoisoned(&flight.waiters).is_empty());
    }

    #[test]
    fn many_waiters_on_many_threads_all_get_the_one_result() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .build()
            .unwrap();
        for _ in 0..50 {
            let flight = Arc::new(Flight::<u64>::new());
            let waiters: Vec<_> = (0..64)
                .map(|i| {
                    let f = Arc::clone(&flight);
                    rt.spawn(async move {
                        if i % 2 == 0 {
                            tokio::task::yield_now().await;
                        }
                        // Some give up at once: never woken, affecting nobody.
                        if i % 8 == 0 {
                            let mut w = std::pin::pin!(f.wait());
                            let _ = futures::poll!(w.as_mut());
                            return None;
                        }
                        Some(f.wait().await)
                    })
                })
                .collect();
            let f = Arc::clone(&flight);
            rt.spawn(async move { f.complete(Ok(Arc::new(42))) });
            let got: Vec<_> = rt.block_on(async {
                let mut got = Vec::new();
                for w in waiters {
                    if let Some(r) = w.await.unwrap() {
                        got.push(r.unwrap());
                    }
                }
                got
            });
            assert_eq!(got.len(), 56);
            assert!(got.iter().all(|v| Arc::ptr_eq(v, &got[0]) && **v == 42));
        }
    }
}
