//! The crate's clock.
//!
//! Every deadline, cooldown, backoff and timestamp in this crate is read through [`Clock`], which
//! is built on `tokio::time`. That is why a test with `#[tokio::test(start_paused = true)]`
//! controls all of them at once: monotonic time is `tokio::time::Instant`, and wall time is an
//! anchor taken when the clock was made plus the monotonic time elapsed since, so paused time
//! moves the wall clock too.
//!
//! The system's wall clock can move apart from monotonic time: it is set (by hand or by an NTP
//! step), and while the host is suspended it goes on while the monotonic clock stops. A clock
//! made with [`Clock::new`] follows such steps: each time it is read for the current wall time
//! ([`Clock::wall_now`], and the scheduler's clock readings), it compares the system's wall
//! clock with the real monotonic clock (not tokio's, so paused time is not mistaken for a step)
//! and, if they moved apart by [`SYSTEM_STEP_MIN`] or more, moves its wall time by as much.
//! That is how the scheduler sees a real clock jump or suspend (see
//! [`crate::schedule`](crate::schedule#clock-jumps)). A clock made with
//! [`Clock::with_wall_start`] is simulated and ignores the system's wall clock; a jump is
//! simulated on either kind with [`Clock::shift_wall`].

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use tokio::time::Instant;

/// Monotonic and wall time for the runtime, driven by `tokio::time`.
///
/// Cheap to clone; clones share the wall anchor.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// use job_runtime::time::Clock;
/// use std::time::Duration;
///
/// let clock = Clock::new();
/// let (t0, w0) = (clock.now(), clock.wall_now());
/// clock.sleep(Duration::from_secs(60)).await; // instant under paused time
/// assert_eq!(clock.now() - t0, Duration::from_secs(60));
/// assert_eq!(clock.wall_now().duration_since(w0).unwrap(), Duration::from_secs(60));
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Clock {
    inner: Arc<Anchor>,
}

/// A step of the system's wall clock smaller than this is not followed: two clock readings a few
/// microseconds apart cannot tell it from noise, and nothing in the crate needs wall time that
/// precise (the scheduler's jump tolerance is a second).
pub const SYSTEM_STEP_MIN: Duration = Duration::from_micros(200);

/// A sample of the system clocks is discarded when reading them took longer than this (the
/// thread was preempted between the readings, so they were not taken together).
const SAMPLE_MAX: Duration = Duration::from_micros(50);

#[derive(Debug)]
struct Anchor {
    mono: Instant,
    wall: SystemTime,
    /// Nanoseconds added to wall time, to simulate a wall-clock jump.
    shift_nanos: AtomicI64,
    /// For a clock that follows the system's wall clock: what it was anchored to.
    system: Option<System>,
    /// Nanoseconds the system's wall clock has stepped since the anchor, as last followed.
    step_nanos: AtomicI64,
}

/// The system clocks when a following clock was made, and how to read the wall clock (a plain
/// function, so tests can step a fake one).
#[derive(Debug)]
struct System {
    real: std::time::Instant,
    wall: SystemTime,
    read_wall: fn() -> SystemTime,
}

/// Nanoseconds from the epoch (negative before it), saturating.
fn epoch_nanos(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

/// `t` moved by `nanos` (negative: back).
fn shifted(t: SystemTime, nanos: i64) -> SystemTime {
    if nanos >= 0 {
        t + Duration::from_nanos(nanos as u64)
    } else {
        t - Duration::from_nanos(nanos.unsigned_abs())
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A clock anchored at the current wall time that follows the system's wall clock when it
    /// is set or the host was suspended (see the [module docs](self)).
    pub fn new() -> Self {
        Self::following(SystemTime::now)
    }

    /// A clock that follows the wall clock `read_wall` reads.
    fn following(read_wall: fn() -> SystemTime) -> Self {
        let (real, wall) = (std::time::Instant::now(), read_wall());
        Self::anchored(
            wall,
            Some(System {
                real,
                wall,
                read_wall,
            }),
        )
    }

    /// A simulated clock whose wall time reads `start` now and then moves with `tokio::time`
    /// only: the system's wall clock is never read (for tests with a set wall start).
    pub fn with_wall_start(start: SystemTime) -> Self {
        Self::anchored(start, None)
    }

    fn anchored(wall: SystemTime, system: Option<System>) -> Self {
        Self {
            inner: Arc::new(Anchor {
                mono: Instant::now(),
                wall,
                shift_nanos: AtomicI64::new(0),
                system,
                step_nanos: AtomicI64::new(0),
            }),
        }
    }

    /// For a clock made with [`new`](Self::new): compares the system's wall clock with the real
    /// monotonic clock and, if it stepped since the last look (by [`SYSTEM_STEP_MIN`] or more),
    /// moves this clock's wall time with it. Called by every reading of the current wall time;
    /// costs three clock readings.
    pub(crate) fn follow_system(&self) {
        let Some(sys) = &self.inner.system else {
            return;
        };
        let before = std::time::Instant::now();
        let wall = (sys.read_wall)();
        let after = std::time::Instant::now();
        let took = after - before;
        if took > SAMPLE_MAX {
            return;
        }
        let real = (before + took / 2).saturating_duration_since(sys.real);
        let elapsed = i64::try_from(real.as_nanos()).unwrap_or(i64::MAX);
        let step = epoch_nanos(wall)
            .saturating_sub(epoch_nanos(sys.wall))
            .saturating_sub(elapsed);
        let known = self.inner.step_nanos.load(Ordering::Relaxed);
        if step.abs_diff(known) >= SYSTEM_STEP_MIN.as_nanos() as u64 {
            self.inner.step_nanos.store(step, Ordering::Relaxed);
        }
    }

    /// Monotonic now, for deadlines and elapsed time.
    #[inline]
    pub fn now(&self) -> Instant {
        Instant::now()
    }

    /// Wall-clock now, for timestamps shown to people and for schedules. A clock made with
    /// [`new`](Self::new) first follows any step of the system's wall clock.
    pub fn wall_now(&self) -> SystemTime {
        self.follow_system();
        self.wall_at(Instant::now())
    }

    /// The wall time that corresponds to a monotonic instant, in the wall-clock frame of the
    /// last reading (a step of the system's wall clock is followed by [`wall_now`](Self::wall_now)
    /// and by the scheduler's readings, not here).
    pub fn wall_at(&self, at: Instant) -> SystemTime {
        let base = self.inner.wall + at.saturating_duration_since(self.inner.mono);
        let moved = self
            .inner
            .shift_nanos
            .load(Ordering::Relaxed)
            .saturating_add(self.inner.step_nanos.load(Ordering::Relaxed));
        shifted(base, moved)
    }

    /// Moves wall time by `nanos` (negative: backwards) without moving monotonic time, as a
    /// changed system clock would.
    ///
    /// On a clock made with [`new`](Self::new) this adds to the steps of the system's wall clock
    /// it follows.
    pub fn shift_wall(&self, nanos: i64) {
        self.inner.shift_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Sleeps for `d` on the tokio timer.
    pub async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await
    }

    /// Sleeps until `deadline` on the tokio timer.
    pub async fn sleep_until(&self, deadline: Instant) {
        tokio::time::sleep_until(deadline).await
    }
}

/// `instant + d`, saturating far in the future instead of overflowing.
pub(crate) fn add_saturating(instant: Instant, d: Duration) -> Instant {
    instant
        .checked_add(d)
        .unwrap_or_else(|| instant + Duration::from_secs(86_400 * 365 * 30))
}

/// Serde helpers for status types: wall times as RFC 3339, durations as milliseconds.
pub(crate) mod serde_fmt {
    use serde::Serializer;
    use std::time::{Duration, SystemTime};

    pub(crate) fn rfc3339<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => rfc3339_at(t, s),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn rfc3339_at<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }

    pub(crate) fn millis_of<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1e3)
    }

    pub(crate) fn millis<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => millis_of(d, s),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ClockReading;

    /// Nanoseconds the fake system wall clock is set away from the real one.
    static STEP: AtomicI64 = AtomicI64::new(0);

    fn fake_wall() -> SystemTime {
        shifted(SystemTime::now(), STEP.load(Ordering::SeqCst))
    }

    const HOUR: Duration = Duration::from_secs(3600);

    fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
        (epoch_nanos(b) - epoch_nanos(a)) as f64 / 1e9
    }

    /// One test drives the fake clock (a static), so the steps are not raced by another test.
    #[tokio::test(start_paused = true)]
    async fn a_following_clock_moves_with_system_steps_but_not_with_paused_time() {
        let clock = Clock::following(fake_wall);
        let w0 = clock.wall_now();

        // Paused time moves wall time exactly; the real clocks did not step.
        clock.sleep(HOUR).await;
        assert_eq!(clock.wall_now().duration_since(w0).unwrap(), HOUR);

        // The system clock is set an hour forward (or the host slept an hour): followed.
        let before = ClockReading::of(&clock);
        STEP.store(HOUR.as_nanos() as i64, Ordering::SeqCst);
        let after = ClockReading::of(&clock);
        let moved = secs_between(before.wall, after.wall);
        assert!((moved - 3600.0).abs() < 0.01, "moved {moved} s");
        assert_eq!(after.mono, before.mono, "monotonic time did not move");
        assert!(
            after.jump_since(before).is_some(),
            "the scheduler sees a jump"
        );
        let w1 = clock.wall_now();
        assert!((secs_between(w0, w1) - 7200.0).abs() < 0.01);

        // Set back ten seconds: followed back.
        STEP.store(
            (HOUR - Duration::from_secs(10)).as_nanos() as i64,
            Ordering::SeqCst,
        );
        let w2 = clock.wall_now();
        assert!(
            (secs_between(w1, w2) + 10.0).abs() < 0.01,
            "{}",
            secs_between(w1, w2)
        );

        // A step under `SYSTEM_STEP_MIN` is noise: wall time stays exact.
        STEP.fetch_add(50_000, Ordering::SeqCst);
        assert_eq!(clock.wall_now(), w2);
        clock.sleep(Duration::from_secs(1)).await;
        assert_eq!(
            clock.wall_now().duration_since(w2).unwrap(),
            Duration::from_secs(1)
        );

        // A simulated shift adds to the followed steps.
        clock.shift_wall(-(HOUR.as_nanos() as i64));
        let w3 = clock.wall_now();
        assert!((secs_between(w2, w3) - (1.0 - 3600.0)).abs() < 0.01);
        STEP.store(0, Ordering::SeqCst);
    }

    #[tokio::test(start_paused = true)]
    async fn a_simulated_clock_never_reads_the_system_wall_clock() {
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let clock = Clock::with_wall_start(start);
        clock.sleep(HOUR).await;
        assert_eq!(clock.wall_now(), start + HOUR);
        assert_eq!(ClockReading::of(&clock).wall, start + HOUR);
    }

    #[test]
    fn a_clock_made_with_new_reads_the_system_wall_clock() {
        let clock = Clock::new();
        let d = secs_between(SystemTime::now(), clock.wall_now()).abs();
        assert!(d < 1.0, "{d} s apart");
        assert!(clock.inner.system.is_some());
    }

    #[test]
    fn epoch_nanos_is_signed_and_shifted_inverts_it() {
        let before = UNIX_EPOCH - Duration::from_secs(2);
        assert_eq!(epoch_nanos(before), -2_000_000_000);
        assert_eq!(shifted(UNIX_EPOCH, -2_000_000_000), before);
        assert_eq!(shifted(before, 2_000_000_000), UNIX_EPOCH);
    }
}
