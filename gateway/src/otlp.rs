//! Spans over OTLP (`trace.otlp_endpoint`): each sampled request's span, and below it
//! the spans it recorded (cache lookups, the PostgreSQL query, upstream attempts; see
//! [`app_core::spans`]), sent to a collector in batches over OTLP/HTTP (protobuf).
//!
//! A request hands its finished spans to a bounded queue and goes on: when the queue is
//! full, or the collector does not take a batch (down, slow), the spans are dropped and
//! counted (`tiergate_trace_spans_dropped_total`); nothing on the request path waits for
//! the collector. Without an endpoint none of this exists, and a request pays nothing for
//! it but a check of an `Option`.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use app_core::spans::{self, ChildSpan, Recorder, Value as AttrValue};
use metrics::Counter;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use tiergate_config::TraceSettings;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::access_log::{ResponsePart, protocol_version, server_address};
use crate::trace::TraceContext;

/// Most spans in one export request.
const MAX_BATCH: usize = 512;

/// How long a batch waits for more spans once its first has come.
const GATHER_FOR: Duration = Duration::from_millis(100);

/// The span exporter of one server: cheap to clone.
#[derive(Debug, Clone)]
pub struct SpanExport {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    queue: mpsc::Sender<SpanData>,
    /// `trace.sample_ratio`.
    ratio: f64,
    scope: InstrumentationScope,
    dropped: Counter,
    /// Tells the export task to send what is queued and end.
    closing: Notify,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl SpanExport {
    /// The exporter `settings` ask for (none without an endpoint), its task started on
    /// the current runtime.
    ///
    /// # Errors
    /// The endpoint is not a URL the exporter takes.
    pub fn start(settings: &TraceSettings) -> anyhow::Result<Option<Self>> {
        let Some(endpoint) = &settings.otlp_endpoint else {
            return Ok(None);
        };
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint.clone())
            .with_timeout(settings.export_timeout)
            .build()?;
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name(settings.service_name.clone())
                .with_attribute(KeyValue::new("service.version", crate::BUILD.version))
                .build(),
        );
        let (queue, spans) = mpsc::channel(settings.queue_spans);
        let shared = Arc::new(Shared {
            queue,
            ratio: settings.sample_ratio,
            scope: InstrumentationScope::builder("tiergate")
                .with_version(crate::BUILD.version)
                .build(),
            dropped: metrics::counter!("tiergate_trace_spans_dropped_total"),
            closing: Notify::new(),
            task: Mutex::new(None),
        });
        let exported = metrics::counter!("tiergate_trace_spans_exported_total");
        let task = tokio::spawn(export_until_closed(
            exporter,
            spans,
            shared.clone(),
            exported,
        ));
        *shared.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        spans::enable();
        Ok(Some(Self { shared }))
    }

    /// Whether the request of `trace` is exported: a continued trace as its caller's
    /// sampled flag says, one started here as `trace.sample_ratio` says of its id.
    pub(crate) fn samples(&self, trace: &TraceContext) -> bool {
        if trace.continued {
            return trace.sampled();
        }
        // The id's low 56 bits as a share, as OpenTelemetry's ratio samplers read them.
        let low = (trace.trace_id & ((1 << 56) - 1)) as f64 / (1u64 << 56) as f64;
        low < self.shared.ratio
    }

    /// Queues the span of `req`, answered as `rsp` says, and those recorded below it.
    pub(crate) fn request_done(&self, req: SampledRequest, rsp: &ResponsePart<'_>) {
        let SampledRequest {
            trace,
            recorder,
            name,
            mut attributes,
        } = req;
        let end = SystemTime::now();
        let start = end.checked_sub(rsp.duration).unwrap_or(end);
        let context = span_context(trace.trace_id, trace.span_id);
        let children = recorder.take();
        response_attributes(&mut attributes, rsp);
        let span = SpanData {
            span_context: context,
            parent_span_id: SpanId::from(trace.parent_id),
            parent_span_is_remote: trace.parent_id != 0,
            span_kind: SpanKind::Server,
            name: Cow::Owned(name),
            start_time: start,
            end_time: end,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if rsp.status >= 500 {
                Status::error("")
            } else {
                Status::Unset
            },
            instrumentation_scope: self.shared.scope.clone(),
        };
        self.queue(span);
        for child in children {
            self.queue(self.child(&trace, child));
        }
    }

    fn child(&self, trace: &TraceContext, child: ChildSpan) -> SpanData {
        SpanData {
            span_context: span_context(trace.trace_id, child.span_id),
            parent_span_id: SpanId::from(trace.span_id),
            parent_span_is_remote: false,
            span_kind: if child.client {
                SpanKind::Client
            } else {
                SpanKind::Internal
            },
            name: child.name,
            start_time: child.start,
            end_time: child.end,
            attributes: child
                .attributes
                .into_iter()
                .map(|(key, value)| KeyValue::new(key, attribute(value)))
                .collect(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if child.failed {
                Status::error("")
            } else {
                Status::Unset
            },
            instrumentation_scope: self.shared.scope.clone(),
        }
    }

    /// Queues `span`, or counts it dropped when the queue is full.
    fn queue(&self, span: SpanData) {
        if self.shared.queue.try_send(span).is_err() {
            self.shared.dropped.increment(1);
        }
    }

    /// Sends what is queued (within the export timeout) and stops the export task.
    pub async fn close(&self) {
        self.shared.closing.notify_one();
        let task = self
            .shared
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// A request sampled for export: its trace, where the spans below its own are recorded,
/// and its span's name and attributes, taken as it comes in (copies: see
/// `access_log::RequestFields`).
#[derive(Debug)]
pub(crate) struct SampledRequest {
    trace: TraceContext,
    pub(crate) recorder: Recorder,
    name: String,
    attributes: Vec<KeyValue>,
}

impl SampledRequest {
    /// `req`, from `client`, in `trace`, with its request id; after OpenTelemetry's HTTP
    /// server conventions.
    pub(crate) fn of<B>(
        req: &http::Request<B>,
        client: std::net::IpAddr,
        request_id: &http::HeaderValue,
        trace: TraceContext,
    ) -> Self {
        let headers = req.headers();
        let mut attributes = vec![
            KeyValue::new("http.request.method", req.method().as_str().to_owned()),
            KeyValue::new("url.path", req.uri().path().to_owned()),
            KeyValue::new("client.address", client.to_string()),
            KeyValue::new("network.protocol.version", protocol_version(req.version())),
            KeyValue::new(
                "tiergate.request_id",
                String::from_utf8_lossy(request_id.as_bytes()).into_owned(),
            ),
        ];
        if let Some(host) = server_address(req.uri(), headers.get(http::header::HOST)) {
            attributes.push(KeyValue::new(
                "server.address",
                String::from_utf8_lossy(host).into_owned(),
            ));
        }
        if let Some(agent) = headers.get(http::header::USER_AGENT) {
            attributes.push(KeyValue::new(
                "user_agent.original",
                String::from_utf8_lossy(agent.as_bytes()).into_owned(),
            ));
        }
        Self {
            trace,
            recorder: Recorder::default(),
            name: req.method().as_str().to_owned(),
            attributes,
        }
    }
}

/// The request span's attributes that come with the answer.
fn response_attributes(attributes: &mut Vec<KeyValue>, rsp: &ResponsePart<'_>) {
    attributes.push(KeyValue::new(
        "http.response.status_code",
        i64::from(rsp.status),
    ));
    attributes.push(KeyValue::new("tiergate.route", rsp.route.to_owned()));
    if let Some(cache) = rsp.cache {
        attributes.push(KeyValue::new(
            "tiergate.cache",
            String::from_utf8_lossy(cache.as_bytes()).into_owned(),
        ));
    }
    if let Some((group, target)) = rsp.upstream {
        attributes.push(KeyValue::new("tiergate.upstream.group", group.to_owned()));
        if let Some(target) = target {
            attributes.push(KeyValue::new("tiergate.upstream.target", target.to_owned()));
        }
    }
}

fn span_context(trace_id: u128, span_id: u64) -> SpanContext {
    SpanContext::new(
        TraceId::from(trace_id),
        SpanId::from(span_id),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    )
}

fn attribute(value: AttrValue) -> Value {
    match value {
        AttrValue::Str(text) => Value::from(text),
        AttrValue::Int(n) => Value::from(n),
        AttrValue::Bool(b) => Value::from(b),
    }
}

/// The export task: gathers batches from the queue and sends each; a batch the collector
/// does not take is dropped and counted. On close, sends what is queued and ends.
async fn export_until_closed(
    exporter: opentelemetry_otlp::SpanExporter,
    mut spans: mpsc::Receiver<SpanData>,
    shared: Arc<Shared>,
    exported: Counter,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut closing = false;
    let mut failing = false;
    while !closing {
        tokio::select! {
            got = spans.recv_many(&mut batch, MAX_BATCH) => {
                if got == 0 {
                    return;
                }
                let until = tokio::time::Instant::now() + GATHER_FOR;
                while batch.len() < MAX_BATCH {
                    let room = MAX_BATCH - batch.len();
                    let more = spans.recv_many(&mut batch, room);
                    match tokio::time::timeout_at(until, more).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
            () = shared.closing.notified() => {
                closing = true;
                spans.close();
                while let Ok(span) = spans.try_recv() {
                    batch.push(span);
                }
            }
        }
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(MAX_BATCH));
            let chunk = std::mem::replace(&mut batch, rest);
            let count = chunk.len() as u64;
            match exporter.export(chunk).await {
                Ok(()) => {
                    exported.increment(count);
                    if std::mem::take(&mut failing) {
                        tracing::info!("Span export works again.");
                    }
                }
                Err(error) => {
                    shared.dropped.increment(count);
                    // Once per outage: the counter tells how much it cost.
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(%error, "Span export failed; spans are dropped until it works again.");
                    }
                }
            }
        }
    }
}
