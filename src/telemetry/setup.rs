//! OpenTelemetry setup from the standard `OTEL_*` variables (feature `otel`).
//!
//! Why this is more than a call to the SDK's builders:
//! - **The service owns its subscriber.** [`init_from_env`] installs no global `tracing`
//!   subscriber; [`Telemetry::layer`] hands out a `tracing-opentelemetry` layer for the service
//!   to add to the subscriber it already builds. Only the global *meter* provider is set, since
//!   that is how the library's metrics (`opentelemetry::global::meter("job_runtime")`) reach
//!   the exporter.
//! - **A slow or absent collector never slows a job.** Finished spans go into a bounded queue
//!   (`OTEL_BSP_MAX_QUEUE_SIZE`, default 2048) drained by the SDK's batch thread; when it is
//!   full a span is dropped at once, never waited for, and counted
//!   ([`Telemetry::dropped_spans`]). Every export has a time limit (`OTEL_BSP_EXPORT_TIMEOUT`,
//!   `OTEL_METRIC_EXPORT_TIMEOUT`) that covers the exporter's retries too.
//! - **Shutdown keeps its promise on any runtime.** The exporters' network I/O runs on a small
//!   runtime of their own, on their own thread, not on the service's: flushing from `Drop`
//!   inside a `current_thread` runtime cannot deadlock on a runtime that is blocked waiting for
//!   it, and [`Telemetry::shutdown`] returns within its timeout on either flavour, whatever the
//!   collector does (the exports still running then are cut at the deadline).
//! - **Tests never touch the process environment:** [`init_from_env_with`] takes a lookup
//!   function, like [`RuntimeConfig::from_env_with`](crate::RuntimeConfig::from_env_with).
//!
//! The variables read are listed in `docs/observability.md`.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{
    Compression, MetricExporter, Protocol, SpanExporter as OtlpSpanExporter, WithExportConfig,
    WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::resource::TelemetryResourceDetector;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, Span, SpanData,
    SpanExporter, SpanProcessor,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

use crate::error::{ConfigError, ConfigProblem};

/// How long dropping a [`Telemetry`] waits at most for the last spans and metrics to be
/// exported. Call [`Telemetry::shutdown`] to choose another limit.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The instrumentation scope of the spans this guard's layer creates.
const TRACER_NAME: &str = "job_runtime";

/// Reads the process environment: see [`init_from_env_with`].
///
/// # Errors
/// As [`init_from_env_with`].
pub fn init_from_env() -> Result<Telemetry, TelemetryError> {
    init_from_env_with(|name| std::env::var(name).ok())
}

/// Builds the OTLP exporters from `OTEL_*` variables read through `lookup`, installs the global
/// meter provider, and returns the guard that owns them.
///
/// Call it before creating the [`JobRuntimeController`](crate::JobRuntimeController) (or the
/// [`Runtime`](crate::runtime::Runtime)): the library creates its metric instruments when those
/// are built, and instruments created before a meter provider is installed stay no-ops.
///
/// `OTEL_SDK_DISABLED=true` returns a guard that does nothing, without reading the other
/// variables. An empty variable counts as unset. Every problem found is reported at once, each
/// naming the variable, its value and what is accepted.
///
/// The exporters themselves also read a few variables straight from the process environment
/// (`OTEL_EXPORTER_OTLP_*HEADERS` are added to those given here; `OTEL_EXPORTER_OTLP_*COMPRESSION`
/// applies when `lookup` names none); everything else comes from `lookup` only.
///
/// ```
/// use job_runtime::telemetry;
///
/// let err = telemetry::init_from_env_with(|name| match name {
///     "OTEL_EXPORTER_OTLP_PROTOCOL" => Some("http/json".into()),
///     _ => None,
/// })
/// .unwrap_err();
/// assert!(err.to_string().contains("OTEL_EXPORTER_OTLP_PROTOCOL"));
///
/// let off = telemetry::init_from_env_with(|name| {
///     (name == "OTEL_SDK_DISABLED").then(|| "true".into())
/// })
/// .unwrap();
/// assert!(!off.is_enabled());
/// ```
///
/// # Errors
/// [`TelemetryError::Config`] for invalid variables; an exporter that cannot be built or a thread
/// that cannot be started are the other variants.
pub fn init_from_env_with(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Telemetry, TelemetryError> {
    let Some(settings) = Settings::read(&lookup)? else {
        return Ok(Telemetry::disabled());
    };
    if settings.traces.is_none() && settings.metrics.is_none() {
        return Ok(Telemetry::disabled());
    }
    Telemetry::start(settings)
}

/// The trace id (32 lowercase hex digits) of `span`'s OpenTelemetry context, or `None` when the
/// span is disabled or no `tracing-opentelemetry` layer sees it.
///
/// The id is the one exported with the span, so it finds the run in the tracing backend; a span
/// that the sampler left out still has one (its children and logs share it).
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let otel_span = cx.span();
    let sc = otel_span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Telemetry could not be set up or shut down.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// One or more `OTEL_*` variables are invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The OTLP exporter of a signal could not be built.
    #[error("could not build the OTLP {signal} exporter: {source}")]
    Exporter {
        /// `traces` or `metrics`.
        signal: &'static str,
        /// What the exporter's builder said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A thread (export runtime, shutdown) could not be started.
    #[error("could not start the telemetry thread: {0}")]
    Thread(#[source] std::io::Error),
    /// Shutdown did not finish within its timeout; what was not exported by then is lost.
    #[error("telemetry shutdown did not finish within {0:?}")]
    ShutdownTimeout(Duration),
    /// Shutdown finished, but a provider reported errors (typically: the last export failed).
    #[error("telemetry shutdown reported errors: {0}")]
    Shutdown(String),
}

impl TelemetryError {
    /// The configuration problems, when that is what went wrong.
    pub fn config_error(&self) -> Option<&ConfigError> {
        match self {
            Self::Config(e) => Some(e),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Settings read from the variables

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Grpc,
    HttpProtobuf,
}

#[derive(Debug, Clone)]
struct SignalSettings {
    wire: Wire,
    endpoint: String,
    headers: BTreeMap<String, String>,
    /// Per-request timeout of the OTLP client.
    request_timeout: Duration,
    /// Limit of one whole export, retries included.
    export_timeout: Duration,
    gzip: bool,
}

#[derive(Debug, Clone, Copy)]
struct BatchSettings {
    max_queue_size: usize,
    max_export_batch_size: usize,
    scheduled_delay: Duration,
}

#[derive(Debug)]
struct Settings {
    traces: Option<SignalSettings>,
    metrics: Option<SignalSettings>,
    resource: Resource,
    sampler: Sampler,
    batch: BatchSettings,
    metric_interval: Duration,
    temporality: Temporality,
}

const PROTOCOLS: &str = "`grpc` or `http/protobuf`";
const SAMPLERS: &str = "one of always_on, always_off, traceidratio, parentbased_always_on, \
                        parentbased_always_off, parentbased_traceidratio";

/// Reads variables through a lookup, collecting every problem.
struct Reader<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    problems: Vec<ConfigProblem>,
}

impl Reader<'_> {
    /// The trimmed value, `None` when unset or empty.
    fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    /// The first of `names` that is set, with its name.
    fn first(&self, names: &[&'static str]) -> Option<(&'static str, String)> {
        names.iter().find_map(|n| self.get(n).map(|v| (*n, v)))
    }

    /// Records a problem once (shared variables are read for each signal).
    fn problem(&mut self, name: &str, value: &str, problem: impl Into<String>, expected: &str) {
        let p = ConfigProblem {
            name: name.to_string(),
            value: value.to_string(),
            problem: problem.into(),
            expected: expected.to_string(),
        };
        if !self.problems.contains(&p) {
            self.problems.push(p);
        }
    }

    fn bool(&mut self, name: &str) -> Option<bool> {
        let v = self.get(name)?;
        match v.to_ascii_lowercase().as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => {
                self.problem(name, &v, "not a boolean", "`true` or `false`");
                None
            }
        }
    }

    /// A positive integer (milliseconds, sizes).
    fn positive(&mut self, name: &str) -> Option<u64> {
        let v = self.get(name)?;
        match v.parse::<u64>() {
            Ok(n) if n > 0 => Some(n),
            Ok(_) => {
                self.problem(name, &v, "must be positive", "a whole number above 0");
                None
            }
            Err(e) => {
                self.problem(name, &v, e.to_string(), "a whole number above 0");
                None
            }
        }
    }

    fn millis(&mut self, name: &str) -> Option<Duration> {
        self.positive(name).map(Duration::from_millis)
    }

    fn millis_of(&mut self, names: &[&'static str]) -> Option<Duration> {
        let (name, _) = self.first(names)?;
        self.millis(name)
    }

    /// `otlp` (default) or `none`.
    fn exporter_on(&mut self, name: &str) -> bool {
        match self.get(name) {
            None => true,
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "otlp" => true,
                "none" => false,
                _ => {
                    self.problem(
                        name,
                        &v,
                        "this exporter is not available",
                        "`otlp` or `none`",
                    );
                    true
                }
            },
        }
    }

    /// `key=value` pairs separated by commas, values percent-decoded (W3C baggage form).
    fn pairs(&mut self, name: &str, secret: bool) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(v) = self.get(name) else {
            return out;
        };
        let shown = if secret {
            "(not shown: it may hold credentials)".to_string()
        } else {
            v.clone()
        };
        for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let parsed = item.split_once('=').and_then(|(k, val)| {
                let k = percent_decode(k.trim())?;
                let val = percent_decode(val.trim())?;
                (!k.is_empty()).then_some((k, val))
            });
            match parsed {
                Some((k, val)) => {
                    out.insert(k, val);
                }
                None => {
                    let what = if secret {
                        "an entry is not `key=value`".to_string()
                    } else {
                        format!("`{item}` is not `key=value`")
                    };
                    self.problem(
                        name,
                        &shown,
                        what,
                        "comma-separated `key=value` pairs, values percent-encoded",
                    );
                    return BTreeMap::new();
                }
            }
        }
        out
    }

    fn wire(&mut self, names: &[&'static str]) -> Wire {
        let Some((name, v)) = self.first(names) else {
            return Wire::HttpProtobuf;
        };
        match v.as_str() {
            "grpc" => Wire::Grpc,
            "http/protobuf" => Wire::HttpProtobuf,
            "http/json" => {
                self.problem(name, &v, "OTLP over JSON is not supported", PROTOCOLS);
                Wire::HttpProtobuf
            }
            _ => {
                self.problem(name, &v, "unknown protocol", PROTOCOLS);
                Wire::HttpProtobuf
            }
        }
    }

    fn signal(&mut self, signal: Signal, export_timeout: Duration) -> SignalSettings {
        let wire = self.wire(&[signal.var("PROTOCOL"), "OTEL_EXPORTER_OTLP_PROTOCOL"]);
        let (var, raw, endpoint) = match (
            self.get(signal.var("ENDPOINT")),
            self.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            // A signal's own endpoint is used as it is.
            (Some(v), _) => (signal.var("ENDPOINT"), v.clone(), v),
            // The shared one is a base: http appends the signal's path.
            (None, Some(v)) => {
                let full = match wire {
                    Wire::Grpc => v.clone(),
                    Wire::HttpProtobuf => {
                        format!("{}/{}", v.trim_end_matches('/'), signal.http_path())
                    }
                };
                ("OTEL_EXPORTER_OTLP_ENDPOINT", v, full)
            }
            (None, None) => {
                let base = match wire {
                    Wire::Grpc => "http://localhost:4317".to_string(),
                    Wire::HttpProtobuf => {
                        format!("http://localhost:4318/{}", signal.http_path())
                    }
                };
                ("", base.clone(), base)
            }
        };
        self.check_endpoint(var, &raw);
        let mut headers = self.pairs("OTEL_EXPORTER_OTLP_HEADERS", true);
        headers.extend(self.pairs(signal.var("HEADERS"), true));
        let request_timeout = self
            .millis_of(&[signal.var("TIMEOUT"), "OTEL_EXPORTER_OTLP_TIMEOUT"])
            .unwrap_or(Duration::from_secs(10));
        let gzip = match self.first(&[signal.var("COMPRESSION"), "OTEL_EXPORTER_OTLP_COMPRESSION"])
        {
            None => false,
            Some((name, v)) => match v.to_ascii_lowercase().as_str() {
                "gzip" => true,
                "none" => false,
                _ => {
                    self.problem(name, &v, "unknown compression", "`gzip` or `none`");
                    false
                }
            },
        };
        SignalSettings {
            wire,
            endpoint,
            headers,
            request_timeout,
            export_timeout,
            gzip,
        }
    }

    fn check_endpoint(&mut self, var: &str, v: &str) {
        if var.is_empty() {
            return;
        }
        let lower = v.to_ascii_lowercase();
        if lower.starts_with("https://") {
            self.problem(
                var,
                v,
                "TLS is not built into job-runtime's OTLP exporter",
                "an http:// URL of a collector or agent (a local OpenTelemetry Collector can \
                 forward over TLS)",
            );
        } else if !lower.starts_with("http://") || lower.len() == "http://".len() {
            self.problem(
                var,
                v,
                "not an absolute http:// URL",
                "a URL like http://localhost:4318",
            );
        }
    }

    fn sampler(&mut self) -> Sampler {
        let Some(v) = self.get("OTEL_TRACES_SAMPLER") else {
            return Sampler::ParentBased(Box::new(Sampler::AlwaysOn));
        };
        let name = v.to_ascii_lowercase();
        let ratio = |r: &mut Self| -> f64 {
            let Some(arg) = r.get("OTEL_TRACES_SAMPLER_ARG") else {
                return 1.0;
            };
            match arg.parse::<f64>() {
                Ok(x) if (0.0..=1.0).contains(&x) => x,
                _ => {
                    r.problem(
                        "OTEL_TRACES_SAMPLER_ARG",
                        &arg,
                        format!("not a sampling ratio for `{name}`"),
                        "a number from 0 to 1, like 0.25",
                    );
                    1.0
                }
            }
        };
        match name.as_str() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatioBased(ratio(self)),
            "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            "parentbased_traceidratio" => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio(self))))
            }
            _ => {
                self.problem("OTEL_TRACES_SAMPLER", &v, "unknown sampler", SAMPLERS);
                Sampler::AlwaysOn
            }
        }
    }

    fn resource(&mut self) -> Resource {
        let attrs = self.pairs("OTEL_RESOURCE_ATTRIBUTES", false);
        let service = self
            .get("OTEL_SERVICE_NAME")
            .or_else(|| attrs.get("service.name").cloned())
            .unwrap_or_else(default_service_name);
        Resource::builder_empty()
            .with_detector(Box::new(TelemetryResourceDetector))
            .with_attributes(attrs.into_iter().map(|(k, v)| KeyValue::new(k, v)))
            .with_service_name(service)
            .build()
    }
}

#[derive(Debug, Clone, Copy)]
enum Signal {
    Traces,
    Metrics,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Self::Traces => "traces",
            Self::Metrics => "metrics",
        }
    }

    fn http_path(self) -> &'static str {
        match self {
            Self::Traces => "v1/traces",
            Self::Metrics => "v1/metrics",
        }
    }

    /// `OTEL_EXPORTER_OTLP_<SIGNAL>_<suffix>`.
    fn var(self, suffix: &str) -> &'static str {
        macro_rules! vars {
            ($($s:literal),*) => {
                match (self, suffix) {
                    $(
                        (Self::Traces, $s) => concat!("OTEL_EXPORTER_OTLP_TRACES_", $s),
                        (Self::Metrics, $s) => concat!("OTEL_EXPORTER_OTLP_METRICS_", $s),
                    )*
                    _ => unreachable!("unknown variable suffix {suffix}"),
                }
            };
        }
        vars!("ENDPOINT", "PROTOCOL", "HEADERS", "TIMEOUT", "COMPRESSION")
    }
}

impl Settings {
    /// `Ok(None)`: the SDK is disabled.
    fn read(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Option<Self>, ConfigError> {
        let mut r = Reader {
            lookup,
            problems: Vec::new(),
        };
        let disabled = r.bool("OTEL_SDK_DISABLED");
        if !r.problems.is_empty() {
            return Err(ConfigError::new(r.problems));
        }
        if disabled == Some(true) {
            return Ok(None);
        }

        let traces_on = r.exporter_on("OTEL_TRACES_EXPORTER");
        let metrics_on = r.exporter_on("OTEL_METRICS_EXPORTER");

        let max_queue_size = r
            .positive("OTEL_BSP_MAX_QUEUE_SIZE")
            .map_or(2048, |n| usize::try_from(n).unwrap_or(usize::MAX));
        let max_export_batch_size = r
            .positive("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
            .map_or(512, |n| usize::try_from(n).unwrap_or(usize::MAX))
            .min(max_queue_size);
        let batch = BatchSettings {
            max_queue_size,
            max_export_batch_size,
            scheduled_delay: r
                .millis("OTEL_BSP_SCHEDULE_DELAY")
                .unwrap_or(Duration::from_secs(5)),
        };
        let span_export_timeout = r
            .millis("OTEL_BSP_EXPORT_TIMEOUT")
            .unwrap_or(Duration::from_secs(30));
        let metric_interval = r
            .millis("OTEL_METRIC_EXPORT_INTERVAL")
            .unwrap_or(Duration::from_secs(60));
        let metric_export_timeout = r
            .millis("OTEL_METRIC_EXPORT_TIMEOUT")
            .unwrap_or(Duration::from_secs(30));
        let temporality = match r.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE") {
            None => Temporality::Cumulative,
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "cumulative" => Temporality::Cumulative,
                "delta" => Temporality::Delta,
                "lowmemory" => Temporality::LowMemory,
                _ => {
                    r.problem(
                        "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
                        &v,
                        "unknown temporality",
                        "`cumulative`, `delta` or `lowmemory`",
                    );
                    Temporality::Cumulative
                }
            },
        };

        let traces = traces_on.then(|| r.signal(Signal::Traces, span_export_timeout));
        let metrics = metrics_on.then(|| r.signal(Signal::Metrics, metric_export_timeout));
        let sampler = r.sampler();
        let resource = r.resource();

        if !r.problems.is_empty() {
            return Err(ConfigError::new(r.problems));
        }
        Ok(Some(Self {
            traces,
            metrics,
            resource,
            sampler,
            batch,
            metric_interval,
            temporality,
        }))
    }
}

fn default_service_name() -> String {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()));
    match exe {
        Some(name) => format!("unknown_service:{name}"),
        None => "unknown_service".to_string(),
    }
}

/// Decodes `%XX` escapes; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

// ---------------------------------------------------------------------------------------------
// The guard

/// Owns the tracer and meter providers built by [`init_from_env`]; flushes and shuts them down
/// on drop (waiting at most [`DEFAULT_SHUTDOWN_TIMEOUT`]) or in [`shutdown`](Self::shutdown).
///
/// ```no_run
/// use job_runtime::{JobRuntimeController, RuntimeConfig, telemetry};
/// use std::time::Duration;
/// use tracing_subscriber::layer::SubscriberExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // First, so the library's metric instruments find the meter provider.
/// let mut otel = telemetry::init_from_env()?;
/// // The service's own subscriber, with the OpenTelemetry layer added.
/// let subscriber = tracing_subscriber::registry().with(otel.layer());
/// tracing::subscriber::set_global_default(subscriber)?;
///
/// let ctl = JobRuntimeController::new(RuntimeConfig::from_env()?);
/// // ... run the service ...
/// # drop(ctl);
///
/// otel.shutdown(Duration::from_secs(3)).await?;
/// if otel.dropped_spans() > 0 {
///     eprintln!("{} spans could not be exported", otel.dropped_spans());
/// }
/// # Ok(())
/// # }
/// ```
pub struct Telemetry {
    inner: Option<Inner>,
    /// Outlives `inner`, so the counts can be read after shutdown.
    spans: Arc<SpanCounts>,
}

struct Inner {
    tracer: Option<SdkTracer>,
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
    deadline: Arc<ExportDeadline>,
    /// Kept so the exporters' runtime outlives every provider handle held here.
    _runtime: Arc<ExportRuntime>,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (traces, metrics) = self.inner.as_ref().map_or((false, false), |i| {
            (i.tracer_provider.is_some(), i.meter_provider.is_some())
        });
        f.debug_struct("Telemetry")
            .field("traces", &traces)
            .field("metrics", &metrics)
            .field("exported_spans", &self.exported_spans())
            .field("dropped_spans", &self.dropped_spans())
            .finish()
    }
}

impl Telemetry {
    /// A guard that exports nothing; its [`layer`](Self::layer) does nothing.
    pub fn disabled() -> Self {
        Self {
            inner: None,
            spans: Arc::default(),
        }
    }

    /// Whether anything is exported (until shutdown).
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// A `tracing-opentelemetry` layer that turns the subscriber's spans into OpenTelemetry
    /// spans exported by this guard; a layer that does nothing when traces are off. Add it to
    /// the service's own subscriber (`registry().with(telemetry.layer())`); it may be called
    /// more than once.
    pub fn layer<S>(&self) -> impl Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        self.inner
            .as_ref()
            .and_then(|i| i.tracer.clone())
            .map(|tracer| tracing_opentelemetry::layer().with_tracer(tracer))
    }

    /// Spans that ended but will not reach the collector: dropped because the export queue was
    /// full (`OTEL_BSP_MAX_QUEUE_SIZE`), or part of an export that failed or ran out of time.
    /// Still readable after shutdown, which counts the spans it could not export. (Spans
    /// still open when shutdown begins are neither exported nor counted, nor are spans the
    /// sampler left out.)
    pub fn dropped_spans(&self) -> u64 {
        self.spans.dropped()
    }

    /// Spans the collector accepted.
    pub fn exported_spans(&self) -> u64 {
        self.spans.exported.load(Ordering::Relaxed)
    }

    /// Exports what is pending and shuts the providers down, within `timeout`: exports still
    /// running shortly before it are cut off and their spans counted as dropped. Does not block
    /// the calling thread (the work happens on threads of its own), so any runtime flavour is
    /// fine. Later calls, and the drop, do nothing. The global meter provider stays installed,
    /// shut down: measurements recorded after this are ignored.
    ///
    /// # Errors
    /// [`TelemetryError::ShutdownTimeout`] when `timeout` passed first,
    /// [`TelemetryError::Shutdown`] when a provider reported errors (a failed last export).
    pub async fn shutdown(&mut self, timeout: Duration) -> Result<(), TelemetryError> {
        let Some(inner) = self.inner.take() else {
            return Ok(());
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let waiter = std::thread::Builder::new()
            .name("jobrt-otel-shutdown".into())
            .spawn(move || {
                let _ = tx.send(inner.shut_down(timeout));
            })
            .map_err(TelemetryError::Thread)?;
        drop(waiter);
        rx.await.unwrap_or(Err(TelemetryError::Shutdown(
            "shutdown thread panicked".into(),
        )))
    }

    /// [`shutdown`](Self::shutdown) for synchronous code: blocks the calling thread for at most
    /// `timeout`.
    ///
    /// # Errors
    /// As [`shutdown`](Self::shutdown).
    pub fn shutdown_blocking(&mut self, timeout: Duration) -> Result<(), TelemetryError> {
        match self.inner.take() {
            Some(inner) => inner.shut_down(timeout),
            None => Ok(()),
        }
    }

    fn start(settings: Settings) -> Result<Self, TelemetryError> {
        let runtime = ExportRuntime::start()?;
        let deadline = Arc::new(ExportDeadline::default());
        let spans = Arc::new(SpanCounts::default());
        // The exporters (tonic's channel in particular) attach to the runtime they are built in.
        let _entered = runtime.handle.enter();

        let (tracer_provider, tracer) = match &settings.traces {
            None => (None, None),
            Some(s) => {
                let exporter = span_exporter(s)?;
                let exporter = Export {
                    inner: exporter,
                    signal: Signal::Traces,
                    endpoint: s.endpoint.clone(),
                    runtime: Arc::clone(&runtime),
                    limit: s.export_timeout,
                    deadline: Arc::clone(&deadline),
                    failing: AtomicBool::new(false),
                    spans: Arc::clone(&spans),
                };
                let batch = BatchSpanProcessor::builder(exporter)
                    .with_batch_config(
                        BatchConfigBuilder::default()
                            .with_max_queue_size(settings.batch.max_queue_size)
                            .with_max_export_batch_size(settings.batch.max_export_batch_size)
                            .with_scheduled_delay(settings.batch.scheduled_delay)
                            .build(),
                    )
                    .build();
                let processor = BoundedQueue {
                    inner: batch,
                    capacity: settings.batch.max_queue_size,
                    spans: Arc::clone(&spans),
                };
                let provider = SdkTracerProvider::builder()
                    .with_span_processor(processor)
                    .with_sampler(settings.sampler)
                    .with_resource(settings.resource.clone())
                    .build();
                let tracer = provider.tracer(TRACER_NAME);
                (Some(provider), Some(tracer))
            }
        };

        let meter_provider = match &settings.metrics {
            None => None,
            Some(s) => {
                let exporter = match metric_exporter(s, settings.temporality) {
                    Ok(e) => e,
                    Err(e) => {
                        if let Some(p) = &tracer_provider {
                            let _ = p.shutdown_with_timeout(Duration::ZERO);
                        }
                        return Err(e);
                    }
                };
                let exporter = Export {
                    inner: exporter,
                    signal: Signal::Metrics,
                    endpoint: s.endpoint.clone(),
                    runtime: Arc::clone(&runtime),
                    limit: s.export_timeout,
                    deadline: Arc::clone(&deadline),
                    failing: AtomicBool::new(false),
                    spans: Arc::clone(&spans),
                };
                let reader = PeriodicReader::builder(exporter)
                    .with_interval(settings.metric_interval)
                    .build();
                let provider = SdkMeterProvider::builder()
                    .with_reader(reader)
                    .with_resource(settings.resource.clone())
                    .build();
                opentelemetry::global::set_meter_provider(provider.clone());
                Some(provider)
            }
        };

        Ok(Self {
            inner: Some(Inner {
                tracer,
                tracer_provider,
                meter_provider,
                deadline,
                _runtime: Arc::clone(&runtime),
            }),
            spans,
        })
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            let _ = inner.shut_down(DEFAULT_SHUTDOWN_TIMEOUT);
        }
    }
}

impl Inner {
    /// Shuts both providers down in parallel, each on a thread of its own, and waits for them
    /// until `timeout` has passed. Exports are cut a little before that, so a provider's own
    /// shutdown can finish in time.
    fn shut_down(self, timeout: Duration) -> Result<(), TelemetryError> {
        let start = Instant::now();
        let end = start + timeout;
        let margin = (timeout / 10).min(Duration::from_millis(100));
        self.deadline.set(end - margin);

        let (tx, rx) = mpsc::channel::<(&'static str, OTelSdkResult)>();
        let mut pending = 0;
        if let Some(p) = self.tracer_provider.clone() {
            let tx = tx.clone();
            spawn_named("jobrt-otel-shutdown-traces", move || {
                let _ = tx.send(("traces", p.shutdown_with_timeout(timeout)));
            })?;
            pending += 1;
        }
        if let Some(p) = self.meter_provider.clone() {
            let tx = tx.clone();
            spawn_named("jobrt-otel-shutdown-metrics", move || {
                let _ = tx.send(("metrics", p.shutdown_with_timeout(timeout)));
            })?;
            pending += 1;
        }
        drop(tx);

        let mut errors = Vec::new();
        while pending > 0 {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((signal, result)) => {
                    pending -= 1;
                    if let Err(e) = result {
                        errors.push(format!("{signal}: {e}"));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(TelemetryError::ShutdownTimeout(timeout));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    errors.push("a shutdown thread panicked".into());
                    break;
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(TelemetryError::Shutdown(errors.join("; ")))
        }
    }
}

fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), TelemetryError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(TelemetryError::Thread)
}

fn span_exporter(s: &SignalSettings) -> Result<OtlpSpanExporter, TelemetryError> {
    let built = match s.wire {
        Wire::HttpProtobuf => {
            let mut b = OtlpSpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(s.endpoint.clone())
                .with_timeout(s.request_timeout)
                .with_headers(s.headers.clone().into_iter().collect());
            if s.gzip {
                b = b.with_compression(Compression::Gzip);
            }
            b.build()
        }
        Wire::Grpc => {
            let mut b = OtlpSpanExporter::builder()
                .with_tonic()
                .with_protocol(Protocol::Grpc)
                .with_endpoint(s.endpoint.clone())
                .with_timeout(s.request_timeout)
                .with_metadata(metadata(&s.headers));
            if s.gzip {
                b = b.with_compression(Compression::Gzip);
            }
            b.build()
        }
    };
    built.map_err(|e| TelemetryError::Exporter {
        signal: "traces",
        source: Box::new(e),
    })
}

fn metric_exporter(
    s: &SignalSettings,
    temporality: Temporality,
) -> Result<MetricExporter, TelemetryError> {
    let built = match s.wire {
        Wire::HttpProtobuf => {
            let mut b = MetricExporter::builder()
                .with_http()
                .with_temporality(temporality)
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(s.endpoint.clone())
                .with_timeout(s.request_timeout)
                .with_headers(s.headers.clone().into_iter().collect());
            if s.gzip {
                b = b.with_compression(Compression::Gzip);
            }
            b.build()
        }
        Wire::Grpc => {
            let mut b = MetricExporter::builder()
                .with_tonic()
                .with_temporality(temporality)
                .with_protocol(Protocol::Grpc)
                .with_endpoint(s.endpoint.clone())
                .with_timeout(s.request_timeout)
                .with_metadata(metadata(&s.headers));
            if s.gzip {
                b = b.with_compression(Compression::Gzip);
            }
            b.build()
        }
    };
    built.map_err(|e| TelemetryError::Exporter {
        signal: "metrics",
        source: Box::new(e),
    })
}

fn metadata(
    headers: &BTreeMap<String, String>,
) -> opentelemetry_otlp::tonic_types::metadata::MetadataMap {
    let map: http::HeaderMap = headers
        .iter()
        .filter_map(|(k, v)| {
            Some((
                http::HeaderName::from_bytes(k.as_bytes()).ok()?,
                http::HeaderValue::from_str(v).ok()?,
            ))
        })
        .collect();
    opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(map)
}

// ---------------------------------------------------------------------------------------------
// The exporters' runtime

/// A current-thread tokio runtime on a thread of its own: the exporters' sockets, timers and
/// background tasks (hyper's connections, tonic's channel) live here, so exporting never needs
/// the service's runtime. The thread ends when the last holder drops.
struct ExportRuntime {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ExportRuntime {
    fn start() -> Result<Arc<Self>, TelemetryError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(TelemetryError::Thread)?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        spawn_named("jobrt-otel-export", move || {
            // Nothing the exporters do may itself become telemetry.
            let _suppressed = Context::enter_telemetry_suppressed_scope();
            rt.block_on(async {
                let _ = stopped.await;
            });
        })?;
        Ok(Arc::new(Self {
            handle,
            _stop: stop,
        }))
    }

    /// Runs `make`'s future with this runtime as the current one at every poll, so the
    /// exporter's I/O and timers register here, whatever thread polls it (the SDK's batch and
    /// reader threads poll with a plain `block_on`).
    fn run<F: Future>(&self, make: impl FnOnce() -> F) -> impl Future<Output = F::Output> {
        let handle = self.handle.clone();
        let fut = {
            let _entered = handle.enter();
            make()
        };
        async move {
            let mut fut = std::pin::pin!(fut);
            std::future::poll_fn(|cx| {
                let _entered = handle.enter();
                fut.as_mut().poll(cx)
            })
            .await
        }
    }
}

/// The time after which exports give up: none until shutdown begins. Exports running when it
/// is set are cut at it too, not only those that start later.
#[derive(Debug)]
struct ExportDeadline(tokio::sync::watch::Sender<Option<Instant>>);

impl Default for ExportDeadline {
    fn default() -> Self {
        Self(tokio::sync::watch::Sender::new(None))
    }
}

impl ExportDeadline {
    fn set(&self, at: Instant) {
        self.0.send_replace(Some(at));
    }

    /// Runs `export` for at most `limit`, and not past the deadline (set now or later). Must be
    /// polled inside the export runtime ([`ExportRuntime::run`]).
    async fn limit<F>(&self, limit: Duration, export: F) -> OTelSdkResult
    where
        F: Future<Output = OTelSdkResult>,
    {
        let give_up = tokio::time::Instant::now() + limit;
        let mut deadline = self.0.subscribe();
        let cut = async move {
            loop {
                let at = match *deadline.borrow_and_update() {
                    Some(at) => give_up.min(tokio::time::Instant::from_std(at)),
                    None => give_up,
                };
                tokio::select! {
                    () = tokio::time::sleep_until(at) => return,
                    changed = deadline.changed() => {
                        if changed.is_err() {
                            // The guard is gone: only the time limit is left.
                            tokio::time::sleep_until(give_up).await;
                            return;
                        }
                    }
                }
            }
        };
        tokio::select! {
            result = export => result,
            () = cut => Err(OTelSdkError::Timeout(limit)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Span accounting: a bounded queue we can count

/// `queued`: spans handed to the batch processor and not yet taken out for export.
#[derive(Debug, Default)]
struct SpanCounts {
    queued: AtomicUsize,
    queue_full: AtomicU64,
    failed: AtomicU64,
    exported: AtomicU64,
}

impl SpanCounts {
    fn dropped(&self) -> u64 {
        self.queue_full.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed)
    }
}

/// The SDK's batch processor behind a gate that admits a span only while fewer than
/// `capacity` are queued. The processor's own queue has the same capacity and holds at most
/// what the gate admitted, so it never drops a span itself: every drop happens here, where it is
/// counted (the SDK keeps its own count private).
#[derive(Debug)]
struct BoundedQueue {
    inner: BatchSpanProcessor,
    capacity: usize,
    spans: Arc<SpanCounts>,
}

impl SpanProcessor for BoundedQueue {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let admitted = self
            .spans
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < self.capacity).then_some(q + 1)
            })
            .is_ok();
        if admitted {
            self.inner.on_end(span);
        } else {
            // No logging here: this runs inside the subscriber's span-close callback.
            self.spans.queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// An OTLP exporter run on the export runtime, each export limited in time (and cut at the
/// shutdown deadline), failures counted and logged when the state changes.
struct Export<E> {
    inner: E,
    signal: Signal,
    endpoint: String,
    runtime: Arc<ExportRuntime>,
    limit: Duration,
    deadline: Arc<ExportDeadline>,
    failing: AtomicBool,
    spans: Arc<SpanCounts>,
}

impl<E> fmt::Debug for Export<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("signal", &self.signal)
            .field("endpoint", &self.endpoint)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl<E: Send + Sync> Export<E> {
    /// Runs one export on the export runtime, limited in time, and logs the outcome.
    fn run<F>(&self, export: F) -> impl Future<Output = OTelSdkResult> + Send
    where
        F: Future<Output = OTelSdkResult> + Send,
    {
        let fut = self
            .runtime
            .run(move || self.deadline.limit(self.limit, export));
        async move {
            let result = fut.await;
            self.note(&result);
            result
        }
    }

    fn note(&self, result: &OTelSdkResult) {
        let signal = self.signal.name();
        match result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        target: "job_runtime::telemetry",
                        endpoint = %self.endpoint,
                        "OTLP {signal} export works again"
                    );
                }
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        target: "job_runtime::telemetry",
                        endpoint = %self.endpoint,
                        error = %e,
                        "OTLP {signal} export failed; the data is dropped (logged again only \
                         after exports recover)"
                    );
                }
            }
        }
    }
}

impl<E: SpanExporter> SpanExporter for Export<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let n = batch.len();
        // Taken out of the processor's queue: room for more.
        let _ = self
            .spans
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(n))
            });
        let fut = self.run(self.inner.export(batch));
        async move {
            let result = fut.await;
            let counter = if result.is_ok() {
                &self.spans.exported
            } else {
                &self.spans.failed
            };
            counter.fetch_add(n as u64, Ordering::Relaxed);
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _entered = self.runtime.handle.enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        let _entered = self.runtime.handle.enter();
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: PushMetricExporter> PushMetricExporter for Export<E> {
    fn export(&self, metrics: &ResourceMetrics) -> impl Future<Output = OTelSdkResult> + Send {
        self.run(self.inner.export(metrics))
    }

    fn force_flush(&self) -> OTelSdkResult {
        let _entered = self.runtime.handle.enter();
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _entered = self.runtime.handle.enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(vars: &[(&str, &str)]) -> Result<Option<Settings>, ConfigError> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        Settings::read(&move |name: &str| vars.get(name).cloned())
    }

    #[test]
    fn defaults() {
        let s = read(&[]).unwrap().unwrap();
        let t = s.traces.unwrap();
        assert_eq!(t.wire, Wire::HttpProtobuf);
        assert_eq!(t.endpoint, "http://localhost:4318/v1/traces");
        assert_eq!(
            s.metrics.unwrap().endpoint,
            "http://localhost:4318/v1/metrics"
        );
        assert_eq!(s.batch.max_queue_size, 2048);
        assert!(matches!(s.sampler, Sampler::ParentBased(_)));
    }

    #[test]
    fn endpoints_follow_the_spec() {
        let s = read(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://m:9/custom"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            s.traces.unwrap().endpoint,
            "http://collector:4318/v1/traces"
        );
        assert_eq!(s.metrics.unwrap().endpoint, "http://m:9/custom");

        let s = read(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
        ])
        .unwrap()
        .unwrap();
        let t = s.traces.unwrap();
        assert_eq!(
            (t.wire, t.endpoint.as_str()),
            (Wire::Grpc, "http://collector:4317")
        );
        let m = s.metrics.unwrap();
        assert_eq!(
            (m.wire, m.endpoint.as_str()),
            (Wire::HttpProtobuf, "http://collector:4317/v1/metrics")
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let err = read(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "udp"),
            ("OTEL_TRACES_SAMPLER", "sometimes"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://secure:4318"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "authorization"),
        ])
        .unwrap_err();
        let names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
        for n in [
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_TRACES_SAMPLER",
            "OTEL_BSP_MAX_QUEUE_SIZE",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ] {
            assert!(names.contains(&n), "{n} missing from {err}");
        }
        // Header values may be credentials: never echoed.
        assert!(!err.to_string().contains("authorization"), "{err}");
    }

    #[test]
    fn sampler_arg_is_checked_for_ratio_samplers_only() {
        let err = read(&[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
        ])
        .unwrap_err();
        assert_eq!(err.problems()[0].name, "OTEL_TRACES_SAMPLER_ARG");
        let s = read(&[
            ("OTEL_TRACES_SAMPLER", "always_off"),
            ("OTEL_TRACES_SAMPLER_ARG", "junk"),
        ])
        .unwrap()
        .unwrap();
        assert!(matches!(s.sampler, Sampler::AlwaysOff));
    }

    #[test]
    fn disabled_reads_nothing_else() {
        assert!(
            read(&[
                ("OTEL_SDK_DISABLED", "TRUE"),
                ("OTEL_TRACES_SAMPLER", "junk")
            ])
            .unwrap()
            .is_none()
        );
        assert!(read(&[("OTEL_SDK_DISABLED", "yes")]).is_err());
    }

    #[test]
    fn resource_attributes() {
        let s = read(&[
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=a,deployment.environment=prod%2Ceu",
            ),
            ("OTEL_SERVICE_NAME", "b"),
        ])
        .unwrap()
        .unwrap();
        let get = |k: &'static str| s.resource.get(&k.into()).map(|v| v.to_string());
        assert_eq!(get("service.name").as_deref(), Some("b"));
        assert_eq!(get("deployment.environment").as_deref(), Some("prod,eu"));
        assert!(read(&[("OTEL_RESOURCE_ATTRIBUTES", "a=%zz")]).is_err());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("%E2%82%AC").as_deref(), Some("€"));
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%FF"), None);
    }
}
