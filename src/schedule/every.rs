//! Fixed-rate schedules: fire `n` at `first + n · period + jitter(n)`, in exact integers.

use super::nanos::Nanos;

/// A validated interval schedule. All times in nanoseconds since the epoch.
#[derive(Debug, Clone)]
pub(crate) struct Every {
    /// `start + initial_delay`: fire 0 before jitter.
    first: Nanos,
    /// The period, > 0.
    period: u128,
    /// Exclusive upper bound of the per-fire delay, < `period` (0: none).
    jitter: u64,
    seed: u64,
}

impl Every {
    /// `period > 0` and `jitter < period` are checked by the caller.
    pub(crate) fn new(first: Nanos, period: u128, jitter: u128, seed: u64) -> Self {
        debug_assert!(period > 0 && jitter < period);
        Self {
            first,
            period,
            // Beyond ~584 years of jitter, 584 years is as good.
            jitter: u64::try_from(jitter).unwrap_or(u64::MAX),
            seed,
        }
    }

    /// The delay of fire `n`, uniform in `[0, jitter)`: a pure function of the seed and `n`, so
    /// any fire's time can be computed without the ones before it.
    pub(crate) fn jitter_of(&self, n: u128) -> Nanos {
        if self.jitter == 0 {
            return 0;
        }
        let mixed = splitmix64(self.seed ^ splitmix64(n as u64 ^ splitmix64((n >> 64) as u64)));
        fastrand::Rng::with_seed(mixed).u64(0..self.jitter) as Nanos
    }

    /// The time of fire `n`, if it fits in an `i128` (it always fits a `SystemTime` check
    /// later, or not).
    pub(crate) fn fire(&self, n: u128) -> Option<Nanos> {
        let offset = n.checked_mul(self.period)?;
        let base = self.first.checked_add(i128::try_from(offset).ok()?)?;
        base.checked_add(self.jitter_of(n))
    }

    /// The index of the last fire at or before `t`, or `None` when fire 0 is after `t`.
    /// Jitter is below the period, so fire times increase with `n`.
    pub(crate) fn index_at_or_before(&self, t: Nanos) -> Option<u128> {
        if t < self.first {
            return None;
        }
        // Slot `n` starts at `first + n · period`; the fire is in `[start, start + jitter)`.
        let n = (t - self.first) as u128 / self.period;
        match self.fire(n) {
            Some(f) if f <= t => Some(n),
            _ => n.checked_sub(1),
        }
    }

    /// The first fire strictly after `t`.
    pub(crate) fn next_after(&self, t: Nanos) -> Option<Nanos> {
        let n = match self.index_at_or_before(t) {
            None => 0,
            Some(n) => n.checked_add(1)?,
        };
        self.fire(n)
    }

    /// How many fires fall in `[from, to]`, counting at most `cap`.
    pub(crate) fn count_between(&self, from: Nanos, to: Nanos, cap: u32) -> u32 {
        let Some(last) = self.index_at_or_before(to) else {
            return 0;
        };
        let first = match self.index_at_or_before(from.saturating_sub(1)) {
            None => 0,
            Some(n) => n + 1,
        };
        if last < first {
            return 0;
        }
        u32::try_from(last - first + 1).map_or(cap, |n| n.min(cap))
    }
}

/// SplitMix64's finaliser: spreads nearby inputs (consecutive fire numbers) over all bits.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_a_pure_function_of_seed_and_index() {
        let e = Every::new(0, 1_000, 900, 7);
        let a: Vec<_> = (0..100).map(|n| e.jitter_of(n)).collect();
        let b: Vec<_> = (0..100).rev().map(|n| e.jitter_of(n)).rev().collect();
        assert_eq!(a, b, "order of computation must not matter");
        assert!(a.iter().all(|&j| (0..900).contains(&j)));
        let other = Every::new(0, 1_000, 900, 8);
        assert_ne!(a, (0..100).map(|n| other.jitter_of(n)).collect::<Vec<_>>());
        // Consecutive indices do not give correlated delays.
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 80);
    }

    #[test]
    fn index_and_count_agree_with_enumeration() {
        let e = Every::new(500, 100, 60, 3);
        let fires: Vec<_> = (0..60).map(|n| e.fire(n).unwrap()).collect();
        assert!(fires.windows(2).all(|w| w[0] < w[1]));
        for t in 0..5_600 {
            let expected = fires.iter().rposition(|&f| f <= t).map(|i| i as u128);
            assert_eq!(e.index_at_or_before(t), expected, "t = {t}");
            let next = fires.iter().copied().find(|&f| f > t);
            assert_eq!(e.next_after(t), next, "t = {t}");
        }
        for (from, to) in [(0, 499), (500, 600), (560, 2_000), (1_000, 999), (0, 5_460)] {
            let expected = fires.iter().filter(|&&f| f >= from && f <= to).count() as u32;
            assert_eq!(
                e.count_between(from, to, u32::MAX),
                expected,
                "[{from}, {to}]"
            );
            assert_eq!(e.count_between(from, to, 3), expected.min(3));
        }
    }

    #[test]
    fn overflow_is_never_not_a_panic() {
        let e = Every::new(i128::MAX - 10, u128::MAX / 2, 0, 0);
        assert_eq!(e.next_after(i128::MAX - 10), None);
        assert_eq!(e.fire(u128::MAX), None);
    }
}
