//! Cron schedules: croner matches local (civil) times, this file maps them to instants.
//!
//! croner is only asked about a time zone-free civil timeline (`NaiveDateTime`), where there
//! is no daylight saving. Mapping a matching civil time to the instant it fires, and an
//! instant back to the civil time the search starts from, is done here, so our two DST rules
//! hold whatever the parser's own DST handling does:
//!
//! - `fire(t)` for a civil time `t` is the first instant at which the zone's wall clock shows
//!   `t` or later. A `t` inside a spring-forward gap maps to the end of the gap; a `t` shown
//!   twice at fall-back maps to its first occurrence. `fire` never decreases as `t` grows.
//! - So the next fire after instant `a` is `fire(t)` for the smallest matching `t` above the
//!   highest civil time the wall clock has shown up to `a` (its "high-water mark"). That mark
//!   is the civil time at `a`, except during the second pass of a repeated hour, where it is
//!   the end of the first pass.

use std::str::FromStr;

use chrono::{DateTime, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeDelta, TimeZone};
use chrono_tz::{GapInfo, Tz};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

use super::error::ScheduleError;
use super::nanos::{NANOS_PER_SEC, Nanos, floor_secs};

/// A validated cron schedule in a time zone.
#[derive(Debug, Clone)]
pub(crate) struct CronSchedule {
    cron: Cron,
    zone: Tz,
}

const SECOND: TimeDelta = TimeDelta::seconds(1);

impl CronSchedule {
    /// Parses `expr` (6 or 7 fields) and `zone` (IANA name, UTC when `None`), and checks that
    /// the expression fires at all.
    pub(crate) fn new(expr: &str, zone: Option<&str>) -> Result<Self, ScheduleError> {
        let cron = parse(expr)?;
        let zone = match zone {
            None => Tz::UTC,
            Some(name) => {
                Tz::from_str(name.trim()).map_err(|_| ScheduleError::UnknownTimeZone {
                    zone: name.to_owned(),
                    expr: expr.to_owned(),
                    suggestion: suggest_zone(name),
                })?
            }
        };
        if never_fires(&cron, expr) {
            return Err(ScheduleError::NeverFires {
                expr: expr.to_owned(),
            });
        }
        Ok(Self { cron, zone })
    }

    /// The first fire strictly after `after`, or `None` when there is none (a year field that
    /// has run out, or past the year 4999, croner's limit).
    pub(crate) fn next_after(&self, after: Nanos) -> Option<Nanos> {
        let at = DateTime::from_timestamp(floor_secs(after), 0)?.naive_utc();
        if self.zone == Tz::UTC {
            // No offset and no daylight saving: the civil time is the instant, and the first
            // match after the whole second `at` is after `after`. A timer asks this once per
            // fire; skipping the zone lookups saves about a third of it.
            let t = self.cron.find_next_occurrence(&at, false).ok()?;
            return Some(i128::from(t.and_utc().timestamp()) * NANOS_PER_SEC);
        }
        let mut from = self.high_water(at);
        // `fire` is monotonic and `from` is the exact high-water mark, so the first candidate
        // is the answer; the loop only guards against a zone with back-to-back transitions.
        for _ in 0..10_000 {
            let t = self.cron.find_next_occurrence(&from, false).ok()?;
            let fire = self.fire(t)?;
            let nanos = i128::from(fire.and_utc().timestamp()) * NANOS_PER_SEC;
            if nanos > after {
                return Some(nanos);
            }
            from = t;
        }
        None
    }

    fn offset(&self, utc: NaiveDateTime) -> TimeDelta {
        let secs = self
            .zone
            .offset_from_utc_datetime(&utc)
            .fix()
            .local_minus_utc();
        TimeDelta::seconds(i64::from(secs))
    }

    /// The highest civil time (whole seconds) the zone's wall clock has shown at or before the
    /// instant `at` (UTC, whole seconds).
    fn high_water(&self, at: NaiveDateTime) -> NaiveDateTime {
        let offset = self.offset(at);
        let civil = at + offset;
        if let LocalResult::Ambiguous(first, _) = self.zone.from_local_datetime(&civil) {
            let first = first.naive_utc();
            if first < at {
                // Second pass of a repeated range: the clock went back at some transition in
                // `(first, at]`; before it, it showed up to one second before
                // `transition + old offset`.
                let old = self.offset(first);
                let (mut lo, mut hi) = (first, at);
                while hi - lo > SECOND {
                    let mid = lo + (hi - lo) / 2;
                    if self.offset(mid) == old {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                return (hi - SECOND + old).max(civil);
            }
        }
        civil
    }

    /// The instant (UTC) the civil time `t` fires at: the first instant the wall clock shows
    /// `t` or later. `None` only at the ends of the time zone database.
    fn fire(&self, t: NaiveDateTime) -> Option<NaiveDateTime> {
        match self.zone.from_local_datetime(&t) {
            LocalResult::Single(d) => Some(d.naive_utc()),
            LocalResult::Ambiguous(first, _) => Some(first.naive_utc()),
            LocalResult::None => Some(GapInfo::new(&t, &self.zone)?.end?.naive_utc()),
        }
    }
}

/// Parses with seconds required and an optional year.
fn parse(expr: &str) -> Result<Cron, ScheduleError> {
    let invalid = |problem: String| ScheduleError::InvalidCron {
        expr: expr.to_owned(),
        problem,
    };
    let fields = expr.split_whitespace().count();
    if !expr.trim_start().starts_with('@') && !(6..=7).contains(&fields) {
        return Err(invalid(match fields {
            0 => "it is empty".to_owned(),
            5 => "it has 5 fields, but a seconds field is required first".to_owned(),
            n => format!("it has {n} fields"),
        }));
    }
    let parser = CronParser::builder()
        .seconds(Seconds::Required)
        .year(Year::Optional)
        .build();
    parser.parse(expr).map_err(|e| {
        let reason = e.to_string().trim_end_matches('.').to_owned();
        // Name the field at fault: the one whose replacement by `*` makes the rest parse.
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let culprit = (0..fields.len()).find(|&i| {
            let mut fixed = fields.clone();
            fixed[i] = "*";
            parser.parse(&fixed.join(" ")).is_ok()
        });
        invalid(match culprit {
            Some(i) => {
                let (name, accepted) = FIELDS[i];
                format!(
                    "the {name} field `{}` is invalid ({reason}); {name} takes {accepted}",
                    fields[i]
                )
            }
            None => reason,
        })
    })
}

/// The fields in order, with the values each takes.
const FIELDS: [(&str, &str); 7] = [
    ("second", "0-59"),
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31, L or nW"),
    ("month", "1-12 or JAN-DEC"),
    ("day-of-week", "0-7 or SUN-SAT, n#k or nL"),
    ("year", "1-5000"),
];

/// Whether no date ever matches. Without a year field the calendar repeats every 400 years
/// (146,097 days, a whole number of weeks), so one 400-year window decides; croner searches up
/// to the year 5000, so the window starts in 4600 and a pattern that never matches costs a
/// few milliseconds, once, here. With a year field, the search runs from 1970.
fn never_fires(cron: &Cron, expr: &str) -> bool {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let year_bound = fields.len() == 7 && !matches!(fields[6], "*" | "?");
    let from_year = if year_bound { 1970 } else { 4600 };
    let from = NaiveDate::from_ymd_opt(from_year, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .expect("a valid date");
    cron.find_next_occurrence(&from, true).is_err()
}

/// A zone name the user probably meant: the same name in other case, or a zone whose city is
/// the name given (`berlin`, `New York`).
fn suggest_zone(name: &str) -> Option<String> {
    let wanted = name.trim().replace(' ', "_");
    let names = || chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name());
    names()
        .find(|n| n.eq_ignore_ascii_case(&wanted))
        .or_else(|| {
            names().find(|n| {
                n.rsplit('/')
                    .next()
                    .is_some_and(|city| city.eq_ignore_ascii_case(&wanted))
            })
        })
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn civil(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
    }

    fn berlin() -> CronSchedule {
        CronSchedule::new("* * * * * *", Some("Europe/Berlin")).unwrap()
    }

    #[test]
    fn high_water_is_the_civil_time_outside_repeated_ranges() {
        let s = berlin();
        // 2025-06-01 10:00:00 UTC is 12:00:00 CEST.
        assert_eq!(
            s.high_water(civil("2025-06-01 10:00:00")),
            civil("2025-06-01 12:00:00")
        );
        // First pass of the repeated hour on 2025-10-26: 00:30 UTC is 02:30 CEST.
        assert_eq!(
            s.high_water(civil("2025-10-26 00:30:00")),
            civil("2025-10-26 02:30:00")
        );
    }

    #[test]
    fn high_water_in_a_second_pass_is_the_end_of_the_first() {
        let s = berlin();
        // 01:30 UTC is 02:30 CET, the second pass; the first pass ended at 02:59:59 CEST.
        assert_eq!(
            s.high_water(civil("2025-10-26 01:30:00")),
            civil("2025-10-26 02:59:59")
        );
        // At the transition itself (01:00 UTC = 02:00 CET) too.
        assert_eq!(
            s.high_water(civil("2025-10-26 01:00:00")),
            civil("2025-10-26 02:59:59")
        );
        // Once the second pass is over, the clock is past the mark again.
        assert_eq!(
            s.high_water(civil("2025-10-26 02:00:00")),
            civil("2025-10-26 03:00:00")
        );
    }

    #[test]
    fn fire_maps_gaps_to_their_end_and_repeats_to_the_first_occurrence() {
        let s = berlin();
        // 02:30 does not exist on 2025-03-30; the clock jumps to 03:00 CEST = 01:00 UTC.
        assert_eq!(
            s.fire(civil("2025-03-30 02:30:00")),
            Some(civil("2025-03-30 01:00:00"))
        );
        // 02:30 on 2025-10-26 happens at 00:30 UTC (CEST) and 01:30 UTC (CET): the first.
        assert_eq!(
            s.fire(civil("2025-10-26 02:30:00")),
            Some(civil("2025-10-26 00:30:00"))
        );
        // Lord Howe's gap is 30 minutes: 02:00 → 02:30 local (+10:30 → +11).
        let lh = CronSchedule::new("* * * * * *", Some("Australia/Lord_Howe")).unwrap();
        assert_eq!(
            lh.fire(civil("2025-10-05 02:10:00")),
            Some(civil("2025-10-04 15:30:00"))
        );
    }

    #[test]
    fn zone_suggestions() {
        assert_eq!(
            suggest_zone("europe/berlin").as_deref(),
            Some("Europe/Berlin")
        );
        assert_eq!(
            suggest_zone("New York").as_deref(),
            Some("America/New_York")
        );
        assert_eq!(suggest_zone("Nowhere/Atlantis"), None);
    }

    #[test]
    fn never_fires_is_exact_for_rare_but_real_dates() {
        let p = |e: &str| parse(e).unwrap();
        assert!(never_fires(&p("0 0 0 30 2 *"), "0 0 0 30 2 *"));
        assert!(never_fires(
            &p("0 0 0 31 4,6,9,11 *"),
            "0 0 0 31 4,6,9,11 *"
        ));
        // 29 February on a Monday: every 5 to 11 years.
        assert!(!never_fires(&p("0 0 0 29 2 +MON"), "0 0 0 29 2 +MON"));
        assert!(!never_fires(&p("0 0 0 29 2 * 2028"), "0 0 0 29 2 * 2028"));
        assert!(never_fires(&p("0 0 0 29 2 * 2027"), "0 0 0 29 2 * 2027"));
    }
}
