//! An OTLP/HTTP trace receiver of the test's own: `POST /v1/traces` with a protobuf
//! `ExportTraceServiceRequest` (what `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf` sends), on
//! a free port, decoded with `opentelemetry-proto`. No collector binary can be installed
//! here; this is the part of one that the programs talk to.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// One exported span, flattened.
#[derive(Debug, Clone)]
pub struct Span {
    /// `service.name` of the resource that exported it.
    pub service: String,
    /// The span's name.
    pub name: String,
    /// Trace id, hex.
    pub trace_id: String,
    /// Span id, hex.
    pub span_id: String,
    /// Parent span id, hex (empty for a root).
    pub parent_span_id: String,
    /// (trace id, span id) of each link, hex.
    pub links: Vec<(String, String)>,
    /// Attributes, values as text.
    pub attributes: BTreeMap<String, String>,
    /// Event names and their attributes' values, as text.
    pub events: Vec<String>,
}

impl Span {
    /// An attribute's value.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    /// An attribute as an integer.
    pub fn int(&self, key: &str) -> Option<i64> {
        self.attr(key).and_then(|v| v.parse().ok())
    }
}

#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    /// Every request body, as lossy text: protobuf strings are plain UTF-8 in it, so a
    /// scan of these sees every name, attribute and event the programs sent.
    raw: Vec<String>,
    requests: usize,
    /// Requests that were not protobuf trace exports.
    refused: usize,
}

/// The receiver; it stops when dropped.
pub struct Receiver {
    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    received: Arc<Mutex<Received>>,
    stop: CancellationToken,
}

fn text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

async fn traces(
    State(received): State<Arc<Mutex<Received>>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let mut r = received.lock().await;
    r.requests += 1;
    let protobuf = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-protobuf"));
    let Ok(request) = ExportTraceServiceRequest::decode(body.as_ref()) else {
        r.refused += 1;
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    if !protobuf {
        r.refused += 1;
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new());
    }
    r.raw.push(String::from_utf8_lossy(&body).into_owned());
    for rs in &request.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .map(|res| attributes(&res.attributes))
            .and_then(|a| a.get("service.name").cloned())
            .unwrap_or_default();
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                r.spans.push(Span {
                    service: service.clone(),
                    name: s.name.clone(),
                    trace_id: hex::encode(&s.trace_id),
                    span_id: hex::encode(&s.span_id),
                    parent_span_id: hex::encode(&s.parent_span_id),
                    links: s
                        .links
                        .iter()
                        .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                        .collect(),
                    attributes: attributes(&s.attributes),
                    events: s
                        .events
                        .iter()
                        .map(|e| {
                            let a: Vec<String> = attributes(&e.attributes).into_values().collect();
                            format!("{} {}", e.name, a.join(" "))
                        })
                        .collect(),
                });
            }
        }
    }
    (
        StatusCode::OK,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

impl Receiver {
    /// Listens on a free port of 127.0.0.1.
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Received::default()));
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/v1/traces", post(traces))
            .with_state(received.clone());
        let until = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(until.cancelled_owned())
                .await;
        });
        Ok(Self {
            endpoint: format!("http://{addr}"),
            received,
            stop,
        })
    }

    /// The environment that points a program at this receiver, exporting promptly.
    pub fn process_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.endpoint.clone()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
            // Batches leave every 200 ms instead of every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
        ]
    }

    /// Every span received so far.
    pub async fn spans(&self) -> Vec<Span> {
        self.received.lock().await.spans.clone()
    }

    /// Every request body received so far, as lossy text.
    pub async fn raw(&self) -> Vec<String> {
        self.received.lock().await.raw.clone()
    }

    /// (requests, refused requests).
    pub async fn requests(&self) -> (usize, usize) {
        let r = self.received.lock().await;
        (r.requests, r.refused)
    }

    /// Waits until `pred` holds over the spans received (bounded: the deadline only keeps
    /// a broken run from hanging).
    pub async fn wait_until(&self, within: Duration, pred: impl Fn(&[Span]) -> bool) -> bool {
        let started = Instant::now();
        loop {
            if pred(&self.received.lock().await.spans) {
                return true;
            }
            if started.elapsed() > within {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
