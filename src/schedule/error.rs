//! `ScheduleError`: a trigger that cannot be scheduled, and why.

/// What a cron expression may contain, quoted by every cron error.
pub(crate) const CRON_SYNTAX: &str = "6 fields `second minute hour day-of-month month day-of-week` \
     or 7 with a trailing year (for example `0 */5 * * * *`: every five minutes), each field a \
     number, `*`, a range `1-5`, a step `*/15` or `0-30/10`, or a list `1,15`; months 1-12 or \
     JAN-DEC, weekdays 0-7 or SUN-SAT (0 and 7 are Sunday); also `L` (last), `W` (nearest \
     weekday), `#` (nth weekday), `?`, and @yearly, @monthly, @weekly, @daily, @hourly";

/// A trigger that cannot be scheduled. Each message names the input, what is wrong, and what
/// is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// The cron expression does not parse.
    #[error("cron expression `{expr}` is invalid: {problem}; expected {CRON_SYNTAX}")]
    InvalidCron {
        /// The expression as given.
        expr: String,
        /// What the parser objected to.
        problem: String,
    },
    /// The cron expression parses but no date ever matches it (30 February, say).
    #[error(
        "cron expression `{expr}` never fires: no date matches its day-of-month, month, day-of-week and year fields together (like 30 February); fix those fields"
    )]
    NeverFires {
        /// The expression as given.
        expr: String,
    },
    /// The time zone is not an IANA time zone name.
    #[error(
        "unknown time zone `{zone}` for cron `{expr}`{}; expected an IANA time zone name such as `UTC`, `Europe/Berlin` or `America/New_York`",
        suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default()
    )]
    UnknownTimeZone {
        /// The zone as given.
        zone: String,
        /// The cron expression it was given for.
        expr: String,
        /// A known zone the name probably meant (same name in other case, or the city alone).
        suggestion: Option<String>,
    },
    /// An option has a value the trigger cannot use, or does not apply to this kind of trigger.
    #[error("{option} = {value} is invalid for {trigger}: {problem}; expected {expected}")]
    InvalidOption {
        /// The option (`every`, `jitter`, `initial_delay`, `time_zone`, `misfire`).
        option: &'static str,
        /// The value given.
        value: String,
        /// The trigger, as `every 1m` or ``cron `0 * * * * *` ``.
        trigger: String,
        /// What is wrong with it.
        problem: String,
        /// What is accepted.
        expected: String,
    },
}

impl ScheduleError {
    /// The input the error is about: the cron expression, the time zone, or the option's
    /// value.
    pub fn input(&self) -> &str {
        match self {
            ScheduleError::InvalidCron { expr, .. } | ScheduleError::NeverFires { expr } => expr,
            ScheduleError::UnknownTimeZone { zone, .. } => zone,
            ScheduleError::InvalidOption { value, .. } => value,
        }
    }
}
