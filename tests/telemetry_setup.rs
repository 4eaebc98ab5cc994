//! Telemetry setup, proved on the wire: `init_from_env_with` + the guard's layer export a
//! `tracing` span tree and the global meter's metrics to an in-process OTLP/HTTP receiver;
//! bad variables are clear errors; a closed, gRPC-closed or silent collector slows neither the
//! spans nor the shutdown, on both runtime flavours.
//!
//! The global meter provider is process-wide and these tests run on parallel threads, so every
//! test that installs one (metrics exporter on) holds `GLOBAL_METER` for its whole run.

#![cfg(feature = "otel")]

#[path = "support/callsites.rs"]
mod callsites;
#[path = "support/otlp.rs"]
mod otlp;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use job_runtime::telemetry::{self, Telemetry};
use opentelemetry::KeyValue;
use otlp::{MetricKind, OtlpReceiver};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

static GLOBAL_METER: Mutex<()> = Mutex::new(());

/// Held by every test that installs the global meter provider.
fn global_meter() -> MutexGuard<'static, ()> {
    GLOBAL_METER.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone, Copy)]
enum Flavor {
    CurrentThread,
    MultiThread,
}

/// Runs `fut` to completion on a fresh runtime of the given flavour.
fn on<F: Future>(flavor: Flavor, fut: F) -> F::Output {
    let mut b = match flavor {
        Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        Flavor::MultiThread => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        }
    };
    b.enable_all().build().expect("runtime").block_on(fut)
}

/// A lookup over `pairs`, standing in for the process environment.
fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: BTreeMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

fn init(pairs: &[(&str, &str)]) -> Telemetry {
    telemetry::init_from_env_with(vars(pairs)).expect("valid telemetry settings")
}

/// `http://127.0.0.1:<port>` where nothing listens (the port was just free).
fn closed_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    format!("http://{addr}")
}

/// Awaits `fut` for at most `limit` + 1 s of slack; panics if it has not returned by then.
async fn returns_within<F: Future>(what: &str, limit: Duration, fut: F) -> F::Output {
    let slack = Duration::from_secs(1);
    match tokio::time::timeout(limit + slack, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not return within {limit:?} + {slack:?}"),
    }
}

/// Polls `cond` in real time for up to `limit`.
async fn eventually(what: &str, limit: Duration, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "not true within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_span_tree_arrives_with_its_structure_and_attributes() {
    let rx = OtlpReceiver::start();
    let endpoint = rx.endpoint();
    let mut otel = init(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_SERVICE_NAME", "telemetry-setup-test"),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=test,team=jobs%2Cinfra",
        ),
        ("OTEL_METRICS_EXPORTER", "none"),
        ("OTEL_TRACES_SAMPLER", "always_on"),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ]);
    assert!(otel.is_enabled());
    let subscriber = tracing_subscriber::registry().with(otel.layer());
    let _default = callsites::scoped(subscriber);

    let request = tracing::info_span!("http.request", http.route = "/scan");
    let trigger = tracing::info_span!("job.trigger", trigger = "manual");
    let expected_trace_id = telemetry::trace_id_of(&trigger).expect("a trace id");
    assert_eq!(expected_trace_id.len(), 32);
    {
        let _t = trigger.enter();
        let run = tracing::info_span!(
            "job.run",
            job = "scan",
            key = "k1",
            outcome = tracing::field::Empty
        );
        run.follows_from(&request);
        let _r = run.enter();
        {
            let attempt = tracing::info_span!(
                "job.attempt",
                attempt = 1_i64,
                otel.status_code = "error",
                otel.status_description = "boom"
            );
            let _a = attempt.enter();
            tracing::warn!(error.type = "io", retry_in_ms = 20_i64, "attempt failed");
        }
        {
            let attempt = tracing::info_span!("job.attempt", attempt = 2_i64);
            let _a = attempt.enter();
            attempt.set_attribute("items.changed", 7_i64);
        }
        run.record("outcome", "success");
    }
    // The same id through the public helper, from inside the tree too.
    assert_eq!(
        telemetry::trace_id_of(&trigger).as_deref(),
        Some(expected_trace_id.as_str())
    );
    drop(trigger);
    drop(request);
    assert_eq!(telemetry::trace_id_of(&tracing::Span::none()), None);

    // Exported by the batch timer (50 ms), before any shutdown.
    let spans = rx.wait_for(Duration::from_secs(10), |s| s.len() >= 5).await;
    assert_eq!(spans.len(), 5, "{}", otlp::summary(&spans));

    let one = |name: &str| {
        let mut v = rx.spans_named(name);
        assert_eq!(v.len(), 1, "one {name}: {}", otlp::summary(&spans));
        v.remove(0)
    };
    let trigger = one("job.trigger");
    let run = one("job.run");
    let request = one("http.request");
    let attempts = rx.spans_named("job.attempt");
    assert_eq!(attempts.len(), 2);
    let first = attempts
        .iter()
        .find(|a| a.attr("attempt") == Some("1"))
        .unwrap();
    let second = attempts
        .iter()
        .find(|a| a.attr("attempt") == Some("2"))
        .unwrap();

    // Structure: trigger → run → two sibling attempts, one trace; the request is its own trace.
    assert_eq!(trigger.parent_span_id, None);
    assert_eq!(trigger.trace_id, expected_trace_id);
    assert_eq!(
        run.parent_span_id.as_deref(),
        Some(trigger.span_id.as_str())
    );
    for a in [first, second] {
        assert_eq!(a.parent_span_id.as_deref(), Some(run.span_id.as_str()));
        assert_eq!(a.trace_id, expected_trace_id);
    }
    assert_ne!(first.span_id, second.span_id);
    assert_eq!(request.parent_span_id, None);
    assert_ne!(request.trace_id, expected_trace_id);

    // Attributes, recorded late ones included; the follows-from link; events; status.
    assert_eq!(trigger.attr("trigger"), Some("manual"));
    assert_eq!(run.attr("job"), Some("scan"));
    assert_eq!(run.attr("key"), Some("k1"));
    assert_eq!(run.attr("outcome"), Some("success"));
    assert_eq!(second.attr("items.changed"), Some("7"));
    assert_eq!(run.links.len(), 1);
    assert_eq!(run.links[0].span_id, request.span_id);
    assert_eq!(run.links[0].trace_id, request.trace_id);
    let event = first
        .event("attempt failed")
        .expect("the warning as a span event");
    assert_eq!(
        event.attributes.get("error.type").map(String::as_str),
        Some("io")
    );
    assert_eq!(
        event.attributes.get("retry_in_ms").map(String::as_str),
        Some("20")
    );
    assert_eq!(first.status_code, "error");
    assert_eq!(first.status_message, "boom");
    assert_eq!(second.status_code, "unset");

    // Resource and scope.
    assert_eq!(
        run.resource.get("service.name").map(String::as_str),
        Some("telemetry-setup-test")
    );
    assert_eq!(
        run.resource
            .get("deployment.environment")
            .map(String::as_str),
        Some("test")
    );
    assert_eq!(
        run.resource.get("team").map(String::as_str),
        Some("jobs,infra")
    );
    assert!(run.resource.contains_key("telemetry.sdk.version"));
    assert_eq!(run.scope, "job_runtime");

    // Counted once the collector's answer is back, a moment after it stored the spans.
    eventually(
        "5 spans counted as exported",
        Duration::from_secs(5),
        || otel.exported_spans() == 5,
    )
    .await;
    assert_eq!(otel.dropped_spans(), 0);
    otel.shutdown(Duration::from_secs(5))
        .await
        .expect("clean shutdown");
    assert!(!otel.is_enabled());
    // Plain http/protobuf requests, uncompressed by default.
    assert!(
        rx.requests()
            .iter()
            .all(|(path, enc)| path == "/v1/traces" && enc.is_none())
    );
}

#[test]
fn metrics_from_the_global_meter_arrive_and_shutdown_flushes_the_rest() {
    let _global = global_meter();
    on(Flavor::MultiThread, async {
        let rx = OtlpReceiver::start();
        let endpoint = rx.endpoint();
        let mut otel = init(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_SERVICE_NAME", "telemetry-metrics-test"),
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "100"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ]);
        // As the library does: instruments from the global meter, created after init.
        let meter = opentelemetry::global::meter("job_runtime");
        let runs = meter.u64_counter("job_runtime.test.runs").build();
        let duration = meter
            .f64_histogram("job_runtime.test.duration")
            .with_unit("s")
            .build();
        let ok = [
            KeyValue::new("job", "scan"),
            KeyValue::new("outcome", "success"),
        ];
        let failed = [
            KeyValue::new("job", "scan"),
            KeyValue::new("outcome", "failure"),
        ];
        runs.add(3, &ok);
        runs.add(1, &failed);
        duration.record(0.25, &ok);
        duration.record(0.75, &ok);

        // The periodic reader exports on its own.
        let attrs = [("job", "scan"), ("outcome", "success")];
        rx.wait_for_metrics(Duration::from_secs(10), |_| {
            rx.last_point("job_runtime.test.runs", &attrs).is_some()
        })
        .await;
        let p = rx.last_point("job_runtime.test.runs", &attrs).unwrap();
        assert_eq!(p.kind, MetricKind::Sum { monotonic: true });
        assert_eq!(p.value, Some(3.0));
        assert_eq!(p.scope, "job_runtime");
        assert_eq!(
            p.resource.get("service.name").map(String::as_str),
            Some("telemetry-metrics-test")
        );
        let h = rx.last_point("job_runtime.test.duration", &attrs).unwrap();
        assert_eq!(h.kind, MetricKind::Histogram);
        assert_eq!((h.count, h.sum, h.unit.as_str()), (Some(2), Some(1.0), "s"));

        // Recorded after the last periodic export: shutdown's final collection carries it.
        runs.add(2, &ok);
        otel.shutdown(Duration::from_secs(5))
            .await
            .expect("clean shutdown");
        let p = rx.last_point("job_runtime.test.runs", &attrs).unwrap();
        assert_eq!(p.value, Some(5.0), "cumulative total after shutdown");
        let p = rx
            .last_point(
                "job_runtime.test.runs",
                &[("job", "scan"), ("outcome", "failure")],
            )
            .unwrap();
        assert_eq!(p.value, Some(1.0));
        assert!(
            rx.requests()
                .iter()
                .all(|(path, enc)| path == "/v1/metrics" && enc.as_deref() == Some("gzip")),
            "{:?}",
            rx.requests()
        );
    });
}

#[tokio::test]
async fn sdk_disabled_exports_nothing() {
    let rx = OtlpReceiver::start();
    let endpoint = rx.endpoint();
    let mut otel = init(&[
        ("OTEL_SDK_DISABLED", "true"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "10"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "10"),
        // Not even read when disabled.
        ("OTEL_TRACES_SAMPLER", "not-a-sampler"),
    ]);
    assert!(!otel.is_enabled());
    let subscriber = tracing_subscriber::registry().with(otel.layer());
    let _default = callsites::scoped(subscriber);
    for i in 0..10 {
        let span = tracing::info_span!("job.run", i);
        let _e = span.enter();
        assert_eq!(telemetry::trace_id_of(&span), None);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    otel.shutdown(Duration::from_secs(1)).await.expect("no-op");
    assert!(rx.requests().is_empty(), "{:?}", rx.requests());
    assert_eq!((otel.exported_spans(), otel.dropped_spans()), (0, 0));
}

#[tokio::test]
async fn a_sampler_that_drops_everything_still_gives_trace_ids() {
    let rx = OtlpReceiver::start();
    let endpoint = rx.endpoint();
    let mut otel = init(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_METRICS_EXPORTER", "none"),
        ("OTEL_TRACES_SAMPLER", "always_off"),
        ("OTEL_BSP_SCHEDULE_DELAY", "10"),
    ]);
    let subscriber = tracing_subscriber::registry().with(otel.layer());
    {
        let _default = callsites::scoped(subscriber);
        let root = tracing::info_span!("job.run");
        let id = telemetry::trace_id_of(&root).expect("an id for logs, sampled or not");
        let _e = root.enter();
        let child = tracing::info_span!("job.attempt");
        assert_eq!(telemetry::trace_id_of(&child), Some(id));
    }
    otel.shutdown(Duration::from_secs(5))
        .await
        .expect("clean shutdown");
    assert!(rx.spans().is_empty(), "{}", otlp::summary(&rx.spans()));
    assert_eq!((otel.exported_spans(), otel.dropped_spans()), (0, 0));

    // Both signals off: nothing to run, the same as disabled.
    let off = init(&[
        ("OTEL_TRACES_EXPORTER", "none"),
        ("OTEL_METRICS_EXPORTER", "none"),
    ]);
    assert!(!off.is_enabled());
}

#[test]
fn bad_values_are_clear_errors() {
    let message = |pairs: &[(&str, &str)]| {
        let err = telemetry::init_from_env_with(vars(pairs)).expect_err("invalid");
        assert!(err.config_error().is_some(), "{err}");
        err.to_string()
    };

    for bad in ["http/json", "udp", "GRPC "] {
        let m = message(&[("OTEL_EXPORTER_OTLP_PROTOCOL", bad)]);
        assert!(m.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{m}");
        assert!(m.contains(bad.trim()), "{m}");
        assert!(m.contains("`grpc`") && m.contains("`http/protobuf`"), "{m}");
    }
    let m = message(&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift")]);
    assert!(
        m.contains("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") && m.contains("thrift"),
        "{m}"
    );

    let m = message(&[("OTEL_TRACES_SAMPLER", "sometimes")]);
    assert!(
        m.contains("OTEL_TRACES_SAMPLER") && m.contains("sometimes"),
        "{m}"
    );
    assert!(
        m.contains("parentbased_traceidratio") && m.contains("always_on"),
        "{m}"
    );

    for bad in ["2", "-0.1", "half"] {
        let m = message(&[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", bad),
        ]);
        assert!(
            m.contains("OTEL_TRACES_SAMPLER_ARG") && m.contains(bad),
            "{m}"
        );
        assert!(m.contains("from 0 to 1"), "{m}");
    }

    let m = message(&[("OTEL_SDK_DISABLED", "maybe")]);
    assert!(
        m.contains("OTEL_SDK_DISABLED") && m.contains("`true` or `false`"),
        "{m}"
    );

    // Several problems at once: all of them reported.
    let err = telemetry::init_from_env_with(vars(&[
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "udp"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
    ]))
    .unwrap_err();
    assert_eq!(err.config_error().unwrap().problems().len(), 3, "{err}");
}

/// Spans against a port where nothing listens: the loop runs normally, shutdown returns within
/// its timeout, and every span is counted as dropped.
fn closed_port(flavor: Flavor, protocol: &str) {
    let _global = global_meter();
    on(flavor, async {
        let endpoint = closed_endpoint();
        let mut otel = init(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            ("OTEL_BSP_SCHEDULE_DELAY", "20"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "50"),
        ]);
        let subscriber = tracing_subscriber::registry().with(otel.layer());
        let counter = opentelemetry::global::meter("job_runtime")
            .u64_counter("job_runtime.test.closed_port")
            .build();
        {
            let _default = callsites::scoped(subscriber);
            for i in 0..1_000_u64 {
                let span = tracing::info_span!("job.run", i);
                let _e = span.enter();
                counter.add(1, &[]);
            }
            // The runtime keeps working while exports fail in the background.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let limit = Duration::from_secs(2);
        let result = returns_within("shutdown", limit, otel.shutdown(limit)).await;
        // Whether it reports the failed last export or ran out of time is the collector's
        // business; that it returned in time is ours.
        drop(result);
        eventually(
            "every span counted as dropped",
            Duration::from_secs(5),
            || otel.dropped_spans() == 1_000,
        )
        .await;
        assert_eq!(otel.exported_spans(), 0);
    });
}

#[test]
fn closed_port_http_current_thread() {
    closed_port(Flavor::CurrentThread, "http/protobuf");
}

#[test]
fn closed_port_http_multi_thread() {
    closed_port(Flavor::MultiThread, "http/protobuf");
}

#[test]
fn closed_port_grpc_current_thread() {
    closed_port(Flavor::CurrentThread, "grpc");
}

#[test]
fn closed_port_grpc_multi_thread() {
    closed_port(Flavor::MultiThread, "grpc");
}

/// A collector that accepts connections and never answers: exports hang until their time limit,
/// which shutdown cuts to its own.
fn silent_collector(flavor: Flavor, protocol: &str) {
    let _global = global_meter();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    listener.set_nonblocking(true).expect("nonblocking");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holder = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut held = Vec::new();
            // Bounded: at most 60 s, and stops when the test is done.
            let start = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && start.elapsed() < Duration::from_secs(60)
            {
                match listener.accept() {
                    Ok((conn, _)) => held.push(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        })
    };

    on(flavor, async {
        let mut otel = init(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            ("OTEL_BSP_SCHEDULE_DELAY", "20"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "50"),
            // Longer than the shutdown timeout: shutdown must cut it.
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "30000"),
        ]);
        let subscriber = tracing_subscriber::registry().with(otel.layer());
        {
            let _default = callsites::scoped(subscriber);
            for i in 0..1_000_u64 {
                let _e = tracing::info_span!("job.run", i).entered();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let limit = Duration::from_secs(1);
        let result = returns_within("shutdown", limit, otel.shutdown(limit)).await;
        drop(result);
        eventually(
            "every span counted as dropped",
            Duration::from_secs(5),
            || otel.dropped_spans() == 1_000,
        )
        .await;
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    holder.join().expect("holder thread");
}

#[test]
fn silent_collector_http_current_thread() {
    silent_collector(Flavor::CurrentThread, "http/protobuf");
}

#[test]
fn silent_collector_grpc_multi_thread() {
    silent_collector(Flavor::MultiThread, "grpc");
}

/// Dropping the guard inside a runtime blocks that thread until the flush is done: the flush
/// must not need that runtime (on `current_thread` it would deadlock), and it must deliver.
fn drop_inside_runtime_flushes(flavor: Flavor) {
    let _global = global_meter();
    let rx = OtlpReceiver::start();
    let endpoint = rx.endpoint();
    on(flavor, async {
        let otel = init(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            // Nothing is exported before the drop.
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "600000"),
        ]);
        let subscriber = tracing_subscriber::registry().with(otel.layer());
        let counter = opentelemetry::global::meter("job_runtime")
            .u64_counter("job_runtime.test.dropped_guard")
            .build();
        {
            let _default = callsites::scoped(subscriber);
            for i in 0..10_u64 {
                let _e = tracing::info_span!("job.run", i).entered();
                counter.add(1, &[]);
            }
        }
        tokio::task::yield_now().await;
        assert!(rx.spans().is_empty());

        let start = Instant::now();
        drop(otel);
        let limit = telemetry::DEFAULT_SHUTDOWN_TIMEOUT + Duration::from_secs(1);
        assert!(start.elapsed() < limit, "drop took {:?}", start.elapsed());
    });
    assert_eq!(rx.spans_named("job.run").len(), 10);
    let p = rx
        .last_point("job_runtime.test.dropped_guard", &[])
        .expect("the counter, flushed on drop");
    assert_eq!(p.value, Some(10.0));
}

#[test]
fn drop_inside_current_thread_runtime_flushes() {
    drop_inside_runtime_flushes(Flavor::CurrentThread);
}

#[test]
fn drop_inside_multi_thread_runtime_flushes() {
    drop_inside_runtime_flushes(Flavor::MultiThread);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_instead_of_waiting() {
    let rx = OtlpReceiver::start();
    let endpoint = rx.endpoint();
    let mut otel = init(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_METRICS_EXPORTER", "none"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "100"),
        // No timer export while the loop runs: the queue fills up.
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
    ]);
    let subscriber = tracing_subscriber::registry().with(otel.layer());
    {
        let _default = callsites::scoped(subscriber);
        for i in 0..1_000_u64 {
            let _e = tracing::info_span!("job.run", i).entered();
        }
    }
    otel.shutdown(Duration::from_secs(5))
        .await
        .expect("clean shutdown");
    let exported = rx.spans_named("job.run").len() as u64;
    assert_eq!(otel.exported_spans(), exported);
    assert!(
        exported >= 100,
        "at least one full queue exported: {exported}"
    );
    assert_eq!(
        otel.exported_spans() + otel.dropped_spans(),
        1_000,
        "every span either exported or counted as dropped"
    );
}
