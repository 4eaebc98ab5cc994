//! The crate's clock.
//!
//! Every deadline, cooldown, backoff and timestamp in this crate is read through [`Clock`], which
//! is built on `tokio::time`. That is why a test with `#[tokio::test(start_paused = true)]`
//! controls all of them at once: monotonic time is `tokio::time::Instant`, and wall time is an
//! anchor taken when the clock was made plus the monotonic time elapsed since, so paused time
//! moves the wall clock too. A wall-clock jump can be simulated with [`Clock::shift_wall`].

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

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

#[derive(Debug)]
struct Anchor {
    mono: Instant,
    wall: SystemTime,
    /// Nanoseconds added to wall time, to simulate a wall-clock jump.
    shift_nanos: AtomicI64,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A clock anchored at the current wall time.
    pub fn new() -> Self {
        Self::with_wall_start(SystemTime::now())
    }

    /// A clock whose wall time reads `start` now and then moves with `tokio::time`.
    pub fn with_wall_start(start: SystemTime) -> Self {
        Self {
            inner: Arc::new(Anchor {
                mono: Instant::now(),
                wall: start,
                shift_nanos: AtomicI64::new(0),
            }),
        }
    }

    /// Monotonic now, for deadlines and elapsed time.
    #[inline]
    pub fn now(&self) -> Instant {
        Instant::now()
    }

    /// Wall-clock now, for timestamps shown to people.
    pub fn wall_now(&self) -> SystemTime {
        self.wall_at(Instant::now())
    }

    /// The wall time that corresponds to a monotonic instant.
    pub fn wall_at(&self, at: Instant) -> SystemTime {
        let base = self.inner.wall + at.saturating_duration_since(self.inner.mono);
        let shift = self.inner.shift_nanos.load(Ordering::Relaxed);
        if shift >= 0 {
            base + Duration::from_nanos(shift as u64)
        } else {
            base - Duration::from_nanos(shift.unsigned_abs())
        }
    }

    /// Moves wall time by `nanos` (negative: backwards) without moving monotonic time, as a
    /// changed system clock would.
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
