//! Configuration: plain data, read from `JOBRT_*` environment variables or built in code.
//!
//! Operators tune a deployed service through the environment, so variables win over what the
//! code set: a per-job variable (`JOBRT_JOB_<NAME>_COOLDOWN`) over a global one
//! (`JOBRT_COOLDOWN`), and both over the [`JobPolicy`] passed to `run`. Every variable is
//! listed in `docs/configuration.md`. Reading needs the list of variables, not a lookup by
//! name, because per-job and per-group names are open-ended and unknown `JOBRT_*` names must be
//! reported: [`RuntimeConfig::from_env_with`] takes any list of pairs, so tests never call
//! `set_var`.
//!
//! Names in variables are the job or group name in upper case with every character other than
//! a letter or digit replaced by `_`: job `session-scan` is `JOBRT_JOB_SESSION_SCAN_*`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::time::Duration;

use crate::error::{ConfigError, ConfigProblem};
use crate::job::{JobPolicy, Overlap, matches_normalized, normalize_name};
use crate::limit::{RATE_FORM, RateLimit};
use crate::retry::Jitter;

/// The prefix of every variable this crate reads.
pub const PREFIX: &str = "JOBRT_";

/// Policy values set from outside the code; `None` leaves the code's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PolicyOverrides {
    /// `OVERLAP`.
    pub overlap: Option<Overlap>,
    /// `COOLDOWN`: after success (and after failure unless `FAILURE_COOLDOWN` is set).
    pub cooldown: Option<Duration>,
    /// `FAILURE_COOLDOWN`.
    pub failure_cooldown: Option<Duration>,
    /// `BUDGET`.
    pub budget: Option<Duration>,
    /// `ATTEMPT_TIMEOUT`.
    pub attempt_timeout: Option<Duration>,
    /// `ABANDON_GRACE`.
    pub abandon_grace: Option<Duration>,
    /// `MAX_ATTEMPTS`.
    pub max_attempts: Option<u32>,
    /// `RETRY_BASE_DELAY`.
    pub retry_base_delay: Option<Duration>,
    /// `RETRY_MAX_DELAY`.
    pub retry_max_delay: Option<Duration>,
    /// `RETRY_JITTER`.
    pub retry_jitter: Option<Jitter>,
    /// `LOCK_WAIT`.
    pub lock_wait: Option<Duration>,
    /// `HEARTBEAT_TIMEOUT` (0: off).
    pub heartbeat_timeout: Option<Duration>,
    /// `PRIORITY`.
    pub priority: Option<i32>,
    /// `GROUP` (normalized).
    pub group: Option<String>,
}

impl PolicyOverrides {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Applies these overrides to `p`.
    pub fn apply(&self, p: &mut JobPolicy) {
        if let Some(v) = self.overlap {
            p.overlap = v;
        }
        if let Some(v) = self.cooldown {
            p.cooldown.after_success = v;
            if self.failure_cooldown.is_none() {
                p.cooldown.after_failure = v;
            }
        }
        if let Some(v) = self.failure_cooldown {
            p.cooldown.after_failure = v;
        }
        if let Some(v) = self.budget {
            p.budget = Some(v);
        }
        if let Some(v) = self.attempt_timeout {
            p.attempt_timeout = Some(v);
        }
        if let Some(v) = self.abandon_grace {
            p.abandon_grace = v;
        }
        if let Some(v) = self.max_attempts.and_then(std::num::NonZeroU32::new) {
            p.retry.max_attempts = v;
        }
        if let Some(v) = self.retry_base_delay {
            p.retry.base_delay = v;
        }
        if let Some(v) = self.retry_max_delay {
            p.retry.max_delay = v;
        }
        if let Some(v) = self.retry_jitter {
            p.retry.jitter = v;
        }
        if let Some(v) = self.heartbeat_timeout {
            p.heartbeat_timeout = (!v.is_zero()).then_some(v);
        }
        if let Some(v) = self.lock_wait {
            p.lock_wait = v;
        }
        if let Some(v) = self.priority {
            p.priority = v;
        }
        if let Some(v) = &self.group {
            p.group = Some(v.as_str().into());
        }
    }
}

/// Limits of one named group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupLimits {
    /// Attempts of the group's jobs running at once.
    pub concurrency: Option<NonZeroUsize>,
    /// Attempts of the group's jobs started per period.
    pub rate: Option<RateLimit>,
}

/// The runtime's configuration.
///
/// Defaults: no global concurrency or rate limit, no groups, no overrides, and a key's status
/// kept until its cooldown has passed (`status_retention` 0: no longer than that).
///
/// ```
/// use job_runtime::RuntimeConfig;
/// use std::time::Duration;
///
/// let cfg = RuntimeConfig::from_env_with([
///     ("JOBRT_MAX_CONCURRENCY", "8"),
///     ("JOBRT_GROUP_DB_CONCURRENCY", "2"),
///     ("JOBRT_JOB_SCAN_COOLDOWN", "30s"),
/// ])
/// .unwrap();
/// assert_eq!(cfg.max_concurrency.unwrap().get(), 8);
/// assert_eq!(cfg.groups["DB"].concurrency.unwrap().get(), 2);
/// assert_eq!(cfg.jobs["SCAN"].cooldown, Some(Duration::from_secs(30)));
///
/// let err = RuntimeConfig::from_env_with([("JOBRT_COOLDOWN", "10 parsecs")]).unwrap_err();
/// assert!(err.to_string().contains("JOBRT_COOLDOWN"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuntimeConfig {
    /// `JOBRT_MAX_CONCURRENCY`: attempts running at once across all jobs.
    pub max_concurrency: Option<NonZeroUsize>,
    /// `JOBRT_RATE_LIMIT`: attempts started per period across all jobs.
    pub rate_limit: Option<RateLimit>,
    /// `JOBRT_GROUP_<NAME>_*`: named groups, keyed by normalized name.
    pub groups: BTreeMap<String, GroupLimits>,
    /// `JOBRT_<FIELD>`: overrides for every job.
    pub defaults: PolicyOverrides,
    /// `JOBRT_JOB_<NAME>_<FIELD>`: overrides for one job, keyed by normalized name.
    pub jobs: BTreeMap<String, PolicyOverrides>,
    /// `JOBRT_STATUS_RETENTION`: an idle key's status is kept until the later of its cooldown's
    /// end and its last run's end plus this.
    pub status_retention: Duration,
    /// `JOBRT_SNAPSHOT_DIR`: where snapshot stores keep their files unless a store sets its
    /// own directory (`None`: the platform's data directory, `<data dir>/job-runtime`).
    pub snapshot_dir: Option<std::path::PathBuf>,
    /// `JOBRT_SNAPSHOT_MAX_BYTES`: the largest snapshot or checkpoint file a store reads at
    /// start-up (`None`: [`DEFAULT_SNAPSHOT_MAX_BYTES`]); a larger one is moved aside, not
    /// read, and the store scans anew.
    pub snapshot_max_bytes: Option<u64>,
    /// `JOBRT_TELEMETRY_KEYS`: how a run's key appears in spans and logs (`off`, `hashed`
    /// — the default — or `raw`). Metrics never carry keys.
    pub telemetry_keys: crate::telemetry::KeyAttribute,
    /// Unknown `JOBRT_*` variables found while reading (each also logged as a warning).
    pub warnings: Vec<String>,
}

const DURATION_FORM: &str = "a duration like `250ms`, `30s`, `5m`, `1h 30m` or `0`";

/// The largest snapshot file a store reads unless `JOBRT_SNAPSHOT_MAX_BYTES` or the store says
/// otherwise: 1 GiB. A file is read whole before it is decoded, so this bounds the memory a
/// damaged or misplaced file can make start-up take.
pub const DEFAULT_SNAPSHOT_MAX_BYTES: u64 = 1 << 30;

const SIZE_FORM: &str = "a size of at least 1 byte: a whole number of bytes, or one with a unit (`KB`, `MB`, `GB`, `KiB`, `MiB`, `GiB`), like `1048576`, `512MiB` or `2GB`";

/// The policy fields and their variable suffixes, longest first so `FAILURE_COOLDOWN` is
/// matched before `COOLDOWN`.
const POLICY_FIELDS: &[&str] = &[
    "HEARTBEAT_TIMEOUT",
    "FAILURE_COOLDOWN",
    "RETRY_BASE_DELAY",
    "RETRY_MAX_DELAY",
    "ATTEMPT_TIMEOUT",
    "ABANDON_GRACE",
    "RETRY_JITTER",
    "MAX_ATTEMPTS",
    "LOCK_WAIT",
    "PRIORITY",
    "COOLDOWN",
    "OVERLAP",
    "BUDGET",
    "GROUP",
];

impl RuntimeConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_env_with(std::env::vars_os().filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            k.starts_with(PREFIX)
                .then(|| (k, v.to_string_lossy().into_owned()))
        }))
    }

    /// Reads the given variables (a map, a list of pairs, `std::env::vars()`); names without
    /// the `JOBRT_` prefix are ignored. Every problem is reported, not just the first.
    pub fn from_env_with<I, K, V>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut cfg = RuntimeConfig::default();
        let mut problems = Vec::new();
        let mut vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(k, _)| k.as_ref().starts_with(PREFIX))
            .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string()))
            .collect();
        vars.sort();
        for (name, value) in &vars {
            if let Err(p) = cfg.read_var(name, value) {
                problems.push(p);
            }
        }
        cfg.check_ranges(&mut problems);
        if !problems.is_empty() {
            return Err(ConfigError::new(problems));
        }
        for w in &cfg.warnings {
            tracing::warn!(target: "job_runtime::config", "{w}");
        }
        Ok(cfg)
    }

    fn read_var(&mut self, name: &str, value: &str) -> Result<(), ConfigProblem> {
        let rest = &name[PREFIX.len()..];
        match rest {
            "MAX_CONCURRENCY" => {
                self.max_concurrency = Some(parse_nonzero_usize(name, value)?);
                return Ok(());
            }
            "RATE_LIMIT" => {
                self.rate_limit = Some(parse_rate(name, value)?);
                return Ok(());
            }
            "STATUS_RETENTION" => {
                self.status_retention = parse_duration(name, value)?;
                return Ok(());
            }
            "TELEMETRY_KEYS" => {
                self.telemetry_keys =
                    crate::telemetry::KeyAttribute::parse(value).ok_or_else(|| {
                        problem(
                            name,
                            value,
                            "unknown key attribute mode",
                            "one of off, hashed, raw",
                        )
                    })?;
                return Ok(());
            }
            "SNAPSHOT_MAX_BYTES" => {
                self.snapshot_max_bytes = Some(parse_size(name, value)?);
                return Ok(());
            }
            "SNAPSHOT_DIR" => {
                if value.trim().is_empty() {
                    return Err(problem(
                        name,
                        value,
                        "the directory is empty",
                        "a directory path (created if missing)",
                    ));
                }
                self.snapshot_dir = Some(value.into());
                return Ok(());
            }
            _ => {}
        }
        if let Some(g) = rest.strip_prefix("GROUP_") {
            if let Some(group) = g.strip_suffix("_CONCURRENCY").filter(|n| !n.is_empty()) {
                self.groups
                    .entry(group.to_string())
                    .or_default()
                    .concurrency = Some(parse_nonzero_usize(name, value)?);
                return Ok(());
            }
            if let Some(group) = g.strip_suffix("_RATE_LIMIT").filter(|n| !n.is_empty()) {
                self.groups.entry(group.to_string()).or_default().rate =
                    Some(parse_rate(name, value)?);
                return Ok(());
            }
        }
        if let Some(j) = rest.strip_prefix("JOB_") {
            for field in POLICY_FIELDS {
                if let Some(job) = j
                    .strip_suffix(field)
                    .and_then(|n| n.strip_suffix('_'))
                    .filter(|n| !n.is_empty())
                {
                    let o = self.jobs.entry(normalize_name(job)).or_default();
                    return read_policy_field(o, field, name, value);
                }
            }
        }
        if POLICY_FIELDS.contains(&rest) {
            return read_policy_field(&mut self.defaults, rest, name, value);
        }
        self.warnings.push(format!(
            "unknown variable {name} is ignored; see docs/configuration.md for the accepted JOBRT_* names"
        ));
        Ok(())
    }

    fn check_ranges(&self, problems: &mut Vec<ConfigProblem>) {
        // Each problem names a variable that was set: the job's own when it set one, else the
        // global one.
        let mut check = |scope: &str, o: &PolicyOverrides, base: &PolicyOverrides| {
            let lo = o.retry_base_delay.or(base.retry_base_delay);
            let hi = o.retry_max_delay.or(base.retry_max_delay);
            if let (Some(lo), Some(hi)) = (lo, hi)
                && lo > hi
            {
                let field = if o.retry_base_delay.is_some() {
                    "RETRY_BASE_DELAY"
                } else {
                    "RETRY_MAX_DELAY"
                };
                let max_scope = if o.retry_max_delay.is_some() {
                    scope
                } else {
                    ""
                };
                problems.push(ConfigProblem {
                    name: format!("{PREFIX}{scope}{field}"),
                    value: format!("{lo:?} (max {hi:?})"),
                    problem: "the retry base delay is larger than the max delay".into(),
                    expected: format!(
                        "a base delay no larger than the max delay ({PREFIX}{max_scope}RETRY_MAX_DELAY)"
                    ),
                });
            }
        };
        check("", &self.defaults, &PolicyOverrides::default());
        for (job, o) in &self.jobs {
            if o.retry_base_delay.is_some() || o.retry_max_delay.is_some() {
                check(&format!("JOB_{job}_"), o, &self.defaults);
            }
        }
    }

    /// Sets the directory snapshot stores keep their files in (unless a store sets its own).
    #[must_use]
    pub fn snapshot_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.snapshot_dir = Some(dir.into());
        self
    }

    /// Sets the largest snapshot file a store reads at start-up (unless a store sets its own;
    /// default [`DEFAULT_SNAPSHOT_MAX_BYTES`]).
    #[must_use]
    pub fn snapshot_max_bytes(mut self, bytes: u64) -> Self {
        self.snapshot_max_bytes = Some(bytes);
        self
    }

    /// Adds (or replaces) a named concurrency group.
    #[must_use]
    pub fn concurrency_group(mut self, name: &str, limit: NonZeroUsize) -> Self {
        self.groups
            .entry(normalize_name(name))
            .or_default()
            .concurrency = Some(limit);
        self
    }

    /// Adds (or replaces) a named group's rate limit.
    #[must_use]
    pub fn rate_limit_group(mut self, name: &str, rate: RateLimit) -> Self {
        self.groups.entry(normalize_name(name)).or_default().rate = Some(rate);
        self
    }

    /// Sets the global concurrency limit.
    #[must_use]
    pub fn with_max_concurrency(mut self, n: NonZeroUsize) -> Self {
        self.max_concurrency = Some(n);
        self
    }

    /// Sets the global rate limit.
    #[must_use]
    pub fn with_rate_limit(mut self, rate: RateLimit) -> Self {
        self.rate_limit = Some(rate);
        self
    }

    /// Overrides for one job (by name, any case).
    #[must_use]
    pub fn job_overrides(mut self, job: &str, o: PolicyOverrides) -> Self {
        self.jobs.insert(normalize_name(job), o);
        self
    }

    /// Whether any policy field is overridden, for all jobs or for one (if not,
    /// [`effective_policy`](Self::effective_policy) gives back the policy it is handed).
    pub fn has_overrides(&self) -> bool {
        !self.defaults.is_empty() || !self.jobs.is_empty()
    }

    /// The policy a run of `job` follows: `policy`, then the global overrides, then the job's.
    pub fn effective_policy<'a>(&self, job: &str, policy: &'a JobPolicy) -> Cow<'a, JobPolicy> {
        let job_o = if self.jobs.is_empty() {
            None
        } else {
            self.jobs
                .iter()
                .find(|(n, _)| matches_normalized(job, n))
                .map(|(_, o)| o)
        };
        if self.defaults.is_empty() && job_o.is_none() {
            return Cow::Borrowed(policy);
        }
        let mut p = policy.clone();
        self.defaults.apply(&mut p);
        if let Some(o) = job_o {
            o.apply(&mut p);
        }
        Cow::Owned(p)
    }
}

fn problem(name: &str, value: &str, problem: impl Into<String>, expected: &str) -> ConfigProblem {
    ConfigProblem {
        name: name.to_string(),
        value: value.to_string(),
        problem: problem.into(),
        expected: expected.to_string(),
    }
}

fn read_policy_field(
    o: &mut PolicyOverrides,
    field: &str,
    name: &str,
    value: &str,
) -> Result<(), ConfigProblem> {
    match field {
        "OVERLAP" => {
            o.overlap = Some(Overlap::parse(value).ok_or_else(|| {
                problem(
                    name,
                    value,
                    "unknown overlap policy",
                    "one of coalesce, skip, queue-one, replace",
                )
            })?)
        }
        "COOLDOWN" => o.cooldown = Some(parse_duration(name, value)?),
        "FAILURE_COOLDOWN" => o.failure_cooldown = Some(parse_duration(name, value)?),
        "BUDGET" => o.budget = Some(parse_nonzero_duration(name, value)?),
        "ATTEMPT_TIMEOUT" => o.attempt_timeout = Some(parse_nonzero_duration(name, value)?),
        "ABANDON_GRACE" => o.abandon_grace = Some(parse_duration(name, value)?),
        "MAX_ATTEMPTS" => o.max_attempts = Some(parse_positive::<u32>(name, value)?),
        "RETRY_BASE_DELAY" => o.retry_base_delay = Some(parse_duration(name, value)?),
        "RETRY_MAX_DELAY" => o.retry_max_delay = Some(parse_duration(name, value)?),
        "RETRY_JITTER" => {
            o.retry_jitter = Some(Jitter::parse(value).ok_or_else(|| {
                problem(
                    name,
                    value,
                    "unknown jitter",
                    "one of none, full, equal, decorrelated",
                )
            })?)
        }
        "LOCK_WAIT" => o.lock_wait = Some(parse_duration(name, value)?),
        "HEARTBEAT_TIMEOUT" => o.heartbeat_timeout = Some(parse_duration(name, value)?),
        "PRIORITY" => o.priority = Some(parse_priority(name, value)?),
        "GROUP" => {
            let v = value.trim();
            if v.is_empty() {
                return Err(problem(
                    name,
                    value,
                    "empty",
                    "a group name defined by JOBRT_GROUP_<NAME>_*",
                ));
            }
            o.group = Some(normalize_name(v));
        }
        _ => unreachable!("POLICY_FIELDS and this match list the same fields"),
    }
    Ok(())
}

/// Parses a duration variable (zero allowed).
pub(crate) fn parse_duration(name: &str, value: &str) -> Result<Duration, ConfigProblem> {
    let v = value.trim();
    if v.is_empty() {
        return Err(problem(name, value, "empty", DURATION_FORM));
    }
    if v.starts_with('-') {
        return Err(problem(name, value, "negative", DURATION_FORM));
    }
    if v == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(v).map_err(|e| problem(name, value, e.to_string(), DURATION_FORM))
}

fn parse_nonzero_duration(name: &str, value: &str) -> Result<Duration, ConfigProblem> {
    let d = parse_duration(name, value)?;
    if d.is_zero() {
        return Err(problem(
            name,
            value,
            "zero would fail every run",
            "a duration longer than zero, like `30s`",
        ));
    }
    Ok(d)
}

fn parse_positive<T: TryFrom<u64>>(name: &str, value: &str) -> Result<T, ConfigProblem> {
    const FORM: &str = "a whole number of at least 1";
    let v = value.trim();
    if v.is_empty() {
        return Err(problem(name, value, "empty", FORM));
    }
    if v.starts_with('-') {
        return Err(problem(name, value, "negative", FORM));
    }
    let n: u64 = v.parse().map_err(|e: std::num::ParseIntError| {
        let why = match e.kind() {
            std::num::IntErrorKind::PosOverflow => "too large".to_string(),
            _ => "not a whole number".to_string(),
        };
        problem(name, value, why, FORM)
    })?;
    if n == 0 {
        return Err(problem(name, value, "zero", FORM));
    }
    T::try_from(n).map_err(|_| problem(name, value, "too large", FORM))
}

fn parse_priority(name: &str, value: &str) -> Result<i32, ConfigProblem> {
    const FORM: &str = "a whole number from -2147483648 to 2147483647 (higher starts first)";
    let v = value.trim();
    if v.is_empty() {
        return Err(problem(name, value, "empty", FORM));
    }
    v.parse().map_err(|e: std::num::ParseIntError| {
        let why = match e.kind() {
            std::num::IntErrorKind::PosOverflow => "too large",
            std::num::IntErrorKind::NegOverflow => "too small",
            _ => "not a whole number",
        };
        problem(name, value, why, FORM)
    })
}

fn parse_nonzero_usize(name: &str, value: &str) -> Result<NonZeroUsize, ConfigProblem> {
    let n: usize = parse_positive(name, value)?;
    NonZeroUsize::new(n).ok_or_else(|| problem(name, value, "zero", "a whole number of at least 1"))
}

/// A size: a whole number of bytes, optionally with a decimal (`KB`, `MB`, `GB`) or binary
/// (`KiB`, `MiB`, `GiB`) unit, any case, spaces allowed between; at least 1 byte.
fn parse_size(name: &str, value: &str) -> Result<u64, ConfigProblem> {
    let v = value.trim();
    let digits = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (number, unit) = (&v[..digits], v[digits..].trim());
    if number.is_empty() {
        let why = if v.is_empty() {
            "empty"
        } else {
            "not a whole number of bytes"
        };
        return Err(problem(name, value, why, SIZE_FORM));
    }
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => {
            return Err(problem(
                name,
                value,
                format!("unknown unit `{unit}`"),
                SIZE_FORM,
            ));
        }
    };
    let bytes = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| problem(name, value, "too large", SIZE_FORM))?;
    if bytes == 0 {
        return Err(problem(name, value, "zero", SIZE_FORM));
    }
    Ok(bytes)
}

fn parse_rate(name: &str, value: &str) -> Result<RateLimit, ConfigProblem> {
    RateLimit::parse(value).map_err(|why| problem(name, value, why, RATE_FORM))
}
