//! Scheduling: when a job fires — at a fixed rate, or on a cron expression in a time zone —
//! and what to do when fires were missed.
//!
//! Why it is built this way: a scheduler's bugs hide in time (drift, daylight saving, a
//! suspended process, a clock set back), and such bugs are only testable when the rules are
//! pure functions of the times they are given. Nothing here reads a clock, sleeps or spawns: a
//! timer loop reads the crate clock, asks a [`Planner`] when to wake and what to fire, and
//! does the waiting itself. So every rule below is tested by feeding times, a million fires or
//! a simulated day at a time.
//!
//! The pieces, in the order a runtime uses them:
//!
//! 1. [`Trigger`]: plain data describing the schedule ([`Trigger::every`],
//!    `Trigger::cron`), its [`Misfire`] policy and grace. Never fails to build.
//! 2. [`Schedule`]: a validated trigger anchored at a start time;
//!    [`next_after(t)`](Schedule::next_after) is the first fire strictly after `t`, or
//!    `None` for never. Validation errors ([`ScheduleError`]) name the input and what is
//!    accepted.
//! 3. [`Planner`]: one trigger's timeline for a timer loop. [`deadline`](Planner::deadline) is
//!    when to wake (a `tokio::time::Instant`); [`wake(reading)`](Planner::wake) returns a
//!    [`Plan`]: how many runs to start now and the next planned fire.
//!
//! ```
//! use job_runtime::schedule::{ClockReading, Planner, Schedule, Trigger};
//! use job_runtime::time::Clock;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let clock = Clock::new();
//! let trigger = Trigger::every(Duration::from_secs(10));
//! let now = ClockReading::of(&clock);
//! let mut planner = Planner::new(Schedule::new(&trigger, now.wall).unwrap(), now);
//! let mut fired = 0;
//! // A timer loop in miniature (paused time: the sleeps are instant).
//! while let Some(deadline) = planner.deadline() {
//!     clock.sleep_until(deadline).await;
//!     fired += planner.wake(ClockReading::of(&clock)).fires();
//!     if fired == 7 {
//!         break;
//!     }
//! }
//! assert_eq!(clock.wall_now(), now.wall + Duration::from_secs(60));
//! # }
//! ```
//!
//! # Intervals
//!
//! Fire `n` (from 0) of [`Trigger::every(period)`](Trigger::every) is at
//! `start + initial_delay + n · period + jitter(n)`, computed in exact integer nanoseconds from
//! the schedule — never from the time the previous fire happened, so a million fires later the
//! schedule has not drifted by a nanosecond. Without an initial delay the first fire is at the
//! start.
//!
//! Jitter is a per-fire delay, uniform in `[0, jitter)`, chosen over a fixed per-trigger offset
//! because a fixed offset leaves two replicas that drew close offsets colliding forever, while a
//! per-fire delay spreads every fire anew. The delay of fire `n` is a pure function of `(seed,
//! n)` (fastrand seeded from a SplitMix64 mix of both), so `next_after` needs no history and a
//! seed reproduces every delay. The jitter must be shorter than the period, so fires stay in
//! order. Without [`Trigger::seed`], each schedule draws a random seed.
//!
//! Interval schedules follow elapsed time: a wall-clock jump moves them along (see below).
//!
//! # Cron expressions
//!
//! `Trigger::cron` takes six fields, `second minute hour day-of-month month day-of-week`, or
//! seven with a trailing year, parsed by [croner](https://docs.rs/croner): numbers, `*`,
//! ranges `1-5`, steps `*/15` and `0-30/10`, lists `1,15`, `JAN-DEC`, `SUN-SAT` (weekdays
//! `0-7`, Sunday is `0` and `7`), `L` (last day, last weekday `5#L`), `W` (nearest weekday),
//! `#` (nth weekday), `?`, a `+` before the weekday field to require both day fields, and
//! `@yearly`/`@monthly`/`@weekly`/`@daily`/`@hourly`. When both day fields are restricted, a
//! day matching either fires (as in Vixie cron). Five-field expressions are refused with an
//! error asking for the seconds field. Times are local to the IANA time zone given by
//! `Trigger::time_zone` (UTC by default).
//!
//! # Daylight saving
//!
//! One rule: **a cron time fires at the first instant the zone's wall clock shows that time
//! or later.** It gives the two cases their behaviour:
//!
//! - A local time inside a spring-forward gap fires once, at the end of the gap: `0 30 2 * * *`
//!   in Europe/Berlin fires at 03:00 CEST on the day clocks go from 02:00 to 03:00 (and in
//!   Australia/Lord_Howe, whose clocks go from 02:00 to 02:30, at 02:30). All the slots
//!   inside a gap collapse into that one fire.
//! - A local time repeated at fall-back fires once, at its first occurrence: `0 30 2 * * *`
//!   in Europe/Berlin fires at 02:30 CEST, not again at 02:30 CET. This holds for every
//!   expression, so one matching every minute is silent while the repeated hour plays again
//!   (it already fired at those local times); use [`Trigger::every`] for elapsed-time
//!   intervals.
//!
//! These rules are ours, not the parser's: croner is only asked about local calendar times
//! without a zone, and the mapping to instants is done here (and tested against a brute-force
//! oracle that walks the wall clock second by second).
//!
//! # Never
//!
//! An expression no date matches (`0 0 0 30 2 *`, 30 February) is refused by
//! [`Schedule::new`] with [`ScheduleError::NeverFires`]: without a year field the calendar
//! repeats every 400 years, so one bounded search (a few milliseconds at most) decides it. A
//! schedule that has fired for the last time (a year field that ran out, or past the year
//! 4999) returns `None` from [`Schedule::next_after`] after one bounded search, and its
//! planner has no deadline.
//!
//! # Misfires
//!
//! When the timer wakes, the slots due are those from the oldest not yet handled up to now.
//! If the oldest is late by at most the trigger's [misfire grace](Trigger::misfire_grace)
//! (1 s by default), the wake is on time and fires once. Otherwise fires were missed — the
//! process was suspended, the runtime starved — and the [`Misfire`] policy decides:
//!
//! | policy | fires now | then |
//! |---|---|---|
//! | [`FireOnceNow`](Misfire::FireOnceNow) (default) | 1 | the first slot after now |
//! | [`Skip`](Misfire::Skip) | 0 (1 if a slot is within grace) | the first slot after now |
//! | [`CatchUp { max }`](Misfire::CatchUp) | one per slot due, at most `max` | the first slot after now |
//!
//! Several fires started at once go to the controller like any other, so the job's overlap
//! policy decides whether they coalesce, queue or skip.
//!
//! # Clock jumps
//!
//! Each wake compares the wall time elapsed since the previous reading with the monotonic time
//! elapsed. If they differ by more than [`CLOCK_JUMP_TOLERANCE`] (1 s) plus
//! [`CLOCK_JUMP_TOLERANCE_PER_SEC`] (1 ms per second elapsed, above NTP's slew rate), the wall
//! clock jumped, and:
//!
//! - only slots that came due in elapsed time (up to the previous wall reading plus the
//!   monotonic time elapsed) are handled as above; nothing fires for the span the jump skipped
//!   or repeated, so a jump never causes a burst of fires;
//! - a cron schedule's next fire is recomputed from the new wall time (after a jump back, local
//!   times already fired come round again: the new clock is trusted);
//! - an interval schedule moves with the jump, keeping its rate in elapsed time.
//!
//! A host sleep that stops the monotonic clock (Linux suspend) looks the same as a jump
//! forward and is handled as one.
//!
//! The wall time compared is the crate [`Clock`](crate::time::Clock)'s: a clock made with
//! `Clock::new()` (as `JobRuntimeController::new` does) follows steps of the system's wall
//! clock at every reading, so a clock set by hand, an NTP step or a suspend is seen at the next
//! wake or once-a-minute look. A simulated clock (`Clock::with_wall_start`) only moves with
//! paused time and `Clock::shift_wall`.
//!
//! # Feature
//!
//! Cron triggers need the `cron` feature (on by default; croner and chrono-tz). Interval
//! triggers, misfires and the planner are always available.

#[cfg(feature = "cron")]
mod cron;

mod compiled;
mod error;
mod every;
mod nanos;
mod planner;
mod trigger;

pub(crate) use compiled::CronCache;
pub use compiled::Schedule;
pub use error::ScheduleError;
pub use planner::{
    CLOCK_JUMP_TOLERANCE, CLOCK_JUMP_TOLERANCE_PER_SEC, ClockJump, ClockReading, Plan, Planner,
};
pub use trigger::{DEFAULT_MISFIRE_GRACE, Misfire, Trigger};
