//! `Schedule`: a validated trigger that answers "when is the next fire after t?".

#[cfg(feature = "cron")]
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use super::Trigger;
#[cfg(feature = "cron")]
use super::cron::CronSchedule;
use super::error::ScheduleError;
use super::every::Every;
use super::nanos::{self, Nanos};
use super::trigger::{Kind, Misfire};

/// A validated [`Trigger`], anchored at a start time: pure functions of time, no clock.
///
/// `start` anchors interval triggers (fire `n` at `start + initial_delay + n · period`, plus
/// jitter); cron triggers fire at their matching times whatever the start. Cheap to clone.
///
/// ```
/// use job_runtime::schedule::{Schedule, Trigger};
/// use std::time::{Duration, SystemTime};
///
/// let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
/// let s = Schedule::new(&Trigger::every(Duration::from_secs(30)), start).unwrap();
/// assert_eq!(s.next_after(start), Some(start + Duration::from_secs(30)));
/// ```
#[derive(Debug, Clone)]
pub struct Schedule {
    trigger: Trigger,
    start: SystemTime,
    compiled: Compiled,
}

#[derive(Debug, Clone)]
pub(crate) enum Compiled {
    Every(Every),
    #[cfg(feature = "cron")]
    Cron(CronSchedule),
}

/// Parsed cron expressions by (expression, time zone), so that the triggers of one runtime
/// that share an expression share one parse (croner's takes ~12 µs).
#[derive(Debug, Default)]
pub(crate) struct CronCache {
    #[cfg(feature = "cron")]
    parsed: HashMap<(String, Option<String>), CronSchedule>,
}

impl Schedule {
    /// Validates `trigger` and anchors it at `start`.
    ///
    /// Errors name the input and what is accepted: a zero period, jitter not shorter than the
    /// period, an option that does not apply to the kind of trigger, an invalid cron expression
    /// or one that never fires (30 February: detected here, in a few milliseconds at most), an
    /// unknown time zone, or `CatchUp { max: 0 }`.
    pub fn new(trigger: &Trigger, start: SystemTime) -> Result<Self, ScheduleError> {
        Self::new_cached(trigger, start, &mut CronCache::default())
    }

    /// [`Schedule::new`], taking a cron trigger's parsed expression from `cache` when an
    /// earlier trigger had the same expression and zone (and adding it when not).
    pub(crate) fn new_cached(
        trigger: &Trigger,
        start: SystemTime,
        cache: &mut CronCache,
    ) -> Result<Self, ScheduleError> {
        Ok(Self {
            compiled: Compiled::new(trigger, nanos::from_system(start), cache)?,
            trigger: trigger.clone(),
            start,
        })
    }

    /// The first fire strictly after `after`, or `None` if the schedule never fires again:
    /// a cron year field that has run out, a time past what `SystemTime` (or, for cron, the
    /// year 4999) can hold. Bounded work: O(1) for intervals, one calendar search for cron.
    pub fn next_after(&self, after: SystemTime) -> Option<SystemTime> {
        nanos::to_system(self.compiled.next_after(nanos::from_system(after))?)
    }

    /// The trigger this schedule was built from.
    pub fn trigger(&self) -> &Trigger {
        &self.trigger
    }

    /// The start the schedule is anchored at.
    pub fn start(&self) -> SystemTime {
        self.start
    }

    pub(crate) fn compiled(&self) -> &Compiled {
        &self.compiled
    }
}

impl Compiled {
    /// Validates `t` and compiles it, anchored at `start` (nanoseconds since the epoch).
    pub(crate) fn new(
        t: &Trigger,
        start: Nanos,
        #[cfg_attr(not(feature = "cron"), allow(unused_variables))] cache: &mut CronCache,
    ) -> Result<Self, ScheduleError> {
        let invalid = |option: &'static str, value: String, problem: &str, expected: &str| {
            ScheduleError::InvalidOption {
                option,
                value,
                trigger: t.label(),
                problem: problem.to_owned(),
                expected: expected.to_owned(),
            }
        };
        let show = |d: Duration| humantime::format_duration(d).to_string();
        if let Misfire::CatchUp { max: 0 } = t.misfire {
            return Err(invalid(
                "misfire",
                "CatchUp { max: 0 }".to_owned(),
                "catching up on no fires is skipping them",
                "max ≥ 1, or Misfire::Skip",
            ));
        }
        match &t.kind {
            Kind::Every(period) => {
                if let Some(zone) = &t.zone {
                    return Err(invalid(
                        "time_zone",
                        format!("{zone:?}"),
                        "an interval trigger runs on elapsed time, not local time",
                        "a time zone only on `Trigger::cron`",
                    ));
                }
                if period.is_zero() {
                    return Err(invalid(
                        "every",
                        show(*period),
                        "the period is zero",
                        "a period above zero",
                    ));
                }
                let jitter = t.jitter.unwrap_or_default();
                if jitter >= *period {
                    return Err(invalid(
                        "jitter",
                        show(jitter),
                        "fires could come out of order",
                        &format!("a jitter shorter than the period ({})", show(*period)),
                    ));
                }
                let first = start.saturating_add(nanos::of(t.initial_delay.unwrap_or_default()));
                let seed = t.seed.unwrap_or_else(|| fastrand::u64(..));
                Ok(Compiled::Every(Every::new(
                    first,
                    period.as_nanos(),
                    jitter.as_nanos(),
                    seed,
                )))
            }
            #[cfg(feature = "cron")]
            Kind::Cron(expr) => {
                for (option, value) in [("initial_delay", t.initial_delay), ("jitter", t.jitter)] {
                    if let Some(d) = value {
                        return Err(invalid(
                            option,
                            show(d),
                            "a cron trigger fires at its matching times, with no delay or jitter",
                            &format!("{option} only on `Trigger::every`"),
                        ));
                    }
                }
                if let Some(seed) = t.seed {
                    return Err(invalid(
                        "seed",
                        seed.to_string(),
                        "a cron trigger has no jitter to seed",
                        "a seed only on `Trigger::every`",
                    ));
                }
                let key = (expr.clone(), t.zone.clone());
                if let Some(cron) = cache.parsed.get(&key) {
                    return Ok(Compiled::Cron(cron.clone()));
                }
                let cron = CronSchedule::new(expr, t.zone.as_deref())?;
                cache.parsed.insert(key, cron.clone());
                Ok(Compiled::Cron(cron))
            }
        }
    }

    /// The first fire strictly after `t`.
    pub(crate) fn next_after(&self, t: Nanos) -> Option<Nanos> {
        match self {
            Compiled::Every(e) => e.next_after(t),
            #[cfg(feature = "cron")]
            Compiled::Cron(c) => c.next_after(t),
        }
    }

    /// How many fires fall in `[from, to]`, counting at most `cap` (bounded work: O(1) for
    /// intervals, at most `cap` searches for cron).
    pub(crate) fn count_between(&self, from: Nanos, to: Nanos, cap: u32) -> u32 {
        match self {
            Compiled::Every(e) => e.count_between(from, to, cap),
            #[cfg(feature = "cron")]
            Compiled::Cron(_) => {
                let mut n = 0;
                let mut cursor = from.saturating_sub(1);
                while n < cap {
                    match self.next_after(cursor) {
                        Some(f) if f <= to => {
                            n += 1;
                            cursor = f;
                        }
                        _ => break,
                    }
                }
                n
            }
        }
    }

    /// Whether the schedule follows elapsed time (intervals) rather than the wall clock.
    pub(crate) fn is_elapsed_time(&self) -> bool {
        matches!(self, Compiled::Every(_))
    }
}

#[cfg(all(test, feature = "cron"))]
mod tests {
    use super::*;

    /// Triggers with one expression and zone share one parse; each still answers exactly what
    /// a schedule of its own answers, fire by fire, while the others ask about other days in
    /// between.
    #[test]
    fn triggers_on_one_expression_share_one_parse_and_agree_with_their_own() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
        let expr = "0 */7 9-17 * * MON-FRI";
        let mut cache = CronCache::default();
        let shared: Vec<Schedule> = (0..3)
            .map(|_| Schedule::new_cached(&Trigger::cron(expr), start, &mut cache).unwrap())
            .collect();
        let berlin = Trigger::cron(expr).time_zone("Europe/Berlin");
        let other_zone = Schedule::new_cached(&berlin, start, &mut cache).unwrap();
        assert_eq!(cache.parsed.len(), 2);

        let own = Schedule::new(&Trigger::cron(expr), start).unwrap();
        // Each shared schedule walks from its own start (0, 3 and 11 days later), in turns.
        let mut at: Vec<SystemTime> = [0, 3, 11]
            .map(|d| start + Duration::from_secs(d * 86_400))
            .to_vec();
        for _ in 0..500 {
            for (s, t) in shared.iter().zip(at.iter_mut()) {
                let next = s.next_after(*t).unwrap();
                assert_eq!(Some(next), own.next_after(*t), "after {t:?}");
                *t = next;
            }
        }
        // And a different zone is a different schedule.
        assert_ne!(other_zone.next_after(start), own.next_after(start));
    }

    /// An expression that never fires is refused every time it is given (a refused one is
    /// not cached as parsed).
    #[test]
    fn a_never_firing_expression_is_refused_every_time() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
        let mut cache = CronCache::default();
        for expr in ["0 0 0 30 2 *", "0 0 0 30 2 *", "0 0 0 29 2 * 2027"] {
            let e = Schedule::new_cached(&Trigger::cron(expr), start, &mut cache).unwrap_err();
            assert!(
                matches!(e, ScheduleError::NeverFires { .. }),
                "`{expr}`: {e}"
            );
        }
        assert!(cache.parsed.is_empty());
        for expr in ["0 0 0 29 2 *", "5 5 5 29 2 *"] {
            let s = Schedule::new_cached(&Trigger::cron(expr), start, &mut cache).unwrap();
            assert!(s.next_after(start).is_some(), "`{expr}`");
        }
        assert_eq!(cache.parsed.len(), 2);
    }
}
