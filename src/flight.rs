//! Single-flight: one run per key, its result shared with everyone who asked.
//!
//! A [`Flight`] is the shared end of one run. The caller that started the run (the leader)
//! polls it, but holds no power over it: if the leader gives up — drops its future — the run
//! moves to a task of its own and goes on for the followers, and because the flight stays
//! registered until the run has ended, giving up never lets a duplicate start.
//!
//! The result is stored once and then broadcast. A waiter registers for the broadcast *before*
//! looking at the result slot, so a result published between the look and the sleep still
//! wakes it. Success is shared as one `Arc<T>` (every caller gets a pointer-equal value) and
//! failure as one cloneable [`JobError`].

use std::fmt;
use std::sync::Arc;
use std::sync::OnceLock;

use tokio::sync::Notify;

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
    done: Notify,
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
            done: Notify::new(),
        }
    }

    /// Publishes the result and wakes every waiter. Only the first call has an effect.
    pub fn complete(&self, result: Shared<T>) {
        if self.result.set(result).is_ok() {
            self.done.notify_waiters();
        }
    }

    /// The result, if the run has ended.
    pub fn peek(&self) -> Option<&Shared<T>> {
        self.result.get()
    }

    /// Waits for the result. Cancel-safe: dropping this future affects nobody else.
    pub async fn wait(&self) -> Shared<T> {
        if let Some(r) = self.result.get() {
            return r.clone();
        }
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.result.get() {
                return r.clone();
            }
            notified.await;
        }
    }
}
