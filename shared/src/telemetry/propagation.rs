//! W3C trace context across the system's boundaries: the CRM's HTTP request, the work
//! messages, the stored batch and the events.
//!
//! A context travels as a `traceparent` string (`00-{trace id}-{span id}-{flags}`):
//! - in HTTP headers, read from the CRM's request ([`from_http`]);
//! - in AMQP headers, written on every work message and event ([`with_traceparent`],
//!   [`traceparent_props`]) and read back by the worker ([`amqp_traceparent`]);
//! - in the database: a transaction that writes a batch or outbox rows is stamped with
//!   the current span's context ([`stamp_transaction`]), and the `trace_context` and
//!   `traceparent` columns default to that stamp (migration `m20261202_000008`), so the
//!   batch keeps the context it was accepted under and every event the one of the span
//!   that committed it, without any insert naming them.
//!
//! Only ids cross: a trace id, a span id and the sampled flag. When no trace is being
//! recorded (export off, or a span not sampled) nothing is written: the helpers return
//! `None` and leave headers and transactions as they were.

use std::collections::HashSet;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use sea_orm::{ConnectionTrait, DbErr};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header (HTTP) and AMQP header name.
pub const TRACEPARENT: &str = "traceparent";
/// The transaction-local setting the `trace_context` and `traceparent` columns default to.
pub const DB_SETTING: &str = "bulkops.traceparent";
/// At most this many links on one span (the SDK's default limit is 128): a chunk holds
/// messages of few split chunks, so more would only repeat.
pub const MAX_LINKS: usize = 64;

struct One<'a>(Option<&'a str>);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if key == TRACEPARENT { self.0 } else { None }
    }
    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

struct Out(Option<String>);

impl Injector for Out {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}

struct Http<'a>(&'a http::HeaderMap);

impl Extractor for Http<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Whether `tp` has the W3C shape `vv-{32 hex}-{16 hex}-ff` in lower case (the SDK's own
/// parser accepts shorter ids; the CRM's value is checked before it is trusted).
fn well_formed(tp: &str) -> bool {
    let parts: Vec<&str> = tp.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() >= 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        // Version 00 has exactly four fields; later versions may append more.
        && (parts.len() == 4 || parts[0] != "00")
}

/// The remote context a `traceparent` names, or `None` when it is absent or malformed
/// (a malformed one starts a new trace rather than failing anything).
pub fn parse(traceparent: &str) -> Option<Context> {
    let tp = traceparent.trim();
    if !well_formed(tp) {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&One(Some(tp)));
    cx.span().span_context().is_valid().then_some(cx)
}

/// The span context a `traceparent` names, for a link.
pub fn span_context(traceparent: &str) -> Option<SpanContext> {
    parse(traceparent).map(|cx| cx.span().span_context().clone())
}

/// `cx` as a `traceparent`, when it holds a valid span.
pub fn format(cx: &Context) -> Option<String> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut out = Out(None);
    TraceContextPropagator::new().inject_context(cx, &mut out);
    out.0
}

/// The `traceparent` of `span`, when it is being recorded (export on and sampled in).
pub fn of_span(span: &Span) -> Option<String> {
    if !super::otel::enabled() || span.is_disabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_sampled() {
        return None;
    }
    format(&cx)
}

/// The `traceparent` of the current span.
pub fn current() -> Option<String> {
    of_span(&Span::current())
}

/// The context of a request's `traceparent` (and `tracestate`) header, or an empty one.
pub fn from_http(headers: &http::HeaderMap) -> Context {
    let usable = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tp| well_formed(tp.trim()));
    if !usable {
        return Context::new();
    }
    TraceContextPropagator::new().extract(&Http(headers))
}

/// Makes `span` a child of the context `traceparent` names. Call before the span is first
/// entered; a missing or malformed value leaves the span where it is.
pub fn follow(span: &Span, traceparent: Option<&str>) {
    if !super::otel::enabled() {
        return;
    }
    if let Some(cx) = traceparent.and_then(parse) {
        let _ = span.set_parent(cx);
    }
}

/// Makes `span` a child of `cx` when it holds a valid span (an incoming request's).
pub fn follow_context(span: &Span, cx: Context) {
    if super::otel::enabled() && cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to each distinct context of `traceparents` (at most [`MAX_LINKS`]).
pub fn link_all<'a>(span: &Span, traceparents: impl IntoIterator<Item = Option<&'a str>>) {
    if !super::otel::enabled() {
        return;
    }
    let mut seen = HashSet::new();
    for tp in traceparents.into_iter().flatten() {
        if seen.len() >= MAX_LINKS {
            break;
        }
        if seen.insert(tp)
            && let Some(sc) = span_context(tp)
        {
            span.add_link(sc);
        }
    }
}

/// Links `span` to the context of `other` (a chunk span, from the batch span it holds).
pub fn link_span(span: &Span, other: &Span) {
    if !super::otel::enabled() {
        return;
    }
    let cx = other.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// The `traceparent` AMQP header of a message, if it carries one.
pub fn amqp_traceparent(headers: Option<&FieldTable>) -> Option<&str> {
    match headers?.inner().get(&ShortString::from(TRACEPARENT))? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        _ => None,
    }
}

/// `headers` with the current span's `traceparent` added (unchanged when no trace is
/// recorded).
pub fn with_traceparent(mut headers: FieldTable) -> FieldTable {
    if let Some(tp) = current() {
        headers.insert(
            TRACEPARENT.into(),
            AMQPValue::LongString(LongString::from(tp)),
        );
    }
    headers
}

/// `props` with a `traceparent` header carrying `traceparent`, when there is one.
pub fn traceparent_props(props: BasicProperties, traceparent: Option<&str>) -> BasicProperties {
    match traceparent {
        Some(tp) => {
            let mut headers = props.headers().clone().unwrap_or_default();
            headers.insert(
                TRACEPARENT.into(),
                AMQPValue::LongString(LongString::from(tp)),
            );
            props.with_headers(headers)
        }
        None => props,
    }
}

/// Stamps the transaction with the current span's context, so that the batch and outbox
/// rows it writes carry it (their columns default to [`DB_SETTING`]). Costs one round
/// trip, and nothing when no trace is recorded.
///
/// # Errors
/// Database errors.
pub async fn stamp_transaction(tx: &impl ConnectionTrait) -> Result<(), DbErr> {
    let Some(tp) = current() else {
        return Ok(());
    };
    tx.execute_raw(crate::db::stmt(
        "SELECT set_config('bulkops.traceparent', $1, true)",
        [tp.into()],
    ))
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_round_trips() {
        let cx = parse(TP).expect("valid");
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(format(&cx).as_deref(), Some(TP));
        // Not sampled: the flag survives too.
        let unsampled = TP.replace("-01", "-00");
        assert_eq!(
            parse(&unsampled).and_then(|c| format(&c)).as_deref(),
            Some(unsampled.as_str())
        );
    }

    #[test]
    fn malformed_traceparents_start_nothing() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
        assert!(format(&Context::new()).is_none());
    }

    #[test]
    fn http_headers_carry_the_context() {
        let mut headers = http::HeaderMap::new();
        assert!(!from_http(&headers).span().span_context().is_valid());
        headers.insert("traceparent", http::HeaderValue::from_static(TP));
        let cx = from_http(&headers);
        assert_eq!(format(&cx).as_deref(), Some(TP));
        headers.insert(
            "traceparent",
            http::HeaderValue::from_static("00-zz-not-a-context-01"),
        );
        assert!(!from_http(&headers).span().span_context().is_valid());
    }

    #[test]
    fn a_span_continues_a_traceparent_and_hands_on_its_own() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        super::super::otel::mark_enabled();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("child");
            follow(&span, Some(TP));
            let handed = of_span(&span).expect("a recorded span has a traceparent");
            let cx = parse(&handed).expect("well formed");
            let sc = cx.span().span_context().clone();
            assert_eq!(
                sc.trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            assert_ne!(
                sc.span_id().to_string(),
                "00f067aa0ba902b7",
                "its own span id"
            );
            // Inside the span, the helpers see it as the current one.
            span.in_scope(|| {
                assert_eq!(current().as_deref(), Some(handed.as_str()));
                let headers = with_traceparent(FieldTable::default());
                assert_eq!(amqp_traceparent(Some(&headers)), Some(handed.as_str()));
            });
            // Links: repeats count once.
            let linked = tracing::info_span!("linked");
            link_all(&linked, [Some(TP), Some(TP), None, Some("garbage")]);
        });
    }

    #[test]
    fn amqp_headers_carry_the_context() {
        assert_eq!(amqp_traceparent(None), None);
        let props = traceparent_props(BasicProperties::default(), Some(TP));
        assert_eq!(amqp_traceparent(props.headers().as_ref()), Some(TP));
        // Other headers stay.
        let mut table = FieldTable::default();
        table.insert("x-published-at-ms".into(), AMQPValue::LongLongInt(7));
        let props = traceparent_props(BasicProperties::default().with_headers(table), Some(TP));
        let headers = props.headers().clone().unwrap_or_default();
        assert_eq!(headers.inner().len(), 2);
        assert_eq!(
            amqp_traceparent(Some(&headers))
                .and_then(parse)
                .and_then(|c| format(&c))
                .as_deref(),
            Some(TP)
        );
        // No context: nothing added.
        let props = traceparent_props(BasicProperties::default(), None);
        assert!(props.headers().is_none());
        // Without a recording span, nothing is added either.
        assert!(with_traceparent(FieldTable::default()).inner().is_empty());
    }
}
