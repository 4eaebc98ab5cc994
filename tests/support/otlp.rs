//! An in-process OTLP/HTTP receiver for tests: what the exporter really sends, decoded with the
//! opentelemetry-proto types and flattened into plain records that are easy to assert on.
//!
//! It runs on a thread and runtime of its own, so it answers whatever the test's runtime is
//! doing (even while a `current_thread` test blocks in a telemetry shutdown). It binds
//! `127.0.0.1:0`, accepts `POST /v1/traces` and `POST /v1/metrics` with protobuf bodies
//! (gzip-compressed or not) and stops when dropped.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use prost::Message as _;

/// One exported span, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanRecord {
    pub name: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// `None` for a root span.
    pub parent_span_id: Option<String>,
    /// `internal`, `server`, `client`, `producer`, `consumer` or `unspecified`.
    pub kind: String,
    pub attributes: BTreeMap<String, String>,
    /// Each attribute's OTLP value type: `string`, `bool`, `int`, `double`, `array`, `kvlist`,
    /// `bytes` (`attributes` renders them all as strings).
    pub attribute_types: BTreeMap<String, &'static str>,
    pub events: Vec<EventRecord>,
    pub links: Vec<LinkRecord>,
    /// `unset`, `ok` or `error`.
    pub status_code: String,
    pub status_message: String,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    /// The instrumentation scope's name.
    pub scope: String,
    /// The resource's attributes (`service.name`, …).
    pub resource: BTreeMap<String, String>,
}

impl SpanRecord {
    /// An attribute's value, if the span has it.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    /// An attribute's OTLP value type (`int`, `string`, …), if the span has it.
    pub fn attr_type(&self, key: &str) -> Option<&'static str> {
        self.attribute_types.get(key).copied()
    }

    /// The first event with this name.
    pub fn event(&self, name: &str) -> Option<&EventRecord> {
        self.events.iter().find(|e| e.name == name)
    }
}

/// A span event.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub name: String,
    pub attributes: BTreeMap<String, String>,
}

/// A span link.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkRecord {
    pub trace_id: String,
    pub span_id: String,
    pub attributes: BTreeMap<String, String>,
}

/// What kind of metric a point belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// A counter (monotonic) or up-down counter.
    Sum {
        monotonic: bool,
    },
    Gauge,
    Histogram,
    ExponentialHistogram,
    Summary,
}

/// One exported metric data point, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricPoint {
    pub name: String,
    pub unit: String,
    pub kind: MetricKind,
    pub attributes: BTreeMap<String, String>,
    /// Sums and gauges: the value.
    pub value: Option<f64>,
    /// Histograms and summaries: the number of measurements.
    pub count: Option<u64>,
    /// Histograms and summaries: their sum.
    pub sum: Option<f64>,
    /// Explicit-bucket histograms: the bucket bounds and counts.
    pub bounds: Vec<f64>,
    pub bucket_counts: Vec<u64>,
    pub time_unix_nanos: u64,
    pub scope: String,
    pub resource: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct Received {
    spans: Vec<SpanRecord>,
    metrics: Vec<MetricPoint>,
    /// `(path, content-encoding)` of every request, in order.
    requests: Vec<(String, Option<String>)>,
    /// Spans received (also those not kept).
    span_total: usize,
    /// Count spans but keep nothing (a benchmark's collector: cheap, so it does not compete
    /// with what is measured).
    count_only: bool,
}

/// The receiver. Clone-free: share it by reference; dropping it stops the server.
#[derive(Debug)]
pub struct OtlpReceiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl OtlpReceiver {
    /// Starts listening on `127.0.0.1:0`.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A receiver that decodes and counts spans but keeps nothing: see
    /// [`span_count`](Self::span_count).
    pub fn start_counting() -> Self {
        Self::start_with(true)
    }

    fn start_with(count_only: bool) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let received = Arc::new(Mutex::new(Received {
            count_only,
            ..Received::default()
        }));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = Arc::clone(&received);
        std::thread::Builder::new()
            .name("otlp-receiver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("receiver runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    loop {
                        let (stream, _) = tokio::select! {
                            _ = &mut stopped => break,
                            accepted = listener.accept() => match accepted {
                                Ok(a) => a,
                                Err(_) => continue,
                            },
                        };
                        let shared = Arc::clone(&shared);
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |req| {
                                handle(Arc::clone(&shared), req)
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        });
                    }
                });
            })
            .expect("receiver thread");
        Self {
            addr,
            received,
            _stop: stop,
        }
    }

    /// `http://127.0.0.1:<port>`, the value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<SpanRecord> {
        self.lock().spans.clone()
    }

    /// How many spans have arrived (without copying them).
    pub fn span_count(&self) -> usize {
        self.lock().span_total
    }

    /// Forgets what has arrived (a long benchmark would otherwise hold millions of spans).
    pub fn clear(&self) {
        let mut r = self.lock();
        r.spans.clear();
        r.span_total = 0;
        r.metrics.clear();
        r.requests.clear();
    }

    /// The spans with this name.
    pub fn spans_named(&self, name: &str) -> Vec<SpanRecord> {
        self.lock()
            .spans
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }

    /// Every metric data point received so far, in arrival order.
    pub fn metrics(&self) -> Vec<MetricPoint> {
        self.lock().metrics.clone()
    }

    /// The data points of the metric with this name.
    pub fn metrics_named(&self, name: &str) -> Vec<MetricPoint> {
        self.lock()
            .metrics
            .iter()
            .filter(|m| m.name == name)
            .cloned()
            .collect()
    }

    /// The last data point received for this metric with exactly these attributes (with
    /// cumulative temporality: the current total).
    pub fn last_point(&self, name: &str, attributes: &[(&str, &str)]) -> Option<MetricPoint> {
        let want: BTreeMap<String, String> = attributes
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        self.lock()
            .metrics
            .iter()
            .rev()
            .find(|m| m.name == name && m.attributes == want)
            .cloned()
    }

    /// `(path, content-encoding)` of every request received.
    pub fn requests(&self) -> Vec<(String, Option<String>)> {
        self.lock().requests.clone()
    }

    /// Waits (real time, polling every 10 ms) until `cond` holds for the spans received, and
    /// returns them; panics after `timeout`, listing what did arrive.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        cond: impl Fn(&[SpanRecord]) -> bool,
    ) -> Vec<SpanRecord> {
        let start = std::time::Instant::now();
        loop {
            let spans = self.spans();
            if cond(&spans) {
                return spans;
            }
            assert!(
                start.elapsed() < timeout,
                "spans did not arrive within {timeout:?}; received: {}",
                summary(&spans)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Like [`wait_for`](Self::wait_for), for metric data points.
    pub async fn wait_for_metrics(
        &self,
        timeout: Duration,
        cond: impl Fn(&[MetricPoint]) -> bool,
    ) -> Vec<MetricPoint> {
        let start = std::time::Instant::now();
        loop {
            let points = self.metrics();
            if cond(&points) {
                return points;
            }
            assert!(
                start.elapsed() < timeout,
                "metrics did not arrive within {timeout:?}; received: {:?}",
                points.iter().map(|p| &p.name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Received> {
        self.received.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `name (span_id ← parent)` for each span, for failure messages.
pub fn summary(spans: &[SpanRecord]) -> String {
    let mut out = String::new();
    for s in spans {
        let _ = write!(
            out,
            "\n  {} ({} <- {})",
            s.name,
            s.span_id,
            s.parent_span_id.as_deref().unwrap_or("root")
        );
    }
    out
}

type Reply = Response<Full<Bytes>>;

async fn handle(shared: Arc<Mutex<Received>>, req: Request<Incoming>) -> Result<Reply, Infallible> {
    let path = req.uri().path().to_string();
    let encoding = req
        .headers()
        .get(hyper::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    if req.method() != Method::POST {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, Vec::new()));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(reply(StatusCode::BAD_REQUEST, Vec::new())),
    };
    let body = match encoding.as_deref() {
        None | Some("identity") => body.to_vec(),
        Some("gzip") => {
            let mut out = Vec::new();
            if flate2::read::GzDecoder::new(&body[..])
                .read_to_end(&mut out)
                .is_err()
            {
                return Ok(reply(StatusCode::BAD_REQUEST, Vec::new()));
            }
            out
        }
        Some(_) => return Ok(reply(StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new())),
    };
    let mut received = shared.lock().unwrap_or_else(|e| e.into_inner());
    received.requests.push((path.clone(), encoding));
    match path.as_str() {
        "/v1/traces" => match ExportTraceServiceRequest::decode(&body[..]) {
            Ok(request) => {
                if received.count_only {
                    received.span_total += request
                        .resource_spans
                        .iter()
                        .flat_map(|r| &r.scope_spans)
                        .map(|s| s.spans.len())
                        .sum::<usize>();
                } else {
                    let spans = flatten_spans(request);
                    received.span_total += spans.len();
                    received.spans.extend(spans);
                }
                Ok(reply(
                    StatusCode::OK,
                    ExportTraceServiceResponse::default().encode_to_vec(),
                ))
            }
            Err(_) => Ok(reply(StatusCode::BAD_REQUEST, Vec::new())),
        },
        "/v1/metrics" => match ExportMetricsServiceRequest::decode(&body[..]) {
            Ok(request) => {
                if !received.count_only {
                    received.metrics.extend(flatten_metrics(request));
                }
                Ok(reply(
                    StatusCode::OK,
                    ExportMetricsServiceResponse::default().encode_to_vec(),
                ))
            }
            Err(_) => Ok(reply(StatusCode::BAD_REQUEST, Vec::new())),
        },
        _ => Ok(reply(StatusCode::NOT_FOUND, Vec::new())),
    }
}

fn reply(status: StatusCode, body: Vec<u8>) -> Reply {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn flatten_spans(request: ExportTraceServiceRequest) -> Vec<SpanRecord> {
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let resource = rs
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            let scope = ss.scope.map(|s| s.name).unwrap_or_default();
            for s in ss.spans {
                let status = s.status.unwrap_or_default();
                out.push(SpanRecord {
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: (!s.parent_span_id.is_empty()).then(|| hex(&s.parent_span_id)),
                    kind: match s.kind {
                        1 => "internal",
                        2 => "server",
                        3 => "client",
                        4 => "producer",
                        5 => "consumer",
                        _ => "unspecified",
                    }
                    .to_string(),
                    attributes: attributes(&s.attributes),
                    attribute_types: s
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), value_type(kv.value.as_ref())))
                        .collect(),
                    events: s
                        .events
                        .iter()
                        .map(|e| EventRecord {
                            name: e.name.clone(),
                            attributes: attributes(&e.attributes),
                        })
                        .collect(),
                    links: s
                        .links
                        .iter()
                        .map(|l| LinkRecord {
                            trace_id: hex(&l.trace_id),
                            span_id: hex(&l.span_id),
                            attributes: attributes(&l.attributes),
                        })
                        .collect(),
                    status_code: match status.code {
                        1 => "ok",
                        2 => "error",
                        _ => "unset",
                    }
                    .to_string(),
                    status_message: status.message,
                    start_unix_nanos: s.start_time_unix_nano,
                    end_unix_nanos: s.end_time_unix_nano,
                    scope: scope.clone(),
                    resource: resource.clone(),
                });
            }
        }
    }
    out
}

fn flatten_metrics(request: ExportMetricsServiceRequest) -> Vec<MetricPoint> {
    let mut out = Vec::new();
    for rm in request.resource_metrics {
        let resource = rm
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        for sm in rm.scope_metrics {
            let scope = sm.scope.map(|s| s.name).unwrap_or_default();
            for m in sm.metrics {
                let point = |kind, attrs: &[KeyValue], time| MetricPoint {
                    name: m.name.clone(),
                    unit: m.unit.clone(),
                    kind,
                    attributes: attributes(attrs),
                    value: None,
                    count: None,
                    sum: None,
                    bounds: Vec::new(),
                    bucket_counts: Vec::new(),
                    time_unix_nanos: time,
                    scope: scope.clone(),
                    resource: resource.clone(),
                };
                let number = |v: &Option<number_data_point::Value>| match v {
                    Some(number_data_point::Value::AsDouble(d)) => Some(*d),
                    Some(number_data_point::Value::AsInt(i)) => Some(*i as f64),
                    None => None,
                };
                match &m.data {
                    Some(metric::Data::Sum(s)) => {
                        let kind = MetricKind::Sum {
                            monotonic: s.is_monotonic,
                        };
                        for p in &s.data_points {
                            out.push(MetricPoint {
                                value: number(&p.value),
                                ..point(kind, &p.attributes, p.time_unix_nano)
                            });
                        }
                    }
                    Some(metric::Data::Gauge(g)) => {
                        for p in &g.data_points {
                            out.push(MetricPoint {
                                value: number(&p.value),
                                ..point(MetricKind::Gauge, &p.attributes, p.time_unix_nano)
                            });
                        }
                    }
                    Some(metric::Data::Histogram(h)) => {
                        for p in &h.data_points {
                            out.push(MetricPoint {
                                count: Some(p.count),
                                sum: p.sum,
                                bounds: p.explicit_bounds.clone(),
                                bucket_counts: p.bucket_counts.clone(),
                                ..point(MetricKind::Histogram, &p.attributes, p.time_unix_nano)
                            });
                        }
                    }
                    Some(metric::Data::ExponentialHistogram(h)) => {
                        for p in &h.data_points {
                            out.push(MetricPoint {
                                count: Some(p.count),
                                sum: p.sum,
                                ..point(
                                    MetricKind::ExponentialHistogram,
                                    &p.attributes,
                                    p.time_unix_nano,
                                )
                            });
                        }
                    }
                    Some(metric::Data::Summary(s)) => {
                        for p in &s.data_points {
                            out.push(MetricPoint {
                                count: Some(p.count),
                                sum: Some(p.sum),
                                ..point(MetricKind::Summary, &p.attributes, p.time_unix_nano)
                            });
                        }
                    }
                    None => {}
                }
            }
        }
    }
    out
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(render).unwrap_or_default(),
            )
        })
        .collect()
}

/// The OTLP type of an attribute value.
fn value_type(v: Option<&AnyValue>) -> &'static str {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(_)) => "string",
        Some(any_value::Value::BoolValue(_)) => "bool",
        Some(any_value::Value::IntValue(_)) => "int",
        Some(any_value::Value::DoubleValue(_)) => "double",
        Some(any_value::Value::ArrayValue(_)) => "array",
        Some(any_value::Value::KvlistValue(_)) => "kvlist",
        Some(any_value::Value::BytesValue(_)) => "bytes",
        Some(any_value::Value::StringValueStrindex(_)) => "strindex",
        None => "none",
    }
}

/// An attribute value as a string: strings as they are, numbers and booleans in their usual
/// form, arrays as `[a, b]`, key-value lists as `{k: v}`, bytes in hex.
fn render(v: &AnyValue) -> String {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::ArrayValue(a)) => {
            let items: Vec<String> = a.values.iter().map(render).collect();
            format!("[{}]", items.join(", "))
        }
        Some(any_value::Value::KvlistValue(l)) => {
            let items: Vec<String> = l
                .values
                .iter()
                .map(|kv| {
                    let v = kv.value.as_ref().map(render).unwrap_or_default();
                    format!("{}: {v}", kv.key)
                })
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Some(any_value::Value::BytesValue(b)) => hex(b),
        // Profiles' string-table indexes; not used by traces and metrics.
        Some(any_value::Value::StringValueStrindex(i)) => format!("strindex:{i}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
