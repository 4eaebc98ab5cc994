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

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use chrono::{DateTime, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeDelta, TimeZone};
use chrono_tz::{GapInfo, Tz};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

use super::error::ScheduleError;
use super::nanos::{NANOS_PER_SEC, Nanos, floor_secs};

/// A validated cron schedule in a time zone.
///
/// It keeps the expression's time of day as three bitmasks ([`DayCache`]) and its date part
/// as croner's pattern with the time fields fixed to 00:00:00 (`date`): croner's pattern is
/// ~5.5 KB (5,001 B of it the year field), and schedules whose date fields are written the
/// same way (`* * *` in most expressions) share one through [`DatePatterns`], whatever their
/// times of day.
#[derive(Debug, Clone)]
pub(crate) struct CronSchedule {
    /// Matches the midnight (civil) of each day the expression fires on.
    date: Arc<DatePattern>,
    zone: Tz,
    day: DayCache,
}

/// Date-only patterns by the text of their date fields (see [`date_key`]), shared by the
/// schedules built with one map.
pub(crate) type DatePatterns = HashMap<String, Arc<DatePattern>>;

/// croner's pattern for an expression's date fields, and the last answer of its day search,
/// shared by every schedule that uses the pattern: thousands of triggers registered together,
/// or due on the same day, ask it about the same day, and all but the first get the answer
/// without a search.
#[derive(Debug)]
pub(crate) struct DatePattern {
    /// Matches the midnight (civil) of each day the date fields match.
    cron: Cron,
    /// The last [`DatePattern::matching_day`] question and answer for an even and for an odd
    /// day (a trigger asks about today, then often tomorrow), each as two `i32` day numbers in
    /// one word (question high, answer low; [`NO_DAY`] for "none"); [`NOT_ASKED`] before the
    /// first. The answer depends on the question alone, so any thread may reuse it.
    last: [AtomicU64; 2],
}

/// `DatePattern::last` before the first question.
const NOT_ASKED: u64 = u64::MAX;
/// The answer "no matching day" (past croner's last year).
const NO_DAY: i32 = i32::MIN;

impl DatePattern {
    fn new(cron: Cron) -> Self {
        Self {
            cron: date_only(cron),
            last: [AtomicU64::new(NOT_ASKED), AtomicU64::new(NOT_ASKED)],
        }
    }

    /// The first civil day (days since 1970-01-01) at or after `day` that the date fields
    /// match, from croner's search (or the last answer, when the question is the same);
    /// `None` past croner's last year.
    fn matching_day(&self, day: i64) -> Option<i64> {
        let Ok(asked) = i32::try_from(day) else {
            return self.search(day);
        };
        let slot = &self.last[(asked & 1) as usize];
        let last = slot.load(Ordering::Relaxed);
        if last != NOT_ASKED && (last >> 32) as u32 as i32 == asked {
            let answer = last as u32 as i32;
            return (answer != NO_DAY).then_some(i64::from(answer));
        }
        let found = self.search(day);
        let answer = match found.map(i32::try_from) {
            Some(Ok(a)) if a != NO_DAY => a,
            Some(_) => return found,
            None => NO_DAY,
        };
        slot.store(
            u64::from(asked as u32) << 32 | u64::from(answer as u32),
            Ordering::Relaxed,
        );
        found
    }

    fn search(&self, day: i64) -> Option<i64> {
        let before = DateTime::from_timestamp(day.checked_mul(DAY_SECS)? - 1, 0)?.naive_utc();
        let midnight = self.cron.find_next_occurrence(&before, false).ok()?;
        Some(midnight.and_utc().timestamp().div_euclid(DAY_SECS))
    }
}

const DAY_SECS: i64 = 86_400;

/// A shortcut past croner's search for the fires of a day known to match.
///
/// croner matches a civil time when its year, month, day (day of month and day of week, with
/// `L`, `W`, `#`) and its hour, minute and second each match, and the date's part depends on
/// the date alone. So once croner has returned a match on some civil day, every (hour, minute,
/// second) of that day whose three fields match is a match too, and the next one after a
/// time of that day is found in three bitmasks. A timer asks for the next fire once per fire,
/// and a schedule that fires several times a day asks about the day of its last fire: a
/// bit scan (nanoseconds) instead of croner's search (hundreds of nanoseconds).
#[derive(Debug)]
struct DayCache {
    /// Seconds, minutes and hours that match, as bits (bit n: the value n).
    seconds: u64,
    minutes: u64,
    hours: u64,
    /// The civil day (days since 1970-01-01) of croner's last answer; `i64::MIN` before the
    /// first, and for good when a mask is empty (never for a schedule that parsed).
    day: AtomicI64,
}

impl DayCache {
    fn new(cron: &Cron) -> Self {
        let mask = |n: u32, hit: &dyn Fn(u32) -> bool| {
            (0..n).filter(|&v| hit(v)).fold(0u64, |m, v| m | 1 << v)
        };
        let p = &cron.pattern;
        Self {
            seconds: mask(60, &|v| p.second_match(v).unwrap_or(false)),
            minutes: mask(60, &|v| p.minute_match(v).unwrap_or(false)),
            hours: mask(24, &|v| p.hour_match(v).unwrap_or(false)),
            day: AtomicI64::new(i64::MIN),
        }
    }

    /// The first match at or after the civil time `at` (seconds since 1970, as if UTC), if it
    /// is on the day croner last answered about.
    fn next_from(&self, at: i64) -> Option<i64> {
        if at.div_euclid(DAY_SECS) != self.day.load(Ordering::Relaxed) {
            return None;
        }
        self.next_on_day(at)
    }

    /// The first time of day that matches at or after the civil time `at`, on `at`'s day (the
    /// caller knows that the day matches), if there is one left that day.
    fn next_on_day(&self, at: i64) -> Option<i64> {
        let day = at.div_euclid(DAY_SECS);
        let sod = at.rem_euclid(DAY_SECS);
        let (h, m, s) = (
            (sod / 3600) as u32,
            (sod / 60 % 60) as u32,
            (sod % 60) as u32,
        );
        let first = |mask: u64| i64::from(mask.trailing_zeros());
        let hms = |h: u32, m: i64, s: i64| day * DAY_SECS + i64::from(h) * 3600 + m * 60 + s;
        if self.hours >> h & 1 == 1 {
            if self.minutes >> m & 1 == 1
                && let Some(s) = next_bit(self.seconds, s)
            {
                return Some(hms(h, i64::from(m), i64::from(s)));
            }
            if let Some(m) = next_bit(self.minutes, m + 1) {
                return Some(hms(h, i64::from(m), first(self.seconds)));
            }
        }
        let h = next_bit(self.hours, h + 1)?;
        Some(hms(h, first(self.minutes), first(self.seconds)))
    }

    /// Whether a time field matches nothing (never for a pattern croner parsed; the guard for
    /// one that would).
    fn has_empty_mask(&self) -> bool {
        self.seconds == 0 || self.minutes == 0 || self.hours == 0
    }

    /// Records the civil day of a match croner returned (`at`, seconds since 1970 as if UTC).
    fn learn(&self, at: i64) {
        if !self.has_empty_mask() {
            self.day.store(at.div_euclid(DAY_SECS), Ordering::Relaxed);
        }
    }
}

impl Clone for DayCache {
    fn clone(&self) -> Self {
        Self {
            day: AtomicI64::new(self.day.load(Ordering::Relaxed)),
            ..*self
        }
    }
}

/// The lowest set bit of `mask` at position `from` or above.
fn next_bit(mask: u64, from: u32) -> Option<u32> {
    let rest = mask & u64::MAX.checked_shl(from).unwrap_or(0);
    (rest != 0).then(|| rest.trailing_zeros())
}

const SECOND: TimeDelta = TimeDelta::seconds(1);

impl CronSchedule {
    /// Parses `expr` (6 or 7 fields) and `zone` (IANA name, UTC when `None`), and checks that
    /// the expression fires at all.
    #[cfg(test)]
    pub(crate) fn new(expr: &str, zone: Option<&str>) -> Result<Self, ScheduleError> {
        Self::new_shared(expr, zone, &mut DatePatterns::new())
    }

    /// [`CronSchedule::new`], sharing the date-only pattern with the schedules in `dates`
    /// whose date fields are written the same way (and adding it when there is none).
    pub(crate) fn new_shared(
        expr: &str,
        zone: Option<&str>,
        dates: &mut DatePatterns,
    ) -> Result<Self, ScheduleError> {
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
        let day = DayCache::new(&cron);
        let key = date_key(expr);
        let known = dates.get(&key).map(Arc::clone);
        // Whether the expression fires at all depends on its date fields alone once each time
        // field matches something: a date part already in `dates` passed this check (a
        // failing one is never added), so only a new one is searched.
        if (known.is_none() || day.has_empty_mask()) && never_fires(&cron, expr) {
            return Err(ScheduleError::NeverFires {
                expr: expr.to_owned(),
            });
        }
        let date = match known {
            Some(date) => date,
            None => {
                let date = Arc::new(DatePattern::new(cron));
                dates.insert(key, Arc::clone(&date));
                date
            }
        };
        Ok(Self { date, zone, day })
    }

    /// The shared date-only pattern (for tests of the sharing).
    #[cfg(test)]
    pub(crate) fn date_pattern(&self) -> Arc<DatePattern> {
        Arc::clone(&self.date)
    }

    /// The first fire strictly after `after`, or `None` when there is none (a year field that
    /// has run out, or past the year 4999, croner's limit).
    pub(crate) fn next_after(&self, after: Nanos) -> Option<Nanos> {
        if self.zone == Tz::UTC {
            // No offset and no daylight saving: the civil time is the instant, and the first
            // match after the whole second `at` is after `after`. A timer asks this once per
            // fire; skipping the zone lookups saves about a third of it.
            let at = floor_secs(after);
            let t = match at.checked_add(1).and_then(|a| self.day.next_from(a)) {
                Some(t) => t,
                None => self
                    .next_civil(DateTime::from_timestamp(at, 0)?.naive_utc())?
                    .and_utc()
                    .timestamp(),
            };
            return Some(i128::from(t) * NANOS_PER_SEC);
        }
        let at = DateTime::from_timestamp(floor_secs(after), 0)?.naive_utc();
        let mut from = self.high_water(at);
        // `fire` is monotonic and `from` is the exact high-water mark, so the first candidate
        // is the answer; the loop only guards against a zone with back-to-back transitions.
        for _ in 0..10_000 {
            let t = self.next_civil(from)?;
            let fire = self.fire(t)?;
            let nanos = i128::from(fire.and_utc().timestamp()) * NANOS_PER_SEC;
            if nanos > after {
                return Some(nanos);
            }
            from = t;
        }
        None
    }

    /// The first match strictly after the civil time `from` (whole seconds): from the
    /// [`DayCache`] alone when `from` is on the day of its last answer, else the first
    /// matching day from the date-only pattern and the first matching time on it.
    fn next_civil(&self, from: NaiveDateTime) -> Option<NaiveDateTime> {
        let at = from.and_utc().timestamp().checked_add(1)?;
        let t = match self.day.next_from(at) {
            Some(t) => t,
            None => {
                let today = at.div_euclid(DAY_SECS);
                let day = self.date.matching_day(today)?;
                // Later today if today matches and has a time left, else the next matching day's
                // first time.
                let t = match (day == today).then(|| self.day.next_on_day(at)).flatten() {
                    Some(t) => t,
                    None => {
                        let day = if day == today {
                            self.date.matching_day(today + 1)?
                        } else {
                            day
                        };
                        self.day.next_on_day(day * DAY_SECS)?
                    }
                };
                self.day.learn(t);
                t
            }
        };
        DateTime::from_timestamp(t, 0).map(|d| d.naive_utc())
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

/// croner's pattern for `cron` with the time fields fixed to 00:00:00: it matches the midnight
/// of each civil day `cron` matches on. croner matches the date and the time of day
/// independently (the day fields, with `L`, `W` and `#`, depend on the date alone).
fn date_only(mut cron: Cron) -> Cron {
    static MIDNIGHT: LazyLock<Cron> =
        LazyLock::new(|| parse("0 0 0 * * *").expect("a valid expression"));
    cron.pattern.seconds = MIDNIGHT.pattern.seconds.clone();
    cron.pattern.minutes = MIDNIGHT.pattern.minutes.clone();
    cron.pattern.hours = MIDNIGHT.pattern.hours.clone();
    cron
}

/// The text of an expression's date fields (day of month, month, day of week, year), the key
/// under which its date-only pattern is shared. A nickname (`@daily`) is its own key.
fn date_key(expr: &str) -> String {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    if fields.len() >= 6 {
        fields[3..].join(" ")
    } else {
        expr.trim().to_owned()
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

    /// The day cache answers exactly as croner does, fire after fire, across days, months,
    /// leap days and the special day fields.
    #[test]
    fn the_day_cache_agrees_with_croner() {
        let exprs = [
            "* * * * * *",
            "*/7 * * * * *",
            "0 * * * * *",
            "59 59 23 * * *",
            "0,30 */13 1-3,22 * * *",
            "15 0 0 * * *",
            "0 0 12 L * *",
            "0 30 9 15W * *",
            "5 5 5 * * 5#3",
            "0 0 */6 * * 1L",
            "0 0 0 29 2 *",
            "*/20 10 4 1,15 * MON-FRI",
            "0 0 1 * * * 2026-2027",
            "0 */15 * * 2,11 ?",
        ];
        let starts = [
            "2025-12-31 23:59:58",
            "2028-02-28 12:00:00",
            "2026-03-29 00:59:59",
        ];
        for expr in exprs {
            for start in starts {
                let s = CronSchedule::new(expr, None).unwrap();
                let cron = parse(expr).unwrap();
                let mut ours = civil(start);
                let mut theirs = ours;
                for i in 0..3_000 {
                    let want = cron.find_next_occurrence(&theirs, false).ok();
                    let got = s.next_civil(ours);
                    assert_eq!(got, want, "`{expr}` from {start}, fire {i}");
                    let Some(t) = want else { break };
                    (ours, theirs) = (t, t);
                }
                if ours != civil(start) {
                    let day = s.day.day.load(Ordering::Relaxed);
                    assert_ne!(day, i64::MIN, "`{expr}`: the cache was used");
                }
            }
        }
        // An empty mask never turns the cache on (a pattern that parsed has none; this is the
        // guard for one that would).
        let s = CronSchedule::new("* * * * * *", None).unwrap();
        let empty = DayCache {
            seconds: 0,
            ..s.day.clone()
        };
        empty.learn(0);
        assert_eq!(empty.next_from(1), None);
    }

    /// The remembered last answer is what a search answers, for questions in any order and
    /// repeated, "no day" (past a year field's end) included.
    #[test]
    fn a_date_patterns_remembered_answer_is_the_search_answer() {
        for expr in [
            "0 0 0 29 2 *",
            "0 0 0 L * *",
            "0 0 1 * * * 2026-2027",
            "5 5 5 * * 5#3",
            "0 0 0 * * *",
        ] {
            let shared = DatePattern::new(parse(expr).unwrap());
            let mut rng = fastrand::Rng::with_seed(7);
            let mut nones = 0;
            for _ in 0..400 {
                // 2024-10-04 to 2030-06-19.
                let day = 20_000 + rng.i64(0..2_000);
                let want = DatePattern::new(parse(expr).unwrap()).search(day);
                nones += usize::from(want.is_none());
                assert_eq!(shared.matching_day(day), want, "`{expr}` day {day}");
                assert_eq!(shared.matching_day(day), want, "`{expr}` day {day}, again");
            }
            assert_eq!(nones > 0, expr.ends_with("2027"), "`{expr}`");
        }
    }

    #[test]
    fn next_bit_finds_the_lowest_bit_at_or_above() {
        assert_eq!(next_bit(0b1010, 0), Some(1));
        assert_eq!(next_bit(0b1010, 2), Some(3));
        assert_eq!(next_bit(0b1010, 4), None);
        assert_eq!(next_bit(1 << 59, 59), Some(59));
        assert_eq!(next_bit(u64::MAX, 64), None);
        assert_eq!(next_bit(u64::MAX, 200), None);
    }
}
