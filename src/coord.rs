//! Coordination: who may run a key, and the shared cooldown clock.
//!
//! In one process the controller coordinates through its own concurrent maps (the fast path).
//! Across replicas, a [`Coordinator`] backend — PostgreSQL or Redis, behind features — answers
//! the same questions, and the pipeline does not change: it asks the backend for a lease with a
//! fencing token, renews it while the job runs (a lost lease cancels the job), releases it by
//! token, and records and reads the cooldown on the backend's own clock so replicas with skewed
//! clocks agree. Single-flight stays in process: across replicas, the others are `Busy` (or
//! wait, with a lock wait) and read the shared snapshot.
//!
//! [`InProcessCoordinator`] implements the trait over the same primitives the fast path uses;
//! it is the reference a backend is tested against.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dashmap::DashMap;

use crate::error::SharedError;
use crate::lock::{FencingToken, KeyGuard, KeyedLocks};
use crate::time::{Clock, Instant, add_saturating};

/// A boxed, sendable future (the trait is object-safe so a backend is chosen at run time).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A held lease on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Job name.
    pub job: Arc<str>,
    /// Key.
    pub key: Arc<str>,
    /// Strictly increasing per key, across every replica.
    pub token: FencingToken,
}

/// The answer to an acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// The lease is ours.
    Acquired(Lease),
    /// Someone else holds it; it may free up after `free_in` (when the backend knows).
    Held {
        /// Time until the current lease expires, if known.
        free_in: Option<Duration>,
    },
}

/// A backend failure (connection, query).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub SharedError);

/// What a coordination backend must be able to say.
pub trait Coordinator: Send + Sync + fmt::Debug + 'static {
    /// Takes the lease for (job, key) for `ttl`, or says who holds it.
    fn acquire<'a>(
        &'a self,
        job: &'a str,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Acquire, BackendError>>;

    /// Extends a lease; `Ok(false)` means it was lost (expired and taken, or removed).
    fn renew<'a>(
        &'a self,
        lease: &'a Lease,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, BackendError>>;

    /// Releases a lease; removes only this lease (compared by token).
    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), BackendError>>;

    /// Records that a run of (job, key) ended now, on the backend's clock, and that the key may
    /// not start again for `cooldown`.
    fn record_finish<'a>(
        &'a self,
        job: &'a str,
        key: &'a str,
        cooldown: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>>;

    /// Time left in the key's cooldown on the backend's clock, or `None`.
    fn cooldown_remaining<'a>(
        &'a self,
        job: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Duration>, BackendError>>;

    /// The backend's wall clock (a database's `now()`), where it has one.
    fn now(&self) -> BoxFuture<'_, Result<SystemTime, BackendError>>;
}

type PairKey = (Arc<str>, Arc<str>);

/// The in-process coordinator: locks in a concurrent map, cooldowns on the crate clock.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use job_runtime::coord::{Acquire, Coordinator, InProcessCoordinator};
/// use std::time::Duration;
///
/// let c = InProcessCoordinator::new();
/// let Acquire::Acquired(lease) = c.acquire("scan", "a", Duration::from_secs(30)).await.unwrap()
///     else { unreachable!() };
/// assert!(matches!(c.acquire("scan", "a", Duration::from_secs(30)).await.unwrap(), Acquire::Held { .. }));
/// c.release(&lease).await.unwrap();
/// assert!(matches!(c.acquire("scan", "a", Duration::from_secs(30)).await.unwrap(), Acquire::Acquired(_)));
/// # }
/// ```
#[derive(Debug, Default)]
pub struct InProcessCoordinator {
    locks: Arc<KeyedLocks<PairKey>>,
    held: DashMap<FencingToken, KeyGuard<PairKey>>,
    cooldowns: DashMap<PairKey, Instant>,
    clock: Clock,
}

impl InProcessCoordinator {
    /// A new coordinator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keys whose cooldown record is kept (expired ones are dropped as they are read).
    pub fn cooldown_len(&self) -> usize {
        self.cooldowns.len()
    }
}

fn ready<T: Send + 'static>(v: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(v))
}

impl Coordinator for InProcessCoordinator {
    fn acquire<'a>(
        &'a self,
        job: &'a str,
        key: &'a str,
        _ttl: Duration,
    ) -> BoxFuture<'a, Result<Acquire, BackendError>> {
        let r = match self.locks.try_acquire((job.into(), key.into())) {
            Some(g) => {
                let lease = Lease {
                    job: job.into(),
                    key: key.into(),
                    token: g.token(),
                };
                self.held.insert(g.token(), g);
                Acquire::Acquired(lease)
            }
            None => Acquire::Held { free_in: None },
        };
        ready(Ok(r))
    }

    fn renew<'a>(
        &'a self,
        lease: &'a Lease,
        _ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        ready(Ok(self.held.contains_key(&lease.token)))
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), BackendError>> {
        self.held.remove(&lease.token);
        ready(Ok(()))
    }

    fn record_finish<'a>(
        &'a self,
        job: &'a str,
        key: &'a str,
        cooldown: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        if !cooldown.is_zero() {
            self.cooldowns.insert(
                (job.into(), key.into()),
                add_saturating(self.clock.now(), cooldown),
            );
        }
        ready(Ok(()))
    }

    fn cooldown_remaining<'a>(
        &'a self,
        job: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Duration>, BackendError>> {
        let k: PairKey = (job.into(), key.into());
        let now = self.clock.now();
        let left = self
            .cooldowns
            .get(&k)
            .and_then(|t| crate::cooldown::remaining(Some(*t), now));
        if left.is_none() {
            self.cooldowns.remove_if(&k, |_, t| *t <= now);
        }
        ready(Ok(left))
    }

    fn now(&self) -> BoxFuture<'_, Result<SystemTime, BackendError>> {
        ready(Ok(self.clock.wall_now()))
    }
}
