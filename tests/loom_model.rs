#![cfg(loom)]
//! Loom model of the per-key lock and single-flight state machine.
//!
//! Loom cannot look inside `DashMap` or `tokio::sync::Notify`, so this file re-states the same
//! protocol with loom primitives and lets loom explore its interleavings:
//!
//! | real                                   | model                                               |
//! |----------------------------------------|-----------------------------------------------------|
//! | `DashMap<K, V>` (one shard)            | loom `Mutex<HashMap<K, V>>` (`KeyedLocks`) / loom `RwLock<HashMap<K, V>>` (the controller's key map): `get` == the shard's read lock, `entry` / `get_mut` / `remove_if` == its write lock |
//! | the controller's key map (`DashMap<RunKey, KeyEntry { record, slot: Option<Slot>, lock: Option<Held> }>`) | [`KeyEntry`] `{ slot, lock }` in the key map above: a run on a free key puts its slot in the entry and takes the key's lock in the same write section (`admit`), and `Finisher::finish` gives both back in one (`get_mut`); a run that finds the lock held (a replacing or queued run) takes it in its pipeline (`Controller::lock`, the real `try_lock_key` / `lock_key`). Records are not modelled: the model removes an entry with neither slot nor lock where the real code leaves it to the thread's `retire` |
//! | `tokio::sync::Notify::notify_waiters`  | [`Notify`]: a call counter under a loom `Mutex` + loom `Condvar` |
//! | `Notify::notified()` / `enable()`      | [`Notify::notified`] snapshots the counter: a waiter that registered before `notify_waiters` is woken, one that registers after is not |
//! | fencing counters `AtomicU64` (Relaxed; `KeyedLocks::next`, `Inner::next_token`) | loom `AtomicU64`, same ordering |
//! | `Flight { OnceLock, Mutex<Vec<Option<Waker>>>, registered: AtomicBool }` | [`Flight`]: the `OnceLock`'s completion flag as a loom `AtomicU8` (Acquire / Release, as `Once`), the waiter list as a loom `Mutex<bool>` ("taken") + `Condvar`, `registered` as a loom `AtomicBool` (Relaxed) with loom `fence(SeqCst)`s as real |
//! | `RunHandle { ended: AtomicBool, ended_notify: Notify, awaited: AtomicBool }` | loom `AtomicBool` (Release / Acquire, as real) + [`Notify`] + loom `AtomicBool` (Relaxed) with loom `fence(SeqCst)`s as real |
//! | `RunSignal { reason: AtomicU8, token: OnceLock<CancellationToken> }` | loom `AtomicU8` (SeqCst), loom `fence(SeqCst)` as real; the `OnceLock` is its completion flag, a loom `AtomicBool` (Release / Acquire); the token is an [`Event`] |
//! | `CancellationToken` (the run's token)  | [`Event`]: `Mutex<bool>` + [`Notify`]               |
//! | the run's boxed future (`run_future`)  | [`RunFuture`], a state machine polled to its next await point ([`Cx`]) |
//! | `Lead` polled by the caller            | [`Lead::poll`] in the caller's thread                |
//! | `TaskTracker::spawn` / `spawn_on`      | `loom::thread::spawn` (joined at the end)           |
//!
//! Function names follow the real code (`try_acquire`, `try_lock`, `acquire`, `release`,
//! `complete`, `wait`, `start`, `admit`, `starter`, `Lead`, `run_future`, `wait_ended`, `lock`,
//! `pipeline`, `Finisher::finish`, `RunSignal::{cancel, token, cancelled}`), with the real
//! lines cited as of commit 498f297 (the controller's key lock, since, by name only), so the
//! two can be compared side by side. `KeyedLocks` is still the crate's (the in-process
//! coordinator's locks); the controller's key lock follows the same protocol in the key's
//! entry (a waiter registers under the shard's write lock; the holder gives the lock back
//! under it, then wakes the waiters).
//!
//! Checked, for every interleaving within the preemption bound:
//! - mutual exclusion: never two holders of one key (holder count, and loom's race detector on
//!   the resource the lock protects);
//! - fencing tokens strictly increase across successive holders of a key;
//! - no lost wake-up: a waiter always gets the lock / result / the previous run's end / its
//!   cancellation after release / completion / `end` / `cancel` (else every thread ends up
//!   blocked and loom panics with "deadlock");
//! - no lost cancellation: a cancelled run's lazily made token is cancelled too;
//! - no leaked entry: the lock map and the key map are empty once every thread and task is done
//!   (no run's lock is left in a key's entry);
//! - single-flight: each flight's body runs exactly once, never two bodies of a key at once,
//!   every caller gets its flight's (pointer-equal) value, a caller arriving after the slot is
//!   gone starts a new flight (both outcomes are asserted to be reached), no caller joins a
//!   flight whose result was already published (stale join), a queued run is promoted (never
//!   dropped unstarted), a replacing run waits for the one it replaced, a leader that gives up
//!   hands its run to a task (the run goes on; it is never dropped), and no run of a controller
//!   ever waits for or is `Busy` on its own key lock (the slot alone keeps runs apart).
//!
//! Deliberate bugs are switched on through [`Bugs`]; a `#[should_panic]` test per bug proves the
//! model catches it.
//!
//! `Arc` is `std::sync::Arc`, as in the real code. (loom's `Arc` would add a leak check, but its
//! `drop` panics while a thread unwinds from loom's "deadlock" panic, which aborts the process
//! instead of failing the test, so the lost-wake-up tests below could not be `#[should_panic]`.
//! Leaks that matter here, entries left in the maps, are asserted directly. For the same reason
//! the model's `Drop` impls that act (`Lead`, `RunFuture`, `Finisher`, `Queued`) do nothing
//! while a thread unwinds from a model panic.)
//!
//! Test-only bookkeeping ([`Probe`], `Flight::published`) uses `std` atomics/mutexes on purpose:
//! they are invisible to loom, so they add no happens-before edges (which could hide a bug) and
//! no schedule points. The protected "downstream resource" is a loom `UnsafeCell`, so loom also
//! reports any two lock holders whose critical sections are not ordered by happens-before.
//!
//! How the run is polled: the caller that leads a run polls it inline (`Lead`); a caller that
//! gives up (plan [`Call::gives_up`]) polls it once and drops it where the real future would
//! first return `Pending` — waiting for the replaced run to end, or inside the job body (the
//! body of a run in a scenario with `pends` does not finish at its first poll, and makes the
//! run's token there, as `run_attempt` does) — and `Lead::drop` moves the rest to a tracker
//! task. A blocking wait in the model stands for an `.await` that is woken later. A run that
//! is polled to completion blocks at each await instead of returning `Pending`.
//!
//! Not modelled: lock-wait timeouts (a timed-out waiter only drops its `Notified`); a caller
//! that gives up while *joined* (dropping `Flight::wait` affects nobody else); a leader giving
//! up while waiting for the key lock (`lock_wait` > 0: the model asserts that a run never has
//! to wait for its own controller's lock, so that await never pends); the `OnceLock` init race
//! between two makers of one run's token (only the run's own task makes it); the Finisher's
//! drop path outside the `lead_drop_drops_run` bug (a runtime torn down, a panic); cooldowns
//! and key records (`keys`, the cooldown re-check under the entry, `maybe_sweep`); shutdown
//! (`closed`, `cancelling`, cancelling slots through the map); mixing `QueueOne` with
//! `Replace` on one key (a replace drops the queued run, which fails its flight);
//! `Skip` (a refusal under the write lock, no state change); `Result`s other than the model's
//! [`Output`] (errors, panics caught by `catch_unwind`); shutdown waiting for the key map
//! to hold no run (a run its caller polls holds no tracker token); the coordinator (lease) lock
//! backend; manual holders of the controller's key lock (`ctl.try_acquire` / `acquire`: the
//! same entry and protocol as the runs' slow path, tested in `tests/controller.rs` on a
//! multi-threaded runtime).
//!
//! Run: `.ci/loom.sh` (see there for the exact command and bounds).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ops::Deref;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{
    AtomicBool as StdAtomicBool, AtomicUsize as StdAtomicUsize, Ordering::SeqCst as StdSeqCst,
};
use std::sync::{Arc, Weak};

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering, fence};
use loom::sync::{Condvar, Mutex, RwLock};
use loom::thread;

type Key = u8;
type FencingToken = u64;

const KEY: Key = 7;

// ---------------------------------------------------------------------------------------------
// Bounds
// ---------------------------------------------------------------------------------------------

/// `LOOM_MAX_PREEMPTIONS` (and the other `LOOM_*` variables) are honoured; without it the
/// preemption bound defaults to 2 so a bare `cargo test` also terminates quickly.
fn builder() -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(2);
    }
    b
}

/// Runs `f` under loom and returns how many interleavings were explored.
fn check<F: Fn() + Sync + Send + 'static>(name: &str, iterations: &'static StdAtomicUsize, f: F) {
    builder().check(move || {
        iterations.fetch_add(1, StdSeqCst);
        f();
    });
    eprintln!(
        "loom_model::{name}: {} interleavings",
        iterations.load(StdSeqCst)
    );
}

// ---------------------------------------------------------------------------------------------
// Deliberate bugs (all off in the real-protocol tests)
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Default, Debug)]
struct Bugs {
    /// `acquire`: look at the entry, release the shard lock, *then* register for the wake-up.
    lock_register_after_unlock: bool,
    /// `release`: wake the waiters first, remove the entry in a second shard-lock section.
    lock_notify_before_remove: bool,
    /// `Flight::wait`: look at the result *before* registering for the broadcast.
    flight_check_before_register: bool,
    /// `Flight::complete` / `Wait::poll`: no `fence(SeqCst)` between the store of one side
    /// (the result; `registered`) and the load of the other.
    flight_without_fences: bool,
    /// `RunSignal::cancel` / `RunSignal::token`: no `fence(SeqCst)` between the store of one
    /// side and the load of the other.
    signal_without_fences: bool,
    /// `RunHandle::wait_ended`: look at `ended` *before* registering for `ended_notify`.
    ended_check_before_register: bool,
    /// `RunHandle::end` / `wait_ended`: no `fence(SeqCst)` between the store of one side
    /// (`ended`; `awaited`) and the load of the other.
    ended_without_fences: bool,
    /// `Finisher::finish`: remove the slot without checking that it is still this run's.
    finish_ignores_id: bool,
    /// `Finisher::finish`: look under the read lock whether the slot can go, remove it in a
    /// second (write) section instead of one `remove_if`.
    finish_check_then_remove: bool,
    /// `Finisher::finish`: publish the result *before* removing / handing over the slot (the
    /// order before 1592426): a caller can join a flight that has already ended.
    finish_publishes_first: bool,
    /// `Lead::drop`: drop the run instead of handing it to a tracker task (a leader giving up
    /// would cancel the run for everyone who joined it).
    lead_drop_drops_run: bool,
    /// `Finisher::finish`: take the slot out but leave the run's lock in the key's entry.
    finish_keeps_lock: bool,
}

// ---------------------------------------------------------------------------------------------
// tokio::sync::Notify (notify_waiters semantics only)
// ---------------------------------------------------------------------------------------------

/// Model of `tokio::sync::Notify` as used here: only `notified()` + `notify_waiters()`.
///
/// tokio snapshots the number of `notify_waiters` calls when a `Notified` is *created* and the
/// future completes once that number has moved on; the model does exactly that. No permit is
/// stored: a `Notified` created after the call waits for the next one.
struct Notify {
    calls: Mutex<u64>,
    cv: Condvar,
}

impl Default for Notify {
    fn default() -> Self {
        Self {
            calls: Mutex::new(0),
            cv: Condvar::new(),
        }
    }
}

/// A registered waiter (`Notified<'_>` / `OwnedNotified`, or a `Notified` pinned inside a
/// future that owns its `Notify`: `N` is whatever keeps the `Notify` alive).
struct Notified<N: Deref<Target = Notify>> {
    notify: N,
    seen: u64,
}

/// Creates a `Notified` on the `Notify` that `notify` leads to (snapshot at creation).
fn notified_on<N: Deref<Target = Notify>>(notify: N) -> Notified<N> {
    let seen = *notify.calls.lock().unwrap();
    Notified { notify, seen }
}

impl Notify {
    /// `Notify::notified()`.
    fn notified(&self) -> Notified<&Notify> {
        notified_on(self)
    }

    /// `Notify::notified_owned()`.
    fn notified_owned(self: Arc<Self>) -> Notified<Arc<Notify>> {
        notified_on(self)
    }

    /// `Notify::notify_waiters()`: wakes every `Notified` created before this call.
    fn notify_waiters(&self) {
        *self.calls.lock().unwrap() += 1;
        self.cv.notify_all();
    }
}

impl<N: Deref<Target = Notify>> Notified<N> {
    /// `Notified::enable()`. The snapshot was already taken at creation (as in tokio), which is
    /// all `notify_waiters` looks at; kept so call sites read like the real code.
    fn enable(&mut self) {}

    /// `notified.await`: blocks until `notify_waiters` has been called since creation. If that
    /// never happens and every other thread is done or blocked, loom reports a deadlock.
    fn wait(self) {
        let mut calls = self.notify.calls.lock().unwrap();
        while *calls == self.seen {
            calls = self.notify.cv.wait(calls).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Test bookkeeping (invisible to loom)
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Probe {
    /// Lock holders of `KEY` right now (mutual exclusion: never above 1).
    holders: StdAtomicUsize,
    /// The resource the lock protects: fencing tokens in the order holders saw them. A loom
    /// `UnsafeCell`, so two holders not ordered by happens-before are reported as a race.
    downstream: UnsafeCell<Vec<FencingToken>>,
    /// Job bodies running right now (never above 1 per key).
    bodies_running: StdAtomicUsize,
    /// Flight number -> times its body ran to its end.
    bodies: StdMutex<HashMap<u64, usize>>,
    /// Flights created.
    flights_created: StdAtomicUsize,
    /// Every run handle made, for the lost-cancellation check at the end.
    runs: StdMutex<Vec<Arc<RunHandle>>>,
    /// Runs ended by `Finisher::drop` (dropped before they finished).
    dropped_runs: StdAtomicUsize,
    /// Queued runs dropped without being started (`Queued::drop` failed their flight).
    queued_dropped: StdAtomicUsize,
    /// Leaders that gave up while waiting for the replaced run to end / inside the body.
    gave_up_waiting: StdAtomicUsize,
    gave_up_in_body: StdAtomicUsize,
}

// SAFETY: `downstream` is only touched by the holder of the modelled lock (and by the main
// thread after every other thread was joined); that exclusive access is exactly what the model
// checks, and loom's `UnsafeCell` reports any access not ordered by happens-before.
unsafe impl Sync for Probe {}

impl Probe {
    /// Entering the critical section of a lock holder: the fencing check a downstream system
    /// would do.
    fn enter(&self, token: FencingToken) {
        assert_eq!(
            self.holders.fetch_add(1, StdSeqCst),
            0,
            "two holders of one key at once"
        );
        self.downstream.with_mut(|d| {
            // SAFETY: loom checks that no other access is concurrent with this one.
            let d = unsafe { &mut *d };
            if let Some(&last) = d.last() {
                assert!(token > last, "fencing token {token} not above {last}");
            }
            d.push(token);
        });
    }

    fn exit(&self) {
        assert_eq!(self.holders.fetch_sub(1, StdSeqCst), 1);
    }

    /// A whole critical section (the lock tests).
    fn critical_section(&self, token: FencingToken) {
        self.enter(token);
        thread::yield_now(); // let others try while we hold the lock
        self.exit();
    }

    fn tokens(&self) -> Vec<FencingToken> {
        // SAFETY: called after every thread was joined.
        self.downstream.with(|d| unsafe { (*d).clone() })
    }

    /// A job body starts (inside the lock).
    fn body_start(&self) {
        assert_eq!(
            self.bodies_running.fetch_add(1, StdSeqCst),
            0,
            "two runs of one key at once"
        );
    }

    /// A job body ran to its end.
    fn body_end(&self, flight_no: u64) {
        {
            let mut b = self.bodies.lock().unwrap();
            let n = b.entry(flight_no).or_default();
            *n += 1;
            assert_eq!(*n, 1, "flight {flight_no} ran its body twice");
        }
        assert_eq!(self.bodies_running.fetch_sub(1, StdSeqCst), 1);
    }

    /// A job body was dropped before its end.
    fn body_dropped(&self) {
        assert_eq!(self.bodies_running.fetch_sub(1, StdSeqCst), 1);
    }
}

// ---------------------------------------------------------------------------------------------
// src/lock.rs: KeyedLocks
// ---------------------------------------------------------------------------------------------

/// `struct Held` (src/lock.rs:28).
struct Held {
    token: FencingToken,
    waiters: Option<Arc<Notify>>,
}

/// `struct KeyedLocks` (src/lock.rs:48): `map` is one DashMap shard.
struct KeyedLocks {
    map: Mutex<HashMap<Key, Held>>,
    next: AtomicU64,
    bugs: Bugs,
    /// Times a waiter went to sleep (std, invisible to loom).
    slept: StdAtomicUsize,
}

/// `struct KeyGuard` (src/lock.rs:219): releases on drop.
struct KeyGuard {
    locks: Arc<KeyedLocks>,
    key: Option<Key>,
    token: FencingToken,
}

impl KeyGuard {
    fn token(&self) -> FencingToken {
        self.token
    }
}

/// `impl Drop for KeyGuard` (src/lock.rs:245).
impl Drop for KeyGuard {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.locks.release(&key, self.token);
        }
    }
}

/// `struct KeyRef` (src/lock.rs:255): borrows the set and the key; releases on drop.
struct KeyRef<'a> {
    locks: &'a KeyedLocks,
    key: &'a Key,
    token: FencingToken,
}

impl KeyRef<'_> {
    fn token(&self) -> FencingToken {
        self.token
    }
}

/// `impl Drop for KeyRef` (src/lock.rs:276).
impl Drop for KeyRef<'_> {
    fn drop(&mut self) {
        self.locks.release(self.key, self.token);
    }
}

impl KeyedLocks {
    fn new(bugs: Bugs) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1), // src/lock.rs:87
            bugs,
            slept: StdAtomicUsize::new(0),
        }
    }

    /// src/lock.rs:92
    fn next_token(&self) -> FencingToken {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// src/lock.rs:98
    fn try_acquire(self: &Arc<Self>, key: Key) -> Option<KeyGuard> {
        let mut shard = self.map.lock().unwrap(); // self.map.entry(key)
        match shard.entry(key) {
            Entry::Occupied(_) => None,
            Entry::Vacant(v) => {
                let token = self.next_token();
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

    /// src/lock.rs:121
    fn try_lock<'a>(&'a self, key: &'a Key) -> Option<KeyRef<'a>> {
        let mut shard = self.map.lock().unwrap(); // self.map.entry(key.clone())
        match shard.entry(*key) {
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

    /// src/lock.rs:140, with an unbounded wait (timeouts are not modelled).
    fn acquire(self: &Arc<Self>, key: Key) -> KeyGuard {
        loop {
            // src/lock.rs:148 `let notified = match self.map.entry(key.clone()) { .. }`
            let notified = {
                let mut shard = self.map.lock().unwrap();
                match shard.entry(key) {
                    Entry::Vacant(v) => {
                        // src/lock.rs:149-160
                        let token = self.next_token();
                        v.insert(Held {
                            token,
                            waiters: None,
                        });
                        return KeyGuard {
                            locks: Arc::clone(self),
                            key: Some(key),
                            token,
                        };
                    }
                    Entry::Occupied(mut o) => {
                        // src/lock.rs:161-167
                        let notify = o.get_mut().waiters.get_or_insert_with(Default::default);
                        if self.bugs.lock_register_after_unlock {
                            // BUG: the shard lock is released before registering, so a release
                            // (remove + notify_waiters) can run in between: lost wake-up.
                            let notify = Arc::clone(notify);
                            drop(shard);
                            let mut n = notify.notified_owned();
                            n.enable();
                            n
                        } else {
                            // src/lock.rs:170-171: registered while the shard lock is held.
                            let mut n = Arc::clone(notify).notified_owned();
                            n.enable();
                            n
                        }
                    }
                }
            }; // shard lock released here
            self.slept.fetch_add(1, StdSeqCst);
            // src/lock.rs:175 `timeout_at(deadline, notified).await`
            notified.wait();
        }
    }

    /// src/lock.rs:184
    fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    /// src/lock.rs:208
    fn release(&self, key: &Key, token: FencingToken) {
        if self.bugs.lock_notify_before_remove {
            // BUG: wake first, remove in a second critical section. A woken waiter can re-check
            // in between, find the entry still there and register again: nobody wakes it.
            let waiters = self
                .map
                .lock()
                .unwrap()
                .get(key)
                .filter(|h| h.token == token)
                .and_then(|h| h.waiters.clone());
            if let Some(n) = waiters {
                n.notify_waiters();
            }
            let mut shard = self.map.lock().unwrap();
            if shard.get(key).is_some_and(|h| h.token == token) {
                shard.remove(key);
            }
            return;
        }
        // `self.map.remove_if(key, |_, h| h.token == token)`: one shard-lock section, the
        // removed value is returned after the shard lock is dropped.
        let removed = {
            let mut shard = self.map.lock().unwrap();
            if shard.get(key).is_some_and(|h| h.token == token) {
                shard.remove(key)
            } else {
                None
            }
        };
        if let Some(held) = removed
            && let Some(n) = held.waiters
        {
            n.notify_waiters();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// src/flight.rs: Flight
// ---------------------------------------------------------------------------------------------

/// What a run produces: which flight and which run produced it.
#[derive(Debug, PartialEq, Eq)]
struct Output {
    flight: u64,
    run: u64,
    /// The run found the key's lock taken and gave up (`JobError::Busy`, lock_wait zero).
    busy: bool,
    /// The run was dropped before it finished (`Finisher::drop`: `Cancelled`), or it was a
    /// queued run dropped unstarted (`Queued::drop`).
    dropped: bool,
}

/// `struct Flight` (src/flight.rs).
struct Flight {
    /// `OnceLock<Shared<T>>`: `state` is its completion flag (0 empty, 1 being set, 2 set;
    /// set with Acquire / Release as `Once` does, read with Acquire), the value is kept
    /// beside it in a std mutex, invisible to loom, so it adds no ordering of its own.
    state: AtomicU8,
    value: StdMutex<Option<Arc<Output>>>,
    /// `waiters: Mutex<Vec<Option<Waker>>>`: here only whether the list was taken (every
    /// waiter registered before that is woken) and a condition variable to block on.
    waiters: Mutex<bool>,
    woken: Condvar,
    /// `registered: AtomicBool` (Relaxed, with the `fence(SeqCst)`s of the real code).
    registered: AtomicBool,
    /// Identity for the checks (test bookkeeping).
    no: u64,
    /// Set (std, invisible to loom) once the result is stored: for the stale-join check.
    published: StdAtomicBool,
    bugs: Bugs,
}

impl Flight {
    fn new(probe: &Probe, bugs: Bugs) -> Arc<Self> {
        Arc::new(Self {
            state: AtomicU8::new(0),
            value: StdMutex::new(None),
            waiters: Mutex::new(false),
            woken: Condvar::new(),
            registered: AtomicBool::new(false),
            no: probe.flights_created.fetch_add(1, StdSeqCst) as u64,
            published: StdAtomicBool::new(false),
            bugs,
        })
    }

    /// `Flight::complete`.
    fn complete(&self, result: Arc<Output>) {
        // `self.result.set(result).is_ok()`
        if self
            .state
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        *self.value.lock().unwrap() = Some(result);
        self.published.store(true, StdSeqCst);
        self.state.store(2, Ordering::Release);
        if !self.bugs.flight_without_fences {
            fence(Ordering::SeqCst);
        }
        if !self.registered.load(Ordering::Relaxed) {
            return;
        }
        // `take(&mut *self.waiters.lock())`, then wake each.
        *self.waiters.lock().unwrap() = true;
        self.woken.notify_all();
    }

    /// `Flight::peek` (`OnceLock::get`).
    fn peek(&self) -> Option<Arc<Output>> {
        if self.state.load(Ordering::Acquire) == 2 {
            self.value.lock().unwrap().clone()
        } else {
            None
        }
    }

    /// `Flight::wait` (`Wait::poll`, then blocking where the real future returns `Pending`
    /// until its waker is woken, then `Wait::poll` again, which takes the fast path).
    fn wait(&self) -> Arc<Output> {
        // The fast path.
        if let Some(r) = self.peek() {
            return r;
        }
        let mut taken = self.waiters.lock().unwrap();
        if !self.bugs.flight_check_before_register {
            self.registered.store(true, Ordering::Relaxed);
            if !self.bugs.flight_without_fences {
                fence(Ordering::SeqCst);
            }
            if let Some(r) = self.peek() {
                return r;
            }
        } else {
            // BUG: registered without marking the flight or looking again under the lock: a
            // `complete` since the fast path's look is missed.
        }
        // Registered (`waiters.push(Some(waker))`); woken when the list is taken.
        while !*taken {
            taken = self.woken.wait(taken).unwrap();
        }
        drop(taken);
        self.peek().expect("woken after the result was stored")
    }
}

/// `CancellationToken` (the run's token): `cancel()` / `cancelled().await`.
struct Event {
    set: Mutex<bool>,
    notify: Notify,
}

impl Event {
    fn new() -> Self {
        Self {
            set: Mutex::new(false),
            notify: Notify::default(),
        }
    }

    fn cancel(&self) {
        *self.set.lock().unwrap() = true;
        self.notify.notify_waiters();
    }

    fn is_cancelled(&self) -> bool {
        *self.set.lock().unwrap()
    }

    fn cancelled(&self) {
        loop {
            let mut n = self.notify.notified();
            n.enable();
            if *self.set.lock().unwrap() {
                return;
            }
            n.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// src/budget.rs: RunSignal
// ---------------------------------------------------------------------------------------------

const NOT_CANCELLED: u8 = 0; // src/budget.rs:19
const REPLACED: u8 = 1; // `CancelReason::Replaced` (src/budget.rs:37)

/// `struct RunSignal` (src/budget.rs:28): a reason, and a token made on first use.
struct RunSignal {
    reason: AtomicU8,
    /// `OnceLock<CancellationToken>`: its completion flag (`get` is an Acquire load, the end of
    /// `get_or_init` a Release store). The token itself is made up front: making it has no
    /// ordering of its own.
    token_set: AtomicBool,
    token: Event,
    bugs: Bugs,
}

impl RunSignal {
    fn new(bugs: Bugs) -> Self {
        Self {
            reason: AtomicU8::new(NOT_CANCELLED),
            token_set: AtomicBool::new(false),
            token: Event::new(),
            bugs,
        }
    }

    /// `OnceLock::get`.
    fn token_get(&self) -> Option<&Event> {
        self.token_set
            .load(Ordering::Acquire)
            .then_some(&self.token)
    }

    /// src/budget.rs:35
    fn cancel(&self, reason: u8) {
        let _ =
            self.reason
                .compare_exchange(NOT_CANCELLED, reason, Ordering::SeqCst, Ordering::SeqCst);
        if !self.bugs.signal_without_fences {
            fence(Ordering::SeqCst); // src/budget.rs:46
        }
        if let Some(t) = self.token_get() {
            t.cancel();
        }
    }

    /// src/budget.rs:53
    fn is_cancelled(&self) -> bool {
        self.reason.load(Ordering::SeqCst) != NOT_CANCELLED
    }

    /// src/budget.rs:67
    fn token(&self) -> &Event {
        // `self.token.get_or_init(CancellationToken::new)` (one maker: the run's own task)
        if !self.token_set.load(Ordering::Acquire) {
            self.token_set.store(true, Ordering::Release);
        }
        let t = &self.token;
        if !self.bugs.signal_without_fences {
            fence(Ordering::SeqCst); // src/budget.rs:69
        }
        if self.is_cancelled() {
            t.cancel();
        }
        t
    }

    /// src/budget.rs:77
    fn cancelled(&self) {
        if !self.is_cancelled() {
            self.token().cancelled();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// src/controller.rs: RunHandle, slots, admit / start, Lead, run_future, Finisher
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Overlap {
    Coalesce,
    QueueOne,
    Replace,
}

/// One caller: its overlap policy, and whether it gives up (drops its `start` future) at the
/// first point where that future returns `Pending`.
#[derive(Clone, Copy, Debug)]
struct Call {
    overlap: Overlap,
    gives_up: bool,
}

const C: Call = Call {
    overlap: Overlap::Coalesce,
    gives_up: false,
};
const Q: Call = Call {
    overlap: Overlap::QueueOne,
    gives_up: false,
};
const R: Call = Call {
    overlap: Overlap::Replace,
    gives_up: false,
};
const C_GIVES_UP: Call = Call {
    overlap: Overlap::Coalesce,
    gives_up: true,
};
const Q_GIVES_UP: Call = Call {
    overlap: Overlap::QueueOne,
    gives_up: true,
};
const R_GIVES_UP: Call = Call {
    overlap: Overlap::Replace,
    gives_up: true,
};

/// `policy.lock_wait` as seen by `Inner::lock` (src/controller.rs:1514).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LockWait {
    /// The default (`Duration::ZERO`): `try_lock`, `Busy` if taken.
    Zero,
    /// Any positive wait: `acquire` (modelled without a deadline).
    Wait,
}

/// `struct RunHandle` (src/controller.rs:420).
struct RunHandle {
    signal: RunSignal,
    ended: AtomicBool,
    ended_notify: Notify,
    /// Relaxed, with the real code's `fence(SeqCst)`s.
    awaited: AtomicBool,
}

impl RunHandle {
    /// src/controller.rs:433
    fn new(probe: &Probe, bugs: Bugs) -> Arc<Self> {
        let run = Arc::new(Self {
            signal: RunSignal::new(bugs),
            ended: AtomicBool::new(false),
            ended_notify: Notify::default(),
            awaited: AtomicBool::new(false),
        });
        probe.runs.lock().unwrap().push(Arc::clone(&run));
        run
    }

    /// src/controller.rs:441
    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        if !self.signal.bugs.ended_without_fences {
            fence(Ordering::SeqCst);
        }
        if self.awaited.load(Ordering::Relaxed) {
            self.ended_notify.notify_waiters();
        }
    }

    /// src/controller.rs:458
    fn cancel(&self, reason: u8) {
        self.signal.cancel(reason);
    }
}

/// The previous run's `ended_notify`, kept alive by the run future that waits on it.
struct EndedOf(Arc<RunHandle>);

impl Deref for EndedOf {
    type Target = Notify;
    fn deref(&self) -> &Notify {
        &self.0.ended_notify
    }
}

/// How a run future is polled.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cx {
    /// Polled to its end: each await blocks (the task sleeps until it is woken).
    ToEnd,
    /// One poll: returns `Pending` where the real future first would.
    Once,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Poll {
    Ready,
    Pending,
}

type Starter = Box<dyn FnOnce(u64, Arc<RunHandle>) + Send + Sync>;

/// `struct Queued` (src/controller.rs:481).
struct Queued {
    flight: Arc<Flight>,
    start: Option<Starter>,
    probe: Arc<Probe>,
}

/// `impl Drop for Queued` (src/controller.rs:490).
impl Drop for Queued {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return; // unwinding from a model panic: no more loom operations (see the header)
        }
        if self.start.is_some() {
            // Never started: its flight fails (`Cancelled { reason: Replaced }`).
            self.probe.queued_dropped.fetch_add(1, StdSeqCst);
            self.flight.complete(Arc::new(Output {
                flight: self.flight.no,
                run: 0,
                busy: false,
                dropped: true,
            }));
        }
    }
}

/// `struct Slot` (src/controller.rs:504).
struct Slot {
    id: u64,
    run: Arc<RunHandle>,
    flight: Arc<Flight>,
    queued: Option<Queued>,
}

/// `struct KeyEntry` (src/controller.rs), without the record: the key's run in flight and its
/// lock.
#[derive(Default)]
struct KeyEntry {
    slot: Option<Slot>,
    lock: Option<KeyHeld>,
}

/// `struct Held` (src/controller.rs): the key's lock, held by run `owner` (the model has no
/// manual holders).
struct KeyHeld {
    /// Compared by the real `unlock_key` (a manual holder's release); the model's holders are
    /// runs, which are told apart by `owner`.
    #[allow(dead_code)]
    token: FencingToken,
    owner: u64,
    waiters: Option<Arc<Notify>>,
}

/// `struct Inner` (src/controller.rs), the parts that matter here.
struct Controller {
    /// One DashMap shard of the key map. An entry goes when it has neither slot nor lock (the
    /// real entry stays with its record until its thread retires it; records are not
    /// modelled, and an entry with neither behaves as no entry at admission).
    keys: RwLock<HashMap<Key, KeyEntry>>,
    next_run: AtomicU64,
    /// `Inner::next_token`.
    next_token: AtomicU64,
    /// Times a run slept waiting for the key's lock (std, invisible to loom).
    slept: StdAtomicUsize,
    /// `TaskTracker` (std mutex: bookkeeping only, the join at the end is loom-visible).
    tracker: StdMutex<Vec<thread::JoinHandle<()>>>,
    lock_wait: LockWait,
    /// Job bodies do not finish at their first poll (they make the run's token there).
    pends: bool,
    bugs: Bugs,
    probe: Arc<Probe>,
}

/// `enum Admitted` (src/controller.rs:1098).
enum Admitted {
    Join(Arc<Flight>),
    Lead(Arc<Flight>, Lead),
}

/// `enum HeldLock` (src/controller.rs), its local variant `Key(FencingToken)`: the token of
/// the key's lock, which stays in the key's entry until `Finisher::finish` gives it back.
type HeldLock = FencingToken;

impl Controller {
    fn new(lock_wait: LockWait, pends: bool, bugs: Bugs) -> Arc<Self> {
        Arc::new(Self {
            keys: RwLock::new(HashMap::new()),
            next_run: AtomicU64::new(1),
            next_token: AtomicU64::new(1),
            slept: StdAtomicUsize::new(0),
            tracker: StdMutex::new(Vec::new()),
            lock_wait,
            pends,
            bugs,
            probe: Arc::new(Probe::default()),
        })
    }

    /// Model check at every join: the flight joined has not published its result yet.
    fn joined(&self, flight: &Flight) {
        assert!(
            !flight.published.load(StdSeqCst),
            "a caller joined flight {} after its result was published (stale join)",
            flight.no
        );
    }

    /// `JobRuntimeController::start` (src/controller.rs:847). Returns the number of the flight
    /// the caller joined or led and the value it received, or `None` if it gave up.
    fn start(self: &Arc<Self>, key: Key, call: Call) -> Option<(u64, Arc<Output>)> {
        match self.admit(key, call.overlap) {
            // src/controller.rs:868
            Admitted::Join(flight) => Some((flight.no, flight.wait())),
            // src/controller.rs:869-872
            Admitted::Lead(flight, mut lead) => {
                if call.gives_up && lead.poll(Cx::Once) == Poll::Pending {
                    // The caller drops its future: `Lead::drop` hands the run off.
                    drop(lead);
                    return None;
                }
                lead.poll(Cx::ToEnd); // `lead.await`
                drop(lead);
                Some((flight.no, flight.wait()))
            }
        }
    }

    /// `JobRuntimeController::admit` (src/controller.rs:877), steps 1-2 without cooldowns.
    fn admit(self: &Arc<Self>, key: Key, overlap: Overlap) -> Admitted {
        // src/controller.rs:901-924: a Coalesce caller joins under the shard's read lock.
        if overlap == Overlap::Coalesce {
            let shard = self.keys.read().unwrap(); // inner.keys.get(&Probe { .. })
            if let Some(slot) = shard.get(&key).and_then(|e| e.slot.as_ref()) {
                let flight = Arc::clone(&slot.flight); // downcast::<T>(&slot.flight, rk)
                self.joined(&flight);
                drop(shard); // drop(slot)
                return Admitted::Join(flight);
            }
        }
        // 2. in flight? src/controller.rs, `inner.keys.entry(rk.clone())`
        let (flight, launch) = {
            let mut shard = self.keys.write().unwrap();
            let e = shard.entry(key).or_default();
            match e.slot.as_mut() {
                Some(slot) => match overlap {
                    Overlap::Coalesce => {
                        let flight = Arc::clone(&slot.flight);
                        self.joined(&flight);
                        (flight, None)
                    }
                    Overlap::QueueOne => match &slot.queued {
                        Some(q) => {
                            let flight = Arc::clone(&q.flight);
                            self.joined(&flight);
                            (flight, None)
                        }
                        None => {
                            let flight = Flight::new(&self.probe, self.bugs);
                            let start = self.starter(key, &flight);
                            slot.queued = Some(Queued {
                                flight: Arc::clone(&flight),
                                start: Some(start),
                                probe: Arc::clone(&self.probe),
                            });
                            (flight, None)
                        }
                    },
                    // The replacing run takes the lock in its pipeline, once the replaced run
                    // has ended (and given the lock back).
                    Overlap::Replace => {
                        slot.run.cancel(REPLACED);
                        let prev_ended = Arc::clone(&slot.run);
                        let flight = Flight::new(&self.probe, self.bugs);
                        let run = RunHandle::new(&self.probe, self.bugs);
                        let id = self.next_run.fetch_add(1, Ordering::Relaxed);
                        slot.id = id;
                        slot.run = Arc::clone(&run);
                        slot.flight = Arc::clone(&flight);
                        slot.queued = None;
                        (
                            Arc::clone(&flight),
                            Some((id, None, run, flight, Some(prev_ended))),
                        )
                    }
                },
                // No run in flight: a new slot, and the key's lock with it if it is free.
                None => {
                    let flight = Flight::new(&self.probe, self.bugs);
                    let run = RunHandle::new(&self.probe, self.bugs);
                    let id = self.next_run.fetch_add(1, Ordering::Relaxed);
                    e.slot = Some(Slot {
                        id,
                        run: Arc::clone(&run),
                        flight: Arc::clone(&flight),
                        queued: None,
                    });
                    let locked = e.lock.is_none().then(|| {
                        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
                        e.lock = Some(KeyHeld {
                            token,
                            owner: id,
                            waiters: None,
                        });
                        token
                    });
                    (Arc::clone(&flight), Some((id, locked, run, flight, None)))
                }
            }
        }; // shard lock released
        // src/controller.rs:1046-1065
        if let Some((id, locked, run, f, prev)) = launch {
            let run = Controller::run_future(self, key, id, locked, run, f, prev);
            let lead = Lead {
                run: Some(run),
                ctrl: Arc::clone(self), // tracker: Cow::Borrowed(&inner.tracker)
            };
            return Admitted::Lead(flight, lead);
        }
        Admitted::Join(flight)
    }

    /// `JobRuntimeController::starter` (src/controller.rs:1070): starts a queued run later,
    /// as a task of the tracker.
    fn starter(self: &Arc<Self>, key: Key, flight: &Arc<Flight>) -> Starter {
        let inner: Weak<Controller> = Arc::downgrade(self);
        let flight = Arc::clone(flight);
        Box::new(move |id, run| {
            if let Some(inner) = inner.upgrade() {
                let run = Controller::run_future(&inner, key, id, None, run, flight, None);
                inner.spawn(run); // inner.tracker.spawn(run)
            }
        })
    }

    /// `tracker.spawn(run)` / `spawn_on(run, &rt)`: a task polls the run to its end.
    fn spawn(&self, mut run: RunFuture) {
        let h = thread::spawn(move || {
            run.poll(Cx::ToEnd);
        });
        self.tracker.lock().unwrap().push(h);
    }

    /// `Inner::run_future` (src/controller.rs:1458).
    fn run_future(
        this: &Arc<Self>,
        key: Key,
        id: u64,
        locked: Option<FencingToken>,
        run: Arc<RunHandle>,
        flight: Arc<Flight>,
        prev_ended: Option<Arc<RunHandle>>,
    ) -> RunFuture {
        RunFuture {
            fin: Finisher {
                ctrl: Arc::clone(this),
                key,
                id,
                run,
                flight: Some(flight),
            },
            prev_ended,
            waiting: None,
            stage: Stage::WaitPrev,
            locked,
        }
    }

    /// `Inner::lock` without a coordinator, for a run that did not take the key's lock at
    /// admission: `try_lock_key` / `lock_key` on the key's entry. A waiter registers for the
    /// release under the shard's write lock, and `Finisher::finish` gives the lock back under
    /// the same lock before it wakes the waiters (the protocol of `KeyedLocks` above).
    fn lock(&self, key: &Key, id: u64) -> Option<HeldLock> {
        loop {
            let notified = {
                let mut shard = self.keys.write().unwrap(); // inner.keys.entry(rk.clone())
                let e = shard.entry(*key).or_default();
                match &mut e.lock {
                    None => {
                        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
                        e.lock = Some(KeyHeld {
                            token,
                            owner: id,
                            waiters: None,
                        });
                        return Some(token);
                    }
                    Some(held) => {
                        if self.lock_wait == LockWait::Zero {
                            return None; // `Busy`
                        }
                        let notify = held.waiters.get_or_insert_with(Default::default);
                        let mut n = Arc::clone(notify).notified_owned();
                        n.enable();
                        n
                    }
                }
            }; // shard lock released here
            self.slept.fetch_add(1, StdSeqCst);
            notified.wait();
        }
    }

    /// `tracker.wait()`: joins every task, including ones spawned by finishers.
    fn join_all(&self) {
        loop {
            let next = self.tracker.lock().unwrap().pop();
            match next {
                Some(h) => h.join().unwrap(),
                None => return,
            }
        }
    }
}

/// `struct Lead` (src/controller.rs:1255).
struct Lead {
    run: Option<RunFuture>,
    ctrl: Arc<Controller>,
}

impl Lead {
    /// `impl Future for Lead` (src/controller.rs:1260): the caller polls the run itself.
    fn poll(&mut self, cx: Cx) -> Poll {
        let Some(run) = self.run.as_mut() else {
            return Poll::Ready;
        };
        if run.poll(cx) == Poll::Pending {
            return Poll::Pending;
        }
        self.run = None;
        Poll::Ready
    }
}

/// `impl Drop for Lead` (src/controller.rs:1273).
impl Drop for Lead {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return; // unwinding from a model panic: no more loom operations (see the header)
        }
        if let Some(run) = self.run.take() {
            match run.stage {
                Stage::WaitPrev => &self.ctrl.probe.gave_up_waiting,
                _ => &self.ctrl.probe.gave_up_in_body,
            }
            .fetch_add(1, StdSeqCst);
            if self.ctrl.bugs.lead_drop_drops_run {
                // BUG: the run is dropped; its `Finisher` ends it as cancelled.
                drop(run);
            } else {
                // src/controller.rs:1279 `self.tracker.task_tracker().spawn_on(run, &rt)`
                self.ctrl.spawn(run);
            }
        }
    }
}

/// Where the run future is suspended.
enum Stage {
    /// `if let Some(prev) = prev_ended { prev.wait_ended().await }` (src/controller.rs:1487).
    WaitPrev,
    /// 3. lock (`Inner::pipeline`, src/controller.rs:1666).
    Lock,
    /// 5. attempts: the job body runs holding the lock; `entered` once it has started.
    Body {
        held: HeldLock,
        entered: bool,
    },
    Done,
}

/// The boxed run future of `Inner::run_future` (src/controller.rs:1458-1511).
struct RunFuture {
    fin: Finisher,
    prev_ended: Option<Arc<RunHandle>>,
    /// The `Notified` pinned inside `wait_ended` while it is pending.
    waiting: Option<Notified<EndedOf>>,
    stage: Stage,
    /// The key's lock, if admission took it with the slot.
    locked: Option<FencingToken>,
}

impl RunFuture {
    /// Polls the run: to its end (`ToEnd`) or to its first `Pending` (`Once`).
    fn poll(&mut self, cx: Cx) -> Poll {
        let ctrl = Arc::clone(&self.fin.ctrl);
        loop {
            match &mut self.stage {
                Stage::WaitPrev => {
                    if let Some(prev) = &self.prev_ended
                        && wait_ended(prev, &mut self.waiting, cx, ctrl.bugs) == Poll::Pending
                    {
                        return Poll::Pending;
                    }
                    self.stage = Stage::Lock;
                }
                // `Inner::pipeline` (src/controller.rs:1648): 3. lock
                Stage::Lock => match self
                    .locked
                    .or_else(|| ctrl.lock(&self.fin.key, self.fin.id))
                {
                    Some(held) => {
                        self.stage = Stage::Body {
                            held,
                            entered: false,
                        }
                    }
                    None => {
                        // `Err(JobError::Busy)` becomes the run's result.
                        self.stage = Stage::Done;
                        let out = self.output(true);
                        self.fin.finish(out); // src/controller.rs:1509
                        return Poll::Ready;
                    }
                },
                // 5. attempts: the job body
                Stage::Body { held, entered } => {
                    if !*entered {
                        *entered = true;
                        ctrl.probe.enter(*held);
                        ctrl.probe.body_start();
                        if ctrl.pends {
                            // The attempt does not finish at its first poll: `run_attempt`
                            // (src/budget.rs:201) polls `outer.cancelled()`, which makes the
                            // run's token (src/budget.rs:77-81).
                            let signal = &self.fin.run.signal;
                            if !signal.is_cancelled() {
                                signal.token();
                            }
                            if cx == Cx::Once {
                                return Poll::Pending;
                            }
                        }
                        thread::yield_now(); // let others try while the body holds the lock
                    }
                    ctrl.probe.body_end(self.fin.flight.as_ref().unwrap().no);
                    ctrl.probe.exit();
                    // `self.unlock(held)` does nothing for the key's lock: `finish` gives it
                    // back with the slot.
                    self.stage = Stage::Done;
                    let out = self.output(false);
                    self.fin.finish(out); // src/controller.rs:1509
                    return Poll::Ready;
                }
                Stage::Done => return Poll::Ready,
            }
        }
    }

    fn output(&self, busy: bool) -> Arc<Output> {
        Arc::new(Output {
            flight: self.fin.flight.as_ref().unwrap().no,
            run: self.fin.id,
            busy,
            dropped: false,
        })
    }
}

/// Dropping the run future mid-run: the pipeline's locals (the job body, the held lock) go
/// first, then the captured `Finisher`, whose `Drop` ends the run as cancelled.
impl Drop for RunFuture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return; // unwinding from a model panic: no more loom operations (see the header)
        }
        if let Stage::Body { entered, .. } = std::mem::replace(&mut self.stage, Stage::Done)
            && entered
        {
            // The key's lock is given back by the `Finisher`'s drop, with the slot.
            self.fin.ctrl.probe.body_dropped();
            self.fin.ctrl.probe.exit();
        }
    }
}

/// `RunHandle::wait_ended` (src/controller.rs:446) as a pollable future: `waiting` is its
/// pinned `Notified`, kept while it is pending (and moved with the run if it is handed off).
fn wait_ended(
    prev: &Arc<RunHandle>,
    waiting: &mut Option<Notified<EndedOf>>,
    cx: Cx,
    bugs: Bugs,
) -> Poll {
    loop {
        if let Some(n) = waiting.take() {
            // `n.await`: woken by `end`'s `notify_waiters`.
            n.wait();
        }
        if bugs.ended_check_before_register {
            // BUG: an `end` between this look and the registration below is missed.
            if prev.ended.load(Ordering::Acquire) {
                return Poll::Ready;
            }
            let mut n = notified_on(EndedOf(Arc::clone(prev)));
            n.enable();
            *waiting = Some(n);
        } else {
            // src/controller.rs, `wait_ended`
            let mut n = notified_on(EndedOf(Arc::clone(prev)));
            n.enable();
            prev.awaited.store(true, Ordering::Relaxed);
            if !bugs.ended_without_fences {
                fence(Ordering::SeqCst);
            }
            if prev.ended.load(Ordering::Acquire) {
                return Poll::Ready;
            }
            *waiting = Some(n);
        }
        if cx == Cx::Once {
            return Poll::Pending;
        }
    }
}

/// `struct Finisher` (src/controller.rs:1158).
struct Finisher {
    ctrl: Arc<Controller>,
    key: Key,
    id: u64,
    run: Arc<RunHandle>,
    flight: Option<Arc<Flight>>,
}

impl Finisher {
    /// src/controller.rs:1168
    fn finish(&mut self, result: Arc<Output>) {
        let Some(flight) = self.flight.take() else {
            return;
        };
        let bugs = self.ctrl.bugs;
        if bugs.finish_publishes_first {
            // BUG (the order before 1592426): published while the slot still leads to it.
            flight.complete(Arc::clone(&result));
        }
        let me = self.id;
        let key = self.key;
        // BUG variant: whether the slot can go is looked at in a section of its own.
        let looked = bugs.finish_check_then_remove.then(|| {
            self.ctrl
                .keys
                .read()
                .unwrap()
                .get(&key)
                .and_then(|e| e.slot.as_ref())
                .is_some_and(|s| s.id == me && s.queued.is_none())
        });
        // src/controller.rs, `Finisher::finish`: `inner.keys.get_mut(&self.rk)`, one section.
        let (removed, waiters, next) = {
            let mut shard = self.ctrl.keys.write().unwrap();
            let e = shard
                .get_mut(&key)
                .expect("the entry of a key with a live run is never removed");
            // The run's lock, if it holds the key's: given back in the same section.
            let waiters =
                if !bugs.finish_keeps_lock && e.lock.as_ref().is_some_and(|h| h.owner == me) {
                    e.lock.take().and_then(|h| h.waiters)
                } else {
                    None
                };
            let mine = e
                .slot
                .as_ref()
                .is_some_and(|s| bugs.finish_ignores_id || s.id == me);
            let goes = match looked {
                Some(removable) => removable,
                None => mine && e.slot.as_ref().is_some_and(|s| s.queued.is_none()),
            };
            let (removed, next) = if goes {
                (e.slot.take(), None)
            } else {
                match e.slot.as_mut() {
                    // Promote the queued run.
                    Some(slot) if slot.id == me => (
                        None,
                        slot.queued.take().and_then(|mut q| {
                            let id = self.ctrl.next_run.fetch_add(1, Ordering::Relaxed);
                            let run = RunHandle::new(&self.ctrl.probe, bugs);
                            slot.id = id;
                            slot.run = Arc::clone(&run);
                            slot.flight = Arc::clone(&q.flight);
                            q.start.take().map(|s| (s, id, run))
                        }),
                    ),
                    // Model invariants: a live run's slot is never gone; if it is not this
                    // run's any more, a later run (Replace) took it over.
                    Some(slot) => {
                        assert!(slot.id > me, "slot went back to an older run");
                        (None, None)
                    }
                    None => panic!("slot of a live run was removed by another run"),
                }
            };
            if e.slot.is_none() && e.lock.is_none() {
                shard.remove(&key); // stands for the thread's later `retire`
            }
            (removed, waiters, next)
        }; // the removed slot is dropped outside the shard lock
        drop(removed);
        if let Some(n) = waiters {
            n.notify_waiters();
        }
        if !bugs.finish_publishes_first {
            flight.complete(result);
        }
        self.run.end();
        if let Some((start, id, run)) = next {
            start(id, run);
        }
    }
}

/// `impl Drop for Finisher` (src/controller.rs:1209): ends a run that never finished as
/// cancelled.
impl Drop for Finisher {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return; // unwinding from a model panic: no more loom operations (see the header)
        }
        if let Some(flight) = &self.flight {
            self.ctrl.probe.dropped_runs.fetch_add(1, StdSeqCst);
            let out = Arc::new(Output {
                flight: flight.no,
                run: self.id,
                busy: false,
                dropped: true,
            });
            self.finish(out);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lock tests
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Acq {
    /// `acquire` (waits).
    Wait,
    /// `try_acquire` (owned guard).
    Try,
    /// `try_lock` (borrowing guard, as a run takes it).
    TryLock,
}

/// Every thread takes the key (waiting or trying once), does the fenced critical section and
/// releases. Checks: mutual exclusion, race-free critical sections, strictly increasing fencing
/// tokens, no lost wake-up (else loom: deadlock), no entry left behind.
fn lock_scenario(plan: &'static [Acq], bugs: Bugs, slept: &'static StdAtomicUsize) {
    let locks = Arc::new(KeyedLocks::new(bugs));
    let probe = Arc::new(Probe::default());
    let one = |locks: &Arc<KeyedLocks>, probe: &Probe, how: Acq| -> bool {
        match how {
            Acq::Wait => {
                let g = locks.acquire(KEY);
                probe.critical_section(g.token());
                true
            }
            Acq::Try => match locks.try_acquire(KEY) {
                Some(g) => {
                    probe.critical_section(g.token());
                    true
                }
                None => false,
            },
            Acq::TryLock => {
                let key = KEY;
                match locks.try_lock(&key) {
                    Some(g) => {
                        probe.critical_section(g.token());
                        true
                    }
                    None => false,
                }
            }
        }
    };
    let handles: Vec<_> = plan[1..]
        .iter()
        .map(|&how| {
            let (locks, probe) = (Arc::clone(&locks), Arc::clone(&probe));
            thread::spawn(move || one(&locks, &probe, how))
        })
        .collect();
    let mut got = usize::from(one(&locks, &probe, plan[0]));
    for h in handles {
        got += usize::from(h.join().unwrap());
    }
    slept.fetch_add(locks.slept.load(StdSeqCst), StdSeqCst);
    let waiting = plan.iter().filter(|a| matches!(a, Acq::Wait)).count();
    assert!(got >= waiting, "a waiting acquirer did not get the lock");
    assert_eq!(locks.len(), 0, "lock entry leaked");
    let tokens = probe.tokens();
    assert_eq!(tokens.len(), got);
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
}

#[test]
fn lock_three_waiters() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SLEPT: StdAtomicUsize = StdAtomicUsize::new(0);
    check("lock_three_waiters", &ITER, || {
        lock_scenario(&[Acq::Wait, Acq::Wait, Acq::Wait], Bugs::default(), &SLEPT)
    });
    assert!(
        SLEPT.load(StdSeqCst) > 0,
        "no interleaving made a waiter sleep"
    );
}

#[test]
fn lock_waiters_and_try_acquire() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SLEPT: StdAtomicUsize = StdAtomicUsize::new(0);
    check("lock_waiters_and_try_acquire", &ITER, || {
        lock_scenario(&[Acq::Wait, Acq::Try, Acq::Wait], Bugs::default(), &SLEPT)
    });
    assert!(
        SLEPT.load(StdSeqCst) > 0,
        "no interleaving made a waiter sleep"
    );
}

#[test]
fn lock_waiters_and_try_lock() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SLEPT: StdAtomicUsize = StdAtomicUsize::new(0);
    check("lock_waiters_and_try_lock", &ITER, || {
        lock_scenario(
            &[Acq::TryLock, Acq::Wait, Acq::Wait],
            Bugs::default(),
            &SLEPT,
        )
    });
    assert!(
        SLEPT.load(StdSeqCst) > 0,
        "no interleaving made a waiter sleep"
    );
}

#[test]
#[should_panic(expected = "deadlock")]
fn broken_lock_register_after_unlock_loses_wakeup() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SLEPT: StdAtomicUsize = StdAtomicUsize::new(0);
    let bugs = Bugs {
        lock_register_after_unlock: true,
        ..Bugs::default()
    };
    check("broken_lock_register_after_unlock", &ITER, move || {
        lock_scenario(&[Acq::Wait, Acq::Wait], bugs, &SLEPT)
    });
}

#[test]
#[should_panic(expected = "deadlock")]
fn broken_lock_notify_before_remove_loses_wakeup() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SLEPT: StdAtomicUsize = StdAtomicUsize::new(0);
    let bugs = Bugs {
        lock_notify_before_remove: true,
        ..Bugs::default()
    };
    check("broken_lock_notify_before_remove", &ITER, move || {
        lock_scenario(&[Acq::Wait, Acq::Wait], bugs, &SLEPT)
    });
}

// ---------------------------------------------------------------------------------------------
// Flight and RunSignal tests
// ---------------------------------------------------------------------------------------------

/// Two waiters and a completer: both get the one (pointer-equal) value.
fn flight_scenario(bugs: Bugs) {
    let probe = Probe::default();
    let flight = Flight::new(&probe, bugs);
    let waiter = {
        let f = Arc::clone(&flight);
        thread::spawn(move || f.wait())
    };
    let completer = {
        let f = Arc::clone(&flight);
        thread::spawn(move || {
            f.complete(Arc::new(Output {
                flight: 0,
                run: 1,
                busy: false,
                dropped: false,
            }))
        })
    };
    let a = flight.wait();
    completer.join().unwrap();
    let b = waiter.join().unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(
        *a,
        Output {
            flight: 0,
            run: 1,
            busy: false,
            dropped: false,
        }
    );
}

#[test]
fn flight_complete_wakes_every_waiter() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    check("flight_complete_wakes_every_waiter", &ITER, || {
        flight_scenario(Bugs::default())
    });
}

#[test]
#[should_panic(expected = "deadlock")]
fn broken_flight_without_fences_loses_wakeup() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    let bugs = Bugs {
        flight_without_fences: true,
        ..Bugs::default()
    };
    check("broken_flight_without_fences", &ITER, move || {
        flight_scenario(bugs)
    });
}

#[test]
#[should_panic(expected = "deadlock")]
fn broken_flight_check_before_register_loses_wakeup() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    let bugs = Bugs {
        flight_check_before_register: true,
        ..Bugs::default()
    };
    check("broken_flight_check_before_register", &ITER, move || {
        flight_scenario(bugs)
    });
}

/// A run waiting on its cancellation (`RunSignal::cancelled`, which makes the token lazily)
/// while a replacing caller cancels it: the waiter always wakes, and the token ends cancelled.
fn signal_scenario(bugs: Bugs) {
    let signal = Arc::new(RunSignal::new(bugs));
    let canceller = {
        let s = Arc::clone(&signal);
        thread::spawn(move || s.cancel(REPLACED))
    };
    signal.cancelled();
    canceller.join().unwrap();
    assert!(signal.is_cancelled());
    if let Some(t) = signal.token_get() {
        assert!(t.is_cancelled(), "the run's token missed its cancellation");
    }
}

#[test]
fn signal_cancel_reaches_lazily_made_token() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    check("signal_cancel_reaches_lazily_made_token", &ITER, || {
        signal_scenario(Bugs::default())
    });
}

#[test]
#[should_panic(expected = "deadlock")]
fn broken_signal_without_fences_loses_cancellation() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    let bugs = Bugs {
        signal_without_fences: true,
        ..Bugs::default()
    };
    check("broken_signal_without_fences", &ITER, move || {
        signal_scenario(bugs)
    });
}

// ---------------------------------------------------------------------------------------------
// Single-flight tests (controller slots + flights + locks together)
// ---------------------------------------------------------------------------------------------

/// Callers of one key with the given plans; returns how many flights were created (each must
/// have run its body once).
///
/// Checks: no run was dropped (a leader giving up hands it off) and no queued run was dropped
/// unstarted; no cancelled run's token missed its cancellation; every caller that did not give
/// up gets the value of the flight it joined, pointer-equal across that flight's callers;
/// every flight's body ran exactly once and never two at once (in `Probe`); no run ever found
/// the key's lock held by another run of the same controller (with the default `lock_wait` of
/// zero that would surface as a spurious `Busy`, with a wait as a sleep): the in-flight slot
/// alone keeps runs of a key apart; no slot and no lock entry left behind once every task is
/// done; and (at every join) no stale join.
fn flight_scenario_ctrl(
    plan: &'static [Call],
    lock_wait: LockWait,
    pends: bool,
    bugs: Bugs,
) -> Outcome {
    let ctrl = Controller::new(lock_wait, pends, bugs);
    let handles: Vec<_> = plan[1..]
        .iter()
        .map(|&call| {
            let c = Arc::clone(&ctrl);
            thread::spawn(move || c.start(KEY, call))
        })
        .collect();
    let mut got = vec![ctrl.start(KEY, plan[0])];
    for h in handles {
        got.push(h.join().unwrap());
    }
    ctrl.join_all();

    let probe = &ctrl.probe;
    assert_eq!(
        probe.dropped_runs.load(StdSeqCst),
        0,
        "a run was dropped before it finished (its leader gave up and nobody took it over)"
    );
    assert_eq!(
        probe.queued_dropped.load(StdSeqCst),
        0,
        "a queued run was dropped without being started"
    );
    for run in probe.runs.lock().unwrap().iter() {
        if run.signal.is_cancelled()
            && let Some(t) = run.signal.token_get()
        {
            assert!(
                t.is_cancelled(),
                "a cancelled run's token was never cancelled"
            );
        }
    }
    assert!(
        ctrl.keys.read().unwrap().values().all(|e| e.lock.is_none()),
        "a run's lock was never given back"
    );
    let got: Vec<_> = got.into_iter().flatten().collect();
    for (joined, value) in &got {
        assert_eq!(value.flight, *joined, "a caller got another flight's value");
        assert!(
            !value.busy,
            "a run was Busy on its own controller's lock: {value:?}"
        );
    }
    for (i, (fa, a)) in got.iter().enumerate() {
        for (fb, b) in &got[i + 1..] {
            assert_eq!(fa == fb, Arc::ptr_eq(a, b), "one flight, one shared value");
        }
    }
    let created = probe.flights_created.load(StdSeqCst);
    let bodies = probe.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), created, "a flight never ran: {bodies:?}");
    assert!(bodies.values().all(|&n| n == 1), "{bodies:?}");
    assert!(
        ctrl.keys.read().unwrap().is_empty(),
        "key entry leaked (a slot or a lock left behind)"
    );
    assert_eq!(
        ctrl.slept.load(StdSeqCst),
        0,
        "a run waited for its own controller's lock"
    );
    let tokens = probe.tokens();
    assert_eq!(tokens.len(), created);
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    Outcome {
        flights: created,
        gave_up_waiting: probe.gave_up_waiting.load(StdSeqCst),
        gave_up_in_body: probe.gave_up_in_body.load(StdSeqCst),
    }
}

/// What one interleaving of a controller scenario did.
struct Outcome {
    /// Flights created (each ran its body once).
    flights: usize,
    /// Leaders that gave up while waiting for the replaced run to end / inside the body.
    gave_up_waiting: usize,
    gave_up_in_body: usize,
}

/// Records which body counts were reached, to show both outcomes are explored.
fn seen(set: &StdMutex<Vec<usize>>, n: usize) {
    let mut s = set.lock().unwrap();
    if !s.contains(&n) {
        s.push(n);
    }
}

fn sorted(set: &StdMutex<Vec<usize>>) -> Vec<usize> {
    let mut s = set.lock().unwrap().clone();
    s.sort();
    s
}

#[test]
fn single_flight_coalesce_two_callers() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SEEN: StdMutex<Vec<usize>> = StdMutex::new(Vec::new());
    check("single_flight_coalesce_two_callers", &ITER, || {
        let n = flight_scenario_ctrl(&[C, C], LockWait::Zero, false, Bugs::default()).flights;
        seen(&SEEN, n);
    });
    assert_eq!(
        sorted(&SEEN),
        [1, 2],
        "joined once, and started anew after the slot was removed"
    );
}

#[test]
fn single_flight_coalesce_three_callers() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SEEN: StdMutex<Vec<usize>> = StdMutex::new(Vec::new());
    check("single_flight_coalesce_three_callers", &ITER, || {
        let n = flight_scenario_ctrl(&[C, C, C], LockWait::Wait, false, Bugs::default()).flights;
        seen(&SEEN, n);
    });
    let s = sorted(&SEEN);
    assert_eq!(s.first(), Some(&1));
    assert!(s.len() >= 2, "only {s:?} bodies ever ran");
}

#[test]
fn single_flight_coalesce_leader_gives_up() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SEEN: StdMutex<Vec<usize>> = StdMutex::new(Vec::new());
    static IN_BODY: StdAtomicUsize = StdAtomicUsize::new(0);
    check("single_flight_coalesce_leader_gives_up", &ITER, || {
        let o = flight_scenario_ctrl(&[C_GIVES_UP, C], LockWait::Zero, true, Bugs::default());
        // The caller that gives up may have joined instead (then it waits: not modelled).
        assert!(o.gave_up_waiting + o.gave_up_in_body <= 1);
        IN_BODY.fetch_add(o.gave_up_in_body, StdSeqCst);
        seen(&SEEN, o.flights);
    });
    assert!(
        IN_BODY.load(StdSeqCst) > 0,
        "no leader gave up inside the body"
    );
    assert_eq!(
        sorted(&SEEN),
        [1, 2],
        "joined the handed-off run once, and started anew after it"
    );
}

#[test]
fn single_flight_queue_one_promotes() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SEEN: StdMutex<Vec<usize>> = StdMutex::new(Vec::new());
    check("single_flight_queue_one_promotes", &ITER, || {
        let n = flight_scenario_ctrl(&[Q, Q], LockWait::Zero, false, Bugs::default()).flights;
        seen(&SEEN, n);
    });
    // Always two runs: queued behind the first, or started after it.
    assert_eq!(*SEEN.lock().unwrap(), [2]);
}

#[test]
fn single_flight_queue_one_three_callers() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SEEN: StdMutex<Vec<usize>> = StdMutex::new(Vec::new());
    check("single_flight_queue_one_three_callers", &ITER, || {
        let n = flight_scenario_ctrl(&[Q, Q, Q], LockWait::Wait, false, Bugs::default()).flights;
        seen(&SEEN, n);
    });
    // Two callers sharing the queued run gives 2 bodies for 3 callers.
    assert!(SEEN.lock().unwrap().contains(&2));
}

#[test]
fn single_flight_queue_one_leader_gives_up() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SEEN: StdMutex<Vec<usize>> = StdMutex::new(Vec::new());
    static IN_BODY: StdAtomicUsize = StdAtomicUsize::new(0);
    check("single_flight_queue_one_leader_gives_up", &ITER, || {
        let o = flight_scenario_ctrl(&[Q_GIVES_UP, Q], LockWait::Zero, true, Bugs::default());
        IN_BODY.fetch_add(o.gave_up_in_body, StdSeqCst);
        seen(&SEEN, o.flights);
    });
    // Always two runs (the handed-off run promotes the queued one from its task, or the
    // second caller starts after it).
    assert_eq!(*SEEN.lock().unwrap(), [2]);
    assert!(
        IN_BODY.load(StdSeqCst) > 0,
        "no leader gave up inside the body"
    );
}

#[test]
fn single_flight_replace_waits_for_previous_run() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SEEN: StdMutex<Vec<usize>> = StdMutex::new(Vec::new());
    check(
        "single_flight_replace_waits_for_previous_run",
        &ITER,
        || {
            let n = flight_scenario_ctrl(&[R, R], LockWait::Zero, true, Bugs::default()).flights;
            seen(&SEEN, n);
        },
    );
    assert_eq!(*SEEN.lock().unwrap(), [2]);
}

#[test]
fn single_flight_replace_three_callers() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SEEN: StdMutex<Vec<usize>> = StdMutex::new(Vec::new());
    check("single_flight_replace_three_callers", &ITER, || {
        let n = flight_scenario_ctrl(&[R, R, R], LockWait::Zero, true, Bugs::default()).flights;
        seen(&SEEN, n);
    });
    assert_eq!(*SEEN.lock().unwrap(), [3]);
}

#[test]
fn single_flight_replace_leader_gives_up() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SEEN: StdMutex<Vec<usize>> = StdMutex::new(Vec::new());
    static WAITING: StdAtomicUsize = StdAtomicUsize::new(0);
    static IN_BODY: StdAtomicUsize = StdAtomicUsize::new(0);
    check("single_flight_replace_leader_gives_up", &ITER, || {
        let o = flight_scenario_ctrl(&[R, R_GIVES_UP], LockWait::Zero, true, Bugs::default());
        WAITING.fetch_add(o.gave_up_waiting, StdSeqCst);
        IN_BODY.fetch_add(o.gave_up_in_body, StdSeqCst);
        seen(&SEEN, o.flights);
    });
    assert_eq!(*SEEN.lock().unwrap(), [2]);
    assert!(
        WAITING.load(StdSeqCst) > 0,
        "no leader gave up while waiting for the replaced run to end"
    );
    assert!(
        IN_BODY.load(StdSeqCst) > 0,
        "no leader gave up inside the body"
    );
}

#[test]
#[should_panic(expected = "a run's lock was never given back")]
fn broken_finish_keeping_the_lock_leaks_it() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    let bugs = Bugs {
        finish_keeps_lock: true,
        ..Bugs::default()
    };
    check("broken_finish_keeping_the_lock", &ITER, move || {
        flight_scenario_ctrl(&[C, C], LockWait::Zero, false, bugs);
    });
}

#[test]
#[should_panic(expected = "slot of a live run was removed")]
fn broken_finish_without_id_check_removes_successors_slot() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    let bugs = Bugs {
        finish_ignores_id: true,
        ..Bugs::default()
    };
    check("broken_finish_without_id_check", &ITER, move || {
        flight_scenario_ctrl(&[R, R], LockWait::Zero, true, bugs);
    });
}

#[test]
#[should_panic(expected = "a queued run was dropped without being started")]
fn broken_finish_check_then_remove_drops_queued_run() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    let bugs = Bugs {
        finish_check_then_remove: true,
        ..Bugs::default()
    };
    check("broken_finish_check_then_remove", &ITER, move || {
        flight_scenario_ctrl(&[Q, Q], LockWait::Zero, false, bugs);
    });
}

#[test]
#[should_panic(expected = "stale join")]
fn broken_finish_publishing_first_lets_a_caller_join_an_ended_run() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    let bugs = Bugs {
        finish_publishes_first: true,
        ..Bugs::default()
    };
    check("broken_finish_publishes_first", &ITER, move || {
        flight_scenario_ctrl(&[C, C], LockWait::Zero, false, bugs);
    });
}

#[test]
#[should_panic(expected = "a run was dropped before it finished")]
fn broken_lead_drop_drops_run_instead_of_handing_it_off() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    let bugs = Bugs {
        lead_drop_drops_run: true,
        ..Bugs::default()
    };
    check("broken_lead_drop_drops_run", &ITER, move || {
        flight_scenario_ctrl(&[C_GIVES_UP, C], LockWait::Zero, true, bugs);
    });
}

#[test]
#[should_panic(expected = "deadlock")]
fn broken_wait_ended_without_fences_loses_wakeup() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    let bugs = Bugs {
        ended_without_fences: true,
        ..Bugs::default()
    };
    check("broken_wait_ended_without_fences", &ITER, move || {
        flight_scenario_ctrl(&[R, R], LockWait::Zero, true, bugs);
    });
}

#[test]
#[should_panic(expected = "deadlock")]
fn broken_wait_ended_check_before_register_loses_wakeup() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    let bugs = Bugs {
        ended_check_before_register: true,
        ..Bugs::default()
    };
    check(
        "broken_wait_ended_check_before_register",
        &ITER,
        move || {
            flight_scenario_ctrl(&[R, R], LockWait::Zero, true, bugs);
        },
    );
}

#[test]
#[should_panic(expected = "a cancelled run's token was never cancelled")]
fn broken_signal_without_fences_in_replace_loses_cancellation() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    let bugs = Bugs {
        signal_without_fences: true,
        ..Bugs::default()
    };
    check(
        "broken_signal_without_fences_in_replace",
        &ITER,
        move || {
            flight_scenario_ctrl(&[R, R], LockWait::Zero, true, bugs);
        },
    );
}
