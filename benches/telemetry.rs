//! The pipeline with telemetry exporting to a local OTLP/HTTP receiver vs telemetry off, in
//! the same run (issue 5's targets: ≤ 1.5× for a trivial job, ≤ 1.05× for a 1 ms job).
//!
//! ```text
//! cargo bench --features otel --bench telemetry
//! ```
//!
//! "off" is what a service without an OpenTelemetry layer pays: the controller's spans are
//! disabled callsites and its instruments come from the no-op meter provider. "on" is the
//! full path: every run's `job.run` and `job.attempt` spans go through the
//! tracing-opentelemetry layer to the batch processor and out over HTTP to a receiver in this
//! process (its own thread, decoding every request), and the metrics go to the SDK's
//! aggregation, exported every second.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use job_runtime::telemetry;
use job_runtime::{JobPolicy, JobRuntimeController, RuntimeConfig};
use tracing::instrument::WithSubscriber;
use tracing_subscriber::layer::SubscriberExt as _;

#[path = "../tests/support/otlp.rs"]
mod otlp;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Made before the meter provider is installed: its instruments are the no-op ones.
    let ctl_off = JobRuntimeController::new(RuntimeConfig::default());
    // A registered subscriber that enables nothing, not `Dispatch::none()`: `tracing` caches a
    // callsite's interest when it is first hit, and while only one dispatcher is registered it
    // asks the current one. With `none()` current during "off", the controller's span callsites
    // were cached as never-enabled, and "on" then ran without spans (as every whole-bench run
    // before this fix did). With two registered, each callsite asks both.
    let off = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());

    let rx = otlp::OtlpReceiver::start_counting();
    let endpoint = rx.endpoint();
    let vars = move |name: &str| match name {
        "OTEL_EXPORTER_OTLP_ENDPOINT" => Some(endpoint.clone()),
        "OTEL_SERVICE_NAME" => Some("job-runtime-bench".into()),
        "OTEL_METRIC_EXPORT_INTERVAL" => Some("1000".into()),
        "OTEL_BSP_SCHEDULE_DELAY" => Some("5".into()),
        "OTEL_BSP_MAX_QUEUE_SIZE" => Some("4096".into()),
        // Anything else from the environment (e.g. OTEL_TRACES_EXPORTER=none to see what the
        // metrics alone cost).
        other => std::env::var(other).ok(),
    };
    let mut otel = rt.block_on(async { telemetry::init_from_env_with(vars).expect("telemetry") });
    let ctl_on = JobRuntimeController::new(RuntimeConfig::default());
    let on = tracing::Dispatch::new(tracing_subscriber::registry().with(otel.layer()));
    let policy = JobPolicy::default();

    // Timed in batches of `BATCH` runs; after each batch (untimed) the exporter is given time
    // to ship the batch's spans, so every span is exported and none is dropped: the number is
    // what a job pays with telemetry on at a rate the exporter keeps up with. (At full speed,
    // ~1 µs per run on one core, no OTLP exporter on this machine keeps up with two spans per
    // run, and the bounded queue drops the excess — counted, never waited for.)
    const BATCH: u64 = 1_000;
    let mut g = c.benchmark_group("telemetry/trivial_job");
    g.sample_size(20);
    for (name, ctl, d) in [("off", &ctl_off, &off), ("on", &ctl_on, &on)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(BATCH);
                    left -= n;
                    let t = rt.block_on(
                        async {
                            let start = std::time::Instant::now();
                            for _ in 0..n {
                                let r = ctl.run("bench", "k", &policy, |_ctx| async { Ok(1_u64) });
                                std::hint::black_box(r.await.expect("run"));
                            }
                            start.elapsed()
                        }
                        .with_subscriber(d.clone()),
                    );
                    total += t;
                    if name == "on"
                        && otel.is_enabled()
                        && std::env::var_os("OTEL_TRACES_EXPORTER").is_none()
                    {
                        drain(&rx, 2 * n as usize);
                    }
                }
                total
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("telemetry/1ms_job");
    for (name, ctl, d) in [("off", &ctl_off, &off), ("on", &ctl_on, &on)] {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                ctl.run("bench", "k", &policy, |_ctx| async {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    Ok(1_u64)
                })
                .with_subscriber(d.clone())
            })
        });
    }
    g.finish();

    rt.block_on(async {
        let _ = otel.shutdown(Duration::from_secs(5)).await;
    });
    println!(
        "{} spans dropped at the queue (should be 0: every batch was drained)",
        otel.dropped_spans()
    );
}

/// Waits (real time, at most 10 s) until the receiver holds `spans` spans; panics if they do
/// not all arrive (the "on" figure would then not be the cost of exporting every span).
fn drain(rx: &otlp::OtlpReceiver, spans: usize) {
    let start = std::time::Instant::now();
    while rx.span_count() < spans && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        rx.span_count() >= spans,
        "only {} of {spans} spans reached the receiver",
        rx.span_count()
    );
    rx.clear();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench
}
criterion_main!(benches);
