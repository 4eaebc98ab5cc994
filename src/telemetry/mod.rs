//! Telemetry: OpenTelemetry traces and metrics for every run.
//!
//! Why: services that embed this library are observed through OpenTelemetry, so a run must
//! show up there as a span tree (`job.trigger` → `job.run` → `job.attempt`) and as bounded
//! metrics, without the library ever installing a global subscriber behind the service's back.
//!
//! How: spans are `tracing` spans (a service turns them into OpenTelemetry spans with the
//! `tracing-opentelemetry` layer it already has, or the one [`init_from_env`] returns); metrics
//! go through the OpenTelemetry metrics API (`opentelemetry::global::meter`), a no-op until a
//! meter provider is installed. With feature `otel`, [`init_from_env`] builds the exporters from
//! the standard `OTEL_*` variables.

#[cfg(feature = "otel")]
mod setup;
#[cfg(feature = "otel")]
pub use setup::{
    DEFAULT_SHUTDOWN_TIMEOUT, Telemetry, TelemetryError, init_from_env, init_from_env_with,
    trace_id_of,
};

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};

/// How a run's key appears in spans and logs: keys can be high-cardinality or personal data
/// (a user id, an e-mail address), so the default is a hash.
///
/// `JOBRT_TELEMETRY_KEYS` = `off`, `hashed` (default) or `raw`. Metrics never carry the key.
///
/// ```
/// use job_runtime::telemetry::KeyAttribute;
///
/// assert_eq!(KeyAttribute::default(), KeyAttribute::Hashed);
/// assert_eq!(KeyAttribute::Raw.render("user-42").as_deref(), Some("user-42"));
/// assert_eq!(KeyAttribute::Off.render("user-42"), None);
/// let h = KeyAttribute::Hashed.render("user-42").unwrap();
/// assert_eq!(h.len(), 16); // 64-bit FNV-1a, hex: the same key gives the same hash everywhere
/// assert_eq!(Some(h), KeyAttribute::Hashed.render("user-42"));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyAttribute {
    /// No key attribute at all.
    Off,
    /// A stable 64-bit hash of the key, in hex: runs of one key can be grouped without the key
    /// itself leaving the process. (A hash of a guessable key can be guessed: use `Off` for
    /// keys that must not leak in any form.)
    #[default]
    Hashed,
    /// The key as it is.
    Raw,
}

impl KeyAttribute {
    /// Parses `off`, `hashed` or `raw` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" => Some(Self::Off),
            "hashed" => Some(Self::Hashed),
            "raw" => Some(Self::Raw),
            _ => None,
        }
    }

    /// The key as it is to be shown, or `None` for `Off`.
    pub fn render(self, key: &str) -> Option<String> {
        match self {
            Self::Off => None,
            Self::Raw => Some(key.to_string()),
            Self::Hashed => {
                // FNV-1a: stable across processes, versions and machines (unlike std's hasher).
                let h = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
                });
                Some(format!("{h:016x}"))
            }
        }
    }
}

/// Attribute names, shared by spans, events and metrics.
pub mod attr {
    /// The job's name.
    pub const JOB: &str = "job.name";
    /// The key, per [`KeyAttribute`](super::KeyAttribute) (spans and logs only).
    pub const KEY: &str = "job.key";
    /// The outcome: `success`, or a [`JobError::kind`](crate::JobError::kind) such as
    /// `failed`, `panicked`, `budget_exceeded`, `cancelled`, `cooling_down`, `busy`.
    pub const OUTCOME: &str = "job.outcome";
}

/// The library's metric instruments, made once per controller from the global meter
/// provider (a no-op until the service installs one: with feature `otel`,
/// [`init_from_env`] does). Attributes are bounded: the job name and the outcome only.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    pub(crate) run_duration: Histogram<f64>,
    pub(crate) runs: Counter<u64>,
    pub(crate) in_flight: UpDownCounter<i64>,
    pub(crate) coalesced: Counter<u64>,
    pub(crate) lock_wait: Histogram<f64>,
    pub(crate) cooldown_rejections: Counter<u64>,
    pub(crate) retries: Counter<u64>,
    pub(crate) limit_waits: Counter<u64>,
    pub(crate) refresh_failures: Counter<u64>,
    pub(crate) meter: Meter,
}

/// The metric names, for dashboards and tests.
pub mod metric {
    /// Histogram, seconds: a run's duration from its lock to its end.
    pub const RUN_DURATION: &str = "job.run.duration";
    /// Counter: runs ended, by job and outcome.
    pub const RUNS: &str = "job.runs";
    /// Up-down counter: runs in flight, by job.
    pub const IN_FLIGHT: &str = "job.runs.active";
    /// Counter: callers that joined a run in flight instead of starting one.
    pub const COALESCED: &str = "job.coalesced_callers";
    /// Histogram, seconds: time from admission to holding the key's lock.
    pub const LOCK_WAIT: &str = "job.lock.wait";
    /// Counter: calls refused because the key was cooling down.
    pub const COOLDOWN_REJECTIONS: &str = "job.cooldown.rejections";
    /// Counter: attempts retried.
    pub const RETRIES: &str = "job.retries";
    /// Counter: attempts that had to wait for a concurrency permit or a rate-limit token.
    pub const LIMIT_WAITS: &str = "job.limit.waits";
    /// Gauge, seconds: the age of a snapshot store's value, by store name.
    pub const SNAPSHOT_AGE: &str = "job.snapshot.age";
    /// Counter: snapshot refreshes that failed (the last good value was kept).
    pub const REFRESH_FAILURES: &str = "job.snapshot.refresh_failures";
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let meter = opentelemetry::global::meter("job_runtime");
        Self {
            run_duration: meter
                .f64_histogram(metric::RUN_DURATION)
                .with_unit("s")
                .with_description("Duration of a run, from holding its lock to its end")
                .build(),
            runs: meter
                .u64_counter(metric::RUNS)
                .with_description("Runs ended, by outcome")
                .build(),
            in_flight: meter
                .i64_up_down_counter(metric::IN_FLIGHT)
                .with_description("Runs in flight")
                .build(),
            coalesced: meter
                .u64_counter(metric::COALESCED)
                .with_description("Callers that joined a run in flight")
                .build(),
            lock_wait: meter
                .f64_histogram(metric::LOCK_WAIT)
                .with_unit("s")
                .with_description("Time from admission to holding the key's lock")
                .build(),
            cooldown_rejections: meter
                .u64_counter(metric::COOLDOWN_REJECTIONS)
                .with_description("Calls refused while the key was cooling down")
                .build(),
            retries: meter
                .u64_counter(metric::RETRIES)
                .with_description("Attempts retried")
                .build(),
            limit_waits: meter
                .u64_counter(metric::LIMIT_WAITS)
                .with_description("Attempts that waited for a concurrency permit or rate token")
                .build(),
            refresh_failures: meter
                .u64_counter(metric::REFRESH_FAILURES)
                .with_description("Snapshot refreshes that failed; the last good value was kept")
                .build(),
            meter,
        }
    }

    /// `[job.name]`.
    #[inline]
    pub(crate) fn job(job: &Arc<str>) -> [KeyValue; 1] {
        [KeyValue::new(attr::JOB, Arc::clone(job))]
    }

    /// A run ended: its duration and its outcome (`job` is the run's `job.name` attribute,
    /// moved in, not cloned).
    pub(crate) fn run_ended(&self, job: KeyValue, outcome: &'static str, took: Duration) {
        let attrs = [job, KeyValue::new(attr::OUTCOME, outcome)];
        self.run_duration.record(took.as_secs_f64(), &attrs);
        self.runs.add(1, &attrs);
    }
}

/// An unsigned count or id as a span attribute. tracing-opentelemetry records a `u64` field
/// through its `Debug` form (a string on the wire, `"1"`), an `i64` as an integer: so ids,
/// attempts, fencing tokens and scan ids go through this (saturating at `i64::MAX`).
pub(crate) fn int(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// Marks `span` as failed with `e`, per the OpenTelemetry conventions: `error.type`, the span
/// status, and an `exception` event.
pub(crate) fn record_error(span: &tracing::Span, e: &crate::JobError) {
    if span.is_disabled() {
        return;
    }
    let message = e.to_string();
    span.record(attr::OUTCOME, e.kind());
    span.record("error.type", e.kind());
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", message.as_str());
    tracing::warn!(
        parent: span,
        { "exception.type" = e.kind(), "exception.message" = %message },
        "exception"
    );
}

/// The trace id of the current span, if an OpenTelemetry layer is there to give one.
pub(crate) fn current_trace_id() -> Option<String> {
    #[cfg(feature = "otel")]
    {
        trace_id_of(&tracing::Span::current())
    }
    #[cfg(not(feature = "otel"))]
    {
        None
    }
}

/// Adds a link from `from` to `to` (a caller that joined a run, to the run).
#[cfg(feature = "otel")]
pub(crate) fn link(from: &tracing::Span, to: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if from.is_disabled() || to.is_disabled() {
        return;
    }
    let cx = to.context();
    let target = cx.span().span_context().clone();
    if target.is_valid() {
        from.add_link(target);
    }
}

/// Records a trigger's outcome on its `job.trigger` span: `success`, a refusal (`busy`,
/// `cooling_down`: not an error), or the error.
pub(crate) fn record_outcome(span: &tracing::Span, r: &Result<(), crate::JobError>) {
    if span.is_disabled() {
        return;
    }
    match r {
        Ok(()) => {
            span.record(attr::OUTCOME, "success");
        }
        Err(e) if e.is_rejection() => {
            span.record(attr::OUTCOME, e.kind());
        }
        Err(e) => {
            span.record(attr::OUTCOME, e.kind());
            span.record("otel.status_code", "ERROR");
        }
    }
}
