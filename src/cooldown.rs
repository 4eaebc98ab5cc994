//! Cooldown: a per-key "not before" clock set when a run ends.
//!
//! A cooldown is the cheapest check in the pipeline, so it comes first: a rejection is a value
//! ([`JobError::CoolingDown`](crate::JobError::CoolingDown) with the time remaining), returned
//! at once without waiting. Success and failure have separate spans, so a failing key can be
//! retried sooner (or later) than a healthy one is refreshed. A forced run bypasses it.

use std::time::Duration;

use crate::time::{Instant, add_saturating};

/// Minimum time from the end of a run to the next start of the same key.
///
/// ```
/// use job_runtime::cooldown::Cooldown;
/// use std::time::Duration;
///
/// let c = Cooldown::new(Duration::from_secs(60)).after_failure(Duration::from_secs(5));
/// assert_eq!(c.span(true), Duration::from_secs(60));
/// assert_eq!(c.span(false), Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cooldown {
    /// After a successful run.
    pub after_success: Duration,
    /// After a failed run.
    pub after_failure: Duration,
}

impl Cooldown {
    /// The same span after success and failure.
    pub fn new(span: Duration) -> Self {
        Self {
            after_success: span,
            after_failure: span,
        }
    }

    /// No cooldown.
    pub const NONE: Cooldown = Cooldown {
        after_success: Duration::ZERO,
        after_failure: Duration::ZERO,
    };

    /// Sets the span after a failure.
    #[must_use]
    pub fn after_failure(mut self, span: Duration) -> Self {
        self.after_failure = span;
        self
    }

    /// The span that follows a run that succeeded (`true`) or failed.
    pub fn span(&self, success: bool) -> Duration {
        if success {
            self.after_success
        } else {
            self.after_failure
        }
    }

    /// When the key may start again after a run that ended at `ended`.
    pub fn not_before(&self, ended: Instant, success: bool) -> Instant {
        add_saturating(ended, self.span(success))
    }
}

/// Time left before `not_before`, or `None` when it has passed.
#[inline]
pub fn remaining(not_before: Option<Instant>, now: Instant) -> Option<Duration> {
    match not_before {
        Some(t) if t > now => Some(t - now),
        _ => None,
    }
}
