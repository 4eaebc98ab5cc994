//! Triggers, schedules and the misfire planner: pure logic, fed with times, no clock and no
//! runtime. Interval math is checked exactly over a million fires; cron against a brute-force
//! oracle that walks the wall clock second by second (DST transitions included); the planner
//! through simulated suspends and wall-clock jumps.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use job_runtime::schedule::{
    ClockJump, ClockReading, Misfire, Plan, Planner, Schedule, ScheduleError, Trigger,
};
use proptest::prelude::*;
use tokio::time::Instant;

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// 2025-06-01 12:00:00 UTC, a whole minute.
fn noon() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_748_779_200)
}

fn nanos(d: u128) -> Duration {
    Duration::new((d / 1_000_000_000) as u64, (d % 1_000_000_000) as u32)
}

// ---------------------------------------------------------------------------------------------
// Intervals
// ---------------------------------------------------------------------------------------------

#[test]
fn every_has_no_drift_over_a_million_fires() {
    // A period with no exact binary or decimal fraction of a second: 1/60 s, rounded.
    let period = Duration::from_nanos(16_666_667);
    let delay = Duration::from_millis(250);
    let start = noon() + Duration::from_nanos(123);
    let s = Schedule::new(&Trigger::every(period).initial_delay(delay), start).unwrap();
    let mut t = start;
    for n in 0..1_000_000u128 {
        let fire = s.next_after(t).expect("an interval always fires again");
        let expected = start + delay + nanos(n * period.as_nanos());
        assert_eq!(fire, expected, "fire {n}");
        t = fire;
    }
    // Fire 1,000,000 computed directly, without walking, is the same instant.
    let far = start + delay + nanos(1_000_000 * period.as_nanos());
    assert_eq!(s.next_after(far - Duration::from_nanos(1)), Some(far));
}

#[test]
fn every_honours_the_initial_delay() {
    let start = noon();
    let s = Schedule::new(
        &Trigger::every(MINUTE).initial_delay(Duration::from_secs(90)),
        start,
    )
    .unwrap();
    // Nothing before start + delay, however early the question.
    assert_eq!(
        s.next_after(UNIX_EPOCH),
        Some(start + Duration::from_secs(90))
    );
    assert_eq!(s.next_after(start), Some(start + Duration::from_secs(90)));
    assert_eq!(
        s.next_after(start + Duration::from_secs(90)),
        Some(start + Duration::from_secs(150))
    );
    // Without a delay the first fire is the start itself.
    let s = Schedule::new(&Trigger::every(MINUTE), start).unwrap();
    assert_eq!(s.next_after(start - Duration::from_nanos(1)), Some(start));
    assert_eq!(s.next_after(start), Some(start + MINUTE));
}

#[test]
fn every_jitter_is_reproducible_from_a_seed_and_spreads_fires() {
    let start = noon();
    let jitter = Duration::from_secs(10);
    let fires = |seed: u64| {
        let s = Schedule::new(&Trigger::every(MINUTE).jitter(jitter).seed(seed), start).unwrap();
        let mut t = start - Duration::from_nanos(1);
        (0..10_000)
            .map(|_| {
                t = s.next_after(t).unwrap();
                t
            })
            .collect::<Vec<_>>()
    };
    let a = fires(42);
    assert_eq!(a, fires(42), "same seed, same fires");
    assert_ne!(a, fires(43), "another seed, other fires");
    let delays: Vec<Duration> = a
        .iter()
        .enumerate()
        .map(|(n, f)| f.duration_since(start + MINUTE * n as u32).unwrap())
        .collect();
    assert!(
        delays.iter().all(|d| *d < jitter),
        "every delay in [0, jitter)"
    );
    // Spread over the whole window: the extremes come close to both ends, and the mean to
    // the middle.
    assert!(delays.iter().min().unwrap() < &Duration::from_millis(50));
    assert!(delays.iter().max().unwrap() > &Duration::from_millis(9_950));
    let mean = delays.iter().sum::<Duration>() / delays.len() as u32;
    assert!(
        (Duration::from_millis(4_800)..Duration::from_millis(5_200)).contains(&mean),
        "{mean:?}"
    );
}

proptest! {
    /// Fire `n` is in `[start + delay + n·period, … + jitter)` for any period, jitter below it,
    /// delay, seed and start; and `next_after` from inside a slot agrees with the walk.
    #[test]
    fn every_jitter_stays_within_bounds(
        period_ns in 1u64..10_000_000_000,
        jitter_frac in 0.0f64..1.0,
        delay_ns in 0u64..10_000_000_000,
        seed in any::<u64>(),
        start_ns in 0u64..4_000_000_000_000_000_000,
    ) {
        let period = Duration::from_nanos(period_ns);
        let jitter = Duration::from_nanos((period_ns as f64 * jitter_frac) as u64).min(period - Duration::from_nanos(1));
        let start = UNIX_EPOCH + Duration::from_nanos(start_ns);
        let delay = Duration::from_nanos(delay_ns);
        let trigger = Trigger::every(period).jitter(jitter).initial_delay(delay).seed(seed);
        let s = Schedule::new(&trigger, start).unwrap();
        let mut t = UNIX_EPOCH;
        for n in 0..200u128 {
            let fire = s.next_after(t).unwrap();
            let base = start + delay + nanos(n * period.as_nanos());
            prop_assert!(fire >= base && fire < base + jitter.max(Duration::from_nanos(1)), "fire {n}");
            if fire > base {
                // From the slot's start, the next fire is this one.
                prop_assert_eq!(s.next_after(base), Some(fire));
            }
            t = fire;
        }
    }
}

#[test]
fn interval_option_errors_name_the_option_the_value_and_what_is_accepted() {
    let err = Schedule::new(&Trigger::every(Duration::ZERO), noon()).unwrap_err();
    assert!(matches!(
        err,
        ScheduleError::InvalidOption {
            option: "every",
            ..
        }
    ));
    assert!(err.to_string().contains("above zero"), "{err}");

    let err = Trigger::every(MINUTE)
        .jitter(MINUTE)
        .validate()
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("jitter = 1m") && msg.contains("shorter than the period (1m)"),
        "{msg}"
    );

    let err = Trigger::every(MINUTE)
        .misfire(Misfire::CatchUp { max: 0 })
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("Misfire::Skip"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The planner: misfires after a suspend, and wall-clock jumps
// ---------------------------------------------------------------------------------------------

/// A planner started at noon (a whole minute) that has already handled its first fire.
fn planner_at_noon(trigger: Trigger) -> (Planner, Instant) {
    let mono = Instant::now();
    let now = ClockReading::new(noon(), mono);
    let mut p = Planner::new(Schedule::new(&trigger, noon()).unwrap(), now);
    assert_eq!(p.deadline(), Some(mono), "the first slot is due at once");
    let plan = p.wake(now);
    assert_eq!((plan.fires(), plan.misfired()), (1, false));
    assert_eq!(plan.next_fire(), Some(noon() + MINUTE));
    assert_eq!(p.deadline(), Some(mono + MINUTE));
    (p, mono)
}

/// Both kinds of every-minute trigger, with `policy`.
fn every_minute(policy: Misfire) -> Vec<Trigger> {
    vec![
        Trigger::every(MINUTE).misfire(policy),
        #[cfg(feature = "cron")]
        Trigger::cron("0 * * * * *").misfire(policy),
    ]
}

/// The process was stopped for an hour: wall and monotonic time both moved on.
fn after_a_one_hour_suspend(p: &mut Planner, mono: Instant) -> Plan {
    let away = MINUTE + HOUR + Duration::from_secs(30);
    p.wake(ClockReading::new(noon() + away, mono + away))
}

/// After the suspend the planner is back on the minute grid: the next wake fires once.
fn resumes_on_schedule(p: &mut Planner, mono: Instant, label: &str) {
    let next = noon() + HOUR + 2 * MINUTE;
    assert_eq!(p.next_fire(), Some(next), "{label}");
    assert_eq!(p.deadline(), Some(mono + HOUR + 2 * MINUTE), "{label}");
    let plan = p.wake(ClockReading::new(next, mono + HOUR + 2 * MINUTE));
    assert_eq!((plan.fires(), plan.misfired()), (1, false), "{label}");
    assert_eq!(plan.next_fire(), Some(next + MINUTE), "{label}");
}

#[test]
fn fire_once_now_fires_once_after_a_suspend_and_resumes_on_schedule() {
    for trigger in every_minute(Misfire::FireOnceNow) {
        let label = trigger.to_string();
        let (mut p, mono) = planner_at_noon(trigger);
        let plan = after_a_one_hour_suspend(&mut p, mono);
        assert_eq!(plan.fires(), 1, "{label}");
        assert!(plan.misfired(), "{label}");
        assert_eq!(plan.late_by(), HOUR + Duration::from_secs(30), "{label}");
        assert_eq!(plan.clock_jump(), None, "{label}: a suspend is not a jump");
        resumes_on_schedule(&mut p, mono, &label);
    }
}

#[test]
fn skip_fires_nothing_after_a_suspend_and_resumes_on_schedule() {
    for trigger in every_minute(Misfire::Skip) {
        let label = trigger.to_string();
        let (mut p, mono) = planner_at_noon(trigger);
        let plan = after_a_one_hour_suspend(&mut p, mono);
        assert_eq!((plan.fires(), plan.misfired()), (0, true), "{label}");
        resumes_on_schedule(&mut p, mono, &label);
    }
}

#[test]
fn catch_up_fires_max_after_a_suspend_and_resumes_on_schedule() {
    for trigger in every_minute(Misfire::CatchUp { max: 5 }) {
        let label = trigger.to_string();
        let (mut p, mono) = planner_at_noon(trigger);
        let plan = after_a_one_hour_suspend(&mut p, mono);
        assert_eq!((plan.fires(), plan.misfired()), (5, true), "{label}");
        resumes_on_schedule(&mut p, mono, &label);
    }
    // Fewer slots missed than `max`: one fire per slot.
    for trigger in every_minute(Misfire::CatchUp { max: 5 }) {
        let (mut p, mono) = planner_at_noon(trigger);
        let away = 3 * MINUTE + Duration::from_secs(30);
        let plan = p.wake(ClockReading::new(noon() + away, mono + away));
        assert_eq!(plan.fires(), 3);
    }
}

#[test]
fn late_within_grace_is_on_time_and_early_wakes_fire_nothing() {
    for policy in [
        Misfire::FireOnceNow,
        Misfire::Skip,
        Misfire::CatchUp { max: 5 },
    ] {
        for trigger in every_minute(policy) {
            let label = trigger.to_string();
            let (mut p, mono) = planner_at_noon(trigger);
            let early = MINUTE - Duration::from_millis(3);
            let plan = p.wake(ClockReading::new(noon() + early, mono + early));
            assert_eq!(plan.fires(), 0, "{label}");
            assert_eq!(plan.next_fire(), Some(noon() + MINUTE), "{label}");
            assert_eq!(p.deadline(), Some(mono + MINUTE), "{label}");
            let late = MINUTE + Duration::from_millis(900);
            let plan = p.wake(ClockReading::new(noon() + late, mono + late));
            assert_eq!((plan.fires(), plan.misfired()), (1, false), "{label}");
            assert_eq!(plan.late_by(), Duration::from_millis(900), "{label}");
        }
    }
}

#[test]
fn skip_still_fires_a_slot_within_grace_after_a_misfire() {
    for trigger in every_minute(Misfire::Skip) {
        let (mut p, mono) = planner_at_noon(trigger);
        // Back half a second after a slot: the missed ones are skipped, that one fires.
        let away = HOUR + Duration::from_millis(500);
        let plan = p.wake(ClockReading::new(noon() + away, mono + away));
        assert_eq!((plan.fires(), plan.misfired()), (1, true));
        assert_eq!(plan.next_fire(), Some(noon() + HOUR + MINUTE));
    }
}

#[test]
fn a_wall_clock_jump_forward_fires_no_burst_and_replans_from_the_new_time() {
    for policy in [Misfire::FireOnceNow, Misfire::CatchUp { max: 5 }] {
        for trigger in every_minute(policy) {
            let label = trigger.to_string();
            let is_cron = label.starts_with("cron");
            let (mut p, mono) = planner_at_noon(trigger);
            // Ten seconds on, the wall clock is set an hour ahead.
            let ten = Duration::from_secs(10);
            let plan = p.wake(ClockReading::new(noon() + ten + HOUR, mono + ten));
            assert_eq!(plan.fires(), 0, "{label}: no burst");
            assert_eq!(plan.clock_jump(), Some(ClockJump::Forward(HOUR)), "{label}");
            // Both wake at the next slot in elapsed time, 50 s from now; the cron's slot is
            // recomputed from the new wall time, the interval grid moved with the clock.
            assert_eq!(p.deadline(), Some(mono + MINUTE), "{label}");
            assert_eq!(p.next_fire(), Some(noon() + HOUR + MINUTE), "{label}");
            let plan = p.wake(ClockReading::new(noon() + HOUR + MINUTE, mono + MINUTE));
            assert_eq!((plan.fires(), plan.clock_jump()), (1, None), "{label}");
            assert!(!is_cron || plan.next_fire() == Some(noon() + HOUR + 2 * MINUTE));
        }
    }
}

#[test]
fn a_wall_clock_jump_back_fires_no_burst_and_replans_from_the_new_time() {
    for policy in [Misfire::FireOnceNow, Misfire::CatchUp { max: 5 }] {
        for trigger in every_minute(policy) {
            let label = trigger.to_string();
            let (mut p, mono) = planner_at_noon(trigger);
            let ten = Duration::from_secs(10);
            let plan = p.wake(ClockReading::new(noon() + ten - HOUR, mono + ten));
            assert_eq!(plan.fires(), 0, "{label}");
            assert_eq!(
                plan.clock_jump(),
                Some(ClockJump::Backward(HOUR)),
                "{label}"
            );
            // The cron follows the new clock: its next slot is 11:01 (local times already
            // fired come round again); the interval keeps its elapsed-time rate.
            assert_eq!(p.next_fire(), Some(noon() - HOUR + MINUTE), "{label}");
            assert_eq!(p.deadline(), Some(mono + MINUTE), "{label}");
        }
    }
}

#[test]
fn a_slot_due_in_elapsed_time_still_fires_once_when_the_clock_jumped_meanwhile() {
    for trigger in every_minute(Misfire::CatchUp { max: 5 }) {
        let label = trigger.to_string();
        let (mut p, mono) = planner_at_noon(trigger);
        // The timer wakes for 12:01 on time, but the wall clock was set ahead by two hours
        // meanwhile: the 12:01 slot fires once; the 120 slots the jump skipped do not.
        let plan = p.wake(ClockReading::new(noon() + MINUTE + 2 * HOUR, mono + MINUTE));
        assert_eq!(plan.fires(), 1, "{label}");
        assert!(!plan.misfired(), "{label}");
        assert_eq!(
            plan.clock_jump(),
            Some(ClockJump::Forward(2 * HOUR)),
            "{label}"
        );
        assert_eq!(
            plan.next_fire(),
            Some(noon() + 2 * HOUR + 2 * MINUTE),
            "{label}"
        );
    }
}

#[test]
fn clock_drift_within_tolerance_is_not_a_jump() {
    for trigger in every_minute(Misfire::FireOnceNow) {
        let (mut p, mono) = planner_at_noon(trigger);
        // NTP slewing: the wall clock gains 300 ms over ten minutes (500 ppm).
        let ten_min = 10 * MINUTE;
        let plan = p.wake(ClockReading::new(
            noon() + ten_min + Duration::from_millis(300),
            mono + ten_min,
        ));
        assert_eq!(plan.clock_jump(), None);
        // A 1.5 s step in ten seconds is a jump.
        let ten = Duration::from_secs(10);
        let plan = p.wake(ClockReading::new(
            noon() + ten_min + Duration::from_millis(300) + ten + Duration::from_millis(1_500),
            mono + ten_min + ten,
        ));
        assert_eq!(
            plan.clock_jump(),
            Some(ClockJump::Forward(Duration::from_millis(1_500)))
        );
    }
}

/// `ClockReading::jump_since` sees what a planner's wake sees, and a vouched reading makes a
/// planner judge the next wake against the tolerance for the time since that reading.
#[test]
fn a_vouched_reading_tightens_the_jump_tolerance() {
    for trigger in every_minute(Misfire::FireOnceNow) {
        let (mut p, mono) = planner_at_noon(trigger);
        let start = ClockReading::new(noon(), mono);
        let hour = 60 * MINUTE;
        // An hour later, 3 s ahead: within the tolerance for an hour (1 s + 3.6 s).
        let later = ClockReading::new(noon() + hour + Duration::from_secs(3), mono + hour);
        assert_eq!(later.jump_since(start), None);
        // Vouched a minute before: 3 s in a minute is a jump, for both.
        let vouched = ClockReading::new(noon() + hour - MINUTE, mono + hour - MINUTE);
        let jump = Some(ClockJump::Forward(Duration::from_secs(3)));
        assert_eq!(later.jump_since(vouched), jump);
        let mut unvouched = p.clone();
        assert_eq!(unvouched.wake(later).clock_jump(), None);
        p.vouch(vouched);
        // An older reading is not taken.
        p.vouch(start);
        assert_eq!(p.last_reading(), vouched);
        assert_eq!(p.wake(later).clock_jump(), jump);
    }
}

// ---------------------------------------------------------------------------------------------
// Cron
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "cron")]
mod cron {
    use super::*;
    use chrono::{DateTime, Datelike, NaiveDateTime, Offset, TimeZone, Timelike, Utc};
    use chrono_tz::Tz;
    use std::sync::OnceLock;
    use std::time::Instant as StdInstant;

    fn utc(s: &str) -> SystemTime {
        let n = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap();
        SystemTime::from(n.and_utc())
    }

    fn cron(expr: &str, zone: &str) -> Schedule {
        Schedule::new(&Trigger::cron(expr).time_zone(zone), UNIX_EPOCH).unwrap()
    }

    /// The fires in `(from, to]`, by walking `next_after`.
    fn fires_between(s: &Schedule, from: SystemTime, to: SystemTime) -> Vec<SystemTime> {
        let mut out = Vec::new();
        let mut t = from;
        while let Some(f) = s.next_after(t) {
            if f > to {
                break;
            }
            assert!(f > t, "next_after({t:?}) = {f:?} is not after it");
            out.push(f);
            t = f;
        }
        out
    }

    #[test]
    fn every_second_over_a_day_fires_86400_times_one_second_apart() {
        let s = Schedule::new(&Trigger::cron("* * * * * *"), UNIX_EPOCH).unwrap();
        let start = utc("2025-01-01 00:00:00");
        let fires = fires_between(&s, start, start + Duration::from_secs(86_400));
        assert_eq!(fires.len(), 86_400);
        assert_eq!(fires[0], start + Duration::from_secs(1));
        assert!(
            fires
                .windows(2)
                .all(|w| w[1].duration_since(w[0]).unwrap() == Duration::from_secs(1))
        );
    }

    #[test]
    fn a_time_in_a_spring_forward_gap_fires_once_at_the_end_of_the_gap() {
        // Berlin, 2025-03-30: 02:00 CET → 03:00 CEST (01:00 UTC). 02:30 does not exist.
        let s = cron("0 30 2 * * *", "Europe/Berlin");
        let fires = fires_between(&s, utc("2025-03-29 00:00:00"), utc("2025-04-01 00:00:00"));
        assert_eq!(
            fires,
            [
                utc("2025-03-29 01:30:00"), // 02:30 CET
                utc("2025-03-30 01:00:00"), // 03:00 CEST, the end of the gap
                utc("2025-03-31 00:30:00"), // 02:30 CEST
            ]
        );
        // New York, 2025-03-09: 02:00 EST → 03:00 EDT (07:00 UTC).
        let s = cron("0 30 2 * * *", "America/New_York");
        assert_eq!(
            s.next_after(utc("2025-03-08 12:00:00")),
            Some(utc("2025-03-09 07:00:00"))
        );
        // Every slot inside the gap collapses into that one fire.
        let s = cron("0 */10 2 * * *", "Europe/Berlin");
        let fires = fires_between(&s, utc("2025-03-30 00:00:00"), utc("2025-03-30 12:00:00"));
        assert_eq!(fires, [utc("2025-03-30 01:00:00")]);
    }

    #[test]
    fn a_time_repeated_at_fall_back_fires_once_at_its_first_occurrence() {
        // Berlin, 2025-10-26: 03:00 CEST → 02:00 CET (01:00 UTC); 02:30 happens twice.
        let s = cron("0 30 2 * * *", "Europe/Berlin");
        let fires = fires_between(&s, utc("2025-10-25 12:00:00"), utc("2025-10-27 12:00:00"));
        assert_eq!(
            fires,
            [utc("2025-10-26 00:30:00"), utc("2025-10-27 01:30:00")]
        );
        // Asked from inside the second pass, it does not fire that second 02:30 either.
        assert_eq!(
            s.next_after(utc("2025-10-26 01:15:00")),
            Some(utc("2025-10-27 01:30:00"))
        );
    }

    #[test]
    fn lord_howe_half_hour_shifts_follow_the_same_rules() {
        // 2025-10-05: 02:00 (+10:30) → 02:30 (+11), at 15:30 UTC the day before.
        let s = cron("0 15 2 * * *", "Australia/Lord_Howe");
        assert_eq!(
            s.next_after(utc("2025-10-04 12:00:00")),
            Some(utc("2025-10-04 15:30:00"))
        );
        // 2025-04-06: 02:00 (+11) → 01:30 (+10:30), at 15:00 UTC the day before; 01:45
        // happens at 14:45 and 15:15 UTC, and fires at the first.
        let s = cron("0 45 1 * * *", "Australia/Lord_Howe");
        let fires = fires_between(&s, utc("2025-04-05 12:00:00"), utc("2025-04-06 18:00:00"));
        assert_eq!(
            fires,
            [utc("2025-04-05 14:45:00"), utc("2025-04-06 15:15:00")]
        );
    }

    #[test]
    fn an_every_minute_cron_is_silent_while_the_repeated_hour_plays_again() {
        let s = cron("0 * * * * *", "Europe/Berlin");
        // 02:59 CEST, then the clock shows 02:00-02:59 again (already fired), then 03:00 CET.
        assert_eq!(
            fires_between(&s, utc("2025-10-26 00:58:30"), utc("2025-10-26 02:01:00")),
            [
                utc("2025-10-26 00:59:00"),
                utc("2025-10-26 02:00:00"),
                utc("2025-10-26 02:01:00"),
            ]
        );
        // In spring: 01:59 CET, then 03:00 CEST once (the gap's 60 slots collapse into it).
        assert_eq!(
            fires_between(&s, utc("2025-03-30 00:58:30"), utc("2025-03-30 01:01:00")),
            [
                utc("2025-03-30 00:59:00"),
                utc("2025-03-30 01:00:00"),
                utc("2025-03-30 01:01:00"),
            ]
        );
    }

    #[test]
    fn seven_fields_take_a_year_and_run_out() {
        let s = cron("0 0 12 1 1 * 2026", "UTC");
        assert_eq!(
            s.next_after(utc("2025-06-01 00:00:00")),
            Some(utc("2026-01-01 12:00:00"))
        );
        let started = StdInstant::now();
        assert_eq!(s.next_after(utc("2026-01-01 12:00:00")), None);
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
        // A planner of a finished schedule has nothing to wake for, and fires nothing.
        let mono = Instant::now();
        let mut p = Planner::new(s, ClockReading::new(utc("2027-01-01 00:00:00"), mono));
        assert_eq!((p.deadline(), p.next_fire()), (None, None));
        let plan = p.wake(ClockReading::new(utc("2028-01-01 00:00:00"), mono + HOUR));
        assert_eq!((plan.fires(), plan.next_fire()), (0, None));
    }

    #[test]
    fn thirty_february_never_fires_and_is_reported_fast() {
        for expr in [
            "0 0 0 30 2 *",
            "0 0 0 31 4,6,9,11 *",
            "0 0 0 30 2 * 2025-2030",
        ] {
            let started = StdInstant::now();
            let err = Trigger::cron(expr).validate().unwrap_err();
            let took = started.elapsed();
            assert_eq!(
                err,
                ScheduleError::NeverFires {
                    expr: expr.to_owned()
                }
            );
            assert!(err.to_string().contains(&format!("`{expr}` never fires")));
            assert!(took < Duration::from_millis(200), "{expr}: {took:?}");
        }
        // Rare is not never: 29 February that is a Monday (next: 2044).
        let s = cron("0 0 0 29 2 +MON", "UTC");
        assert_eq!(
            s.next_after(utc("2025-01-01 00:00:00")),
            Some(utc("2044-02-29 00:00:00"))
        );
    }

    #[test]
    fn bad_cron_expressions_name_the_input_and_what_is_accepted() {
        for (expr, problem) in [
            ("*/5 * * * *", "seconds field is required"),
            ("", "it is empty"),
            ("0 0 0 * * * * *", "8 fields"),
            ("61 * * * * *", "the second field `61` is invalid"),
            ("0 0 25 * * *", "hour takes 0-23"),
            ("0 0 12 * JUNK *", "the month field `JUNK` is invalid"),
            ("0 0 12 * * 8", "the day-of-week field `8` is invalid"),
            ("every day at noon", ""),
        ] {
            let err = Trigger::cron(expr).validate().unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(&err, ScheduleError::InvalidCron { expr: e, .. } if e == expr),
                "{expr}: {err:?}"
            );
            assert!(msg.contains(&format!("`{expr}` is invalid")), "{msg}");
            assert!(msg.contains(problem), "{msg}");
            assert!(
                msg.contains("expected 6 fields `second minute hour"),
                "{msg}"
            );
            assert_eq!(err.input(), expr);
        }
    }

    #[test]
    fn unknown_time_zones_name_the_zone_and_what_is_accepted() {
        for (zone, suggestion) in [
            ("Europe/Berln", None),
            ("europe/berlin", Some("Europe/Berlin")),
            ("New York", Some("America/New_York")),
            ("", None),
        ] {
            let err = Trigger::cron("0 0 * * * *")
                .time_zone(zone)
                .validate()
                .unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("unknown time zone `{zone}`")),
                "{msg}"
            );
            assert!(msg.contains("for cron `0 0 * * * *`"), "{msg}");
            assert!(msg.contains("expected an IANA time zone name"), "{msg}");
            match suggestion {
                Some(s) => assert!(msg.contains(&format!("did you mean `{s}`?")), "{msg}"),
                None => assert!(!msg.contains("did you mean"), "{msg}"),
            }
        }
        // Accepted names, UTC included.
        for zone in ["UTC", "Etc/UTC", "Europe/Berlin", "Australia/Lord_Howe"] {
            assert!(
                Trigger::cron("0 0 * * * *")
                    .time_zone(zone)
                    .validate()
                    .is_ok()
            );
        }
    }

    #[test]
    fn options_that_do_not_fit_the_trigger_are_errors() {
        let err = Trigger::cron("0 0 * * * *")
            .jitter(Duration::from_secs(1))
            .validate()
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("jitter = 1s is invalid for cron `0 0 * * * *`"),
            "{err}"
        );
        let err = Trigger::every(MINUTE)
            .time_zone("Europe/Berlin")
            .validate()
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("time_zone = \"Europe/Berlin\" is invalid for every 1m"),
            "{err}"
        );
    }

    // -----------------------------------------------------------------------------------------
    // The oracle: walk the zone's wall clock second by second; a local time fires at the first
    // instant the clock shows it or a later time (so a gap's times fire when the clock jumps
    // past them, and a repeated time only the first time round). Only UTC → local conversions
    // are used, never chrono's local → UTC resolution that the implementation relies on.
    // -----------------------------------------------------------------------------------------

    /// One cron field: its text and the set of values it matches.
    #[derive(Debug, Clone)]
    struct Field {
        text: String,
        values: Vec<bool>,
        star: bool,
    }

    impl Field {
        fn has(&self, v: u32) -> bool {
            self.values[v as usize]
        }
    }

    fn field(min: u32, max: u32, hot: Vec<u32>) -> impl Strategy<Value = Field> {
        let make = move |text: String, vals: Vec<u32>, star: bool| {
            let mut values = vec![false; max as usize + 1];
            for v in vals {
                values[v as usize] = true;
            }
            Field { text, values, star }
        };
        let value = prop_oneof![proptest::sample::select(hot), min..=max];
        let star = Just(star_field(min, max));
        let single = value
            .clone()
            .prop_map(move |v| make(v.to_string(), vec![v], false));
        let range = (min..=max, min..=max).prop_map(move |(a, b)| {
            let (a, b) = (a.min(b), a.max(b));
            make(format!("{a}-{b}"), (a..=b).collect(), false)
        });
        let step = (1..=(max - min).min(20)).prop_map(move |s| {
            make(
                format!("*/{s}"),
                (min..=max).step_by(s as usize).collect(),
                false,
            )
        });
        let range_step =
            (min..=max, min..=max, 1..=(max - min).min(20)).prop_map(move |(a, b, s)| {
                let (a, b) = (a.min(b), a.max(b));
                make(
                    format!("{a}-{b}/{s}"),
                    (a..=b).step_by(s as usize).collect(),
                    false,
                )
            });
        let list = proptest::collection::btree_set(value, 2..=3).prop_map(move |set| {
            let text = set.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            make(text, set.into_iter().collect(), false)
        });
        prop_oneof![
            2 => star, 4 => single, 1 => range, 2 => step, 1 => range_step, 2 => list,
        ]
    }

    fn star_field(min: u32, max: u32) -> Field {
        let mut values = vec![false; max as usize + 1];
        values[min as usize..].fill(true);
        Field {
            text: "*".to_owned(),
            values,
            star: true,
        }
    }

    fn rare_field(min: u32, max: u32) -> impl Strategy<Value = Field> {
        // Day and month fields: mostly `*`, so a 26-hour window usually has fires.
        prop_oneof![6 => Just(star_field(min, max)), 1 => field(min, max, vec![min])]
    }

    #[derive(Debug, Clone)]
    struct Expr {
        second: Field,
        minute: Field,
        hour: Field,
        dom: Field,
        month: Field,
        dow: Field,
    }

    impl Expr {
        fn text(&self) -> String {
            [
                &self.second,
                &self.minute,
                &self.hour,
                &self.dom,
                &self.month,
                &self.dow,
            ]
            .map(|f| f.text.as_str())
            .join(" ")
        }

        /// Vixie-cron day rule: with both day fields restricted, either may match.
        fn matches(&self, t: NaiveDateTime) -> bool {
            let dom = self.dom.has(t.day());
            let dow = self.dow.has(t.weekday().num_days_from_sunday());
            let day = match (self.dom.star, self.dow.star) {
                (true, true) => true,
                (true, false) => dow,
                (false, true) => dom,
                (false, false) => dom || dow,
            };
            day && self.second.has(t.second())
                && self.minute.has(t.minute())
                && self.hour.has(t.hour())
                && self.month.has(t.month())
        }
    }

    fn expr() -> impl Strategy<Value = Expr> {
        (
            field(0, 59, vec![0, 30, 59]),
            field(0, 59, vec![0, 15, 30, 45, 59]),
            // The hours DST transitions touch in the zones below.
            field(0, 23, vec![0, 1, 2, 3]),
            rare_field(1, 31),
            rare_field(1, 12),
            rare_field(0, 6),
        )
            .prop_map(|(second, minute, hour, dom, month, dow)| Expr {
                second,
                minute,
                hour,
                dom,
                month,
                dow,
            })
    }

    /// UTC (the default, computed without zone lookups) and zones with DST.
    const ZONES: [Tz; 4] = [
        chrono_tz::UTC,
        chrono_tz::Europe::Berlin,
        chrono_tz::America::New_York,
        chrono_tz::Australia::Lord_Howe,
    ];

    fn local(zone: Tz, utc_secs: i64) -> NaiveDateTime {
        let utc = DateTime::from_timestamp(utc_secs, 0).unwrap().naive_utc();
        utc + chrono::TimeDelta::seconds(
            zone.offset_from_utc_datetime(&utc).fix().local_minus_utc() as i64,
        )
    }

    /// Every offset change of `zone` in 2024-2026 (UTC seconds), found by scanning.
    fn transitions(zone: Tz) -> &'static [i64] {
        static CACHE: OnceLock<Vec<Vec<i64>>> = OnceLock::new();
        let all = CACHE.get_or_init(|| {
            ZONES
                .iter()
                .map(|&z| {
                    let off =
                        |t: i64| local(z, t) - DateTime::from_timestamp(t, 0).unwrap().naive_utc();
                    let (from, to) = (1_704_067_200i64, 1_798_761_600i64); // 2024 .. 2027
                    let mut found = Vec::new();
                    let mut t = from;
                    while t < to {
                        let next = t + 1800;
                        if off(t) != off(next) {
                            let (mut lo, mut hi) = (t, next);
                            while hi - lo > 1 {
                                let mid = (lo + hi) / 2;
                                if off(mid) == off(lo) {
                                    lo = mid
                                } else {
                                    hi = mid
                                }
                            }
                            found.push(hi);
                        }
                        t = next;
                    }
                    found
                })
                .collect()
        });
        &all[ZONES.iter().position(|&z| z == zone).unwrap()]
    }

    /// The oracle's fires in `(start, start + window]`, as UTC nanoseconds.
    fn oracle(e: &Expr, zone: Tz, start_ns: i128, window_secs: i64) -> Vec<i128> {
        let start_s = start_ns.div_euclid(1_000_000_000) as i64;
        // The highest local time shown up to the start (transitions here move ≤ 1 hour).
        let mut high = (start_s - 3 * 3600..=start_s)
            .map(|t| local(zone, t))
            .max()
            .unwrap();
        let mut fires = Vec::new();
        for t in start_s + 1..=start_s + window_secs {
            let shown = local(zone, t);
            if shown > high {
                // Local times shown for the first time at instant t: one, or a whole gap.
                let mut c = high + chrono::TimeDelta::seconds(1);
                let mut hit = false;
                while c <= shown && !hit {
                    hit = e.matches(c);
                    c += chrono::TimeDelta::seconds(1);
                }
                if hit {
                    fires.push(t as i128 * 1_000_000_000);
                }
                high = shown;
            }
        }
        fires
    }

    fn to_ns(t: SystemTime) -> i128 {
        t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as i128
    }

    fn check_against_oracle(e: &Expr, zone: Tz, start_ns: i128) -> Result<(), TestCaseError> {
        const WINDOW: i64 = 26 * 3600;
        let text = e.text();
        let expected = oracle(e, zone, start_ns, WINDOW);
        let trigger = Trigger::cron(text.clone()).time_zone(zone.name());
        let schedule = match Schedule::new(&trigger, UNIX_EPOCH) {
            Ok(s) => s,
            Err(ScheduleError::NeverFires { .. }) => {
                prop_assert!(expected.is_empty(), "`{text}` said never, oracle fires");
                return Ok(());
            }
            Err(err) => return Err(TestCaseError::fail(format!("`{text}`: {err}"))),
        };
        let start = UNIX_EPOCH + nanos(start_ns as u128);
        let end = UNIX_EPOCH
            + nanos((start_ns.div_euclid(1_000_000_000) as u128 + WINDOW as u128) * 1_000_000_000);
        let got: Vec<i128> = fires_between(&schedule, start, end)
            .into_iter()
            .map(to_ns)
            .collect();
        if got != expected {
            // Report the first difference, not two lists of up to 93,600 fires.
            let i = got
                .iter()
                .zip(&expected)
                .take_while(|(a, b)| a == b)
                .count();
            let show = |v: Option<&i128>| match v {
                None => "nothing".to_owned(),
                Some(&ns) => {
                    let t = Utc.timestamp_nanos(ns as i64);
                    format!("{t} ({})", t.with_timezone(&zone))
                }
            };
            return Err(TestCaseError::fail(format!(
                "`{text}` in {} from {}: fire #{i} is {}, the oracle says {} ({} fires vs {})",
                zone.name(),
                Utc.timestamp_nanos(start_ns as i64),
                show(got.get(i)),
                show(expected.get(i)),
                got.len(),
                expected.len(),
            )));
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Random expressions, UTC and zones with DST (a 30-minute one included), starts mostly
        /// within 30 hours of a transition (anywhere in UTC), with sub-second parts: every fire in the 26 hours after
        /// the start equals the oracle's.
        #[test]
        fn cron_next_fires_match_a_brute_force_oracle(
            e in expr(),
            zone in proptest::sample::select(ZONES.to_vec()),
            near in proptest::bool::weighted(0.8),
            pick in any::<proptest::sample::Index>(),
            around in -30 * 3600i64..30 * 3600,
            anywhere in 1_704_067_200i64..1_798_761_600,
            sub in 0i128..1_000_000_000,
        ) {
            let ts = transitions(zone);
            let base = if near && !ts.is_empty() {
                ts[pick.index(ts.len())] + around
            } else {
                anywhere
            };
            check_against_oracle(&e, zone, base as i128 * 1_000_000_000 + sub)?;
        }
    }

    /// The same check, deterministically, across every 2025 transition of each zone for a few
    /// expressions that hit them: every second, every five minutes, inside the gap, inside the
    /// repeated range.
    #[test]
    fn cron_matches_the_oracle_across_every_2025_transition() {
        let exprs = [
            "* * * * * *",
            "0 */5 * * * *",
            "0 30 2 * * *",
            "15 45 1 * * *",
        ];
        for zone in ZONES {
            for &t in transitions(zone)
                .iter()
                .filter(|&&t| (1_735_689_600..1_767_225_600).contains(&t))
            {
                for text in exprs {
                    let e = parse_simple(text);
                    check_against_oracle(&e, zone, (t - 13 * 3600) as i128 * 1_000_000_000)
                        .unwrap_or_else(|err| panic!("{err}"));
                }
            }
        }
    }

    /// Field sets for the simple forms used above: `*`, `n`, `*/s`.
    fn parse_simple(text: &str) -> Expr {
        let f = |s: &str, min: u32, max: u32| {
            let mut values = vec![false; max as usize + 1];
            let star = s == "*";
            let vals: Vec<u32> = if star {
                (min..=max).collect()
            } else if let Some(step) = s.strip_prefix("*/") {
                (min..=max).step_by(step.parse().unwrap()).collect()
            } else {
                vec![s.parse().unwrap()]
            };
            for v in vals {
                values[v as usize] = true;
            }
            Field {
                text: s.to_owned(),
                values,
                star,
            }
        };
        let p: Vec<&str> = text.split_whitespace().collect();
        Expr {
            second: f(p[0], 0, 59),
            minute: f(p[1], 0, 59),
            hour: f(p[2], 0, 23),
            dom: f(p[3], 1, 31),
            month: f(p[4], 1, 12),
            dow: f(p[5], 0, 6),
        }
    }
}
