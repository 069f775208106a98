//! The worker's spans, built where the deliveries are still at hand.
//!
//! - `worker.chunk`: one chunk of deliveries. A chunk mixes items of several batches and
//!   of several split chunks, so it has no single parent: it starts a trace of its own and
//!   *links* to the context of every message it holds.
//! - `worker.batch`: the part of a chunk that belongs to one batch: a child of the split
//!   chunk that published its first message (so it sits in the trace of the CRM's request),
//!   linked back to its `worker.chunk`. Under it: `worker.lock`, `worker.apply` (the
//!   transaction, with its outcome counts, and `worker.commit`) and `worker.ack`.
//! - `worker.dead_letter`: the watcher recording a dead-lettered item, in its trace.
//!
//! Fields are ids and counts only.

use bulkops_shared::batch::Lane;
use bulkops_shared::ids::BatchId;
use bulkops_shared::progress::OutcomeDelta;
use bulkops_shared::telemetry::propagation;
use lapin::message::Delivery;
use tracing::Span;

use crate::process::Work;

fn traceparent(delivery: &Delivery) -> Option<&str> {
    propagation::amqp_traceparent(delivery.properties.headers().as_ref())
}

/// The span of one chunk of `deliveries` from `lane`.
pub fn chunk(lane: Lane, deliveries: &[Delivery]) -> Span {
    let span = tracing::info_span!(
        "worker.chunk",
        otel.kind = "consumer",
        lane = lane.as_str(),
        items = deliveries.len(),
    );
    propagation::link_all(&span, deliveries.iter().map(traceparent));
    span
}

/// The span of the `works` of one batch within the current chunk.
pub fn batch(batch_id: BatchId, works: &[Work]) -> Span {
    let span = tracing::info_span!(
        "worker.batch",
        batch_id = batch_id.0,
        items = works.len(),
        kind = tracing::field::Empty,
        agency_id = tracing::field::Empty,
    );
    if bulkops_shared::telemetry::otel::enabled() {
        let first = works.iter().find_map(|w| traceparent(&w.delivery));
        propagation::follow(&span, first);
        propagation::link_span(&span, &Span::current());
    }
    span
}

/// The span of recording one dead letter.
pub fn dead_letter(delivery: &Delivery) -> Span {
    let span = tracing::info_span!("worker.dead_letter", otel.kind = "consumer");
    propagation::follow(&span, traceparent(delivery));
    span
}

/// Records a transaction's outcome counts on the current span (`worker.apply`).
pub fn record_outcomes(delta: &OutcomeDelta) {
    let span = Span::current();
    span.record("created", delta.created);
    span.record("converted", delta.converted);
    span.record("skipped", delta.skipped);
    span.record("failed", delta.failed);
}
