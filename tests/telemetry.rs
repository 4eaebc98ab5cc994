//! The controller's telemetry, proved on the wire: a scenario (a coalesced run, a retry, a
//! panic, a cooldown rejection, a manual trigger) exported through `init_from_env_with` to an
//! in-process OTLP/HTTP receiver, then the spans' tree, attributes, events, links and status,
//! and the metrics, checked as the collector sees them. A second test points the exporter at
//! a closed port and shows the jobs' results unaffected.
//!
//! Each test runs on its own current-thread runtime with a thread-local subscriber
//! (`set_default`), so the tests do not see each other's spans. The global meter provider is
//! process-wide: only `a_scenario_arrives_as_spans_and_metrics` installs one.

#![cfg(feature = "otel")]

#[path = "support/callsites.rs"]
mod callsites;
#[path = "support/otlp.rs"]
mod otlp;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use job_runtime::runtime::Runtime;
use job_runtime::snapshot::{RefreshPlugin, SnapshotStore};
use job_runtime::telemetry::{self, KeyAttribute, Telemetry, metric};
use job_runtime::{
    Job, JobContext, JobError, JobPolicy, JobRuntimeController, RetryPolicy, RunError,
    RuntimeConfig,
};
use otlp::{MetricKind, OtlpReceiver, SpanRecord, summary};
use tracing::Instrument;
use tracing::instrument::WithSubscriber;
use tracing_subscriber::layer::SubscriberExt as _;

const PATIENCE: Duration = Duration::from_secs(20);

fn init(pairs: &[(&str, &str)]) -> Telemetry {
    let map: BTreeMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    telemetry::init_from_env_with(move |name| map.get(name).cloned()).expect("telemetry")
}

fn by_id<'a>(spans: &'a [SpanRecord], id: &str) -> &'a SpanRecord {
    spans
        .iter()
        .find(|s| s.span_id == id)
        .unwrap_or_else(|| panic!("no span {id} in {}", summary(spans)))
}

fn parent<'a>(spans: &'a [SpanRecord], s: &SpanRecord) -> &'a SpanRecord {
    by_id(
        spans,
        s.parent_span_id
            .as_deref()
            .unwrap_or_else(|| panic!("{} has no parent", s.name)),
    )
}

/// The `job.run` spans of one job, oldest first.
fn runs_of<'a>(spans: &'a [SpanRecord], job: &str) -> Vec<&'a SpanRecord> {
    let mut v: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "job.run" && s.attr("job.name") == Some(job))
        .collect();
    v.sort_by_key(|s| s.start_unix_nanos);
    v
}

fn attempts_of<'a>(spans: &'a [SpanRecord], run: &SpanRecord) -> Vec<&'a SpanRecord> {
    let mut v: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "job.attempt" && s.parent_span_id.as_deref() == Some(&run.span_id))
        .collect();
    v.sort_by_key(|s| s.start_unix_nanos);
    v
}

struct Ping;

impl Job for Ping {
    type Output = ();
    fn name(&self) -> &str {
        "ping"
    }
    async fn run(&self, _ctx: JobContext) -> Result<(), RunError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_scenario_arrives_as_spans_and_metrics() {
    let rx = OtlpReceiver::start();
    let endpoint = rx.endpoint();
    // Installed before the controller: its instruments come from the global meter provider.
    let mut otel = init(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_SERVICE_NAME", "telemetry-scenario"),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "100"),
    ]);
    let subscriber = tracing_subscriber::registry().with(otel.layer());
    let _default = callsites::scoped(subscriber);

    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let fast_retry = RetryPolicy::builder()
        .max_attempts(3)
        .base_delay(Duration::from_millis(1))
        .build()
        .unwrap();
    let request = tracing::info_span!("http.request", http.route = "/scan");
    let trace_ids = Arc::new(std::sync::Mutex::new(Vec::new()));
    async {
        // 1. Two callers, one run: the second joins the first's.
        let gate = Arc::new(tokio::sync::Notify::new());
        let policy = JobPolicy::default();
        let g = Arc::clone(&gate);
        let ids = Arc::clone(&trace_ids);
        let first = ctl.run("coalesce", "user-42", &policy, move |ctx| {
            let g = Arc::clone(&g);
            let ids = Arc::clone(&ids);
            async move {
                ids.lock()
                    .unwrap()
                    .push(ctx.trace_id().expect("a trace id"));
                // The plugin's own span: a child of the attempt.
                async { g.notified().await }
                    .instrument(tracing::info_span!("plugin.work"))
                    .await;
                Ok(1)
            }
        });
        let second = async {
            tokio::task::yield_now().await;
            ctl.run("coalesce", "user-42", &policy, |_ctx| async { Ok(2) })
                .await
        };
        let release = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            gate.notify_one();
        };
        let (a, b, ()) = tokio::join!(first, second, release);
        assert!(Arc::ptr_eq(&a.unwrap(), &b.unwrap()));

        // 2. A retry: the first attempt fails, the second succeeds.
        let tries = Arc::new(AtomicU32::new(0));
        let policy = JobPolicy::builder()
            .retry(fast_retry.clone())
            .build()
            .unwrap();
        let t = Arc::clone(&tries);
        let r = ctl
            .run("retry", "k", &policy, move |_ctx| {
                let n = t.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        Err(RunError::from(std::io::Error::other("flaky disk")))
                    } else {
                        Ok(())
                    }
                }
            })
            .await;
        assert!(r.is_ok());

        // 3. A panic.
        let r = ctl
            .run("panics", "k", &JobPolicy::default(), |_ctx| async {
                if true {
                    panic!("boom");
                }
                Ok(())
            })
            .await;
        assert!(matches!(r, Err(JobError::Panicked { .. })));

        // 4. A cooldown rejection.
        let policy = JobPolicy::builder()
            .cooldown(Duration::from_secs(3600))
            .build()
            .unwrap();
        ctl.run("cool", "k", &policy, |_ctx| async { Ok(()) })
            .await
            .unwrap();
        let r = ctl.run("cool", "k", &policy, |_ctx| async { Ok(()) }).await;
        assert!(matches!(r, Err(JobError::CoolingDown { .. })));
    }
    .instrument(request.clone())
    .await;
    let panic_status = ctl.status("panics", "k").expect("status");
    drop(request);

    // 6. A snapshot store: the first read scans; a stale read starts a refresh on demand,
    //    which fails (counted; the last good value is kept).
    let failing = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&failing);
    let store = SnapshotStore::builder("telemetry-store")
        .ttl(Duration::ZERO)
        .in_memory()
        .build(
            &ctl,
            RefreshPlugin::new(move |_ctx| {
                let f = Arc::clone(&f);
                async move {
                    if f.load(Ordering::SeqCst) {
                        Err(RunError::from(std::io::Error::other("db down")))
                    } else {
                        Ok(7_u64)
                    }
                }
            }),
        )
        .unwrap();
    assert_eq!(*store.get().await.unwrap().data, 7);
    failing.store(true, Ordering::SeqCst);
    assert_eq!(
        *store.get().await.unwrap().data,
        7,
        "a stale read gets the value"
    );
    let patience = std::time::Instant::now();
    while store.status().last_error.is_none() || store.is_refreshing() {
        assert!(patience.elapsed() < PATIENCE, "the refresh never failed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // 5. A manual trigger through the runtime.
    let rt = Runtime::builder(&ctl).job(Ping).build().unwrap().start();
    rt.trigger("ping", "k", false).await.unwrap();
    rt.shutdown(Duration::from_secs(1)).await;

    let spans = rx
        .wait_for(PATIENCE, |s| {
            s.iter().any(|s| s.name == "http.request")
                && s.iter().any(|s| s.name == "job.trigger")
                && s.iter().filter(|s| s.name == "job.run").count() >= 7
        })
        .await;
    let request_span = spans.iter().find(|s| s.name == "http.request").unwrap();

    // 1. One run for two callers, a child of the request; the joiner is a link and an event.
    let runs = runs_of(&spans, "coalesce");
    assert_eq!(runs.len(), 1, "one run: {}", summary(&spans));
    let run = runs[0];
    assert_eq!(parent(&spans, run).span_id, request_span.span_id);
    assert_eq!(run.attr("job.outcome"), Some("success"));
    assert_eq!(run.attr("job.overlap"), Some("start"));
    assert!(run.attr("job.run_id").is_some());
    assert!(run.attr("job.fencing_token").is_some());
    assert!(run.attr("job.lock_wait_ms").is_some());
    // Numbers arrive as numbers (not their Debug strings), flags as booleans.
    for (key, ty) in [
        ("job.run_id", "int"),
        ("job.fencing_token", "int"),
        ("job.attempts", "int"),
        ("job.lock_wait_ms", "double"),
        ("job.forced", "bool"),
        ("job.outcome", "string"),
    ] {
        assert_eq!(run.attr_type(key), Some(ty), "{key}");
    }
    let hashed = KeyAttribute::Hashed.render("user-42").unwrap();
    assert_eq!(
        run.attr("job.key"),
        Some(hashed.as_str()),
        "keys are hashed by default"
    );
    assert!(
        spans
            .iter()
            .all(|s| s.attributes.values().all(|v| !v.contains("user-42"))),
        "the raw key never leaves the process"
    );
    assert!(
        request_span.links.iter().any(|l| l.span_id == run.span_id),
        "the joining caller links to the run it joined: {:?}",
        request_span.links
    );
    let joined = request_span
        .event("job.coalesced")
        .expect("a job.coalesced event");
    assert_eq!(
        joined.attributes.get("job.run_id").map(String::as_str),
        run.attr("job.run_id")
    );
    let attempts = attempts_of(&spans, run);
    assert_eq!(attempts.len(), 1);
    let work = spans.iter().find(|s| s.name == "plugin.work").unwrap();
    assert_eq!(
        parent(&spans, work).span_id,
        attempts[0].span_id,
        "plugin spans are children"
    );
    assert_eq!(
        trace_ids.lock().unwrap().as_slice(),
        std::slice::from_ref(&run.trace_id)
    );

    // 2. Retries are sibling attempts under one run.
    let run = runs_of(&spans, "retry")[0];
    let attempts = attempts_of(&spans, run);
    assert_eq!(attempts.len(), 2, "{}", summary(&spans));
    assert_eq!(attempts[0].attr("job.attempt"), Some("1"));
    assert_eq!(attempts[0].attr_type("job.attempt"), Some("int"));
    assert_eq!(attempts[0].status_code, "error");
    assert_eq!(attempts[0].attr("error.type"), Some("failed"));
    assert!(attempts[0].attr("job.retry_in_ms").is_some());
    let exception = attempts[0].event("exception").expect("an exception event");
    assert_eq!(
        exception
            .attributes
            .get("exception.type")
            .map(String::as_str),
        Some("failed")
    );
    assert!(exception.attributes["exception.message"].contains("flaky disk"));
    assert_eq!(attempts[1].attr("job.outcome"), Some("success"));
    assert_eq!(run.attr("job.outcome"), Some("success"));
    assert_eq!(run.attr("job.attempts"), Some("2"));
    assert_ne!(run.status_code, "error");

    // 3. A panic: an error with its type, message and exception event; its trace id in status.
    let run = runs_of(&spans, "panics")[0];
    assert_eq!(run.status_code, "error");
    assert_eq!(run.attr("error.type"), Some("panicked"));
    assert!(
        run.status_message.contains("boom"),
        "{}",
        run.status_message
    );
    assert!(run.event("exception").is_some());
    assert_eq!(panic_status.last_error_kind, Some("panicked"));
    assert_eq!(
        panic_status.last_error_trace_id.as_deref(),
        Some(run.trace_id.as_str())
    );

    // 4. The rejected call is an event of the caller's span; nothing ran.
    assert_eq!(runs_of(&spans, "cool").len(), 1);
    let skipped = request_span
        .event("job.skipped")
        .expect("a job.skipped event");
    assert_eq!(skipped.attributes["job.outcome"], "cooling_down");
    assert!(
        skipped.attributes["job.cooldown_remaining_ms"]
            .parse::<f64>()
            .unwrap()
            > 0.0
    );

    // 5. trigger → run → attempt.
    let run = runs_of(&spans, "ping")[0];
    let trigger = parent(&spans, run);
    assert_eq!(trigger.name, "job.trigger");
    assert_eq!(trigger.attr("job.trigger"), Some("manual"));
    assert_eq!(trigger.attr("job.outcome"), Some("success"));
    assert_eq!(attempts_of(&spans, run).len(), 1);

    // 6. The scan's attempt carries its scan id; the demand refresh is a trigger of its own.
    let scans = runs_of(&spans, "telemetry-store");
    assert_eq!(scans.len(), 2, "{}", summary(&spans));
    let scan = attempts_of(&spans, scans[0])[0];
    assert_eq!(scan.attr("job.scan_id"), Some("1"));
    assert_eq!(scan.attr_type("job.scan_id"), Some("int"));
    assert_eq!(scan.attr_type("job.items_changed"), Some("int"));
    let demand = parent(&spans, scans[1]);
    assert_eq!(demand.name, "job.trigger");
    assert_eq!(demand.attr("job.trigger"), Some("demand"));
    assert_eq!(demand.attr("job.outcome"), Some("failed"));
    assert_eq!(scans[1].attr("error.type"), Some("failed"));

    // Metrics: bounded attributes (job name and outcome), the scenario's counts.
    let points = rx
        .wait_for_metrics(PATIENCE, |p| {
            p.iter().any(|p| p.name == metric::COOLDOWN_REJECTIONS)
                && p.iter().any(|p| p.name == metric::RETRIES)
                && p.iter().any(|p| p.name == metric::COALESCED)
                && p.iter().any(|p| p.name == metric::REFRESH_FAILURES)
                && p.iter().any(|p| p.name == metric::SNAPSHOT_AGE)
        })
        .await;
    let last = |name: &str, attrs: &[(&str, &str)]| {
        rx.last_point(name, attrs)
            .unwrap_or_else(|| panic!("no {name} {attrs:?} in {:?}", points.len()))
    };
    assert_eq!(
        last(metric::COALESCED, &[("job.name", "coalesce")]).value,
        Some(1.0)
    );
    assert_eq!(
        last(metric::RETRIES, &[("job.name", "retry")]).value,
        Some(1.0)
    );
    assert_eq!(
        last(metric::COOLDOWN_REJECTIONS, &[("job.name", "cool")]).value,
        Some(1.0)
    );
    assert_eq!(
        last(
            metric::RUNS,
            &[("job.name", "panics"), ("job.outcome", "panicked")]
        )
        .value,
        Some(1.0)
    );
    let d = last(
        metric::RUN_DURATION,
        &[("job.name", "retry"), ("job.outcome", "success")],
    );
    assert_eq!((d.kind, d.count), (MetricKind::Histogram, Some(1)));
    assert_eq!(
        last(metric::IN_FLIGHT, &[("job.name", "coalesce")]).value,
        Some(0.0)
    );
    assert!(
        rx.last_point(metric::LOCK_WAIT, &[("job.name", "retry")])
            .is_some()
    );
    assert_eq!(
        last(metric::REFRESH_FAILURES, &[("job.name", "telemetry-store")]).value,
        Some(1.0)
    );
    let age = last(metric::SNAPSHOT_AGE, &[("job.name", "telemetry-store")]);
    assert_eq!(age.kind, MetricKind::Gauge);
    assert!(age.value.unwrap() >= 0.0);
    drop(store);
    for p in rx.metrics() {
        if p.scope == "job_runtime" {
            assert!(
                p.attributes
                    .keys()
                    .all(|k| k == "job.name" || k == "job.outcome"),
                "unbounded attribute on {}: {:?}",
                p.name,
                p.attributes
            );
        }
    }
    otel.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[test]
fn a_closed_collector_changes_no_result_on_either_runtime_flavour() {
    for multi in [false, true] {
        let rt = if multi {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        .unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let mut otel = init(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &closed),
            ("OTEL_METRICS_EXPORTER", "none"),
            ("OTEL_BSP_SCHEDULE_DELAY", "10"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "64"),
        ]);
        callsites::ask_each_time();
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(otel.layer()));
        rt.block_on(async {
            let ctl = JobRuntimeController::new(RuntimeConfig::default());
            let policy = JobPolicy::default();
            let mut tasks = Vec::new();
            for i in 0..2_000u64 {
                let (ctl, policy) = (ctl.clone(), policy.clone());
                let span = tracing::dispatcher::with_default(&dispatch, || {
                    tracing::info_span!("request", i)
                });
                let call = async move {
                    let key = format!("k{}", i % 50);
                    ctl.run("job", &key, &policy, move |_ctx| async move { Ok(i) })
                        .await
                        .map(|v| (i, *v))
                };
                tasks.push(tokio::spawn(
                    call.instrument(span).with_subscriber(dispatch.clone()),
                ));
            }
            for t in tasks {
                let (i, v) = t.await.unwrap().expect("every call succeeds");
                assert_eq!(i % 50, v % 50, "a caller gets its own key's result");
            }
            tokio::time::timeout(
                Duration::from_secs(6),
                otel.shutdown(Duration::from_secs(5)),
            )
            .await
            .expect("shutdown returns within its timeout")
            .ok();
        });
        assert!(
            otel.dropped_spans() > 0,
            "a queue of 64 in front of a closed port drops spans (and counts them)"
        );
    }
}
