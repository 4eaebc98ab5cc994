//! `JOBRT_*` configuration: every variable `src/config.rs` accepts, globally, per job and per
//! group; what bad values report; unknown names; and that an override really changes what
//! `ctl.run` does, for that job only.
//!
//! Variables are passed to `RuntimeConfig::from_env_with`; no test touches the process
//! environment.

#[path = "support/callsites.rs"]
mod callsites;

use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use job_runtime::config::PolicyOverrides;
use job_runtime::limit::RATE_FORM;
use job_runtime::time::Instant;
use job_runtime::{
    ConfigError, Jitter, JobError, JobPolicy, JobRuntimeController, Overlap, RateLimit, RunError,
    RuntimeConfig,
};

// ---------------------------------------------------------------------------------------------
// Helpers (local to this file).

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn cfg(vars: &[(&str, &str)]) -> RuntimeConfig {
    RuntimeConfig::from_env_with(vars.iter().copied())
        .unwrap_or_else(|e| panic!("{vars:?} should be accepted: {e}"))
}

fn cfg_err(vars: &[(&str, &str)]) -> ConfigError {
    match RuntimeConfig::from_env_with(vars.iter().copied()) {
        Ok(c) => panic!("{vars:?} should be rejected, got {c:?}"),
        Err(e) => e,
    }
}

/// The policy fields, each readable as `JOBRT_<FIELD>` and `JOBRT_JOB_<NAME>_<FIELD>`.
const POLICY_FIELDS: [&str; 14] = [
    "OVERLAP",
    "COOLDOWN",
    "FAILURE_COOLDOWN",
    "BUDGET",
    "ATTEMPT_TIMEOUT",
    "ABANDON_GRACE",
    "MAX_ATTEMPTS",
    "RETRY_BASE_DELAY",
    "RETRY_MAX_DELAY",
    "RETRY_JITTER",
    "LOCK_WAIT",
    "HEARTBEAT_TIMEOUT",
    "PRIORITY",
    "GROUP",
];

/// The prefixes a policy field can follow: global, and per job (job `session-scan`).
const SCOPES: [&str; 2] = ["JOBRT_", "JOBRT_JOB_SESSION_SCAN_"];

// What each kind of variable says it accepts (copied from src/config.rs on purpose: a change
// of wording there should be a deliberate change here and in docs/configuration.md).
const DURATION_FORM: &str = "a duration like `250ms`, `30s`, `5m`, `1h 30m` or `0`";
const NONZERO_FORM: &str = "a duration longer than zero, like `30s`";
const COUNT_FORM: &str = "a whole number of at least 1";
const OVERLAP_FORM: &str = "one of coalesce, skip, queue-one, replace";
const JITTER_FORM: &str = "one of none, full, equal, decorrelated";
const GROUP_FORM: &str = "a group name defined by JOBRT_GROUP_<NAME>_*";
const PRIORITY_FORM: &str = "a whole number from -2147483648 to 2147483647 (higher starts first)";

/// Asserts `vars` fail with exactly one problem, about `name` = `value`, whose `expected`
/// is `form`, and that the message names all three.
fn assert_rejected(vars: &[(&str, &str)], name: &str, value: &str, form: &str) {
    let err = cfg_err(vars);
    let [p] = err.problems() else {
        panic!("{vars:?}: expected one problem, got {:?}", err.problems());
    };
    assert_eq!(p.name, name, "{err}");
    assert_eq!(p.value, value, "{err}");
    assert_eq!(p.expected, form, "{name} = {value:?}: {err}");
    assert!(!p.problem.is_empty());
    let msg = err.to_string();
    for part in [name, &format!("{value:?}"), form] {
        assert!(msg.contains(part), "message lacks {part:?}: {msg}");
    }
}

/// A job body that counts its calls.
fn counting(
    calls: &Arc<AtomicU32>,
) -> impl Fn(job_runtime::JobContext) -> std::future::Ready<Result<u32, RunError>>
+ Send
+ Sync
+ 'static
+ Clone {
    let calls = calls.clone();
    move |_ctx| std::future::ready(Ok(calls.fetch_add(1, Ordering::SeqCst)))
}

// ---------------------------------------------------------------------------------------------
// Parsing: every variable, globally, per job and per group.

#[test]
fn parses_every_global_variable() {
    let c = cfg(&[
        ("JOBRT_MAX_CONCURRENCY", "8"),
        ("JOBRT_RATE_LIMIT", "100/min burst 10"),
        ("JOBRT_STATUS_RETENTION", "10m"),
        ("JOBRT_OVERLAP", "queue-one"),
        ("JOBRT_COOLDOWN", "30s"),
        ("JOBRT_FAILURE_COOLDOWN", "5s"),
        ("JOBRT_BUDGET", "1h 30m"),
        ("JOBRT_ATTEMPT_TIMEOUT", "250ms"),
        ("JOBRT_ABANDON_GRACE", "2s"),
        ("JOBRT_MAX_ATTEMPTS", "5"),
        ("JOBRT_RETRY_BASE_DELAY", "50ms"),
        ("JOBRT_RETRY_MAX_DELAY", "2s"),
        ("JOBRT_RETRY_JITTER", "decorrelated"),
        ("JOBRT_LOCK_WAIT", "3s"),
        ("JOBRT_GROUP", "db"),
    ]);
    assert_eq!(c.max_concurrency, NonZeroUsize::new(8));
    assert_eq!(
        c.rate_limit,
        Some(RateLimit {
            count: NonZeroU32::new(100).unwrap(),
            per: secs(60),
            burst: NonZeroU32::new(10).unwrap(),
        })
    );
    assert_eq!(c.status_retention, secs(600));
    let d = &c.defaults;
    assert_eq!(d.overlap, Some(Overlap::QueueOne));
    assert_eq!(d.cooldown, Some(secs(30)));
    assert_eq!(d.failure_cooldown, Some(secs(5)));
    assert_eq!(d.budget, Some(secs(5400)));
    assert_eq!(d.attempt_timeout, Some(ms(250)));
    assert_eq!(d.abandon_grace, Some(secs(2)));
    assert_eq!(d.max_attempts, Some(5));
    assert_eq!(d.retry_base_delay, Some(ms(50)));
    assert_eq!(d.retry_max_delay, Some(secs(2)));
    assert_eq!(d.retry_jitter, Some(Jitter::Decorrelated));
    assert_eq!(d.lock_wait, Some(secs(3)));
    assert_eq!(d.group.as_deref(), Some("DB"));
    assert!(c.jobs.is_empty() && c.groups.is_empty());
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn parses_every_per_job_variable() {
    let c = cfg(&[
        ("JOBRT_JOB_SESSION_SCAN_OVERLAP", "skip"),
        ("JOBRT_JOB_SESSION_SCAN_COOLDOWN", "30s"),
        ("JOBRT_JOB_SESSION_SCAN_FAILURE_COOLDOWN", "5s"),
        ("JOBRT_JOB_SESSION_SCAN_BUDGET", "2m"),
        ("JOBRT_JOB_SESSION_SCAN_ATTEMPT_TIMEOUT", "10s"),
        ("JOBRT_JOB_SESSION_SCAN_ABANDON_GRACE", "0"),
        ("JOBRT_JOB_SESSION_SCAN_MAX_ATTEMPTS", "3"),
        ("JOBRT_JOB_SESSION_SCAN_RETRY_BASE_DELAY", "100ms"),
        ("JOBRT_JOB_SESSION_SCAN_RETRY_MAX_DELAY", "1s"),
        ("JOBRT_JOB_SESSION_SCAN_RETRY_JITTER", "equal"),
        ("JOBRT_JOB_SESSION_SCAN_LOCK_WAIT", "500ms"),
        ("JOBRT_JOB_SESSION_SCAN_GROUP", "db-pool"),
    ]);
    assert_eq!(c.defaults, PolicyOverrides::default());
    assert_eq!(c.jobs.keys().collect::<Vec<_>>(), ["SESSION_SCAN"]);
    let j = &c.jobs["SESSION_SCAN"];
    assert_eq!(j.overlap, Some(Overlap::Skip));
    assert_eq!(j.cooldown, Some(secs(30)));
    assert_eq!(j.failure_cooldown, Some(secs(5)));
    assert_eq!(j.budget, Some(secs(120)));
    assert_eq!(j.attempt_timeout, Some(secs(10)));
    assert_eq!(j.abandon_grace, Some(Duration::ZERO));
    assert_eq!(j.max_attempts, Some(3));
    assert_eq!(j.retry_base_delay, Some(ms(100)));
    assert_eq!(j.retry_max_delay, Some(secs(1)));
    assert_eq!(j.retry_jitter, Some(Jitter::Equal));
    assert_eq!(j.lock_wait, Some(ms(500)));
    assert_eq!(
        j.group.as_deref(),
        Some("DB_POOL"),
        "the group value is normalized"
    );
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert!(c.has_overrides(), "a per-job override counts");
}

#[test]
fn overrides_are_seen_whether_global_or_per_job_and_absent_by_default() {
    assert!(!RuntimeConfig::default().has_overrides());
    assert!(!cfg(&[("JOBRT_MAX_CONCURRENCY", "4")]).has_overrides());
    assert!(cfg(&[("JOBRT_COOLDOWN", "1s")]).has_overrides());
    assert!(cfg(&[("JOBRT_JOB_SCAN_PRIORITY", "2")]).has_overrides());
    let plain = JobPolicy::default();
    let c = RuntimeConfig::default();
    assert!(matches!(
        c.effective_policy("scan", &plain),
        std::borrow::Cow::Borrowed(_)
    ));
}

/// Job names whose normalized form contains a field name still split at the right place:
/// the longest field suffix wins (`FAILURE_COOLDOWN` before `COOLDOWN`).
#[test]
fn per_job_names_split_at_the_field() {
    let c = cfg(&[
        ("JOBRT_JOB_FAILURE_COOLDOWN", "1s"), // job FAILURE, field COOLDOWN
        ("JOBRT_JOB_X_FAILURE_COOLDOWN", "2s"), // job X, field FAILURE_COOLDOWN
        ("JOBRT_JOB_GROUP_GROUP", "g"),       // job GROUP, field GROUP
        ("JOBRT_JOB_A_B_C_MAX_ATTEMPTS", "4"), // job A_B_C
        ("JOBRT_JOB_RETRY_RETRY_MAX_DELAY", "9s"), // job RETRY
    ]);
    assert_eq!(c.jobs["FAILURE"].cooldown, Some(secs(1)));
    assert_eq!(c.jobs["FAILURE"].failure_cooldown, None);
    assert_eq!(c.jobs["X"].failure_cooldown, Some(secs(2)));
    assert_eq!(c.jobs["GROUP"].group.as_deref(), Some("G"));
    assert_eq!(c.jobs["A_B_C"].max_attempts, Some(4));
    assert_eq!(c.jobs["RETRY"].retry_max_delay, Some(secs(9)));
    assert_eq!(c.jobs.len(), 5);
}

/// Every policy field is a known variable both globally and per job: a valid value is
/// accepted without a warning, and lands in the right scope.
#[test]
fn every_policy_field_is_known_in_both_scopes() {
    let valid = |field: &str| match field {
        "OVERLAP" => "skip",
        "MAX_ATTEMPTS" => "2",
        "RETRY_JITTER" => "none",
        "GROUP" => "db",
        "PRIORITY" => "5",
        _ => "3s",
    };
    for field in POLICY_FIELDS {
        for scope in SCOPES {
            let name = format!("{scope}{field}");
            let c = cfg(&[(&name, valid(field))]);
            assert!(c.warnings.is_empty(), "{name}: {:?}", c.warnings);
            let global = c.defaults != PolicyOverrides::default();
            let per_job = c
                .jobs
                .get("SESSION_SCAN")
                .is_some_and(|o| *o != PolicyOverrides::default());
            assert_eq!(
                (global, per_job),
                (scope == "JOBRT_", scope != "JOBRT_"),
                "{name}"
            );
        }
    }
}

#[test]
fn parses_group_variables() {
    let c = cfg(&[
        ("JOBRT_GROUP_DB_CONCURRENCY", "2"),
        ("JOBRT_GROUP_DB_RATE_LIMIT", "10/s"),
        ("JOBRT_GROUP_API_RATE_LIMIT", "5/250ms burst 2"),
        ("JOBRT_GROUP_SLOW_IO_CONCURRENCY", "1"),
    ]);
    assert_eq!(c.groups.len(), 3);
    assert_eq!(c.groups["DB"].concurrency, NonZeroUsize::new(2));
    assert_eq!(c.groups["DB"].rate, Some(RateLimit::parse("10/s").unwrap()));
    assert_eq!(c.groups["API"].concurrency, None);
    let api = c.groups["API"].rate.unwrap();
    assert_eq!((api.count.get(), api.per, api.burst.get()), (5, ms(250), 2));
    assert_eq!(c.groups["SLOW_IO"].concurrency, NonZeroUsize::new(1));
    assert_eq!(c.groups["SLOW_IO"].rate, None);
    assert!(c.warnings.is_empty());
}

/// Every accepted spelling of every value kind.
#[test]
fn accepted_value_forms() {
    for scope in SCOPES {
        let name = |f: &str| format!("{scope}{f}");
        let read = |f: &str, v: &str| {
            let c = cfg(&[(&name(f), v)]);
            if scope == "JOBRT_" {
                c.defaults
            } else {
                c.jobs["SESSION_SCAN"].clone()
            }
        };
        for (v, d) in [
            ("250ms", ms(250)),
            ("30s", secs(30)),
            ("5m", secs(300)),
            ("1h 30m", secs(5400)),
            ("1h30m", secs(5400)),
            ("2days", secs(2 * 86_400)),
            ("1.5s", ms(1500)),
            ("1w", secs(7 * 86_400)),
            ("  45s ", secs(45)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(read("COOLDOWN", v).cooldown, Some(d), "{v:?}");
            assert_eq!(read("FAILURE_COOLDOWN", v).failure_cooldown, Some(d));
            assert_eq!(read("ABANDON_GRACE", v).abandon_grace, Some(d));
            assert_eq!(read("RETRY_BASE_DELAY", v).retry_base_delay, Some(d));
            assert_eq!(read("RETRY_MAX_DELAY", v).retry_max_delay, Some(d));
            assert_eq!(read("LOCK_WAIT", v).lock_wait, Some(d));
            if !d.is_zero() {
                assert_eq!(read("BUDGET", v).budget, Some(d));
                assert_eq!(read("ATTEMPT_TIMEOUT", v).attempt_timeout, Some(d));
            }
        }
        for (v, o) in [
            ("coalesce", Overlap::Coalesce),
            ("skip", Overlap::Skip),
            ("queue-one", Overlap::QueueOne),
            ("queue_one", Overlap::QueueOne),
            ("Replace", Overlap::Replace),
            (" SKIP ", Overlap::Skip),
        ] {
            assert_eq!(read("OVERLAP", v).overlap, Some(o), "{v:?}");
        }
        for (v, j) in [
            ("none", Jitter::None),
            ("full", Jitter::Full),
            ("Equal", Jitter::Equal),
            ("DECORRELATED", Jitter::Decorrelated),
        ] {
            assert_eq!(read("RETRY_JITTER", v).retry_jitter, Some(j), "{v:?}");
        }
        for (v, n) in [("1", 1), ("10", 10), (" 7 ", 7), ("4294967295", u32::MAX)] {
            assert_eq!(read("MAX_ATTEMPTS", v).max_attempts, Some(n), "{v:?}");
        }
        for (v, n) in [
            ("0", 0),
            ("10", 10),
            (" -3 ", -3),
            ("+7", 7),
            ("2147483647", i32::MAX),
            ("-2147483648", i32::MIN),
        ] {
            assert_eq!(read("PRIORITY", v).priority, Some(n), "{v:?}");
        }
        for (v, g) in [
            ("db", "DB"),
            ("Session-Pool", "SESSION_POOL"),
            (" api ", "API"),
        ] {
            assert_eq!(read("GROUP", v).group.as_deref(), Some(g), "{v:?}");
        }
    }
    for (v, (count, per, burst)) in [
        ("5/s", (5, secs(1), 5)),
        ("100/min", (100, secs(60), 100)),
        ("3/h", (3, secs(3600), 3)),
        ("5/250ms", (5, ms(250), 5)),
        ("10/min burst 5", (10, secs(60), 5)),
        ("10/2s burst 3", (10, secs(2), 3)),
    ] {
        for name in ["JOBRT_RATE_LIMIT", "JOBRT_GROUP_API_RATE_LIMIT"] {
            let c = cfg(&[(name, v)]);
            let r = if name == "JOBRT_RATE_LIMIT" {
                c.rate_limit
            } else {
                c.groups["API"].rate
            }
            .unwrap();
            assert_eq!(
                (r.count.get(), r.per, r.burst.get()),
                (count, per, burst),
                "{v}"
            );
        }
    }
    for (v, n) in [("1", 1), ("64", 64), (" 3", 3)] {
        assert_eq!(
            cfg(&[("JOBRT_MAX_CONCURRENCY", v)]).max_concurrency,
            NonZeroUsize::new(n)
        );
        assert_eq!(
            cfg(&[("JOBRT_GROUP_DB_CONCURRENCY", v)]).groups["DB"].concurrency,
            NonZeroUsize::new(n)
        );
    }
    assert_eq!(
        cfg(&[("JOBRT_STATUS_RETENTION", "0")]).status_retention,
        Duration::ZERO
    );
    assert_eq!(
        cfg(&[("JOBRT_STATUS_RETENTION", "1h")]).status_retention,
        secs(3600)
    );
}

/// With no variables everything is at its default and nothing is overridden.
#[test]
fn empty_environment_is_the_default() {
    let none: [(&str, &str); 0] = [];
    let c = RuntimeConfig::from_env_with(none).unwrap();
    assert_eq!(c, RuntimeConfig::default());
    assert_eq!(c.status_retention, Duration::ZERO);
    // Names without the prefix are not ours: no warning, no error.
    let c = cfg(&[
        ("PATH", "/bin"),
        ("jobrt_cooldown", "x"),
        ("XJOBRT_COOLDOWN", "x"),
    ]);
    assert_eq!(c, RuntimeConfig::default());
}

// ---------------------------------------------------------------------------------------------
// Bad values: each names the variable, the value and the accepted form.

const BAD_DURATIONS: [&str; 9] = [
    "",
    "   ",
    "-5s",
    "10 parsecs",
    "99999999999999999999999s",
    "5",
    "fast",
    "1.5ns",
    "30 s ago",
];

#[test]
fn bad_durations_are_rejected() {
    for scope in SCOPES {
        for field in [
            "COOLDOWN",
            "FAILURE_COOLDOWN",
            "BUDGET",
            "ATTEMPT_TIMEOUT",
            "ABANDON_GRACE",
            "RETRY_BASE_DELAY",
            "RETRY_MAX_DELAY",
            "LOCK_WAIT",
        ] {
            let name = format!("{scope}{field}");
            for v in BAD_DURATIONS {
                assert_rejected(&[(&name, v)], &name, v, DURATION_FORM);
            }
        }
    }
    for v in BAD_DURATIONS {
        assert_rejected(
            &[("JOBRT_STATUS_RETENTION", v)],
            "JOBRT_STATUS_RETENTION",
            v,
            DURATION_FORM,
        );
    }
}

/// A budget or attempt timeout of zero would fail every run.
#[test]
fn zero_budget_and_attempt_timeout_are_rejected() {
    for scope in SCOPES {
        for field in ["BUDGET", "ATTEMPT_TIMEOUT"] {
            let name = format!("{scope}{field}");
            for v in ["0", "0s", "0ms", " 0 "] {
                assert_rejected(&[(&name, v)], &name, v, NONZERO_FORM);
            }
        }
    }
}

#[test]
fn bad_counts_are_rejected() {
    let mut names = vec![
        "JOBRT_MAX_CONCURRENCY".to_string(),
        "JOBRT_GROUP_DB_CONCURRENCY".to_string(),
    ];
    names.extend(SCOPES.map(|s| format!("{s}MAX_ATTEMPTS")));
    for name in &names {
        for v in [
            "",
            " ",
            "0",
            "-5",
            "-0",
            "abc",
            "1.5",
            "3 attempts",
            "184467440737095516160",
            "18446744073709551616",
        ] {
            assert_rejected(&[(name, v)], name, v, COUNT_FORM);
        }
    }
    // MAX_ATTEMPTS is a u32: one past its range is too large as well.
    for scope in SCOPES {
        let name = format!("{scope}MAX_ATTEMPTS");
        assert_rejected(&[(&name, "4294967296")], &name, "4294967296", COUNT_FORM);
    }
    // The problem says what is wrong.
    let err = cfg_err(&[("JOBRT_MAX_ATTEMPTS", "184467440737095516160")]);
    assert!(err.to_string().contains("too large"), "{err}");
    let err = cfg_err(&[("JOBRT_MAX_ATTEMPTS", "-5")]);
    assert!(err.to_string().contains("negative"), "{err}");
    let err = cfg_err(&[("JOBRT_MAX_ATTEMPTS", "0")]);
    assert!(err.to_string().contains("zero"), "{err}");
}

#[test]
fn bad_rates_are_rejected() {
    for name in ["JOBRT_RATE_LIMIT", "JOBRT_GROUP_API_RATE_LIMIT"] {
        for v in [
            "",
            "fast",
            "10",
            "0/s",
            "-1/s",
            "x/s",
            "10/parsecs",
            "10/s burst 0",
            "10/s burst x",
            "1/0s",
            "99999999999/s",
            "2000000000/1s",
        ] {
            assert_rejected(&[(name, v)], name, v, RATE_FORM);
        }
    }
}

#[test]
fn unknown_enum_words_are_rejected() {
    for scope in SCOPES {
        let name = format!("{scope}OVERLAP");
        for v in ["", "sometimes", "queue", "queue one", "skip!"] {
            assert_rejected(&[(&name, v)], &name, v, OVERLAP_FORM);
        }
        let name = format!("{scope}RETRY_JITTER");
        for v in ["", "random", "nonee", "full jitter"] {
            assert_rejected(&[(&name, v)], &name, v, JITTER_FORM);
        }
        let name = format!("{scope}GROUP");
        for v in ["", "  "] {
            assert_rejected(&[(&name, v)], &name, v, GROUP_FORM);
        }
    }
}

#[test]
fn bad_priorities_are_rejected() {
    for scope in SCOPES {
        let name = format!("{scope}PRIORITY");
        for v in [
            "",
            " ",
            "high",
            "1.5",
            "- 1",
            "5 urgent",
            "2147483648",
            "-2147483649",
        ] {
            assert_rejected(&[(&name, v)], &name, v, PRIORITY_FORM);
        }
    }
    let err = cfg_err(&[("JOBRT_PRIORITY", "2147483648")]);
    assert!(err.to_string().contains("too large"), "{err}");
    let err = cfg_err(&[("JOBRT_PRIORITY", "-2147483649")]);
    assert!(err.to_string().contains("too small"), "{err}");
}

/// `RETRY_BASE_DELAY` above `RETRY_MAX_DELAY` is rejected globally and per job, naming both
/// variables and both values; equal is fine.
#[test]
fn base_delay_above_max_delay_is_rejected() {
    let err = cfg_err(&[
        ("JOBRT_RETRY_BASE_DELAY", "10s"),
        ("JOBRT_RETRY_MAX_DELAY", "1s"),
    ]);
    let [p] = err.problems() else { panic!("{err}") };
    assert_eq!(p.name, "JOBRT_RETRY_BASE_DELAY");
    let msg = err.to_string();
    for part in [
        "JOBRT_RETRY_BASE_DELAY",
        "JOBRT_RETRY_MAX_DELAY",
        "10s",
        "1s",
    ] {
        assert!(msg.contains(part), "lacks {part}: {msg}");
    }

    let err = cfg_err(&[
        ("JOBRT_JOB_SCAN_RETRY_BASE_DELAY", "2s"),
        ("JOBRT_JOB_SCAN_RETRY_MAX_DELAY", "500ms"),
    ]);
    let [p] = err.problems() else { panic!("{err}") };
    assert_eq!(p.name, "JOBRT_JOB_SCAN_RETRY_BASE_DELAY");
    let msg = err.to_string();
    for part in [
        "JOBRT_JOB_SCAN_RETRY_BASE_DELAY",
        "JOBRT_JOB_SCAN_RETRY_MAX_DELAY",
        "2s",
        "500ms",
    ] {
        assert!(msg.contains(part), "lacks {part}: {msg}");
    }

    // A job's base against the global max (the job inherits it).
    let err = cfg_err(&[
        ("JOBRT_RETRY_MAX_DELAY", "1s"),
        ("JOBRT_JOB_SCAN_RETRY_BASE_DELAY", "5s"),
    ]);
    assert_eq!(err.problems().len(), 1, "{err}");
    assert_eq!(err.problems()[0].name, "JOBRT_JOB_SCAN_RETRY_BASE_DELAY");

    // A job may lift the max above a global base; the other jobs keep the global pair.
    let c = cfg(&[
        ("JOBRT_RETRY_BASE_DELAY", "2s"),
        ("JOBRT_RETRY_MAX_DELAY", "3s"),
        ("JOBRT_JOB_SCAN_RETRY_BASE_DELAY", "10s"),
        ("JOBRT_JOB_SCAN_RETRY_MAX_DELAY", "20s"),
    ]);
    assert_eq!(c.jobs["SCAN"].retry_base_delay, Some(secs(10)));
    // Equal is accepted, at both levels.
    cfg(&[
        ("JOBRT_RETRY_BASE_DELAY", "1s"),
        ("JOBRT_RETRY_MAX_DELAY", "1s"),
        ("JOBRT_JOB_SCAN_RETRY_BASE_DELAY", "4s"),
        ("JOBRT_JOB_SCAN_RETRY_MAX_DELAY", "4s"),
    ]);
}

/// Every problem is reported at once, not just the first, and unknown names do not hide them.
#[test]
fn several_bad_variables_are_all_reported() {
    let vars = [
        ("JOBRT_COOLDOWN", "10 parsecs"),
        ("JOBRT_BUDGET", "0"),
        ("JOBRT_MAX_ATTEMPTS", "-5"),
        ("JOBRT_RETRY_JITTER", "random"),
        ("JOBRT_JOB_SCAN_LOCK_WAIT", "99999999999999999999999s"),
        ("JOBRT_GROUP_DB_CONCURRENCY", "0"),
        ("JOBRT_RATE_LIMIT", "fast"),
        ("JOBRT_JOB_SCAN_RETRY_BASE_DELAY", "9s"),
        ("JOBRT_JOB_SCAN_RETRY_MAX_DELAY", "1s"),
        // Good and unknown variables mixed in.
        ("JOBRT_FAILURE_COOLDOWN", "5s"),
        ("JOBRT_COOLDOWNN", "5s"),
    ];
    let err = cfg_err(&vars);
    let mut names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "JOBRT_BUDGET",
            "JOBRT_COOLDOWN",
            "JOBRT_GROUP_DB_CONCURRENCY",
            "JOBRT_JOB_SCAN_LOCK_WAIT",
            "JOBRT_JOB_SCAN_RETRY_BASE_DELAY",
            "JOBRT_MAX_ATTEMPTS",
            "JOBRT_RATE_LIMIT",
            "JOBRT_RETRY_JITTER",
        ]
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("invalid job-runtime configuration: "),
        "{msg}"
    );
    for (name, value) in &vars[..7] {
        assert!(
            msg.contains(name) && msg.contains(&format!("{value:?}")),
            "{name}: {msg}"
        );
    }
    // The range problem quotes both values and names both variables.
    assert!(
        msg.contains("\"9s (max 1s)\"") && msg.contains("JOBRT_JOB_SCAN_RETRY_MAX_DELAY"),
        "{msg}"
    );
    assert_eq!(msg.matches("; expected ").count(), 8, "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Unknown names.

/// A minimal tracing subscriber that keeps every event's level, target and message.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(tracing::Level, String, String)>>>);

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut m = Message(String::new());
        event.record(&mut m);
        let meta = event.metadata();
        self.0
            .lock()
            .unwrap()
            .push((*meta.level(), meta.target().to_string(), m.0));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

const UNKNOWN: [&str; 12] = [
    "JOBRT_COOLDOWNN",
    "JOBRT_TIMEOUT",
    "JOBRT_",
    "JOBRT_JOB_SCAN_COLDOWN",
    "JOBRT_JOB_SCAN_MAX_CONCURRENCY",
    "JOBRT_JOB_SCAN_STATUS_RETENTION",
    "JOBRT_JOB_COOLDOWN",
    "JOBRT_JOB__COOLDOWN",
    "JOBRT_GROUP_DB_LIMIT",
    "JOBRT_GROUP__CONCURRENCY",
    "JOBRT_GROUP_DB_COOLDOWN",
    "JOBRT_MAX_CONCURRENCY_X",
];

/// Unknown `JOBRT_*` names are not errors and not silently dropped: each is in `warnings`
/// (naming it) and logged as a tracing warning. Their values are not even looked at.
#[test]
fn unknown_names_are_reported_as_warnings() {
    let mut vars: Vec<(&str, &str)> = UNKNOWN.iter().map(|n| (*n, "not even a value")).collect();
    vars.push(("JOBRT_COOLDOWN", "30s"));
    vars.push(("HOME", "/root"));
    let capture = Capture::default();
    callsites::ask_each_time();
    let c = tracing::subscriber::with_default(capture.clone(), || cfg(&vars));
    assert_eq!(c.defaults.cooldown, Some(secs(30)));
    assert_eq!(c.warnings.len(), UNKNOWN.len(), "{:#?}", c.warnings);
    for name in UNKNOWN {
        let w = c
            .warnings
            .iter()
            .find(|w| w.contains(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no warning names {name}: {:#?}", c.warnings));
        assert!(w.contains("docs/configuration.md"), "{w}");
    }
    let events = capture.0.lock().unwrap();
    let warns: Vec<_> = events
        .iter()
        .filter(|(lvl, target, _)| *lvl == tracing::Level::WARN && target == "job_runtime::config")
        .map(|(_, _, msg)| msg.clone())
        .collect();
    assert_eq!(warns, c.warnings, "each warning is also logged");
}

/// A job or group name written in lower case in a variable name can never match: names are
/// normalized to upper case, so `JOBRT_JOB_scan_COOLDOWN` would be dropped without a word.
/// It must at least be reported (src/config.rs `read_var` stores the raw `scan` as the key).
#[test]

fn lower_case_names_in_variables_are_not_silently_ignored() {
    let c = cfg(&[("JOBRT_JOB_scan_COOLDOWN", "30s")]);
    let applied = c
        .effective_policy("scan", &JobPolicy::default())
        .cooldown()
        .span(true)
        == secs(30);
    assert!(
        applied || !c.warnings.is_empty(),
        "JOBRT_JOB_scan_COOLDOWN neither applied nor warned about: {c:?}"
    );
}

/// A job whose name has non-ASCII characters maps to a variable like any other (each
/// character that is not an ASCII letter or digit becomes `_`: `café` → `CAF_`), but
/// `matches_normalized` (src/job.rs) compares bytes, so `café` (5 bytes) never matches `CAF_`
/// (4 bytes) and the override is silently not applied. `job_overrides("café", ..)` has the same
/// problem.
#[test]

fn non_ascii_job_names_get_their_overrides() {
    let c = cfg(&[("JOBRT_JOB_CAF__COOLDOWN", "30s")]);
    assert!(c.jobs.contains_key("CAF_"));
    let span = c
        .effective_policy("café", &JobPolicy::default())
        .cooldown()
        .span(true);
    assert_eq!(span, secs(30));
}

/// Every problem names a variable that was actually set. Today a global base > max is also
/// reported once per job with any override, under `JOBRT_JOB_<NAME>_RETRY_BASE_DELAY` — a
/// variable nobody set (src/config.rs `check_ranges`).
#[test]

fn range_problems_name_only_variables_that_were_set() {
    let vars = [
        ("JOBRT_RETRY_BASE_DELAY", "10s"),
        ("JOBRT_RETRY_MAX_DELAY", "1s"),
        ("JOBRT_JOB_SCAN_COOLDOWN", "30s"),
    ];
    let err = cfg_err(&vars);
    for p in err.problems() {
        assert!(
            vars.iter().any(|(n, _)| *n == p.name),
            "problem names {} which was not set: {err}",
            p.name
        );
    }
    assert_eq!(err.problems().len(), 1, "{err}");
}

// ---------------------------------------------------------------------------------------------
// Overrides change what runs do: per job > global > code, for that job only.

/// `JOBRT_JOB_SCAN_COOLDOWN=30s` makes job `scan` cool down; job `other` under the same code
/// policy does not.
#[tokio::test(start_paused = true)]
async fn per_job_cooldown_applies_to_that_job_only() {
    let ctl = JobRuntimeController::new(cfg(&[("JOBRT_JOB_SCAN_COOLDOWN", "30s")]));
    let policy = JobPolicy::default();
    let calls = Arc::new(AtomicU32::new(0));
    let job = counting(&calls);
    ctl.run("scan", "k", &policy, job.clone()).await.unwrap();
    ctl.run("other", "k", &policy, job.clone()).await.unwrap();
    match ctl.run("scan", "k", &policy, job.clone()).await {
        Err(JobError::CoolingDown { remaining, .. }) => assert_eq!(remaining, secs(30)),
        other => panic!("scan should cool down: {other:?}"),
    }
    ctl.run("other", "k", &policy, job.clone()).await.unwrap();
    ctl.run("other", "k", &policy, job.clone()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    tokio::time::sleep(secs(30)).await;
    ctl.run("scan", "k", &policy, job.clone()).await.unwrap();
}

/// Job `session-scan` reads `JOBRT_JOB_SESSION_SCAN_*`; so does any spelling that normalizes
/// to the same name, and nothing else.
#[tokio::test(start_paused = true)]
async fn job_names_map_to_variable_names() {
    let c = cfg(&[("JOBRT_JOB_SESSION_SCAN_COOLDOWN", "30s")]);
    let p = JobPolicy::default();
    for job in [
        "session-scan",
        "SESSION_SCAN",
        "session.scan",
        "Session Scan",
    ] {
        assert_eq!(
            c.effective_policy(job, &p).cooldown().span(true),
            secs(30),
            "{job}"
        );
    }
    for job in ["sessionscan", "session-scan-2", "scan", "session"] {
        assert_eq!(
            c.effective_policy(job, &p).cooldown().span(true),
            Duration::ZERO,
            "{job}"
        );
    }
    let ctl = JobRuntimeController::new(c);
    let calls = Arc::new(AtomicU32::new(0));
    ctl.run("session-scan", "k", &p, counting(&calls))
        .await
        .unwrap();
    assert!(matches!(
        ctl.run("session-scan", "k", &p, counting(&calls)).await,
        Err(JobError::CoolingDown { .. })
    ));
    ctl.run("session_scanner", "k", &p, counting(&calls))
        .await
        .unwrap();
    ctl.run("session_scanner", "k", &p, counting(&calls))
        .await
        .unwrap();
}

/// Precedence: per-job variable > global variable > the code's policy.
#[tokio::test(start_paused = true)]
async fn precedence_per_job_over_global_over_code() {
    let code = JobPolicy::builder()
        .cooldown(secs(5))
        .max_attempts(2)
        .budget(secs(100))
        .build()
        .unwrap();
    // Code only.
    let c = cfg(&[]);
    let p = c.effective_policy("scan", &code);
    assert_eq!(
        (
            p.cooldown().span(true),
            p.retry().max_attempts().get(),
            p.budget()
        ),
        (secs(5), 2, Some(secs(100)))
    );
    // Global over code.
    let c = cfg(&[("JOBRT_COOLDOWN", "10s"), ("JOBRT_MAX_ATTEMPTS", "3")]);
    let p = c.effective_policy("scan", &code);
    assert_eq!(
        (
            p.cooldown().span(true),
            p.retry().max_attempts().get(),
            p.budget()
        ),
        (secs(10), 3, Some(secs(100)))
    );
    // Per job over global, for that job only.
    let c = cfg(&[
        ("JOBRT_COOLDOWN", "10s"),
        ("JOBRT_MAX_ATTEMPTS", "3"),
        ("JOBRT_JOB_SCAN_COOLDOWN", "30s"),
    ]);
    let p = c.effective_policy("scan", &code);
    assert_eq!(
        (
            p.cooldown().span(true),
            p.retry().max_attempts().get(),
            p.budget()
        ),
        (secs(30), 3, Some(secs(100)))
    );
    let p = c.effective_policy("other", &code);
    assert_eq!(p.cooldown().span(true), secs(10));

    // The same through runs.
    let ctl = JobRuntimeController::new(c);
    let calls = Arc::new(AtomicU32::new(0));
    for (job, span) in [("scan", 30), ("other", 10)] {
        ctl.run(job, "k", &code, counting(&calls)).await.unwrap();
        match ctl.run(job, "k", &code, counting(&calls)).await {
            Err(JobError::CoolingDown { remaining, .. }) => assert_eq!(remaining, secs(span)),
            other => panic!("{job}: {other:?}"),
        }
    }
}

/// `COOLDOWN` sets both spans and `FAILURE_COOLDOWN` the failure span, level by level: code,
/// then the global variables, then the job's. A `COOLDOWN` at a more specific level therefore
/// also replaces a failure span set at a less specific one.
#[test]
fn cooldown_and_failure_cooldown_layering() {
    let code = JobPolicy::builder()
        .cooldown(secs(60))
        .failure_cooldown(secs(6))
        .build()
        .unwrap();
    let spans = |vars: &[(&str, &str)], job: &str| {
        let c = cfg(vars).effective_policy(job, &code).cooldown();
        (c.span(true), c.span(false))
    };
    assert_eq!(spans(&[], "scan"), (secs(60), secs(6)));
    assert_eq!(
        spans(&[("JOBRT_FAILURE_COOLDOWN", "2s")], "scan"),
        (secs(60), secs(2))
    );
    assert_eq!(
        spans(&[("JOBRT_COOLDOWN", "10s")], "scan"),
        (secs(10), secs(10))
    );
    assert_eq!(
        spans(
            &[("JOBRT_COOLDOWN", "10s"), ("JOBRT_FAILURE_COOLDOWN", "2s")],
            "scan"
        ),
        (secs(10), secs(2))
    );
    assert_eq!(
        spans(
            &[
                ("JOBRT_COOLDOWN", "10s"),
                ("JOBRT_JOB_SCAN_FAILURE_COOLDOWN", "1s")
            ],
            "scan"
        ),
        (secs(10), secs(1))
    );
    // The job's COOLDOWN replaces the global FAILURE_COOLDOWN too.
    assert_eq!(
        spans(
            &[
                ("JOBRT_FAILURE_COOLDOWN", "2s"),
                ("JOBRT_JOB_SCAN_COOLDOWN", "30s")
            ],
            "scan"
        ),
        (secs(30), secs(30))
    );
    assert_eq!(
        spans(
            &[
                ("JOBRT_FAILURE_COOLDOWN", "2s"),
                ("JOBRT_JOB_SCAN_COOLDOWN", "30s")
            ],
            "other"
        ),
        (secs(60), secs(2))
    );
}

/// Per-job retry variables change the attempt schedule of that job only.
#[tokio::test(start_paused = true)]
async fn per_job_retry_variables_change_the_schedule() {
    let c = cfg(&[
        ("JOBRT_JOB_FETCH_MAX_ATTEMPTS", "5"),
        ("JOBRT_JOB_FETCH_RETRY_BASE_DELAY", "100ms"),
        ("JOBRT_JOB_FETCH_RETRY_MAX_DELAY", "300ms"),
        ("JOBRT_JOB_FETCH_RETRY_JITTER", "none"),
    ]);
    let ctl = JobRuntimeController::new(c);
    let code = JobPolicy::default(); // one attempt
    for (job, expect) in [
        ("fetch", vec![ms(0), ms(100), ms(300), ms(600), ms(900)]),
        ("other", vec![ms(0)]),
    ] {
        let starts = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let s = starts.clone();
        let r = ctl
            .run(job, "k", &code, move |_ctx| {
                s.lock().unwrap().push(Instant::now() - t0);
                std::future::ready(Err::<(), _>(RunError::msg("down")))
            })
            .await;
        assert!(r.is_err());
        assert_eq!(*starts.lock().unwrap(), expect, "{job}");
    }
}

/// Global retry variables apply to every job; a per-job jitter overrides the global one.
#[tokio::test(start_paused = true)]
async fn global_retry_variables_change_the_schedule() {
    let c = cfg(&[
        ("JOBRT_MAX_ATTEMPTS", "3"),
        ("JOBRT_RETRY_BASE_DELAY", "1s"),
        ("JOBRT_RETRY_MAX_DELAY", "1m"),
        ("JOBRT_RETRY_JITTER", "none"),
        ("JOBRT_JOB_JITTERY_RETRY_JITTER", "full"),
    ]);
    let ctl = JobRuntimeController::new(c);
    let code = JobPolicy::default();
    let mut schedules = Vec::new();
    for job in ["a", "b", "jittery"] {
        let starts = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let s = starts.clone();
        let r = ctl
            .run(job, "k", &code, move |_ctx| {
                s.lock().unwrap().push(Instant::now() - t0);
                std::future::ready(Err::<(), _>(RunError::msg("down")))
            })
            .await;
        assert!(matches!(
            r,
            Err(JobError::RetriesExhausted { attempts: 3, .. })
        ));
        schedules.push(starts.lock().unwrap().clone());
    }
    assert_eq!(schedules[0], [secs(0), secs(1), secs(3)]);
    assert_eq!(schedules[1], [secs(0), secs(1), secs(3)]);
    // Full jitter: each delay within [0, cap(n)].
    let j = &schedules[2];
    assert!(j[1] <= secs(1) && j[2] - j[1] <= secs(2), "{j:?}");
}

/// The range check only sees what the environment sets: with only `RETRY_BASE_DELAY` set
/// above the code's max, the configuration loads and the backoff clamps the base to the max
/// (`Backoff::new`), so every delay is the max.
#[tokio::test(start_paused = true)]
async fn env_base_above_code_max_is_clamped() {
    let ctl = JobRuntimeController::new(cfg(&[("JOBRT_RETRY_BASE_DELAY", "5s")]));
    let code = JobPolicy::builder()
        .retry(
            job_runtime::RetryPolicy::builder()
                .max_attempts(3)
                .max_delay(secs(2))
                .jitter(Jitter::None)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let starts = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let s = starts.clone();
    let r = ctl
        .run("j", "k", &code, move |_ctx| {
            s.lock().unwrap().push(Instant::now() - t0);
            std::future::ready(Err::<(), _>(RunError::msg("down")))
        })
        .await;
    assert!(r.is_err());
    assert_eq!(*starts.lock().unwrap(), [secs(0), secs(2), secs(4)]);
}

/// `BUDGET`, `ATTEMPT_TIMEOUT` and `ABANDON_GRACE` bound the job's runs.
#[tokio::test(start_paused = true)]
async fn per_job_budget_timeout_and_grace() {
    let c = cfg(&[
        ("JOBRT_JOB_SLOW_BUDGET", "5s"),
        ("JOBRT_JOB_SLOW_ABANDON_GRACE", "2s"),
        ("JOBRT_JOB_TIMED_ATTEMPT_TIMEOUT", "3s"),
        ("JOBRT_BUDGET", "1h"),
    ]);
    let ctl = JobRuntimeController::new(c);
    let code = JobPolicy::default();
    // Ignores its token: budget 5 s + grace 2 s.
    let deaf = |_ctx| async {
        tokio::time::sleep(secs(86_400)).await;
        Ok::<_, RunError>(())
    };
    let t0 = Instant::now();
    match ctl.run("slow", "k", &code, deaf).await {
        Err(JobError::BudgetExceeded { budget, .. }) => assert_eq!(budget, secs(5)),
        other => panic!("{other:?}"),
    }
    assert_eq!(t0.elapsed(), secs(7));
    // Honours its token: attempt timeout at 3 s; the global budget (1 h) is not reached.
    let polite = |ctx: job_runtime::JobContext| async move {
        ctx.cancelled().await;
        Err::<(), _>(RunError::msg("stopped"))
    };
    let t1 = Instant::now();
    match ctl.run("timed", "k", &code, polite).await {
        Err(JobError::AttemptTimeout {
            timeout,
            attempt: 1,
            ..
        }) => assert_eq!(timeout, secs(3)),
        other => panic!("{other:?}"),
    }
    assert_eq!(t1.elapsed(), secs(3));
    // Another job under the global budget only: ends at 1 h (+ the default 1 s grace: deaf).
    let t2 = Instant::now();
    match ctl.run("other", "k", &code, deaf).await {
        Err(JobError::BudgetExceeded { budget, .. }) => assert_eq!(budget, secs(3600)),
        other => panic!("{other:?}"),
    }
    assert_eq!(t2.elapsed(), secs(3601));
}

/// `LOCK_WAIT` lets a run wait for a key held elsewhere; without it the run is `Busy` at once.
#[tokio::test(start_paused = true)]
async fn lock_wait_variable() {
    let ctl = JobRuntimeController::new(cfg(&[("JOBRT_JOB_PATIENT_LOCK_WAIT", "2s")]));
    let code = JobPolicy::default();
    let calls = Arc::new(AtomicU32::new(0));
    let _a = ctl.try_acquire("patient", "k").unwrap();
    let _b = ctl.try_acquire("eager", "k").unwrap();
    let t0 = Instant::now();
    match ctl.run("patient", "k", &code, counting(&calls)).await {
        Err(JobError::LockTimeout { waited, .. }) => assert_eq!(waited, secs(2)),
        other => panic!("{other:?}"),
    }
    assert_eq!(t0.elapsed(), secs(2));
    assert!(matches!(
        ctl.run("eager", "k", &code, counting(&calls)).await,
        Err(JobError::Busy { .. })
    ));
    assert_eq!(t0.elapsed(), secs(2));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// `OVERLAP=skip` for one job: a second caller is refused while the first runs; other jobs
/// still coalesce.
#[tokio::test(start_paused = true)]
async fn overlap_variable() {
    let ctl = JobRuntimeController::new(cfg(&[("JOBRT_JOB_SKIPPY_OVERLAP", "skip")]));
    let code = JobPolicy::default();
    let slow = |_ctx| async {
        tokio::time::sleep(secs(1)).await;
        Ok::<_, RunError>(1u8)
    };
    let (a, b) = tokio::join!(
        ctl.run("skippy", "k", &code, slow),
        ctl.run("skippy", "k", &code, slow)
    );
    assert!(a.is_ok());
    assert!(matches!(b, Err(JobError::Busy { .. })), "{b:?}");
    let (a, b) = tokio::join!(
        ctl.run("other", "k", &code, slow),
        ctl.run("other", "k", &code, slow)
    );
    assert!(Arc::ptr_eq(&a.unwrap(), &b.unwrap()), "coalesced");
}

/// `FAILURE_COOLDOWN` per job: a failed run of that job cools down for that span.
#[tokio::test(start_paused = true)]
async fn failure_cooldown_variable() {
    let ctl = JobRuntimeController::new(cfg(&[
        ("JOBRT_COOLDOWN", "1m"),
        ("JOBRT_JOB_SCAN_FAILURE_COOLDOWN", "5s"),
    ]));
    let code = JobPolicy::default();
    let fail = |_ctx| {
        std::future::ready(Err::<(), _>(RunError::permanent(std::io::Error::other(
            "x",
        ))))
    };
    for (job, span) in [("scan", secs(5)), ("other", secs(60))] {
        assert!(ctl.run(job, "k", &code, fail).await.is_err());
        match ctl.run(job, "k", &code, fail).await {
            Err(JobError::CoolingDown { remaining, .. }) => assert_eq!(remaining, span, "{job}"),
            other => panic!("{other:?}"),
        }
    }
}

/// `GROUP` puts a job in a group defined by `JOBRT_GROUP_<NAME>_CONCURRENCY`: its runs on
/// different keys take turns.
#[tokio::test(start_paused = true)]
async fn group_and_group_concurrency_variables() {
    let c = cfg(&[
        ("JOBRT_GROUP_DB_POOL_CONCURRENCY", "1"),
        ("JOBRT_JOB_SCAN_GROUP", "db-pool"),
    ]);
    assert_eq!(
        c.effective_policy("scan", &JobPolicy::default()).group(),
        Some("DB_POOL")
    );
    let ctl = JobRuntimeController::new(c);
    assert_eq!(ctl.available_permits(Some("db-pool")), Some(1));
    assert_eq!(ctl.available_permits(None), None);
    let code = JobPolicy::default();
    let job = |_ctx| async {
        tokio::time::sleep(secs(1)).await;
        Ok::<_, RunError>(Instant::now())
    };
    let t0 = Instant::now();
    let (a, b, c) = tokio::join!(
        ctl.run("scan", "a", &code, job),
        ctl.run("scan", "b", &code, job),
        ctl.run("other", "c", &code, job),
    );
    let mut ends = [*a.unwrap() - t0, *b.unwrap() - t0];
    ends.sort();
    assert_eq!(
        ends,
        [secs(1), secs(2)],
        "scan runs take turns in the group"
    );
    assert_eq!(*c.unwrap() - t0, secs(1), "other is not in the group");

    // A group named in GROUP but defined nowhere makes the run misconfigured, naming it.
    let ctl = JobRuntimeController::new(cfg(&[("JOBRT_GROUP", "nowhere")]));
    match ctl.run("scan", "a", &code, job).await {
        Err(JobError::Misconfigured { message, .. }) => {
            assert!(
                message.contains("NOWHERE") && message.contains("JOBRT_GROUP_NOWHERE_CONCURRENCY"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// `MAX_CONCURRENCY` bounds attempts across all jobs.
#[tokio::test(start_paused = true)]
async fn max_concurrency_variable() {
    let ctl = JobRuntimeController::new(cfg(&[("JOBRT_MAX_CONCURRENCY", "2")]));
    assert_eq!(ctl.available_permits(None), Some(2));
    let code = JobPolicy::default();
    let job = |_ctx| async {
        tokio::time::sleep(secs(1)).await;
        Ok::<_, RunError>(Instant::now())
    };
    let t0 = Instant::now();
    let runs = (0..5).map(|i| {
        let ctl = ctl.clone();
        let code = code.clone();
        async move { ctl.run(&format!("j{i}"), "k", &code, job).await }
    });
    let mut ends: Vec<_> = futures::future::join_all(runs)
        .await
        .into_iter()
        .map(|r| *r.unwrap() - t0)
        .collect();
    ends.sort();
    assert_eq!(ends, [secs(1), secs(1), secs(2), secs(2), secs(3)]);
}

/// `RATE_LIMIT` and `GROUP_<NAME>_RATE_LIMIT` space out attempt starts.
#[tokio::test(start_paused = true)]
async fn rate_limit_variables() {
    let ctl = JobRuntimeController::new(cfg(&[
        ("JOBRT_RATE_LIMIT", "2/s"),
        ("JOBRT_GROUP_API_RATE_LIMIT", "1/10s"),
        ("JOBRT_JOB_CALL_GROUP", "api"),
    ]));
    let code = JobPolicy::default();
    let started = |_ctx| std::future::ready(Ok::<_, RunError>(Instant::now()));
    let t0 = Instant::now();
    let mut starts = Vec::new();
    for i in 0..4 {
        starts.push(
            *ctl.run("plain", &i.to_string(), &code, started)
                .await
                .unwrap()
                - t0,
        );
    }
    assert_eq!(starts, [ms(0), ms(0), ms(500), ms(1000)]);
    // A job in the group takes the group's token, then the global one: at t1 the group
    // token is free but the next global token is 500 ms away; after that the group's 10 s
    // period dominates.
    let t1 = Instant::now();
    let mut starts = Vec::new();
    for i in 0..3 {
        starts.push(
            *ctl.run("call", &i.to_string(), &code, started)
                .await
                .unwrap()
                - t1,
        );
    }
    assert_eq!(starts, [ms(500), ms(10_000), ms(20_000)]);
}

/// `STATUS_RETENTION` keeps an idle key's status that long after its run (and cooldown).
#[tokio::test(start_paused = true)]
async fn status_retention_variable() {
    let code = JobPolicy::default();
    let ok = |_ctx| std::future::ready(Ok::<_, RunError>(()));
    let ctl = JobRuntimeController::new(cfg(&[("JOBRT_STATUS_RETENTION", "10s")]));
    ctl.run("j", "k", &code, ok).await.unwrap();
    tokio::time::sleep(secs(10) - ms(1)).await;
    assert_eq!(ctl.housekeep(), 0);
    assert!(ctl.status("j", "k").is_some());
    tokio::time::sleep(ms(1)).await;
    assert_eq!(ctl.housekeep(), 1);
    assert!(ctl.status("j", "k").is_none());

    // Retention counts from the end of the run, and a key is kept at least until its cooldown
    // has passed: with a 60 s cooldown and 10 s retention it goes at 60 s (not 70 s).
    let ctl = JobRuntimeController::new(cfg(&[
        ("JOBRT_STATUS_RETENTION", "10s"),
        ("JOBRT_COOLDOWN", "1m"),
    ]));
    ctl.run("j", "k", &code, ok).await.unwrap();
    tokio::time::sleep(secs(60) - ms(1)).await;
    assert_eq!(ctl.housekeep(), 0);
    tokio::time::sleep(ms(1)).await;
    assert_eq!(ctl.housekeep(), 1);

    // Default: 0, gone at the next housekeeping.
    let ctl = JobRuntimeController::new(cfg(&[]));
    ctl.run("j", "k", &code, ok).await.unwrap();
    assert_eq!(ctl.housekeep(), 1);
}

/// `JOBRT_SNAPSHOT_DIR` sets where snapshot stores keep their files; an empty value is an error
/// naming the variable and what is accepted.
#[test]
fn snapshot_dir_is_read_and_an_empty_one_refused() {
    let c =
        RuntimeConfig::from_env_with([("JOBRT_SNAPSHOT_DIR", "/var/lib/svc/snapshots")]).unwrap();
    assert_eq!(
        c.snapshot_dir.as_deref(),
        Some(std::path::Path::new("/var/lib/svc/snapshots"))
    );
    assert_eq!(
        RuntimeConfig::from_env_with(Vec::<(String, String)>::new())
            .unwrap()
            .snapshot_dir,
        None
    );
    let err = RuntimeConfig::from_env_with([("JOBRT_SNAPSHOT_DIR", "  ")]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("JOBRT_SNAPSHOT_DIR") && msg.contains("directory path"),
        "{msg}"
    );
}

/// `JOBRT_SNAPSHOT_MAX_BYTES` takes a byte count with an optional decimal or binary unit; a bad
/// value is an error naming the variable, the value and the accepted form.
#[test]
fn snapshot_max_bytes_is_read_with_units_and_bad_values_refused() {
    let read = |v: &str| RuntimeConfig::from_env_with([("JOBRT_SNAPSHOT_MAX_BYTES", v)]);
    for (v, want) in [
        ("1", 1),
        ("1048576", 1 << 20),
        (" 512MiB ", 512 << 20),
        ("512 mib", 512 << 20),
        ("2GB", 2_000_000_000),
        ("3 KB", 3_000),
        ("1GiB", 1 << 30),
        ("7b", 7),
    ] {
        assert_eq!(read(v).unwrap().snapshot_max_bytes, Some(want), "{v:?}");
    }
    assert_eq!(
        RuntimeConfig::from_env_with(Vec::<(String, String)>::new())
            .unwrap()
            .snapshot_max_bytes,
        None
    );
    assert_eq!(
        job_runtime::config::DEFAULT_SNAPSHOT_MAX_BYTES,
        1 << 30,
        "1 GiB unless set"
    );
    for (v, why) in [
        ("", "empty"),
        ("0", "zero"),
        ("0MiB", "zero"),
        ("-5", "not a whole number"),
        ("1.5GB", "unknown unit"),
        ("10 parsecs", "unknown unit `parsecs`"),
        ("99999999999999999999", "too large"),
        ("20000000000GiB", "too large"),
    ] {
        let msg = read(v).unwrap_err().to_string();
        assert!(
            msg.contains("JOBRT_SNAPSHOT_MAX_BYTES")
                && msg.contains(why)
                && msg.contains("`512MiB`"),
            "{v:?}: {msg}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// docs/configuration.md matches the code.

fn docs() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
    std::fs::read_to_string(path).expect("docs/configuration.md exists")
}

/// The fenced block of `lang` that follows `after` in the docs.
fn docs_block(docs: &str, lang: &str) -> String {
    let start = docs.find(&format!("```{lang}\n")).expect("block") + lang.len() + 4;
    let len = docs[start..].find("```").expect("closed block");
    docs[start..start + len].to_string()
}

/// Every variable named in the docs' tables is one the code reads (no warning for it), and
/// the policy-field table lists exactly the fields the code reads.
#[test]
fn docs_tables_list_exactly_the_variables_the_code_reads() {
    let docs = docs();
    let mut fields = Vec::new();
    let mut names = Vec::new();
    for line in docs.lines().filter(|l| l.starts_with("| `")) {
        let first = line[3..].split('`').next().unwrap();
        if let Some(name) = first.strip_prefix("JOBRT_") {
            names.push(format!("JOBRT_{}", name.replace("<NAME>", "DOCS")));
        } else if first.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            fields.push(first.to_string());
        }
    }
    let mut expected = POLICY_FIELDS.to_vec();
    expected.sort_unstable();
    fields.sort_unstable();
    assert_eq!(fields, expected, "the policy-field table");
    assert_eq!(
        names,
        [
            "JOBRT_MAX_CONCURRENCY",
            "JOBRT_RATE_LIMIT",
            "JOBRT_STATUS_RETENTION",
            "JOBRT_SNAPSHOT_DIR",
            "JOBRT_SNAPSHOT_MAX_BYTES",
            "JOBRT_TELEMETRY_KEYS",
            "JOBRT_GROUP_DOCS_CONCURRENCY",
            "JOBRT_GROUP_DOCS_RATE_LIMIT",
        ]
    );
    for f in &fields {
        names.push(format!("JOBRT_{f}"));
        names.push(format!("JOBRT_JOB_DOCS_{f}"));
    }
    for name in &names {
        // An unknown name is never an error, only a warning: so a name is known if reading it
        // fails (the dummy value is bad for it) or succeeds without a warning.
        if let Ok(c) = RuntimeConfig::from_env_with([(name.as_str(), "1")]) {
            assert!(
                c.warnings.is_empty(),
                "{name} in the docs is unknown to the code"
            );
        }
    }
}

/// The example block in the docs loads without errors or warnings and means what its comments
/// say.
#[tokio::test(start_paused = true)]
async fn docs_example_block_is_valid() {
    let block = docs_block(&docs(), "sh");
    let vars: Vec<(String, String)> = block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("NAME=value");
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect();
    assert!(vars.len() >= 10);
    let c = RuntimeConfig::from_env_with(vars).unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(c.max_concurrency, NonZeroUsize::new(16));
    assert_eq!(
        c.rate_limit,
        Some(RateLimit::parse("100/s burst 20").unwrap())
    );
    assert_eq!(c.status_retention, secs(600));
    assert_eq!(c.groups["DB"].concurrency, NonZeroUsize::new(2));
    let code = JobPolicy::default();
    let p = c.effective_policy("session-scan", &code);
    assert_eq!(
        (p.cooldown().span(true), p.cooldown().span(false)),
        (secs(30), secs(5))
    );
    assert_eq!(p.overlap(), Overlap::Skip);
    assert_eq!(p.group(), Some("DB"));
    assert_eq!(p.budget(), Some(secs(120)));
    assert_eq!(p.retry().max_attempts().get(), 3);
    let other = c.effective_policy("other", &code);
    assert_eq!(other.cooldown().span(true), Duration::ZERO);
    assert_eq!(other.group(), None);
}

/// The error and warning texts quoted in the docs are the ones the code produces.
#[test]
fn docs_quote_the_real_messages() {
    let docs = docs();
    let err = cfg_err(&[("JOBRT_BUDGET", "0"), ("JOBRT_COOLDOWN", "10 parsecs")]);
    assert!(docs.contains(&err.to_string()), "docs lack: {err}");
    let c = cfg(&[("JOBRT_COOLDOWNN", "5s")]);
    assert!(
        docs.contains(&c.warnings[0]),
        "docs lack: {}",
        c.warnings[0]
    );
    // The Rust example in the docs (keep these lines identical to it).
    let rust = docs_block(&docs, "rust");
    assert!(rust.contains("from_env_with") && rust.contains("effective_policy"));
    let cfg = RuntimeConfig::from_env_with([
        ("JOBRT_JOB_SESSION_SCAN_COOLDOWN", "30s"),
        ("JOBRT_JOB_SESSION_SCAN_GROUP", "db"),
        ("JOBRT_GROUP_DB_CONCURRENCY", "2"),
    ])
    .expect("valid configuration");
    let code = JobPolicy::default();
    let policy = cfg.effective_policy("session-scan", &code);
    assert_eq!(policy.cooldown().span(true), Duration::from_secs(30));
    assert_eq!(policy.group(), Some("DB"));
    let _ctl = JobRuntimeController::new(cfg);
}

#[test]
fn telemetry_keys_mode_is_read_and_a_bad_one_named() {
    use job_runtime::telemetry::KeyAttribute;
    assert_eq!(
        RuntimeConfig::default().telemetry_keys,
        KeyAttribute::Hashed
    );
    let cfg = RuntimeConfig::from_env_with([("JOBRT_TELEMETRY_KEYS", "RAW")]).unwrap();
    assert_eq!(cfg.telemetry_keys, KeyAttribute::Raw);
    let err = RuntimeConfig::from_env_with([("JOBRT_TELEMETRY_KEYS", "sha256")]).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("JOBRT_TELEMETRY_KEYS"), "{msg}");
    assert!(
        msg.contains("sha256") && msg.contains("off, hashed, raw"),
        "{msg}"
    );
}
