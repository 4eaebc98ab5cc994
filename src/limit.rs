//! Bounded concurrency and rate limits.
//!
//! Limits protect what jobs call (a database, an API), so they are taken per attempt, right
//! before the job body runs, and given back before any backoff sleep: nothing is held while a
//! run waits to retry, and every call to the guarded system spends a rate token.
//!
//! Order inside an attempt: the group's concurrency permit, then the global one (so no global
//! slot is held while waiting for a busy group), then the group's rate token, then the global
//! one (tokens last, so a token is spent right before the call it pays for). Waiting counts
//! against the run's budget.
//!
//! Attempts waiting for the same concurrency limit start in priority order
//! ([`JobPolicy::priority`](crate::JobPolicy::priority), higher first), then first come first
//! served. A released permit is handed straight to the best waiter, so an arrival can never
//! slip in ahead of it, and a wait that is given up (deadline, cancellation) leaves the queue
//! and passes on a permit it had been handed: none is lost or counted twice. Priority orders
//! the queue only; it does not pre-empt a running attempt or reserve permits, and a retry
//! queues anew (behind earlier arrivals of its priority). Rate-token waits are not ordered by
//! priority: each waiter sleeps for the time governor names.
//!
//! Rate limits use governor's GCRA driven by `tokio::time` (its own clock and `until_ready`
//! would ignore paused time in tests): we `check`, and on a refusal sleep for the time governor
//! says, through the tokio timer. With a quota of `n` per period `p` and burst `b`, at most
//! `b + w·n/p` attempts start in any window of length `w`.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use governor::clock::Clock as GovClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::time::Instant;

/// A rate: `count` per `per`, with bursts up to `burst`.
///
/// Parsed from `"<count>/<unit>"` with unit `s`, `min`, `h` or any duration (`"5/250ms"`), and an
/// optional `" burst <n>"` (default: `count`).
///
/// ```
/// use job_runtime::limit::RateLimit;
/// use std::time::Duration;
///
/// let r = RateLimit::parse("100/min burst 10").unwrap();
/// assert_eq!((r.count.get(), r.per, r.burst.get()), (100, Duration::from_secs(60), 10));
/// assert!(RateLimit::parse("fast").is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Starts allowed per period.
    pub count: NonZeroU32,
    /// The period.
    pub per: Duration,
    /// The most starts allowed back to back.
    pub burst: NonZeroU32,
}

/// What a rate accepts, for error messages.
pub const RATE_FORM: &str = "`<count>/<unit>` with a positive count and unit s, min, h or a duration like 250ms, optionally followed by ` burst <n>` (e.g. `100/s`, `10/min burst 5`)";

impl RateLimit {
    /// `n` per second, burst `n`.
    pub fn per_second(n: NonZeroU32) -> Self {
        Self {
            count: n,
            per: Duration::from_secs(1),
            burst: n,
        }
    }

    /// Sets the burst.
    #[must_use]
    pub fn with_burst(mut self, burst: NonZeroU32) -> Self {
        self.burst = burst;
        self
    }

    /// Parses a rate; the error says what is accepted.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (rate, burst) = match s.split_once("burst") {
            Some((r, b)) => (r.trim(), Some(b.trim())),
            None => (s, None),
        };
        let (count, unit) = rate
            .split_once('/')
            .ok_or_else(|| "missing `/` between count and unit".to_string())?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| format!("count `{}` is not a whole number", count.trim()))?;
        let count = NonZeroU32::new(count).ok_or_else(|| "count must be at least 1".to_string())?;
        let unit = unit.trim();
        let per = match unit {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => humantime::parse_duration(other)
                .map_err(|e| format!("unit `{other}` is not s, min, h or a duration ({e})"))?,
        };
        if per.is_zero() {
            return Err("the period must be longer than zero".into());
        }
        let burst = match burst {
            Some(b) => {
                let n: u32 = b
                    .parse()
                    .map_err(|_| format!("burst `{b}` is not a whole number"))?;
                NonZeroU32::new(n).ok_or_else(|| "burst must be at least 1".to_string())?
            }
            None => count,
        };
        if (per / count.get()).is_zero() {
            return Err("more than one start per nanosecond".into());
        }
        Ok(Self { count, per, burst })
    }

    /// The governor quota.
    pub fn quota(&self) -> Quota {
        Quota::with_period(self.per / self.count.get())
            .expect("period checked non-zero")
            .allow_burst(self.burst)
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:?} burst {}", self.count, self.per, self.burst)
    }
}

/// Governor clock reading `tokio::time`, so paused-time tests drive rate limits.
#[derive(Debug, Clone, Copy, Default)]
struct TokioClock;

impl GovClock for TokioClock {
    type Instant = std::time::Instant;
    #[inline]
    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<std::time::Instant>>;

/// A counting semaphore whose waiters are served by priority, then in arrival order.
///
/// Why our own: tokio's `Semaphore` serves waiters strictly first come first served, and no
/// small, maintained crate offers priorities with the two properties the controller relies on:
/// cancel safety (a run's acquisition is dropped on deadline or cancellation) and hand-off (a
/// released permit goes to the best waiter directly, so a newcomer can never take it between
/// the release and the waiter's wake-up). The state is small enough to keep under one mutex.
///
/// Invariant: while anyone waits, no permit is free (a release with waiters hands its permit
/// over instead of freeing it). So "a permit is free" already implies "nobody is queued ahead".
#[derive(Debug)]
struct PrioritySemaphore {
    state: Mutex<SemState>,
}

#[derive(Debug)]
struct SemState {
    /// Permits free to take.
    free: usize,
    /// Queued waiters, best first: priority descending, then arrival ascending. A waiter is
    /// removed either by a release (the permit is then its own) or by itself when dropped.
    waiters: BTreeMap<WaiterKey, Waker>,
    /// Arrival counter (never wraps in practice: 2⁶⁴ waits).
    next_seq: u64,
}

/// A waiter's place in the queue; unique (the arrival number is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct WaiterKey {
    priority: Reverse<i32>,
    seq: u64,
}

impl PrioritySemaphore {
    fn new(permits: usize) -> Self {
        Self {
            state: Mutex::new(SemState {
                free: permits,
                waiters: BTreeMap::new(),
                next_seq: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SemState> {
        // The critical sections below leave the state consistent at every point where they can
        // panic (only an allocation can), so a poisoned lock is still safe to use.
        crate::lock::unpoisoned(&self.state)
    }

    fn available_permits(&self) -> usize {
        self.lock().free
    }

    /// Takes a permit if one is free (and so nobody waits); one lock, no allocation.
    fn try_acquire(&self) -> Option<SemPermit<'_>> {
        let taken = self.lock().take();
        // Not `then_some`: building the permit when none was taken would release one.
        taken.then(|| SemPermit { sem: self })
    }

    /// Waits for a permit, behind every queued waiter of higher or equal priority.
    /// Cancel-safe: dropping the future leaves the queue, and passes on a permit that was
    /// handed to it meanwhile.
    fn acquire(&self, priority: i32) -> SemAcquire<'_> {
        SemAcquire {
            sem: self,
            priority,
            queued: None,
        }
    }

    /// Gives a permit back: to the best waiter if any (waking it outside the lock), else to
    /// the pool.
    fn release(&self) {
        let mut s = self.lock();
        let waker = s.hand_over();
        drop(s);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl SemState {
    fn take(&mut self) -> bool {
        if self.free > 0 && self.waiters.is_empty() {
            self.free -= 1;
            true
        } else {
            false
        }
    }

    /// A permit comes back: the best waiter now owns it (its entry is gone, which is how it
    /// learns so), or it is free. Returns the waker to call once the lock is released.
    fn hand_over(&mut self) -> Option<Waker> {
        match self.waiters.pop_first() {
            Some((_, waker)) => Some(waker),
            None => {
                self.free += 1;
                None
            }
        }
    }
}

/// One permit of a [`PrioritySemaphore`]; dropping gives it back.
#[derive(Debug)]
struct SemPermit<'a> {
    sem: &'a PrioritySemaphore,
}

impl Drop for SemPermit<'_> {
    fn drop(&mut self) {
        self.sem.release();
    }
}

/// The future of [`PrioritySemaphore::acquire`].
#[derive(Debug)]
struct SemAcquire<'a> {
    sem: &'a PrioritySemaphore,
    priority: i32,
    /// Our place in the queue, once queued; `None` before the first poll and after the permit
    /// was taken.
    queued: Option<WaiterKey>,
}

impl<'a> Future for SemAcquire<'a> {
    type Output = SemPermit<'a>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SemPermit<'a>> {
        let sem = self.sem;
        let mut s = sem.lock();
        match self.queued {
            None => {
                if s.take() {
                    return Poll::Ready(SemPermit { sem });
                }
                let key = WaiterKey {
                    priority: Reverse(self.priority),
                    seq: s.next_seq,
                };
                s.next_seq += 1;
                s.waiters.insert(key, cx.waker().clone());
                self.queued = Some(key);
                Poll::Pending
            }
            Some(key) => match s.waiters.get_mut(&key) {
                Some(w) => {
                    if !w.will_wake(cx.waker()) {
                        w.clone_from(cx.waker());
                    }
                    Poll::Pending
                }
                // Only a release removes another's entry: the permit is ours.
                None => {
                    self.queued = None;
                    Poll::Ready(SemPermit { sem })
                }
            },
        }
    }
}

impl Drop for SemAcquire<'_> {
    fn drop(&mut self) {
        let Some(key) = self.queued else { return };
        let mut s = self.sem.lock();
        if s.waiters.remove(&key).is_some() {
            return;
        }
        // A permit was handed to us and we never took it: pass it on.
        let waker = s.hand_over();
        drop(s);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Limits of one scope (global, or a named group).
#[derive(Default)]
pub(crate) struct Gate {
    sem: Option<PrioritySemaphore>,
    rate: Option<Limiter>,
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field(
                "permits_free",
                &self.sem.as_ref().map(|s| s.available_permits()),
            )
            .field("rate", &self.rate.is_some())
            .finish()
    }
}

impl Gate {
    pub(crate) fn new(concurrency: Option<usize>, rate: Option<RateLimit>) -> Self {
        Self {
            sem: concurrency.map(PrioritySemaphore::new),
            rate: rate.map(|r| RateLimiter::direct_with_clock(r.quota(), TokioClock)),
        }
    }

    fn is_open(&self) -> bool {
        self.sem.is_none() && self.rate.is_none()
    }

    /// Takes a concurrency permit, waiting behind queued waiters of higher or equal priority
    /// until `deadline` at most (the timeout drops the wait, which leaves the queue).
    async fn permit(
        &self,
        priority: i32,
        deadline: Option<Instant>,
    ) -> Result<Option<SemPermit<'_>>, ()> {
        let Some(sem) = &self.sem else {
            return Ok(None);
        };
        if let Some(p) = sem.try_acquire() {
            return Ok(Some(p));
        }
        let acquire = sem.acquire(priority);
        let p = match deadline {
            Some(d) => tokio::time::timeout_at(d, acquire).await.map_err(|_| ())?,
            None => acquire.await,
        };
        Ok(Some(p))
    }

    /// Takes a rate token, sleeping as governor says; returns the time waited.
    async fn token(&self, deadline: Option<Instant>) -> Result<Duration, ()> {
        let Some(rate) = &self.rate else {
            return Ok(Duration::ZERO);
        };
        if rate.check().is_ok() {
            return Ok(Duration::ZERO);
        }
        let start = Instant::now();
        loop {
            match rate.check() {
                Ok(()) => return Ok(start.elapsed()),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(TokioClock.now());
                    let wake = Instant::now() + wait;
                    if deadline.is_some_and(|d| wake > d) {
                        if let Some(d) = deadline {
                            tokio::time::sleep_until(d).await;
                        }
                        return Err(());
                    }
                    tokio::time::sleep_until(wake).await;
                }
            }
        }
    }
}

/// The permits of one attempt; dropping gives them back (the group's first).
#[derive(Debug, Default)]
pub(crate) struct Permits<'a> {
    _group: Option<SemPermit<'a>>,
    _global: Option<SemPermit<'a>>,
    /// Time spent waiting for rate tokens.
    pub(crate) rate_waited: Duration,
}

/// The controller's limits: global and per named group. Fixed when the controller is built.
#[derive(Debug, Default)]
pub(crate) struct Limits {
    global: Gate,
    /// Sorted by name: a lookup is a binary search, cheaper than hashing the name for the few
    /// groups a service defines.
    groups: Vec<(Arc<str>, Gate)>,
}

/// The gates of one job's attempts: the global one and its group's, if any.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scope<'a> {
    global: &'a Gate,
    group: Option<&'a Gate>,
}

impl<'a> Scope<'a> {
    /// `true` when neither gate limits anything: an attempt takes nothing.
    pub(crate) fn is_open(&self) -> bool {
        self.global.is_open() && self.group.is_none_or(Gate::is_open)
    }

    /// Takes the permits and tokens of one attempt if none has to be waited for: no future,
    /// no allocation (the usual case). Otherwise returns what it took so far, for
    /// [`Scope::acquire_rest`].
    pub(crate) fn try_acquire(&self) -> Result<Permits<'a>, Partial<'a>> {
        let mut permits = Permits::default();
        let stop = |permits, stage| Err(Partial { permits, stage });
        if let Some(sem) = self.group.and_then(|g| g.sem.as_ref()) {
            match sem.try_acquire() {
                Some(p) => permits._group = Some(p),
                None => return stop(permits, Stage::GroupPermit),
            }
        }
        if let Some(sem) = &self.global.sem {
            match sem.try_acquire() {
                Some(p) => permits._global = Some(p),
                None => return stop(permits, Stage::GlobalPermit),
            }
        }
        if let Some(rate) = self.group.and_then(|g| g.rate.as_ref())
            && rate.check().is_err()
        {
            return stop(permits, Stage::GroupToken);
        }
        if let Some(rate) = &self.global.rate
            && rate.check().is_err()
        {
            return stop(permits, Stage::GlobalToken);
        }
        Ok(permits)
    }

    /// Waits for what [`Scope::try_acquire`] could not take, in the same order (group permit,
    /// global permit, group token, global token), until `deadline` at most. While permits are
    /// short, waiters of higher `priority` go first, then earlier arrivals. Dropping the future
    /// (the run is cancelled) gives back whatever it holds or was handed.
    pub(crate) async fn acquire_rest(
        &self,
        partial: Partial<'a>,
        priority: i32,
        deadline: Option<Instant>,
    ) -> Result<Permits<'a>, LimitError> {
        let Partial { mut permits, stage } = partial;
        let late = |_| LimitError::Deadline;
        if stage <= Stage::GroupPermit
            && let Some(g) = self.group
        {
            permits._group = g.permit(priority, deadline).await.map_err(late)?;
        }
        if stage <= Stage::GlobalPermit {
            permits._global = self.global.permit(priority, deadline).await.map_err(late)?;
        }
        if stage <= Stage::GroupToken
            && let Some(g) = self.group
        {
            permits.rate_waited += g.token(deadline).await.map_err(late)?;
        }
        permits.rate_waited += self.global.token(deadline).await.map_err(late)?;
        Ok(permits)
    }
}

/// What [`Scope::try_acquire`] took before it reached something it would have to wait for.
#[derive(Debug)]
pub(crate) struct Partial<'a> {
    permits: Permits<'a>,
    stage: Stage,
}

/// The step that would have waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    GroupPermit,
    GlobalPermit,
    GroupToken,
    GlobalToken,
}

/// Why permits were not obtained.
#[derive(Debug)]
pub(crate) enum LimitError {
    Deadline,
}

impl Limits {
    pub(crate) fn new(global: Gate, groups: impl IntoIterator<Item = (Arc<str>, Gate)>) -> Self {
        let mut groups: Vec<_> = groups.into_iter().collect();
        groups.sort_by(|a, b| a.0.cmp(&b.0));
        Self { global, groups }
    }

    fn group(&self, name: &str) -> Option<&Gate> {
        self.groups
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .map(|i| &self.groups[i].1)
    }

    /// The gates an attempt of a job in `group` goes through, looked up once per run; `None`
    /// for a group that is not configured.
    pub(crate) fn scope(&self, group: Option<&str>) -> Option<Scope<'_>> {
        let group = match group {
            Some(g) => Some(self.group(g)?),
            None => None,
        };
        Some(Scope {
            global: &self.global,
            group,
        })
    }

    pub(crate) fn has_group(&self, name: &str) -> bool {
        self.group(name).is_some()
    }

    pub(crate) fn group_names(&self) -> impl Iterator<Item = &str> {
        self.groups.iter().map(|(k, _)| &**k)
    }

    /// Free permits of the global limit and each group (for tests and status).
    pub(crate) fn available(&self, group: Option<&str>) -> Option<usize> {
        let gate = match group {
            Some(g) => self.group(g)?,
            None => &self.global,
        };
        gate.sem.as_ref().map(|s| s.available_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::waker;

    fn poll<'a>(f: &mut Pin<Box<SemAcquire<'a>>>, w: &Waker) -> Poll<SemPermit<'a>> {
        f.as_mut().poll(&mut Context::from_waker(w))
    }

    fn queued(sem: &PrioritySemaphore) -> usize {
        sem.lock().waiters.len()
    }

    #[test]
    fn free_permits_are_taken_at_once_and_given_back() {
        let sem = PrioritySemaphore::new(2);
        let a = sem.try_acquire().expect("free");
        let (_, w) = waker();
        let mut b = Box::pin(sem.acquire(0));
        let Poll::Ready(b) = poll(&mut b, &w) else {
            panic!("a free permit is taken on the first poll");
        };
        assert_eq!(sem.available_permits(), 0);
        assert!(sem.try_acquire().is_none());
        drop((a, b));
        assert_eq!(sem.available_permits(), 2);
    }

    #[test]
    fn waiters_are_served_by_priority_then_arrival() {
        let sem = PrioritySemaphore::new(1);
        let held = sem.try_acquire().unwrap();
        let (_, w) = waker();
        let prios = [0, 5, 1, 5, -2, 3];
        let mut futs: Vec<_> = prios.iter().map(|&p| Box::pin(sem.acquire(p))).collect();
        for f in &mut futs {
            assert!(poll(f, &w).is_pending());
        }
        drop(held);
        let mut order = Vec::new();
        while order.len() < prios.len() {
            let ready: Vec<_> = (0..futs.len())
                .filter(|&i| !order.contains(&i))
                .filter_map(|i| match poll(&mut futs[i], &w) {
                    Poll::Ready(p) => Some((i, p)),
                    Poll::Pending => None,
                })
                .collect();
            assert_eq!(ready.len(), 1, "exactly one waiter holds the one permit");
            let (i, p) = ready.into_iter().next().unwrap();
            order.push(i);
            drop(p);
        }
        // Priorities 5 (1st), 5 (2nd), 3, 1, 0, -2.
        assert_eq!(order, [1, 3, 5, 2, 0, 4]);
        assert_eq!((sem.available_permits(), queued(&sem)), (1, 0));
    }

    #[test]
    fn a_release_hands_the_permit_over_before_anyone_can_take_it() {
        let sem = PrioritySemaphore::new(1);
        let held = sem.try_acquire().unwrap();
        let (woken, w) = waker();
        let mut high = Box::pin(sem.acquire(5));
        assert!(poll(&mut high, &w).is_pending());
        drop(held);
        assert_eq!(woken.woken(), 1, "the waiter is woken");
        // The permit is the waiter's already: a newcomer of any priority finds none.
        assert_eq!(sem.available_permits(), 0);
        assert!(sem.try_acquire().is_none());
        let mut low = Box::pin(sem.acquire(0));
        assert!(poll(&mut low, &w).is_pending());
        let mut higher = Box::pin(sem.acquire(9));
        assert!(poll(&mut higher, &w).is_pending());
        assert!(poll(&mut high, &w).is_ready());
        drop((low, higher));
        assert_eq!((sem.available_permits(), queued(&sem)), (1, 0));
    }

    #[test]
    fn a_dropped_waiter_leaves_the_queue() {
        let sem = PrioritySemaphore::new(1);
        let held = sem.try_acquire().unwrap();
        let (_, w) = waker();
        let mut a = Box::pin(sem.acquire(5));
        let mut b = Box::pin(sem.acquire(1));
        assert!(poll(&mut a, &w).is_pending());
        assert!(poll(&mut b, &w).is_pending());
        drop(a);
        assert_eq!(queued(&sem), 1);
        drop(held);
        assert!(
            poll(&mut b, &w).is_ready(),
            "the next waiter gets the permit"
        );
        assert_eq!((sem.available_permits(), queued(&sem)), (1, 0));
        // Dropping a future never polled, or one that got its permit, changes nothing.
        drop(sem.acquire(3));
        assert_eq!((sem.available_permits(), queued(&sem)), (1, 0));
    }

    #[test]
    fn a_permit_handed_to_a_dropped_waiter_goes_on() {
        let sem = PrioritySemaphore::new(1);
        let held = sem.try_acquire().unwrap();
        let (_, w) = waker();
        let (woken_b, wb) = waker();
        let mut a = Box::pin(sem.acquire(5));
        let mut b = Box::pin(sem.acquire(1));
        assert!(poll(&mut a, &w).is_pending());
        assert!(poll(&mut b, &wb).is_pending());
        drop(held); // handed to `a` ...
        drop(a); // ... which is dropped before it runs: `b` gets it and is woken.
        assert_eq!(woken_b.woken(), 1);
        assert_eq!(sem.available_permits(), 0);
        let Poll::Ready(p) = poll(&mut b, &wb) else {
            panic!("the permit went on to `b`");
        };
        drop(p);
        // With nobody left to hand it to, a dropped waiter's permit goes back to the pool.
        let held = sem.try_acquire().unwrap();
        let mut c = Box::pin(sem.acquire(0));
        assert!(poll(&mut c, &w).is_pending());
        drop(held);
        drop(c);
        assert_eq!((sem.available_permits(), queued(&sem)), (1, 0));
    }

    #[test]
    fn a_moved_waiter_is_woken_through_its_latest_waker() {
        let sem = PrioritySemaphore::new(1);
        let held = sem.try_acquire().unwrap();
        let (first, w1) = waker();
        let (second, w2) = waker();
        let mut a = Box::pin(sem.acquire(0));
        assert!(poll(&mut a, &w1).is_pending());
        assert!(poll(&mut a, &w2).is_pending());
        drop(held);
        assert_eq!(first.woken(), 0);
        assert_eq!(second.woken(), 1);
        assert!(poll(&mut a, &w2).is_ready());
    }

    #[test]
    fn parses_rates() {
        let r = RateLimit::parse("5/250ms").unwrap();
        assert_eq!(r.per, Duration::from_millis(250));
        assert_eq!(r.burst.get(), 5);
        assert_eq!(
            RateLimit::parse("3/h").unwrap().per,
            Duration::from_secs(3600)
        );
        for bad in [
            "",
            "0/s",
            "-1/s",
            "10",
            "10/parsecs",
            "10/s burst 0",
            "1/0s",
            "x/s",
        ] {
            assert!(RateLimit::parse(bad).is_err(), "{bad} should fail");
        }
    }
}
