//! Cron schedules: croner parses, this file matches local (civil) times and maps them to
//! instants.
//!
//! A schedule copies croner's parsed fields into bitmasks ([`DateRule`] for the date,
//! [`DayCache`] for the time of day) and matches a time zone-free civil timeline with croner's
//! rules, where there is no daylight saving. Mapping a matching civil time to the instant it
//! fires, and an instant back to the civil time the search starts from, is done here too, so
//! our two DST rules hold whatever the parser's own DST handling does:
//!
//! - `fire(t)` for a civil time `t` is the first instant at which the zone's wall clock shows
//!   `t` or later. A `t` inside a spring-forward gap maps to the end of the gap; a `t` shown
//!   twice at fall-back maps to its first occurrence. `fire` never decreases as `t` grows.
//! - So the next fire after instant `a` is `fire(t)` for the smallest matching `t` above the
//!   highest civil time the wall clock has shown up to `a` (its "high-water mark"). That mark
//!   is the civil time at `a`, except during the second pass of a repeated hour, where it is
//!   the end of the first pass.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use chrono::{
    DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeDelta, TimeZone,
};
use chrono_tz::{GapInfo, Tz};
use croner::parser::{CronParser, Seconds, Year};
use croner::time::days_in_month;
use croner::{Cron, CronComponent, YEAR_LOWER_LIMIT, YEAR_UPPER_LIMIT};

use super::error::ScheduleError;
use super::nanos::{NANOS_PER_SEC, Nanos, floor_secs};

/// A validated cron schedule in a time zone.
///
/// It keeps the expression's time of day as three bitmasks ([`DayCache`]) and its date part
/// as a [`DateRule`]: 64 bytes in all, and no croner value (croner's pattern is ~5.5 KB, 5,001 B
/// of it the year field).
#[derive(Debug, Clone)]
pub(crate) struct CronSchedule {
    date: DateRule,
    zone: Tz,
    day: DayCache,
}

/// An expression's date fields (day of month, month, day of week, year) as croner parsed
/// them, in 32 bytes, and croner's rule for whether a civil day matches them.
///
/// croner's own pattern keeps each field as a byte per value, ~5.5 KB per expression (5,001 B
/// of it the year field); a schedule copies the bits that decide a day here once, at
/// validation, and keeps no croner value. [`DateRule::matches`] is croner's `day_match`
/// (`L`, `LW`, `nW`, `n#k`, `nL`, the Vixie either-field rule, `+` for both), restated on these
/// bits; `the_date_rule_agrees_with_croner` and the brute-force oracle in `tests/schedule.rs`
/// check it against croner.
#[derive(Debug, Clone)]
struct DateRule {
    /// Days of the month in the field (bit d: day d).
    days: u32,
    /// The `nW` days (bit d: `dW`).
    days_w: u32,
    /// Months in the field (bit m: month m, 1-12).
    months: u16,
    /// Per weekday (0 = Sunday), croner's bits: `ALL_BIT`, `NTH_1ST_BIT`…`NTH_5TH_BIT`,
    /// `LAST_BIT`.
    weekdays: [u8; 7],
    /// [`RULE_L`], [`RULE_W`], [`STAR_DOM`], [`STAR_DOW`], [`DOM_AND_DOW`].
    flags: u8,
    /// The first and last year the expression fires in (1 and 4999 without a year field).
    first_year: u16,
    last_year: u16,
    /// The years from `first_year` to `last_year`, as bits from year 0, when a list or a step
    /// leaves gaps between them.
    year_bits: Option<Arc<Vec<u64>>>,
}

// croner's bits per field value (`croner::component`, not exported; the tests against croner
// would fail if a croner release changed them).
const ALL_BIT: u8 = 1;
const NTH_1ST_BIT: u8 = 1 << 1;
const NTH_2ND_BIT: u8 = 1 << 2;
const NTH_3RD_BIT: u8 = 1 << 3;
const NTH_4TH_BIT: u8 = 1 << 4;
const NTH_5TH_BIT: u8 = 1 << 5;
const LAST_BIT: u8 = 1 << 6;
const CLOSEST_WEEKDAY_BIT: u8 = 1 << 7;

/// `DateRule::flags`: the day-of-month field has `L` (croner's component-wide `LAST_BIT`).
const RULE_L: u8 = 1;
/// `DateRule::flags`: the day-of-month field has `W` (component-wide `CLOSEST_WEEKDAY_BIT`).
const RULE_W: u8 = 2;
/// `DateRule::flags`: the day-of-month field is `*`.
const STAR_DOM: u8 = 4;
/// `DateRule::flags`: the day-of-week field is `*`.
const STAR_DOW: u8 = 8;
/// `DateRule::flags`: both day fields must match (`+` before the day-of-week field).
const DOM_AND_DOW: u8 = 16;

/// The last year a search looks at: croner searches up to its year limit, 5000, but cannot
/// step to a later day or time within it.
const LAST_YEAR: i32 = YEAR_UPPER_LIMIT - 1;

/// The years up to [`LAST_YEAR`] whose bit is set in croner's year field, as
/// `(first, last, bits)`: `bits` only when the years from `first` to `last` have gaps (a list
/// or a step), as bits from year 0 (bit y: year y). An empty field gives `first > last`.
fn year_set(years: &CronComponent) -> (u16, u16, Option<Arc<Vec<u64>>>) {
    let set: Vec<u16> = years
        .get_set_values(ALL_BIT)
        .into_iter()
        .filter(|&y| i32::from(y) <= LAST_YEAR)
        .collect();
    let (Some(&first), Some(&last)) = (set.first(), set.last()) else {
        return (1, 0, None);
    };
    if usize::from(last - first) + 1 == set.len() {
        return (first, last, None);
    }
    let mut bits = vec![0u64; usize::from(last) / 64 + 1];
    for y in set {
        bits[usize::from(y) / 64] |= 1 << (y % 64);
    }
    (first, last, Some(Arc::new(bits)))
}

/// Days from 0001-01-01 (chrono's day 1) to 1970-01-01.
const UNIX_EPOCH_CE: i64 = 719_163;

impl DateRule {
    /// The date fields of `cron`; `every_year` when the expression has no year field or `*`.
    fn new(cron: &Cron, every_year: bool) -> Self {
        let p = &cron.pattern;
        let bits = |c: &CronComponent, range: std::ops::RangeInclusive<u16>, bit: u8| {
            range
                .filter(|&v| c.is_bit_set(v, bit).unwrap_or(false))
                .fold(0u32, |m, v| m | 1 << v)
        };
        let weekdays = std::array::from_fn(|w| {
            [
                ALL_BIT,
                NTH_1ST_BIT,
                NTH_2ND_BIT,
                NTH_3RD_BIT,
                NTH_4TH_BIT,
                NTH_5TH_BIT,
                LAST_BIT,
            ]
            .into_iter()
            .filter(|&bit| p.days_of_week.is_bit_set(w as u16, bit).unwrap_or(false))
            .fold(0u8, |m, bit| m | bit)
        });
        let flag = |on: bool, f: u8| if on { f } else { 0 };
        let (first_year, last_year, year_bits) = if every_year {
            (YEAR_LOWER_LIMIT as u16, LAST_YEAR as u16, None)
        } else {
            year_set(&p.years)
        };
        Self {
            days: bits(&p.days, 1..=31, ALL_BIT),
            days_w: bits(&p.days, 1..=31, CLOSEST_WEEKDAY_BIT),
            months: bits(&p.months, 1..=12, ALL_BIT) as u16,
            weekdays,
            flags: flag(p.days.is_feature_enabled(LAST_BIT), RULE_L)
                | flag(p.days.is_feature_enabled(CLOSEST_WEEKDAY_BIT), RULE_W)
                | flag(p.is_dom_wildcard(), STAR_DOM)
                | flag(p.is_dow_wildcard(), STAR_DOW)
                | flag(p.matches_dom_and_dow(), DOM_AND_DOW),
            first_year,
            last_year,
            year_bits,
        }
    }

    /// The first year at or after `year` that the expression fires in.
    fn next_year(&self, year: i32) -> Option<i32> {
        let mut y = year.max(i32::from(self.first_year));
        if y > i32::from(self.last_year) {
            return None;
        }
        let Some(bits) = &self.year_bits else {
            return Some(y);
        };
        while let Some(word) = bits.get(y as usize / 64) {
            if let Some(b) = next_bit(*word, y as u32 % 64) {
                return Some(y / 64 * 64 + b as i32);
            }
            y = (y / 64 + 1) * 64;
        }
        None
    }

    /// The first civil day (days since 1970-01-01) at or after `day` that the date fields
    /// match; `None` past the year 4999 (croner's limit).
    fn matching_day(&self, day: i64) -> Option<i64> {
        let ce = i32::try_from(day.checked_add(UNIX_EPOCH_CE)?).ok()?;
        let mut date = NaiveDate::from_num_days_from_ce_opt(ce)?;
        loop {
            let year = date.year();
            let wanted = self.next_year(year)?;
            if wanted != year {
                date = NaiveDate::from_ymd_opt(wanted, 1, 1)?;
                continue;
            }
            let month = date.month();
            if self.months >> month & 1 == 0 {
                date = match month {
                    12 => NaiveDate::from_ymd_opt(year + 1, 1, 1)?,
                    _ => NaiveDate::from_ymd_opt(year, month + 1, 1)?,
                };
                continue;
            }
            let weekday = date.weekday().num_days_from_sunday();
            if self.matches(days_in_month(year, month), date.day(), weekday) {
                return Some(i64::from(date.num_days_from_ce()) - UNIX_EPOCH_CE);
            }
            date = date.succ_opt()?;
        }
    }

    /// croner's `day_match` for the day `day` (weekday `weekday`, 0 = Sunday) of a month of
    /// `month_len` days whose year and month match.
    fn matches(&self, month_len: u32, day: u32, weekday: u32) -> bool {
        let flags = self.flags;
        let mut dom = self.days >> day & 1 == 1;
        if !dom && flags & RULE_L != 0 {
            dom = if flags & RULE_W != 0 {
                // `LW`: the last weekday (Monday to Friday) of the month.
                let last_weekday = (weekday + month_len - day) % 7;
                day == match last_weekday {
                    6 => month_len - 1,
                    0 => month_len - 2,
                    _ => month_len,
                }
            } else {
                day == month_len
            };
        }
        if !dom && self.days_w != 0 {
            dom = self.closest_weekday(month_len, day, weekday);
        }
        let bits = self.weekdays[weekday as usize];
        let nth = match (day - 1) / 7 {
            n @ 0..=4 => NTH_1ST_BIT << n,
            _ => 0,
        };
        let dow = bits & (nth | ALL_BIT) != 0 || (bits & LAST_BIT != 0 && day + 7 > month_len);
        let (star_dom, star_dow) = (flags & STAR_DOM != 0, flags & STAR_DOW != 0);
        if (dom && star_dow) || (dow && star_dom) {
            true
        } else if !star_dom && !star_dow {
            if flags & DOM_AND_DOW == 0 {
                dom || dow
            } else {
                dom && dow
            }
        } else {
            false
        }
    }

    /// Whether an `nW` day of the field resolves to `day`: the weekday nearest to it within
    /// its month (a Saturday moves to Friday, or Monday on the 1st; a Sunday to Monday, or
    /// Friday on the month's last day).
    fn closest_weekday(&self, month_len: u32, day: u32, weekday: u32) -> bool {
        let first = day.saturating_sub(2).max(1);
        let last = (day + 2).min(month_len);
        (first..=last).any(|w| {
            if self.days_w >> w & 1 == 0 {
                return false;
            }
            let target = match (weekday + 7 + w - day) % 7 {
                6 if w > 1 => w - 1,
                6 => w + 2,
                0 if w < month_len => w + 1,
                0 => w - 2,
                _ => w,
            };
            target == day
        })
    }
}

const DAY_SECS: i64 = 86_400;

/// An expression's time of day, and the day of its last match.
///
/// croner matches a civil time when its year, month, day (day of month and day of week, with
/// `L`, `W`, `#`) and its hour, minute and second each match, and the date's part depends on
/// the date alone. So the fires of a matching day are the (hour, minute, second) whose three
/// fields match, and the next one after a time of that day is found in three bitmasks. A timer
/// asks for the next fire once per fire, and a schedule that fires several times a day asks
/// about the day of its last fire: a bit scan (nanoseconds), with no day search.
#[derive(Debug)]
struct DayCache {
    /// Seconds, minutes and hours that match, as bits (bit n: the value n).
    seconds: u64,
    minutes: u64,
    hours: u32,
    /// The civil day (days since 1970-01-01) of the last match found with the [`DateRule`];
    /// `i32::MIN` before the first, and for good when a mask is empty (never for a schedule
    /// that parsed).
    day: AtomicI32,
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
            hours: mask(24, &|v| p.hour_match(v).unwrap_or(false)) as u32,
            day: AtomicI32::new(i32::MIN),
        }
    }

    /// The first match at or after the civil time `at` (seconds since 1970, as if UTC), if it
    /// is on the day of the last match.
    fn next_from(&self, at: i64) -> Option<i64> {
        if at.div_euclid(DAY_SECS) != i64::from(self.day.load(Ordering::Relaxed)) {
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
        let h = next_bit(u64::from(self.hours), h + 1)?;
        Some(hms(h, first(self.minutes), first(self.seconds)))
    }

    /// Whether a time field matches nothing (never for a pattern croner parsed; the guard for
    /// one that would).
    fn has_empty_mask(&self) -> bool {
        self.seconds == 0 || self.minutes == 0 || self.hours == 0
    }

    /// Records the civil day of a match (`at`, seconds since 1970 as if UTC).
    fn learn(&self, at: i64) {
        if !self.has_empty_mask() {
            let day = i32::try_from(at.div_euclid(DAY_SECS)).unwrap_or(i32::MIN);
            self.day.store(day, Ordering::Relaxed);
        }
    }
}

impl Clone for DayCache {
    fn clone(&self) -> Self {
        Self {
            day: AtomicI32::new(self.day.load(Ordering::Relaxed)),
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
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let year_bound = fields.len() == 7 && fields[6] != "*";
        let date = DateRule::new(&cron, !year_bound);
        let day = DayCache::new(&cron);
        if day.has_empty_mask() || never_matches(&date, year_bound) {
            return Err(ScheduleError::NeverFires {
                expr: expr.to_owned(),
            });
        }
        Ok(Self { date, zone, day })
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
    /// matching day from the [`DateRule`] and the first matching time on it.
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

/// Whether no day ever matches (30 February). Without a year field the calendar repeats every
/// 400 years (146,097 days, a whole number of weeks), so one 400-year window decides; a search
/// ends with the year 4999, so the window starts in 4600, and a rule that never matches costs
/// a few hundred microseconds, once, at validation. With a year field, the search runs from
/// 1970.
fn never_matches(date: &DateRule, year_bound: bool) -> bool {
    let from =
        NaiveDate::from_ymd_opt(if year_bound { 1970 } else { 4600 }, 1, 1).expect("a valid date");
    let day = i64::from(from.num_days_from_ce()) - UNIX_EPOCH_CE;
    date.matching_day(day).is_none()
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
        let never = |e: &str| match CronSchedule::new(e, None) {
            Err(ScheduleError::NeverFires { expr }) => expr == e,
            Err(other) => panic!("`{e}`: {other}"),
            Ok(_) => false,
        };
        assert!(never("0 0 0 30 2 *"));
        assert!(never("0 0 0 31 4,6,9,11 *"));
        // 29 February on a Monday: every 5 to 11 years.
        assert!(!never("0 0 0 29 2 +MON"));
        assert!(!never("0 0 0 29 2 * 2028"));
        assert!(never("0 0 0 29 2 * 2027"));
        // The fifth Friday of February: only in a leap year starting on a Friday or Thursday.
        assert!(!never("0 0 0 ? 2 5#5"));
        assert!(never("0 0 0 ? 2 5#5 2026-2031"));
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
                    assert_ne!(day, i32::MIN, "`{expr}`: the cache was used");
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

    /// The date rule matches the days croner's own search finds, for date fields with every
    /// modifier croner has, from random days over ten years (leap years, months of every
    /// length, a year field that runs out).
    #[test]
    fn the_date_rule_agrees_with_croner() {
        let doms = [
            "*", "?", "L", "LW", "15W", "1W", "31W", "30W", "1,15", "L,15", "5-10", "*/3", "31",
            "29", "2W,L",
        ];
        let months = ["*", "2", "1-3", "*/4", "2,11", "12"];
        let dows = [
            "*",
            "?",
            "MON-FRI",
            "5#3",
            "1L",
            "0",
            "SUN#1,WED#5",
            "6L",
            "+MON",
            "+1-5",
            "7",
        ];
        let years = ["", " *", " 2026-2027", " 2030", " 2026,2029,2031", " */3"];
        let mut rng = fastrand::Rng::with_seed(11);
        let mut checked = 0;
        for _ in 0..400 {
            let expr = format!(
                "0 0 0 {} {} {}{}",
                doms[rng.usize(..doms.len())],
                months[rng.usize(..months.len())],
                dows[rng.usize(..dows.len())],
                years[rng.usize(..years.len())],
            );
            let Ok(s) = CronSchedule::new(&expr, None) else {
                continue;
            };
            let cron = parse(&expr).unwrap();
            for _ in 0..60 {
                // 2024-10-04 to 2034-08-11.
                let day = 20_000 + rng.i64(0..3_600);
                let before = civil("1970-01-01 00:00:00") + TimeDelta::days(day) - SECOND;
                let want = cron
                    .find_next_occurrence(&before, false)
                    .ok()
                    .map(|t| t.and_utc().timestamp().div_euclid(DAY_SECS));
                assert_eq!(s.date.matching_day(day), want, "`{expr}` from day {day}");
                checked += 1;
            }
        }
        assert!(checked > 10_000, "{checked} days checked");
    }

    /// A schedule is 64 bytes with its zone and time masks; years are kept as a range, with
    /// bits only for a list or step, and a search skips the years between.
    #[test]
    fn a_schedule_is_small_and_keeps_years_compactly() {
        assert!(std::mem::size_of::<CronSchedule>() <= 64);
        let rule = |e: &str| CronSchedule::new(e, None).unwrap().date;
        let years = |r: &DateRule| (r.first_year, r.last_year, r.year_bits.is_some());
        assert_eq!(years(&rule("0 0 0 * * *")), (1, 4999, false));
        assert_eq!(years(&rule("0 0 0 * * * *")), (1, 4999, false));
        assert_eq!(years(&rule("0 0 0 * * * 2026-2030")), (2026, 2030, false));
        let list = rule("0 0 0 * * * 2026,2041,2170");
        assert_eq!(years(&list), (2026, 2170, true));
        let next: Vec<Option<i32>> = [1, 2026, 2027, 2042, 2170, 2171]
            .map(|y| list.next_year(y))
            .to_vec();
        assert_eq!(
            next,
            [
                Some(2026),
                Some(2026),
                Some(2041),
                Some(2170),
                Some(2170),
                None
            ]
        );
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
