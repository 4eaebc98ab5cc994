//! Per-key locks with fencing tokens.
//!
//! A lock is an entry in a sharded concurrent map, present only while held: an idle key costs
//! nothing, and the map's `len()` is the number of keys held right now. Each acquisition gets a
//! fencing token from one counter, so tokens strictly increase per key (and across keys) even
//! though the entry itself vanishes on release; a downstream system can refuse writes carrying
//! a token older than one it has seen.
//!
//! Waiting is done without polling: a waiter registers a notification on the held entry while
//! holding the map shard's lock, so the release — which must take the same shard lock to remove
//! the entry — cannot slip between the waiter's check and its sleep (no lost wake-up).
//!
//! [`KeyedLocks`] is a map of its own. The controller keeps each key's lock inside the key's
//! entry of its own map instead (`EntryLock`, the same protocol), so that a run takes and gives
//! back its lock in the shard locks that admit and end it.

use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_utils::CachePadded;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

use crate::time::{Instant, add_saturating};

/// A fencing token: strictly increasing per key across acquisitions.
pub type FencingToken = u64;

struct Held {
    token: FencingToken,
    waiters: Option<Arc<Notify>>,
}

/// A set of named locks, one per key.
///
/// ```
/// use job_runtime::lock::KeyedLocks;
/// use std::sync::Arc;
///
/// let locks = Arc::new(KeyedLocks::<String>::new());
/// let g = locks.try_acquire("a".to_string()).expect("free");
/// assert!(locks.try_acquire("a".to_string()).is_none()); // held
/// let first = g.token();
/// drop(g);
/// assert_eq!(locks.len(), 0); // released keys cost nothing
/// let g2 = locks.try_acquire("a".to_string()).unwrap();
/// assert!(g2.token() > first);
/// ```
pub struct KeyedLocks<K: Eq + Hash, S = RandomState> {
    map: DashMap<K, Held, S>,
    /// Written by every acquire from every thread: on cache lines of its own, so that the
    /// map's shard pointer, read by every acquire, is not invalidated by each write.
    next: CachePadded<AtomicU64>,
}

impl<K: Eq + Hash, S: BuildHasher + Clone> fmt::Debug for KeyedLocks<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedLocks")
            .field("held", &self.map.len())
            .finish()
    }
}

impl<K: Eq + Hash + Clone, S: BuildHasher + Clone + Default> Default for KeyedLocks<K, S> {
    fn default() -> Self {
        Self::with_hasher(S::default())
    }
}

/// Locks `m`, taking the data even if a thread panicked while holding it (poisoning).
///
/// Every mutex of the crate guards state that each critical section leaves consistent
/// (counters, status fields, a queue of waiters), and a panicking job must never make the
/// controller unusable for the next caller.
pub(crate) fn unpoisoned<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why [`KeyedLocks::acquire`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("lock not acquired within {waited:?}")]
pub struct LockTimeout {
    /// How long the caller waited.
    pub waited: Duration,
}

impl<K: Eq + Hash + Clone> KeyedLocks<K> {
    /// An empty set of locks.
    pub fn new() -> Self {
        Self::with_hasher(RandomState::new())
    }
}

impl<K: Eq + Hash + Clone, S: BuildHasher + Clone> KeyedLocks<K, S> {
    /// An empty set of locks whose map hashes keys with `hasher`.
    pub fn with_hasher(hasher: S) -> Self {
        Self {
            map: DashMap::with_hasher(hasher),
            next: CachePadded::new(AtomicU64::new(1)),
        }
    }

    #[inline]
    fn next_token(&self) -> FencingToken {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes the lock for `key` if it is free; never waits.
    #[inline]
    pub fn try_acquire(self: &Arc<Self>, key: K) -> Option<KeyGuard<K, S>> {
        match self.map.entry(key) {
            Entry::Occupied(_) => None,
            Entry::Vacant(v) => {
                let token = self.next_token();
                let key = v.key().clone();
                v.insert(Held {
                    token,
                    waiters: None,
                });
                Some(KeyGuard {
                    locks: Arc::clone(self),
                    key: Some(key),
                    token,
                })
            }
        }
    }

    /// Like [`try_acquire`](Self::try_acquire), for a caller that keeps the set and the key
    /// alive anyway: the guard borrows both, so taking it costs no reference count and one key
    /// clone (the map's) instead of two.
    #[inline]
    pub fn try_lock<'a>(&'a self, key: &'a K) -> Option<KeyRef<'a, K, S>> {
        match self.map.entry(key.clone()) {
            Entry::Occupied(_) => None,
            Entry::Vacant(v) => {
                let token = self.next_token();
                v.insert(Held {
                    token,
                    waiters: None,
                });
                Some(KeyRef {
                    locks: self,
                    key,
                    token,
                })
            }
        }
    }

    /// Takes the lock for `key`, waiting at most `wait` (zero: try once).
    pub async fn acquire(
        self: &Arc<Self>,
        key: K,
        wait: Duration,
    ) -> Result<KeyGuard<K, S>, LockTimeout> {
        let start = Instant::now();
        let deadline = add_saturating(start, wait);
        loop {
            let notified = match self.map.entry(key.clone()) {
                Entry::Vacant(v) => {
                    let token = self.next_token();
                    v.insert(Held {
                        token,
                        waiters: None,
                    });
                    return Ok(KeyGuard {
                        locks: Arc::clone(self),
                        key: Some(key),
                        token,
                    });
                }
                Entry::Occupied(mut o) => {
                    if wait.is_zero() || Instant::now() >= deadline {
                        return Err(LockTimeout {
                            waited: start.elapsed(),
                        });
                    }
                    let notify = o.get_mut().waiters.get_or_insert_with(Default::default);
                    // Registered before the shard lock is released: the holder's release takes
                    // that lock to remove the entry, then wakes every registered waiter.
                    let mut n = Box::pin(Arc::clone(notify).notified_owned());
                    n.as_mut().enable();
                    n
                }
            };
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(LockTimeout {
                    waited: start.elapsed(),
                });
            }
        }
    }

    /// Keys held right now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// `true` when no key is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether `key` is held right now.
    pub fn is_held(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// The map's capacity (slots allocated), for leak tests.
    pub fn capacity(&self) -> usize {
        self.map.capacity()
    }

    /// Gives back memory after many keys were released.
    pub fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }

    fn release(&self, key: &K, token: FencingToken) {
        if let Some((_, held)) = self.map.remove_if(key, |_, h| h.token == token)
            && let Some(n) = held.waiters
        {
            n.notify_waiters();
        }
    }
}

/// A per-key lock kept inside another map's entry, for a map whose entry is locked anyway:
/// the controller keeps each key's lock in the key's entry, beside its record and its run in
/// flight, so that a run takes its lock in the shard lock that admits it and gives it back in
/// the one that ends it, with no map of its own (two shard locks fewer per run than a
/// [`KeyedLocks`]).
///
/// Every method is called with the entry's shard lock held, which gives the same protocol as
/// [`KeyedLocks`]: a waiter registers ([`wait`](Self::wait)) under that lock, and
/// [`release_if`](Self::release_if) takes the waiters out under it, to be woken with
/// [`Waiters::wake`] once it is dropped, so a release cannot slip between a waiter's look and
/// its sleep (no lost wake-up). A holder is told apart by its token and an owner number the
/// caller chooses (the controller's run id).
#[derive(Debug, Default)]
pub(crate) struct EntryLock(Option<EntryHeld>);

#[derive(Debug)]
struct EntryHeld {
    token: FencingToken,
    owner: u64,
    /// Made by the first waiter.
    waiters: Option<Arc<Notify>>,
}

/// The callers waiting for an [`EntryLock`] that was given back (maybe none); wake them once
/// the entry's shard lock is dropped.
#[must_use = "the waiters sleep until woken"]
pub(crate) struct Waiters(Option<Arc<Notify>>);

impl Waiters {
    /// Wakes every waiter; each looks at the lock again.
    pub(crate) fn wake(self) {
        if let Some(n) = self.0 {
            n.notify_waiters();
        }
    }
}

impl EntryLock {
    /// Whether someone holds it.
    pub(crate) fn is_held(&self) -> bool {
        self.0.is_some()
    }

    /// Takes it for `owner` if it is free, with the fencing token `next` gives.
    pub(crate) fn try_take(
        &mut self,
        owner: u64,
        next: impl FnOnce() -> FencingToken,
    ) -> Option<FencingToken> {
        if self.0.is_some() {
            return None;
        }
        let token = next();
        self.0 = Some(EntryHeld {
            token,
            owner,
            waiters: None,
        });
        Some(token)
    }

    /// Registers for the release of a held lock (`None` if it is free): the returned future
    /// is enabled, so a release after this call wakes it even before it is first polled.
    pub(crate) fn wait(&mut self) -> Option<Pin<Box<OwnedNotified>>> {
        let held = self.0.as_mut()?;
        let notify = held.waiters.get_or_insert_with(Default::default);
        let mut n = Box::pin(Arc::clone(notify).notified_owned());
        n.as_mut().enable();
        Some(n)
    }

    /// Gives it back if it is held and `holds(token, owner)` says by the caller; then returns
    /// its waiters, to be woken.
    pub(crate) fn release_if(
        &mut self,
        holds: impl FnOnce(FencingToken, u64) -> bool,
    ) -> Option<Waiters> {
        let held = self.0.take_if(|h| holds(h.token, h.owner))?;
        Some(Waiters(held.waiters))
    }
}

/// A held lock; released on drop.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct KeyGuard<K: Eq + Hash + Clone, S: BuildHasher + Clone = RandomState> {
    locks: Arc<KeyedLocks<K, S>>,
    key: Option<K>,
    token: FencingToken,
}

impl<K: Eq + Hash + Clone, S: BuildHasher + Clone> KeyGuard<K, S> {
    /// This acquisition's fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The key held.
    pub fn key(&self) -> &K {
        self.key.as_ref().expect("key present until drop")
    }
}

impl<K: Eq + Hash + Clone, S: BuildHasher + Clone> fmt::Debug for KeyGuard<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyGuard")
            .field("token", &self.token)
            .finish()
    }
}

impl<K: Eq + Hash + Clone, S: BuildHasher + Clone> Drop for KeyGuard<K, S> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.locks.release(&key, self.token);
        }
    }
}

/// A held lock from [`KeyedLocks::try_lock`], borrowing the set and the key; released on drop.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct KeyRef<'a, K: Eq + Hash + Clone, S: BuildHasher + Clone = RandomState> {
    locks: &'a KeyedLocks<K, S>,
    key: &'a K,
    token: FencingToken,
}

impl<K: Eq + Hash + Clone, S: BuildHasher + Clone> KeyRef<'_, K, S> {
    /// This acquisition's fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }
}

impl<K: Eq + Hash + Clone, S: BuildHasher + Clone> fmt::Debug for KeyRef<'_, K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRef")
            .field("token", &self.token)
            .finish()
    }
}

impl<K: Eq + Hash + Clone, S: BuildHasher + Clone> Drop for KeyRef<'_, K, S> {
    fn drop(&mut self) {
        self.locks.release(self.key, self.token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn acquire_waits_for_release_and_times_out() {
        let locks = Arc::new(KeyedLocks::<u32>::new());
        let g = locks.try_acquire(1).unwrap();
        let err = locks
            .acquire(1, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err.waited, Duration::from_millis(50));
        assert!(locks.acquire(1, Duration::ZERO).await.is_err());
        let l2 = Arc::clone(&locks);
        let waiter = tokio::spawn(async move {
            l2.acquire(1, Duration::from_secs(10))
                .await
                .map(|g| g.token())
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t1 = g.token();
        drop(g);
        let t2 = waiter.await.unwrap().unwrap();
        assert!(t2 > t1);
        assert!(locks.is_empty());
    }

    /// An entry lock is taken once, given back only by its holder (owner and token), and its
    /// waiters, registered while it is held, are woken after the release even if they had
    /// not been polled yet.
    #[test]
    fn an_entry_lock_is_given_back_only_by_its_holder_and_wakes_its_waiters() {
        use std::future::Future;
        use std::task::{Context, Poll};

        let mut next = 10;
        let mut token = || {
            next += 1;
            next
        };
        let mut lock = EntryLock::default();
        assert!(lock.wait().is_none(), "nothing to wait for while free");
        let t = lock.try_take(7, &mut token).expect("free");
        assert!(lock.is_held());
        assert!(lock.try_take(8, &mut token).is_none(), "held");
        let mut waiter = lock.wait().expect("held");
        // Registered, never polled before the release.
        let mut unpolled = lock.wait().expect("held");
        let (count, waker) = crate::testing::waker();
        let mut cx = Context::from_waker(&waker);
        assert!(waiter.as_mut().poll(&mut cx).is_pending());
        assert!(
            lock.release_if(|_, owner| owner == 8).is_none(),
            "not the holder"
        );
        assert!(
            lock.release_if(|tk, _| tk == t + 1).is_none(),
            "not its token"
        );
        assert!(lock.is_held());
        let waiters = lock
            .release_if(|tk, owner| tk == t && owner == 7)
            .expect("released");
        assert!(!lock.is_held());
        assert!(lock.release_if(|_, _| true).is_none(), "released once");
        waiters.wake();
        assert_eq!(count.woken(), 1, "the waiter was woken");
        assert_eq!(waiter.as_mut().poll(&mut cx), Poll::Ready(()));
        assert_eq!(unpolled.as_mut().poll(&mut cx), Poll::Ready(()));
        assert!(lock.try_take(8, &mut token).unwrap() > t, "tokens increase");
    }

    #[test]
    fn a_borrowing_guard_excludes_both_kinds_and_releases_on_drop() {
        let locks = Arc::new(KeyedLocks::<u32>::new());
        let key = 7;
        let g = locks.try_lock(&key).unwrap();
        assert!(locks.try_lock(&key).is_none());
        assert!(locks.try_acquire(7).is_none());
        let t1 = g.token();
        drop(g);
        assert!(locks.is_empty());
        let owned = locks.try_acquire(7).unwrap();
        assert!(locks.try_lock(&key).is_none());
        assert!(owned.token() > t1);
        drop(owned);
        assert!(locks.try_lock(&key).unwrap().token() > t1);
        assert!(locks.is_empty());
    }
}
