//! `Planner`: per-trigger state for a timer loop — when to wake, and what to fire on waking.

use std::time::{Duration, SystemTime};

use super::Schedule;
use super::nanos::{self, Nanos};
use super::trigger::Misfire;
use crate::time::Instant;

/// How far wall time may move apart from monotonic time between two readings before the
/// planner calls it a clock jump: this much, plus [`CLOCK_JUMP_TOLERANCE_PER_SEC`] per second
/// of monotonic time elapsed.
pub const CLOCK_JUMP_TOLERANCE: Duration = Duration::from_secs(1);

/// The part of the clock-jump tolerance that grows with elapsed time: 1 ms per second
/// (1000 ppm), twice the fastest rate at which NTP slews a clock, so slewing is never a jump.
pub const CLOCK_JUMP_TOLERANCE_PER_SEC: Duration = Duration::from_millis(1);

/// One reading of both clocks, taken together: wall time for schedules and monotonic time for
/// sleeping (a `tokio::time::Instant`, so paused-time tests control it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockReading {
    /// Wall-clock time.
    pub wall: SystemTime,
    /// Monotonic time.
    pub mono: Instant,
}

impl ClockReading {
    /// A reading from the two values.
    pub fn new(wall: SystemTime, mono: Instant) -> Self {
        Self { wall, mono }
    }

    /// Reads the crate clock (monotonic first, and the wall time of that instant), after
    /// following any step of the system's wall clock (see [`crate::time`]).
    pub fn of(clock: &crate::time::Clock) -> Self {
        clock.follow_system();
        let mono = clock.now();
        Self {
            wall: clock.wall_at(mono),
            mono,
        }
    }

    /// The wall-clock jump from the earlier reading `prev` to this one, if the wall clock moved
    /// apart from monotonic time by more than the [tolerance](CLOCK_JUMP_TOLERANCE) for the
    /// time between them: what a [`Planner`] would see at a wake, for a timer loop that looks
    /// at the clocks between its planners' wakes (see [`Planner::vouch`]).
    pub fn jump_since(&self, prev: ClockReading) -> Option<ClockJump> {
        let prev_wall = nanos::from_system(prev.wall);
        compare(
            prev_wall,
            prev.mono,
            nanos::from_system(self.wall),
            self.mono,
        )
        .1
    }
}

/// Compares a reading (`wall`, `mono`) with an earlier one (`prev_wall`, `prev_mono`): the wall
/// time it would show had the wall clock moved with monotonic time, and the jump, if the
/// difference is over the tolerance for the monotonic time elapsed.
fn compare(
    prev_wall: Nanos,
    prev_mono: Instant,
    wall: Nanos,
    mono: Instant,
) -> (Nanos, Option<ClockJump>) {
    let elapsed = mono.saturating_duration_since(prev_mono);
    let expected = prev_wall.saturating_add(nanos::of(elapsed));
    let skew = wall - expected;
    let elapsed_secs = u32::try_from(elapsed.as_secs()).unwrap_or(u32::MAX);
    let tolerance = CLOCK_JUMP_TOLERANCE
        .saturating_add(CLOCK_JUMP_TOLERANCE_PER_SEC.saturating_mul(elapsed_secs));
    let jump = (skew.unsigned_abs() > tolerance.as_nanos()).then(|| {
        let by = nanos::duration(skew.unsigned_abs()).unwrap_or(Duration::MAX);
        if skew > 0 {
            ClockJump::Forward(by)
        } else {
            ClockJump::Backward(by)
        }
    });
    (expected, jump)
}

/// A wall-clock jump: the wall clock moved this much more (forward) or less (backward) than
/// monotonic time between two readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockJump {
    /// The wall clock jumped ahead.
    Forward(Duration),
    /// The wall clock was set back.
    Backward(Duration),
}

/// What to do on waking: how many fires to start now, and when the next one is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Plan {
    fires: u32,
    misfired: bool,
    late_by: Duration,
    clock_jump: Option<ClockJump>,
    next: Option<SystemTime>,
}

impl Plan {
    /// How many runs to start now: 0, 1, or up to `max` with [`Misfire::CatchUp`].
    pub fn fires(&self) -> u32 {
        self.fires
    }

    /// Whether the oldest slot due was later than the misfire grace (so the misfire policy
    /// decided [`fires`](Self::fires)).
    pub fn misfired(&self) -> bool {
        self.misfired
    }

    /// How late the oldest slot due was (zero when none was due).
    pub fn late_by(&self) -> Duration {
        self.late_by
    }

    /// The wall-clock jump seen since the previous reading, if any.
    pub fn clock_jump(&self) -> Option<ClockJump> {
        self.clock_jump
    }

    /// The next planned fire, or `None` if the schedule never fires again.
    pub fn next_fire(&self) -> Option<SystemTime> {
        self.next
    }
}

/// One trigger's timeline: the next planned fire, and what to fire when the timer wakes.
///
/// Pure: it never reads a clock; the caller passes a [`ClockReading`] to
/// [`new`](Self::new) and to every [`wake`](Self::wake), and sleeps until
/// [`deadline`](Self::deadline). See the [module docs](super#misfires) for the misfire and
/// clock-jump rules.
///
/// ```
/// use job_runtime::schedule::{ClockReading, Misfire, Planner, Schedule, Trigger};
/// use std::time::{Duration, SystemTime};
///
/// let minute = Duration::from_secs(60);
/// let trigger = Trigger::every(minute).misfire(Misfire::CatchUp { max: 5 });
/// let (wall, mono) = (SystemTime::UNIX_EPOCH, tokio::time::Instant::now());
/// let mut planner = Planner::new(Schedule::new(&trigger, wall).unwrap(), ClockReading::new(wall, mono));
///
/// // On time: one fire, the next a minute later.
/// let plan = planner.wake(ClockReading::new(wall, mono));
/// assert_eq!((plan.fires(), plan.next_fire()), (1, Some(wall + minute)));
///
/// // The process was stopped for an hour: five catch-up fires, then back on the grid.
/// let hour = Duration::from_secs(3600);
/// let plan = planner.wake(ClockReading::new(wall + hour + minute / 2, mono + hour + minute / 2));
/// assert_eq!(plan.fires(), 5);
/// assert_eq!(plan.next_fire(), Some(wall + hour + minute));
/// ```
#[derive(Debug, Clone)]
pub struct Planner {
    schedule: Schedule,
    /// Sum of the clock jumps seen, added to an interval schedule's times so that it keeps
    /// following elapsed time. Always zero for cron.
    shift: Nanos,
    /// The oldest slot not yet handled, in the current wall-clock frame.
    due: Option<Nanos>,
    last: ClockReading,
    /// `last.wall` in nanoseconds since the epoch, converted once per reading (a timer asks
    /// for it twice per fire).
    last_wall: Nanos,
}

impl Planner {
    /// A planner for `schedule`, starting at `now`: the first slot it plans is the first at or
    /// after `now.wall` (slots before the planner existed are not owed).
    pub fn new(schedule: Schedule, now: ClockReading) -> Self {
        let wall = nanos::from_system(now.wall);
        let due = schedule.compiled().next_after(wall.saturating_sub(1));
        Self {
            schedule,
            shift: 0,
            due,
            last: now,
            last_wall: wall,
        }
    }

    /// The schedule being planned.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The clocks as of the last [`wake`](Self::wake) (or [`new`](Self::new)).
    pub fn last_reading(&self) -> ClockReading {
        self.last
    }

    /// The next planned fire in wall time, or `None` if the schedule never fires again.
    pub fn next_fire(&self) -> Option<SystemTime> {
        nanos::to_system(self.due?)
    }

    /// When to wake for the next fire, on the monotonic clock: the last reading's monotonic
    /// time plus the wall time left until the fire (the last reading's instant if it is due).
    /// `None`: nothing to wake for.
    ///
    /// A wall-clock change is only seen at the next wake. A timer loop that wants cron fires to
    /// follow a changed clock promptly looks at the clocks in between (say, once a minute, with
    /// [`ClockReading::jump_since`]) and, on a jump, hands each planner the last reading from
    /// before it ([`vouch`](Self::vouch)) and wakes it: a wake with nothing due fires nothing
    /// and only re-plans.
    pub fn deadline(&self) -> Option<Instant> {
        let left = self.due? - self.last_wall;
        let left = nanos::duration(left.max(0) as u128).unwrap_or(Duration::MAX);
        Some(crate::time::add_saturating(self.last.mono, left))
    }

    /// Takes `reading` as its last reading if it is later than the planner's own. The caller
    /// vouches that the clocks did not jump from the planner's last reading to `reading` (a
    /// timer loop that checked each step with [`ClockReading::jump_since`]), so a jump after
    /// `reading` is judged at the next [`wake`](Self::wake) against the tolerance for the time
    /// since `reading`, not since the planner's own last wake, hours ago for a daily trigger.
    pub fn vouch(&mut self, reading: ClockReading) {
        if reading.mono > self.last.mono {
            self.last = reading;
            self.last_wall = nanos::from_system(reading.wall);
        }
    }

    /// The timer woke at `now`: decides what to fire and plans the next fire.
    ///
    /// Slots due are those from the oldest unhandled one up to now. If the oldest is late by
    /// at most the misfire grace, the wake is on time: one fire. Otherwise the policy decides:
    /// `FireOnceNow` one fire, `Skip` none (one if a slot is within grace), `CatchUp { max }`
    /// one per slot due, at most `max`. The next fire is the first slot after now.
    ///
    /// If the wall clock moved apart from monotonic time by more than the
    /// [tolerance](CLOCK_JUMP_TOLERANCE) since the previous reading, that is a clock jump: only
    /// slots that came due in elapsed time are handled as above, nothing fires for the time
    /// the jump skipped or repeated, an interval schedule shifts with the jump (it follows
    /// elapsed time), and a cron schedule's next fire is recomputed from the new wall time.
    pub fn wake(&mut self, now: ClockReading) -> Plan {
        let wall = nanos::from_system(now.wall);
        // What the wall clock would read had it moved with monotonic time.
        let (expected, clock_jump) = compare(self.last_wall, self.last.mono, wall, now.mono);
        let jumped = clock_jump.is_some();
        let skew = wall - expected;
        self.last = now;
        self.last_wall = wall;

        let compiled = self.schedule.compiled();
        // Slots are judged against the time that really passed: `expected` after a jump.
        let judge_at = if jumped {
            if compiled.is_elapsed_time() {
                // Move the interval grid with the jump: in the new frame, `wall` is the time
                // that really passed.
                self.shift = self.shift.saturating_add(skew);
                self.due = self.due.map(|d| d.saturating_add(skew));
                wall
            } else {
                expected
            }
        } else {
            wall
        };

        let (fires, misfired, late_by) = match self.due {
            Some(due) if due <= judge_at => {
                let late = judge_at - due;
                let trigger = self.schedule.trigger();
                let grace = nanos::of(trigger.grace());
                let misfired = late > grace;
                let fires = if !misfired {
                    1
                } else {
                    match trigger.misfire_policy() {
                        Misfire::FireOnceNow => 1,
                        Misfire::Skip => {
                            // A slot still within grace is on time, even after a misfire.
                            let recent = self.next_after(judge_at - grace - 1);
                            u32::from(recent.is_some_and(|r| r <= judge_at))
                        }
                        Misfire::CatchUp { max } => {
                            compiled.count_between(due - self.shift, judge_at - self.shift, max)
                        }
                    }
                };
                let late_by = nanos::duration(late as u128).unwrap_or(Duration::MAX);
                (fires, misfired, late_by)
            }
            _ => (0, false, Duration::ZERO),
        };

        // Plan from the current wall time: after a cron jump this is the recomputation; an
        // interval grid was shifted above, so this is its next slot in elapsed time.
        if jumped || self.due.is_some_and(|d| d <= wall) {
            self.due = self.next_after(wall);
        }
        Plan {
            fires,
            misfired,
            late_by,
            clock_jump,
            next: self.next_fire(),
        }
    }

    /// The first slot after `t` (current wall frame).
    fn next_after(&self, t: Nanos) -> Option<Nanos> {
        let s = self.shift;
        let f = self.schedule.compiled().next_after(t.saturating_sub(s))?;
        Some(f.saturating_add(s))
    }
}
