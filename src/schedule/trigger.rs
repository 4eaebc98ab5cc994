//! `Trigger` and `Misfire`: what a job's schedule is, as plain data.

use std::fmt;
use std::time::Duration;

use super::error::ScheduleError;

/// The misfire grace a trigger has unless [`Trigger::misfire_grace`] sets another: a fire up
/// to one second late is on time.
pub const DEFAULT_MISFIRE_GRACE: Duration = Duration::from_secs(1);

/// When a job fires: every fixed period, or on a cron expression in a time zone.
///
/// Plain data (`Clone`, `Debug`, `Eq`): building one never fails and never reads a clock.
/// Everything is checked once, by [`Schedule::new`](super::Schedule::new) (or
/// [`Trigger::validate`]), with an error that names the input and what is accepted.
///
/// Defaults: no initial delay, no jitter, a random jitter seed per schedule, misfire policy
/// [`Misfire::FireOnceNow`], misfire grace [`DEFAULT_MISFIRE_GRACE`] (1 s), time zone UTC.
///
/// ```
/// use job_runtime::schedule::{ClockReading, Misfire, Planner, Schedule, Trigger};
/// use std::time::{Duration, SystemTime};
///
/// // Every minute, first fire 10 s after start, each fire delayed by up to 5 s to spread
/// // replicas; a late fire is skipped rather than run late.
/// let every = Trigger::every(Duration::from_secs(60))
///     .initial_delay(Duration::from_secs(10))
///     .jitter(Duration::from_secs(5))
///     .misfire(Misfire::Skip);
///
/// let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
/// let schedule = Schedule::new(&every, start).unwrap();
/// let first = schedule.next_after(start).unwrap();
/// let delay = first.duration_since(start).unwrap();
/// assert!(delay >= Duration::from_secs(10) && delay < Duration::from_secs(15));
///
/// // At 02:30 every day, Berlin time (with the `cron` feature, on by default).
/// # #[cfg(feature = "cron")] {
/// let nightly = Trigger::cron("0 30 2 * * *")
///     .time_zone("Europe/Berlin")
///     .misfire(Misfire::CatchUp { max: 1 });
/// assert!(nightly.validate().is_ok());
///
/// // Mistakes are reported with the input and what is accepted.
/// let err = Trigger::cron("*/5 * * * *").validate().unwrap_err();
/// assert!(err.to_string().contains("`*/5 * * * *`"));
/// let err = Trigger::cron("0 0 * * * *").time_zone("Europe/Berln").validate().unwrap_err();
/// assert!(err.to_string().contains("Europe/Berln"));
/// # }
///
/// // A timer loop keeps one planner per trigger: when to wake, and what to fire on waking.
/// let mono = tokio::time::Instant::now();
/// let mut planner = Planner::new(schedule, ClockReading::new(start, mono));
/// let wake = ClockReading::new(first, mono + delay);
/// assert_eq!(planner.deadline(), Some(wake.mono));
/// assert_eq!(planner.wake(wake).fires(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Trigger {
    pub(crate) kind: Kind,
    pub(crate) initial_delay: Option<Duration>,
    pub(crate) jitter: Option<Duration>,
    pub(crate) seed: Option<u64>,
    pub(crate) zone: Option<String>,
    pub(crate) misfire: Misfire,
    pub(crate) grace: Duration,
}

impl Trigger {
    /// `interval` or `cron`: the `job.trigger` attribute of the fires' spans.
    pub(crate) fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Every(_) => "interval",
            #[cfg(feature = "cron")]
            Kind::Cron(_) => "cron",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    Every(Duration),
    #[cfg(feature = "cron")]
    Cron(String),
}

/// What to do about fires that are late by more than the trigger's misfire grace: the process
/// was suspended, the runtime starved, or the machine was busy.
///
/// Slots late by at most the grace are on time: they fire once (however many of them there
/// are). Otherwise the wake is a misfire and the policy decides. In every case the schedule
/// then resumes at its first slot after now; missed slots are never replayed beyond what the
/// policy fires now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Misfire {
    /// Fire once now for all the missed slots, then resume on schedule. The default.
    #[default]
    FireOnceNow,
    /// Fire nothing for the missed slots (a slot still within grace fires), then resume on
    /// schedule. For jobs that must not run late.
    Skip,
    /// Fire once per missed slot, at most `max` times, now; then resume on schedule. `max` must
    /// be at least 1 (use [`Misfire::Skip`] to fire nothing).
    CatchUp {
        /// The most fires started at once to catch up.
        max: u32,
    },
}

impl Trigger {
    /// Fires at a fixed rate: fire `n` (from 0) is at `start + initial_delay + n · period`
    /// (plus jitter), computed from the schedule, never from when the previous fire ran, so
    /// the rate never drifts. With no initial delay the first fire is at `start`.
    ///
    /// The period must not be zero.
    pub fn every(period: Duration) -> Self {
        Self::with_kind(Kind::Every(period))
    }

    /// Fires on a cron expression with a seconds field, in UTC unless
    /// [`time_zone`](Self::time_zone) says otherwise.
    ///
    /// Six fields `second minute hour day-of-month month day-of-week`, or seven with a trailing
    /// year; the syntax is croner's (see the [module docs](super#cron-expressions)). Available
    /// with the `cron` feature (on by default).
    #[cfg(feature = "cron")]
    pub fn cron(expr: impl Into<String>) -> Self {
        Self::with_kind(Kind::Cron(expr.into()))
    }

    fn with_kind(kind: Kind) -> Self {
        Self {
            kind,
            initial_delay: None,
            jitter: None,
            seed: None,
            zone: None,
            misfire: Misfire::default(),
            grace: DEFAULT_MISFIRE_GRACE,
        }
    }

    /// Interval triggers only: the first fire comes `delay` after the schedule's start
    /// (default: at the start).
    pub fn initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = Some(delay);
        self
    }

    /// Interval triggers only: each fire is delayed by its own random amount in `[0, jitter)`,
    /// so replicas running the same trigger spread out instead of firing together.
    ///
    /// The delay of fire `n` is a pure function of the seed and `n` (the schedule stays
    /// drift-free and reproducible); `jitter` must be shorter than the period, so fires stay
    /// in order.
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = Some(jitter);
        self
    }

    /// Interval triggers only: the seed of the jitter, for reproducible delays. Without one,
    /// each [`Schedule`](super::Schedule) draws a random seed, so replicas differ.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Cron triggers only: the IANA time zone the expression's local times are in, such as
    /// `Europe/Berlin` (default: `UTC`). Checked by [`validate`](Self::validate).
    #[cfg(feature = "cron")]
    pub fn time_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// What to do about fires late by more than the misfire grace (default:
    /// [`Misfire::FireOnceNow`]).
    pub fn misfire(mut self, policy: Misfire) -> Self {
        self.misfire = policy;
        self
    }

    /// How late a fire may be and still count as on time (default: 1 s).
    pub fn misfire_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The misfire policy.
    pub fn misfire_policy(&self) -> Misfire {
        self.misfire
    }

    /// The misfire grace.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Checks everything [`Schedule::new`](super::Schedule::new) checks, without building:
    /// a positive period, jitter shorter than the period, options that fit the kind of
    /// trigger, a valid cron expression that fires at all, a known time zone, and
    /// `CatchUp { max }` with `max ≥ 1`.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        super::compiled::Compiled::new(self, 0, &mut Default::default()).map(drop)
    }

    /// A short name of the trigger for error messages: `every 1m` or `cron \`…\``.
    pub(crate) fn label(&self) -> String {
        match &self.kind {
            Kind::Every(p) => format!("every {}", humantime::format_duration(*p)),
            #[cfg(feature = "cron")]
            Kind::Cron(expr) => format!("cron `{expr}`"),
        }
    }
}

/// `every 1m (initial delay 10s, jitter < 5s)` or `cron \`0 30 2 * * *\` in Europe/Berlin`.
impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())?;
        if let Some(zone) = &self.zone {
            write!(f, " in {zone}")?;
        }
        let mut extras = Vec::new();
        if let Some(d) = self.initial_delay {
            extras.push(format!("initial delay {}", humantime::format_duration(d)));
        }
        if let Some(j) = self.jitter {
            extras.push(format!("jitter < {}", humantime::format_duration(j)));
        }
        if !extras.is_empty() {
            write!(f, " ({})", extras.join(", "))?;
        }
        Ok(())
    }
}
