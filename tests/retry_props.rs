//! Property tests for the backoff sequence: every delay within its jitter's bounds, and the
//! same seed always giving the same delays. Pure logic, no clock.

use std::time::Duration;

use job_runtime::retry::{Backoff, Jitter};
use proptest::prelude::*;

/// How many delays each case draws: far enough that doubling saturates for every base
/// (1 ns · 2⁸⁰ is more than any `max` here), and past 2³¹, where `Backoff::cap` once stopped.
const DRAWS: usize = 80;

/// `min(max, base · 2ⁿ)`, computed independently of `Backoff::cap` in exact u128 nanoseconds.
fn expected_cap(base: Duration, max: Duration, n: u32) -> Duration {
    let b = base.as_nanos();
    let m = max.as_nanos();
    if b == 0 {
        return Duration::ZERO;
    }
    // b · 2ⁿ > m  ⇔  b > m >> n (for n < 128); past 128 doublings anything non-zero is > m.
    if n >= 128 || b > (m >> n) {
        return max;
    }
    let v = (b << n).min(m);
    from_nanos_u128(v)
}

fn from_nanos_u128(n: u128) -> Duration {
    Duration::new((n / 1_000_000_000) as u64, (n % 1_000_000_000) as u32)
}

fn jitter() -> impl Strategy<Value = Jitter> {
    prop_oneof![
        Just(Jitter::None),
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated),
    ]
}

/// A duration from 1 ns to about three years, spread over every order of magnitude.
fn duration() -> impl Strategy<Value = Duration> {
    (0u32..=15, 1u64..=999).prop_map(|(exp, mantissa)| {
        Duration::from_nanos(mantissa.saturating_mul(10u64.pow(exp)) / 10)
            .max(Duration::from_nanos(1))
    })
}

/// `(base, max)` with `base <= max` (the builder rejects the rest; `Backoff::new` clamps it).
fn base_and_max() -> impl Strategy<Value = (Duration, Duration)> {
    (duration(), duration()).prop_map(|(a, b)| if a <= b { (a, b) } else { (b, a) })
}

fn check_bounds(base: Duration, max: Duration, jitter: Jitter, delays: &[Duration]) {
    let mut prev = Duration::ZERO;
    for (n, &d) in delays.iter().enumerate() {
        let cap = expected_cap(base, max, n as u32);
        match jitter {
            Jitter::None => assert_eq!(d, cap, "delay {n}: None must be exactly cap(n)"),
            Jitter::Full => assert!(d <= cap, "delay {n} = {d:?} outside [0, {cap:?}]"),
            Jitter::Equal => assert!(
                cap / 2 <= d && d <= cap,
                "delay {n} = {d:?} outside [{:?}, {cap:?}]",
                cap / 2
            ),
            Jitter::Decorrelated => {
                if n == 0 {
                    assert_eq!(d, base, "the first decorrelated delay is base");
                } else {
                    let hi = max.min(prev.saturating_mul(3));
                    assert!(
                        base <= d && d <= hi,
                        "delay {n} = {d:?} outside [{base:?}, {hi:?}] (prev {prev:?})"
                    );
                }
            }
        }
        prev = d;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_delay_within_bounds(
        (base, max) in base_and_max(),
        jitter in jitter(),
        seed in any::<u64>(),
    ) {
        let delays: Vec<_> = Backoff::new(base, max, jitter, seed).take(DRAWS).collect();
        check_bounds(base, max, jitter, &delays);
    }

    #[test]
    fn same_seed_same_sequence(
        (base, max) in base_and_max(),
        jitter in jitter(),
        seed in any::<u64>(),
    ) {
        let a: Vec<_> = Backoff::new(base, max, jitter, seed).take(DRAWS).collect();
        let b: Vec<_> = Backoff::new(base, max, jitter, seed).take(DRAWS).collect();
        prop_assert_eq!(a, b);
    }

    #[test]
    fn cap_matches_independent_formula(
        (base, max) in base_and_max(),
        n in 0u32..200,
    ) {
        prop_assert_eq!(Backoff::cap(base, max, n), expected_cap(base, max, n), "n = {}", n);
    }

    #[test]
    fn base_above_max_is_clamped(
        (max, base) in base_and_max(),
        jitter in jitter(),
        seed in any::<u64>(),
    ) {
        // `Backoff::new` documents that a base above max is clamped to max: every delay is
        // then within [0, max], and None / Decorrelated stay at exactly max.
        let delays: Vec<_> = Backoff::new(base, max, jitter, seed).take(DRAWS).collect();
        check_bounds(base.min(max), max, jitter, &delays);
    }
}

/// Different seeds give different sequences for the random kinds (not a constant stream).
#[test]
fn different_seeds_differ() {
    let (base, max) = (Duration::from_millis(10), Duration::from_secs(60));
    for jitter in [Jitter::Full, Jitter::Equal, Jitter::Decorrelated] {
        let a: Vec<_> = Backoff::new(base, max, jitter, 1).take(20).collect();
        let b: Vec<_> = Backoff::new(base, max, jitter, 2).take(20).collect();
        assert_ne!(a, b, "{jitter:?}");
    }
}

/// Regression: `Backoff::cap` used to clamp the exponent at 31 (`1u32.checked_shl(n.min(31))`),
/// so with a 1 ns base and a one-hour max every delay from 31 on stayed at 2³¹ ns ≈ 2.1 s.
/// Delay 32 must be 2³² ns (≈ 4.29 s) and delay 42 the max.
#[test]
fn cap_keeps_doubling_past_31_steps() {
    let (base, max) = (Duration::from_nanos(1), Duration::from_secs(3600));
    assert_eq!(Backoff::cap(base, max, 31), Duration::from_nanos(1 << 31));
    assert_eq!(Backoff::cap(base, max, 32), Duration::from_nanos(1 << 32));
    assert_eq!(Backoff::cap(base, max, 42), max);
    let none: Vec<_> = Backoff::new(base, max, Jitter::None, 0).take(43).collect();
    assert_eq!(none[32], Duration::from_nanos(1 << 32));
    assert_eq!(none[42], max);
}

/// Extreme durations: no overflow, and the bounds still hold.
#[test]
fn extreme_durations_stay_in_bounds() {
    let cases = [
        (Duration::MAX, Duration::MAX),
        (Duration::from_nanos(1), Duration::MAX),
        (Duration::from_secs(u64::MAX / 2), Duration::MAX),
        (Duration::ZERO, Duration::ZERO),
        (Duration::ZERO, Duration::from_secs(1)),
    ];
    for (base, max) in cases {
        for jitter in [
            Jitter::None,
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
        ] {
            for seed in 0..8 {
                let delays: Vec<_> = Backoff::new(base, max, jitter, seed).take(130).collect();
                check_bounds(base, max, jitter, &delays);
            }
        }
        for n in [0, 1, 31, 32, 63, 64, 127, 128, u32::MAX] {
            assert_eq!(
                Backoff::cap(base, max, n),
                expected_cap(base, max, n),
                "{base:?} {max:?} {n}"
            );
        }
    }
}
