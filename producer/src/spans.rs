//! The producer's spans that begin somewhere other than where they are entered: the HTTP
//! request (tower-http's `TraceLayer`, continuing the CRM's `traceparent`), and each split
//! chunk, which continues the context its batch was accepted under (stored on the batch,
//! so a producer that adopts the batch after a crash continues the same trace).
//!
//! Fields are ids, counts and route templates; never a raw path or query (they may hold
//! ids of the CRM's choosing) and never a body.

use std::time::Duration;

use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use bulkops_shared::batch::{BatchKind, Lane};
use bulkops_shared::ids::BatchId;
use bulkops_shared::telemetry::propagation;
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::trace::TraceLayer;
use tracing::Span;

/// The router's `TraceLayer`: one span per request, nothing logged by it (failures are
/// the problem responses' business, and `/metrics` counts them).
pub type HttpTrace = TraceLayer<
    SharedClassifier<ServerErrorsAsFailures>,
    fn(&Request) -> Span,
    (),
    fn(&Response, Duration, &Span),
    (),
    (),
    (),
>;

/// The `TraceLayer` for the router.
pub fn http_layer() -> HttpTrace {
    TraceLayer::new_for_http()
        .make_span_with(request_span as fn(&Request) -> Span)
        .on_request(())
        .on_response(record_response as fn(&Response, Duration, &Span))
        .on_body_chunk(())
        .on_eos(())
        .on_failure(())
}

/// Probes and scrapes come every few seconds and say nothing about a batch: their spans
/// are DEBUG, so the default `telemetry.filter` (`info`) leaves them out.
fn is_probe(route: &str) -> bool {
    matches!(route, "/metrics" | "/healthz" | "/readyz") || route.starts_with("/ui/static")
}

/// The span of one request, named `{method} {route}` and a child of the CRM's
/// `traceparent` when it sent a valid one.
pub fn request_span(request: &Request) -> Span {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    let method = request.method().as_str();
    let name = format!("{method} {route}");
    let span = if is_probe(route) {
        tracing::debug_span!("http.request", otel.name = %name, otel.kind = "server",
            http.request.method = method, http.route = route,
            http.response.status_code = tracing::field::Empty)
    } else {
        tracing::info_span!("http.request", otel.name = %name, otel.kind = "server",
            http.request.method = method, http.route = route,
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty)
    };
    propagation::follow_context(&span, propagation::from_http(request.headers()));
    span
}

fn record_response(response: &Response, _latency: Duration, span: &Span) {
    span.record("http.response.status_code", response.status().as_u16());
    if response.status().is_server_error() {
        span.record("otel.status_code", "error");
    }
}

/// The span of one split chunk of `batch`: a child of the context the batch was accepted
/// under. Its own context goes on every message it publishes.
pub fn split_chunk(
    batch_id: BatchId,
    kind: BatchKind,
    agency_id: i64,
    lane: Lane,
    room: i64,
    trace_context: Option<&str>,
) -> Span {
    let span = tracing::info_span!(
        "split.chunk",
        otel.kind = "producer",
        batch_id = batch_id.0,
        kind = kind.as_str(),
        agency_id,
        lane = lane.as_str(),
        room,
        items = tracing::field::Empty,
    );
    propagation::follow(&span, trace_context);
    span
}

/// The span of a stalled batch's republish generation, in the batch's trace.
pub fn republish(
    batch_id: BatchId,
    kind: BatchKind,
    lane: Lane,
    trace_context: Option<&str>,
) -> Span {
    let span = tracing::info_span!(
        "split.republish",
        otel.kind = "producer",
        batch_id = batch_id.0,
        kind = kind.as_str(),
        lane = lane.as_str(),
    );
    propagation::follow(&span, trace_context);
    span
}
