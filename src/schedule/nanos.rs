//! Exact time arithmetic: wall times as signed nanoseconds since the Unix epoch.
//!
//! `SystemTime` has no signed arithmetic and `Duration` no sign, while the planner needs both
//! (a clock jump may go either way). An `i128` of nanoseconds holds every `SystemTime` the
//! platform can represent, and every product `n · period` a schedule can reach, exactly.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch (negative: before it).
pub(crate) type Nanos = i128;

pub(crate) const NANOS_PER_SEC: i128 = 1_000_000_000;

/// `t` as nanoseconds since the epoch.
pub(crate) fn from_system(t: SystemTime) -> Nanos {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

/// Nanoseconds since the epoch as a `SystemTime`, or `None` past what the platform can hold.
pub(crate) fn to_system(n: Nanos) -> Option<SystemTime> {
    let d = duration(n.unsigned_abs())?;
    if n >= 0 {
        UNIX_EPOCH.checked_add(d)
    } else {
        UNIX_EPOCH.checked_sub(d)
    }
}

/// A `Duration` of `n` nanoseconds, or `None` past `Duration::MAX`.
pub(crate) fn duration(n: u128) -> Option<Duration> {
    // Every span up to 584 years fits in a `u64`, whose division by a constant is a multiply;
    // a `u128` division is a library call (~50 instructions), paid on every timer wake.
    if let Ok(n) = u64::try_from(n) {
        return Some(Duration::from_nanos(n));
    }
    let secs = u64::try_from(n / NANOS_PER_SEC as u128).ok()?;
    Some(Duration::new(secs, (n % NANOS_PER_SEC as u128) as u32))
}

/// `d` in nanoseconds, as a signed number (a `Duration` always fits).
pub(crate) fn of(d: Duration) -> i128 {
    d.as_nanos() as i128
}

/// Floor of `n` to a whole second, as seconds.
#[cfg_attr(not(feature = "cron"), allow(dead_code))]
pub(crate) fn floor_secs(n: Nanos) -> i64 {
    // Seconds of any `SystemTime` fit in an i64; nanoseconds of every time within 292 years of
    // the epoch do too, and an `i64` division by a constant is a multiply.
    match i64::try_from(n) {
        Ok(n) => n.div_euclid(NANOS_PER_SEC as i64),
        Err(_) => n.div_euclid(NANOS_PER_SEC) as i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_before_and_after_the_epoch() {
        for t in [
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::new(1_750_000_000, 123_456_789),
            UNIX_EPOCH - Duration::new(86_400, 1),
        ] {
            assert_eq!(to_system(from_system(t)), Some(t));
        }
        assert_eq!(from_system(UNIX_EPOCH - Duration::from_nanos(1)), -1);
    }

    #[test]
    fn floor_goes_down_for_negative_times() {
        assert_eq!(floor_secs(1_500_000_000), 1);
        assert_eq!(floor_secs(-1), -1);
        assert_eq!(floor_secs(-NANOS_PER_SEC), -1);
        assert_eq!(floor_secs(-NANOS_PER_SEC - 1), -2);
    }

    #[test]
    fn the_fast_paths_agree_with_the_wide_arithmetic() {
        let wide_floor = |n: Nanos| n.div_euclid(NANOS_PER_SEC) as i64;
        let wide_duration = |n: u128| {
            Duration::new(
                (n / NANOS_PER_SEC as u128) as u64,
                (n % NANOS_PER_SEC as u128) as u32,
            )
        };
        for n in [
            0,
            1,
            -1,
            NANOS_PER_SEC - 1,
            -NANOS_PER_SEC + 1,
            1_750_000_000_123_456_789,
            -1_750_000_000_123_456_789,
            i64::MAX as i128,
            i64::MIN as i128,
            i64::MAX as i128 + 1,
            i64::MIN as i128 - 1,
            u64::MAX as i128 * 3,
            -(u64::MAX as i128) * 3,
        ] {
            assert_eq!(floor_secs(n), wide_floor(n), "{n}");
            let u = n.unsigned_abs();
            assert_eq!(duration(u), Some(wide_duration(u)), "{u}");
        }
    }

    #[test]
    fn out_of_range_is_none_not_a_panic() {
        assert_eq!(to_system(i128::MAX), None);
        assert_eq!(duration(u128::MAX), None);
        assert_eq!(duration(1_500_000_000), Some(Duration::from_millis(1500)));
    }
}
