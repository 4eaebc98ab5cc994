#![cfg(loom)]
//! Loom model of the per-key lock and single-flight state machine.
//!
//! Loom cannot look inside `DashMap` or `tokio::sync::Notify`, so this file re-states the same
//! protocol with loom primitives and lets loom explore its interleavings:
//!
//! | real                                   | model                                               |
//! |----------------------------------------|-----------------------------------------------------|
//! | `DashMap<K, V>` (one shard)            | `loom::sync::Mutex<HashMap<K, V>>`; `entry()` / `remove_if` == holding the shard lock |
//! | `tokio::sync::Notify::notify_waiters`  | [`Notify`]: a call counter under a loom `Mutex` + loom `Condvar` |
//! | `Notify::notified()` / `enable()`      | [`Notify::notified`] snapshots the counter: a waiter that registered before `notify_waiters` is woken, one that registers after is not |
//! | fencing counter `AtomicU64` (Relaxed)  | loom `AtomicU64`, same ordering                     |
//! | `Flight { OnceLock, Notify }`          | [`Flight`]: `Mutex<Option<..>>` + [`Notify`]        |
//! | `CancellationToken` (`RunHandle::ended`) | [`Event`]: `Mutex<bool>` + [`Notify`]             |
//! | `TaskTracker::spawn`                   | `loom::thread::spawn` (or inline, see [`Launch`])   |
//!
//! Function names follow the real code (`try_acquire`, `acquire`, `release`, `complete`, `wait`,
//! `start` (lead / join), `launch`, `pipeline`, `finish`), with the real lines cited (as of commit
//! 14e955f), so the two can be compared side by side.
//!
//! Checked, for every interleaving within the preemption bound:
//! - mutual exclusion: never two holders of one key (holder count, and loom's race detector on
//!   the resource the lock protects);
//! - fencing tokens strictly increase across successive holders of a key;
//! - no lost wake-up: a waiter always gets the lock / result after release / completion (else
//!   every thread ends up blocked and loom panics with "deadlock");
//! - no leaked entry: lock map and in-flight map are empty once every thread and task is done;
//! - single-flight: each flight's body runs exactly once, never two bodies of a key at once,
//!   every caller gets its flight's (pointer-equal) value, a caller arriving after the slot is
//!   gone starts a new flight (both outcomes are asserted to be reached), a queued run is
//!   promoted, a replacing run waits for the one it replaced, and no run of a controller is
//!   ever `Busy` on its own key lock (the slot alone keeps runs apart).
//!
//! Deliberate bugs are switched on through [`Bugs`]; a `#[should_panic]` test per bug proves the
//! model catches it.
//!
//! `Arc` is `std::sync::Arc`, as in the real code. (loom's `Arc` would add a leak check, but its
//! `drop` panics while a thread unwinds from loom's "deadlock" panic, which aborts the process
//! instead of failing the test, so the lost-wake-up tests below could not be `#[should_panic]`.
//! Leaks that matter here, entries left in the maps, are asserted directly.)
//!
//! Test-only bookkeeping ([`Probe`]) uses `std` atomics/mutexes on purpose: they are invisible to
//! loom, so they add no happens-before edges (which could hide a bug) and no schedule points.
//! The protected "downstream resource" is a loom `UnsafeCell`, so loom also reports any two
//! lock holders whose critical sections are not ordered by happens-before (a data race).
//!
//! Not modelled: lock-wait timeouts (a timed-out waiter only drops its `Notified`), cancellation
//! of callers (a dropped `wait()` affects nobody else), `Finisher`'s drop path (same `finish`),
//! mixing `QueueOne` with `Replace` on one key, and the coordinator (lease) lock backend.
//!
//! Run: `.ci/loom.sh` (see there for the exact command and bounds).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicUsize as StdAtomicUsize, Ordering::SeqCst as StdSeqCst};

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::{Condvar, Mutex};
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
    /// `Finisher::finish`: remove the slot without checking that it is still this run's.
    finish_ignores_id: bool,
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

/// A registered waiter (`Notified<'_>` / `OwnedNotified`).
struct Notified<N: std::ops::Deref<Target = Notify>> {
    notify: N,
    seen: u64,
}

impl Notify {
    /// `Notify::notified()`.
    fn notified(&self) -> Notified<&Notify> {
        let seen = *self.calls.lock().unwrap();
        Notified { notify: self, seen }
    }

    /// `Notify::notified_owned()`.
    fn notified_owned(self: Arc<Self>) -> Notified<Arc<Notify>> {
        let seen = *self.calls.lock().unwrap();
        Notified { notify: self, seen }
    }

    /// `Notify::notify_waiters()`: wakes every `Notified` created before this call.
    fn notify_waiters(&self) {
        *self.calls.lock().unwrap() += 1;
        self.cv.notify_all();
    }
}

impl<N: std::ops::Deref<Target = Notify>> Notified<N> {
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
    /// Flight number -> times its body ran.
    bodies: StdMutex<HashMap<u64, usize>>,
    /// Flights created.
    flights_created: StdAtomicUsize,
}

// SAFETY: `downstream` is only touched by the holder of the modelled lock (and by the main
// thread after every other thread was joined); that exclusive access is exactly what the model
// checks, and loom's `UnsafeCell` reports any access not ordered by happens-before.
unsafe impl Sync for Probe {}

impl Probe {
    /// The critical section of a lock holder: the fencing check a downstream system would do.
    fn critical_section(&self, token: FencingToken) {
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
        thread::yield_now(); // let others try while we hold the lock
        assert_eq!(self.holders.fetch_sub(1, StdSeqCst), 1);
    }

    fn tokens(&self) -> Vec<FencingToken> {
        // SAFETY: called after every thread was joined.
        self.downstream.with(|d| unsafe { (*d).clone() })
    }

    fn body(&self, flight_no: u64) {
        assert_eq!(
            self.bodies_running.fetch_add(1, StdSeqCst),
            0,
            "two runs of one key at once"
        );
        {
            let mut b = self.bodies.lock().unwrap();
            let n = b.entry(flight_no).or_default();
            *n += 1;
            assert_eq!(*n, 1, "flight {flight_no} ran its body twice");
        }
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
    /// Times a waiter went to sleep (coverage; std, invisible to loom).
    slept: &'static StdAtomicUsize,
}

/// `struct KeyGuard` (src/lock.rs:190): releases on drop.
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

/// `impl Drop for KeyGuard` (src/lock.rs:216).
impl Drop for KeyGuard {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.locks.release(&key, self.token);
        }
    }
}

impl KeyedLocks {
    fn new(bugs: Bugs, slept: &'static StdAtomicUsize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1), // src/lock.rs:80
            bugs,
            slept,
        }
    }

    /// src/lock.rs:85
    fn next_token(&self) -> FencingToken {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// src/lock.rs:91
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

    /// src/lock.rs:111, with an unbounded wait (timeouts are not modelled).
    fn acquire(self: &Arc<Self>, key: Key) -> KeyGuard {
        loop {
            // src/lock.rs:119 `let notified = match self.map.entry(key.clone()) { .. }`
            let notified = {
                let mut shard = self.map.lock().unwrap();
                match shard.entry(key) {
                    Entry::Vacant(v) => {
                        // src/lock.rs:120-131
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
                        // src/lock.rs:138
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
                            // src/lock.rs:141-143: registered while the shard lock is held.
                            let mut n = Arc::clone(notify).notified_owned();
                            n.enable();
                            n
                        }
                    }
                }
            }; // shard lock released here
            self.slept.fetch_add(1, StdSeqCst);
            // src/lock.rs:146 `timeout_at(deadline, notified).await`
            notified.wait();
        }
    }

    /// src/lock.rs:155
    fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    /// src/lock.rs:179
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
}

/// `struct Flight` (src/flight.rs:41).
struct Flight {
    result: Mutex<Option<Arc<Output>>>, // OnceLock<Shared<T>>
    done: Notify,
    /// Identity for the checks (test bookkeeping).
    no: u64,
    bugs: Bugs,
}

impl Flight {
    fn new(probe: &Probe, bugs: Bugs) -> Arc<Self> {
        Arc::new(Self {
            result: Mutex::new(None),
            done: Notify::default(),
            no: probe.flights_created.fetch_add(1, StdSeqCst) as u64,
            bugs,
        })
    }

    /// src/flight.rs:73
    fn complete(&self, result: Arc<Output>) {
        // `self.result.set(result).is_ok()`
        let first = {
            let mut r = self.result.lock().unwrap();
            if r.is_none() {
                *r = Some(result);
                true
            } else {
                false
            }
        };
        if first {
            self.done.notify_waiters();
        }
    }

    /// src/flight.rs:80
    fn peek(&self) -> Option<Arc<Output>> {
        self.result.lock().unwrap().clone()
    }

    /// src/flight.rs:85
    fn wait(&self) -> Arc<Output> {
        loop {
            if self.bugs.flight_check_before_register {
                // BUG: a `complete` between this look and the registration below is missed.
                if let Some(r) = self.peek() {
                    return r;
                }
                let mut notified = self.done.notified();
                notified.enable();
                notified.wait();
                continue;
            }
            let mut notified = self.done.notified();
            notified.enable();
            if let Some(r) = self.peek() {
                return r;
            }
            notified.wait();
        }
    }
}

/// `CancellationToken` as used for `RunHandle::ended`: `cancel()` / `cancelled().await`.
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
// src/controller.rs: in-flight slots, launch, Finisher
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Overlap {
    Coalesce,
    QueueOne,
    Replace,
}

/// Where a run executes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Launch {
    /// A task of its own, as in the real code (`this.tracker.spawn`, src/controller.rs:950).
    Task,
    /// In the thread that launches it (leader, or the finisher promoting a queued run). Loom
    /// allows at most 5 threads, so tests with three callers use this: the run's steps still
    /// interleave with every other caller; only the leader's own `wait`, which then always
    /// finds the result, loses interleavings, and those are the followers' (modelled) path.
    Inline,
}

/// `policy.lock_wait` as seen by `Inner::lock` (src/controller.rs:978).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LockWait {
    /// The default (`Duration::ZERO`): `try_acquire`, `Busy` if taken.
    Zero,
    /// Any positive wait: `acquire` (modelled without a deadline).
    Wait,
}

/// `struct RunHandle` (only `ended`).
struct RunHandle {
    ended: Event,
}

/// `struct Queued` (src/controller.rs:331). The `Starter` closure only captures what
/// `Controller::launch` needs, which the model passes directly.
struct Queued {
    flight: Arc<Flight>,
}

/// `struct Slot` (src/controller.rs:352).
struct Slot {
    id: u64,
    run: Arc<RunHandle>,
    flight: Arc<Flight>,
    queued: Option<Queued>,
}

struct Controller {
    locks: Arc<KeyedLocks>,
    flights: Mutex<HashMap<Key, Slot>>, // one DashMap shard
    next_run: AtomicU64,
    /// `TaskTracker` (std mutex: bookkeeping only, the join at the end is loom-visible).
    tracker: StdMutex<Vec<thread::JoinHandle<()>>>,
    launch: Launch,
    lock_wait: LockWait,
    bugs: Bugs,
    probe: Arc<Probe>,
}

type Launched = (u64, Arc<RunHandle>, Arc<Flight>, Option<Arc<RunHandle>>);

impl Controller {
    fn new(
        launch: Launch,
        lock_wait: LockWait,
        bugs: Bugs,
        slept: &'static StdAtomicUsize,
    ) -> Arc<Self> {
        Arc::new(Self {
            locks: Arc::new(KeyedLocks::new(bugs, slept)),
            flights: Mutex::new(HashMap::new()),
            next_run: AtomicU64::new(1),
            tracker: StdMutex::new(Vec::new()),
            launch,
            lock_wait,
            bugs,
            probe: Arc::new(Probe::default()),
        })
    }

    /// `JobRuntimeController::start`, step "2. in flight?" onwards (src/controller.rs:662-758).
    /// Returns the number of the flight the caller joined or led, and the value it received.
    fn start(self: &Arc<Self>, key: Key, overlap: Overlap) -> (u64, Arc<Output>) {
        let (flight, launch): (Arc<Flight>, Option<Launched>) = {
            let mut shard = self.flights.lock().unwrap(); // inner.flights.entry(rk.clone())
            match shard.entry(key) {
                Entry::Occupied(mut o) => match overlap {
                    // join: src/controller.rs:671
                    Overlap::Coalesce => (Arc::clone(&o.get().flight), None),
                    // src/controller.rs:676
                    Overlap::QueueOne => {
                        let slot = o.get_mut();
                        match &slot.queued {
                            Some(q) => (Arc::clone(&q.flight), None),
                            None => {
                                let flight = Flight::new(&self.probe, self.bugs);
                                slot.queued = Some(Queued {
                                    flight: Arc::clone(&flight),
                                });
                                (flight, None)
                            }
                        }
                    }
                    // src/controller.rs:695
                    Overlap::Replace => {
                        let slot = o.get_mut();
                        let prev = Arc::clone(&slot.run); // slot.run.cancel(..); prev_ended
                        let flight = Flight::new(&self.probe, self.bugs);
                        let run = Arc::new(RunHandle {
                            ended: Event::new(),
                        });
                        let id = self.next_run.fetch_add(1, Ordering::Relaxed);
                        slot.id = id;
                        slot.run = Arc::clone(&run);
                        slot.flight = Arc::clone(&flight);
                        slot.queued = None;
                        (Arc::clone(&flight), Some((id, run, flight, Some(prev))))
                    }
                },
                // lead: src/controller.rs:714-742
                Entry::Vacant(v) => {
                    let flight = Flight::new(&self.probe, self.bugs);
                    let run = Arc::new(RunHandle {
                        ended: Event::new(),
                    });
                    let id = self.next_run.fetch_add(1, Ordering::Relaxed);
                    v.insert(Slot {
                        id,
                        run: Arc::clone(&run),
                        flight: Arc::clone(&flight),
                        queued: None,
                    });
                    (Arc::clone(&flight), Some((id, run, flight, None)))
                }
            }
        }; // shard lock released
        if let Some((id, run, flight, prev)) = launch {
            Controller::launch(self, key, id, run, flight, prev); // src/controller.rs:746
        }
        let out = flight.wait(); // src/controller.rs:758
        (flight.no, out)
    }

    /// `Inner::launch` (src/controller.rs:927).
    fn launch(
        this: &Arc<Self>,
        key: Key,
        id: u64,
        run: Arc<RunHandle>,
        flight: Arc<Flight>,
        prev_ended: Option<Arc<RunHandle>>,
    ) {
        let mut fin = Finisher {
            ctrl: Arc::clone(this),
            key,
            id,
            run,
            flight: Some(flight),
        };
        let task = move || {
            if let Some(prev) = prev_ended {
                prev.ended.cancelled(); // src/controller.rs:952
            }
            let flight_no = fin.flight.as_ref().map(|f| f.no).unwrap();
            let result = fin.ctrl.pipeline(fin.key, fin.id, flight_no);
            fin.finish(result); // src/controller.rs:966
        };
        match this.launch {
            Launch::Task => {
                let h = thread::spawn(task);
                this.tracker.lock().unwrap().push(h);
            }
            Launch::Inline => task(),
        }
    }

    /// `Inner::pipeline` (src/controller.rs:1092): lock, body, unlock.
    fn pipeline(&self, key: Key, id: u64, flight_no: u64) -> Arc<Output> {
        // 3. lock (`Inner::lock`, src/controller.rs:970-997)
        let held = match self.lock_wait {
            LockWait::Zero => self.locks.try_acquire(key),
            LockWait::Wait => Some(self.locks.acquire(key)),
        };
        let Some(held) = held else {
            // `Err(JobError::Busy)` becomes the run's result.
            return Arc::new(Output {
                flight: flight_no,
                run: id,
                busy: true,
            });
        };
        self.probe.critical_section(held.token());
        self.probe.body(flight_no); // 5. attempts: the job body
        drop(held); // self.unlock(held)
        Arc::new(Output {
            flight: flight_no,
            run: id,
            busy: false,
        })
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

/// `struct Finisher` (src/controller.rs:834).
struct Finisher {
    ctrl: Arc<Controller>,
    key: Key,
    id: u64,
    run: Arc<RunHandle>,
    flight: Option<Arc<Flight>>,
}

impl Finisher {
    /// src/controller.rs:844
    fn finish(&mut self, result: Arc<Output>) {
        let Some(flight) = self.flight.take() else {
            return;
        };
        flight.complete(result);
        let ignore_id = self.ctrl.bugs.finish_ignores_id; // BUG when set: skip the id check
        let next = {
            let mut shard = self.ctrl.flights.lock().unwrap(); // inner.flights.entry(..)
            match shard.entry(self.key) {
                Entry::Occupied(mut o) if ignore_id || o.get().id == self.id => {
                    match o.get_mut().queued.take() {
                        // promote the queued run: src/controller.rs:851-859
                        Some(q) => {
                            let id = self.ctrl.next_run.fetch_add(1, Ordering::Relaxed);
                            let run = Arc::new(RunHandle {
                                ended: Event::new(),
                            });
                            let slot = o.get_mut();
                            slot.id = id;
                            slot.run = Arc::clone(&run);
                            slot.flight = Arc::clone(&q.flight);
                            Some((id, run, q.flight))
                        }
                        None => {
                            o.remove();
                            None
                        }
                    }
                }
                // `_ => None`. Model invariant: a live run's slot is never gone; if it is not
                // this run's any more, a later run (Replace) took it over.
                Entry::Occupied(o) => {
                    assert!(o.get().id > self.id, "slot went back to an older run");
                    None
                }
                Entry::Vacant(_) => panic!("slot of a live run was removed by another run"),
            }
        };
        self.run.ended.cancel(); // src/controller.rs:867
        if let Some((id, run, flight)) = next {
            Controller::launch(&self.ctrl, self.key, id, run, flight, None); // start(id, run)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lock tests
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Acq {
    Wait,
    Try,
}

/// Every thread takes the key (waiting or trying once), does the fenced critical section and
/// releases. Checks: mutual exclusion, race-free critical sections, strictly increasing fencing
/// tokens, no lost wake-up (else loom: deadlock), no entry left behind.
fn lock_scenario(plan: &'static [Acq], bugs: Bugs, slept: &'static StdAtomicUsize) {
    let locks = Arc::new(KeyedLocks::new(bugs, slept));
    let probe = Arc::new(Probe::default());
    let one = |locks: &Arc<KeyedLocks>, probe: &Probe, how: Acq| -> bool {
        let guard = match how {
            Acq::Wait => Some(locks.acquire(KEY)),
            Acq::Try => locks.try_acquire(KEY),
        };
        match guard {
            Some(g) => {
                probe.critical_section(g.token());
                true
            }
            None => false,
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
// Flight tests
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
            busy: false
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

// ---------------------------------------------------------------------------------------------
// Single-flight tests (controller slots + flights + locks together)
// ---------------------------------------------------------------------------------------------

/// Callers of one key with the given overlap policies; returns how many bodies ran.
///
/// Checks: every caller gets the value of the flight it joined, pointer-equal across that
/// flight's callers; every flight's body ran exactly once and never two at once (in `Probe`);
/// no run ever found the key's lock held by another run of the same controller (with the
/// default `lock_wait` of zero that would surface as a spurious `Busy`): the in-flight slot
/// alone keeps runs of a key apart; no slot and no lock entry left behind once every task is
/// done.
fn flight_scenario_ctrl(
    plan: &'static [Overlap],
    launch: Launch,
    lock_wait: LockWait,
    bugs: Bugs,
    slept: &'static StdAtomicUsize,
) -> usize {
    let ctrl = Controller::new(launch, lock_wait, bugs, slept);
    let handles: Vec<_> = plan[1..]
        .iter()
        .map(|&overlap| {
            let c = Arc::clone(&ctrl);
            thread::spawn(move || c.start(KEY, overlap))
        })
        .collect();
    let mut got = vec![ctrl.start(KEY, plan[0])];
    for h in handles {
        got.push(h.join().unwrap());
    }
    ctrl.join_all();

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
    let created = ctrl.probe.flights_created.load(StdSeqCst);
    let bodies = ctrl.probe.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), created, "a flight never ran: {bodies:?}");
    assert!(bodies.values().all(|&n| n == 1), "{bodies:?}");
    assert!(
        ctrl.flights.lock().unwrap().is_empty(),
        "in-flight slot leaked"
    );
    assert_eq!(ctrl.locks.len(), 0, "lock entry leaked");
    let tokens = ctrl.probe.tokens();
    assert_eq!(tokens.len(), created);
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    created
}

/// Records which body counts were reached, to show both outcomes are explored.
fn seen(set: &StdMutex<Vec<usize>>, n: usize) {
    let mut s = set.lock().unwrap();
    if !s.contains(&n) {
        s.push(n);
    }
}

#[test]
fn single_flight_coalesce_two_callers_tasks() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SLEPT: StdAtomicUsize = StdAtomicUsize::new(0);
    static SEEN: StdMutex<Vec<usize>> = StdMutex::new(Vec::new());
    check("single_flight_coalesce_two_callers_tasks", &ITER, || {
        let n = flight_scenario_ctrl(
            &[Overlap::Coalesce, Overlap::Coalesce],
            Launch::Task,
            LockWait::Zero,
            Bugs::default(),
            &SLEPT,
        );
        seen(&SEEN, n);
    });
    let mut s = SEEN.lock().unwrap().clone();
    s.sort();
    assert_eq!(
        s,
        [1, 2],
        "joined once, and started anew after the slot was removed"
    );
}

#[test]
fn single_flight_coalesce_three_callers_inline() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SLEPT: StdAtomicUsize = StdAtomicUsize::new(0);
    static SEEN: StdMutex<Vec<usize>> = StdMutex::new(Vec::new());
    check("single_flight_coalesce_three_callers_inline", &ITER, || {
        let n = flight_scenario_ctrl(
            &[Overlap::Coalesce, Overlap::Coalesce, Overlap::Coalesce],
            Launch::Inline,
            LockWait::Wait,
            Bugs::default(),
            &SLEPT,
        );
        seen(&SEEN, n);
    });
    let mut s = SEEN.lock().unwrap().clone();
    s.sort();
    assert_eq!(s.first(), Some(&1));
    assert!(s.len() >= 2, "only {s:?} bodies ever ran");
}

#[test]
fn single_flight_queue_one_promotes_tasks() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SLEPT: StdAtomicUsize = StdAtomicUsize::new(0);
    static SEEN: StdMutex<Vec<usize>> = StdMutex::new(Vec::new());
    check("single_flight_queue_one_promotes_tasks", &ITER, || {
        let n = flight_scenario_ctrl(
            &[Overlap::QueueOne, Overlap::QueueOne],
            Launch::Task,
            LockWait::Zero,
            Bugs::default(),
            &SLEPT,
        );
        seen(&SEEN, n);
    });
    // Always two runs: queued behind the first, or started after it.
    assert_eq!(*SEEN.lock().unwrap(), [2]);
}

#[test]
fn single_flight_queue_one_three_callers_inline() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SLEPT: StdAtomicUsize = StdAtomicUsize::new(0);
    static SEEN: StdMutex<Vec<usize>> = StdMutex::new(Vec::new());
    check(
        "single_flight_queue_one_three_callers_inline",
        &ITER,
        || {
            let n = flight_scenario_ctrl(
                &[Overlap::QueueOne, Overlap::QueueOne, Overlap::QueueOne],
                Launch::Inline,
                LockWait::Wait,
                Bugs::default(),
                &SLEPT,
            );
            seen(&SEEN, n);
        },
    );
    // Two callers sharing the queued run gives 2 bodies for 3 callers.
    assert!(SEEN.lock().unwrap().contains(&2));
}

#[test]
fn single_flight_replace_waits_for_previous_run() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SLEPT: StdAtomicUsize = StdAtomicUsize::new(0);
    static SEEN: StdMutex<Vec<usize>> = StdMutex::new(Vec::new());
    check(
        "single_flight_replace_waits_for_previous_run",
        &ITER,
        || {
            let n = flight_scenario_ctrl(
                &[Overlap::Replace, Overlap::Replace],
                Launch::Task,
                LockWait::Zero,
                Bugs::default(),
                &SLEPT,
            );
            seen(&SEEN, n);
        },
    );
    assert_eq!(*SEEN.lock().unwrap(), [2]);
}

#[test]
fn single_flight_replace_three_callers_inline() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SLEPT: StdAtomicUsize = StdAtomicUsize::new(0);
    static SEEN: StdMutex<Vec<usize>> = StdMutex::new(Vec::new());
    check("single_flight_replace_three_callers_inline", &ITER, || {
        let n = flight_scenario_ctrl(
            &[Overlap::Replace, Overlap::Replace, Overlap::Replace],
            Launch::Inline,
            LockWait::Zero,
            Bugs::default(),
            &SLEPT,
        );
        seen(&SEEN, n);
    });
    assert_eq!(*SEEN.lock().unwrap(), [3]);
}

#[test]
#[should_panic(expected = "slot of a live run was removed")]
fn broken_finish_without_id_check_removes_successors_slot() {
    static ITER: StdAtomicUsize = StdAtomicUsize::new(0);
    static SLEPT: StdAtomicUsize = StdAtomicUsize::new(0);
    let bugs = Bugs {
        finish_ignores_id: true,
        ..Bugs::default()
    };
    check("broken_finish_without_id_check", &ITER, move || {
        flight_scenario_ctrl(
            &[Overlap::Replace, Overlap::Replace],
            Launch::Task,
            LockWait::Zero,
            bugs,
            &SLEPT,
        );
    });
}
