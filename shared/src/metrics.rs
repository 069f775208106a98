//! Every Prometheus metric bulkops exports, defined once.
//!
//! Each binary builds one registry ([`ProducerMetrics::new`] or [`WorkerMetrics::new`]) and
//! serves it at `/metrics`. Names carry the `bulkops_` prefix and a unit suffix; labels
//! are of bounded cardinality (kinds, lanes, outcomes, reasons, routes, queues) with one
//! deliberate exception: the per-batch progress gauges carry `batch_id`, and exist only
//! while the batch is active (they are removed when it completes), so their number is
//! bounded by the number of batches running at once. The README lists every metric.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Registration failed: a programming error (a name defined twice), reported at start-up.
pub type MetricsError = prometheus::Error;

fn counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter, MetricsError> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, MetricsError> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str) -> Result<Gauge, MetricsError> {
    let g = Gauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> Result<IntGauge, MetricsError> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn int_gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, MetricsError> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> Result<HistogramVec, MetricsError> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> Result<Histogram, MetricsError> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

/// Latency buckets from 1 ms to 5 min.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        120.0, 300.0,
    ]
}

fn process_collector(r: &Registry) -> Result<(), MetricsError> {
    #[cfg(target_os = "linux")]
    {
        let pc = prometheus::process_collector::ProcessCollector::new(
            std::process::id() as i32,
            "bulkops",
        );
        r.register(Box::new(pc))?;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = r;
    Ok(())
}

/// Renders a registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    if let Err(e) = encoder.encode(&registry.gather(), &mut buf) {
        tracing::warn!(error = %e, "could not encode metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// `/metrics` as both services answer it: the registry in the Prometheus text format,
/// with its content type.
pub fn http_response(registry: &Registry) -> http::Response<String> {
    let mut response = http::Response::new(encode(registry));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Metrics of the outbox relay (both binaries run one).
#[derive(Clone)]
pub struct OutboxMetrics {
    /// `bulkops_outbox_published_total`
    pub published: IntCounter,
    /// `bulkops_outbox_relay_errors_total`
    pub errors: IntCounter,
    /// `bulkops_outbox_lag_seconds`
    pub lag_seconds: Gauge,
}

impl OutboxMetrics {
    fn new(r: &Registry) -> Result<Self, MetricsError> {
        Ok(Self {
            published: counter(
                r,
                "bulkops_outbox_published_total",
                "Events published from the outbox to the events exchange and confirmed.",
            )?,
            errors: counter(
                r,
                "bulkops_outbox_relay_errors_total",
                "Outbox relay rounds that failed (database or broker) and were retried.",
            )?,
            lag_seconds: gauge(
                r,
                "bulkops_outbox_lag_seconds",
                "Age of the oldest event this relay published in its last round (0 when the outbox was empty).",
            )?,
        })
    }
}

/// Dependency health, shared by both binaries.
#[derive(Clone)]
pub struct HealthMetrics {
    /// `bulkops_dependency_up{dependency}`
    pub dependency_up: IntGaugeVec,
}

impl HealthMetrics {
    fn new(r: &Registry) -> Result<Self, MetricsError> {
        Ok(Self {
            dependency_up: int_gauge_vec(
                r,
                "bulkops_dependency_up",
                "1 when the dependency (database, broker, redis) answered the last readiness check, else 0.",
                &["dependency"],
            )?,
        })
    }
}

/// The producer's metrics.
#[derive(Clone)]
pub struct ProducerMetrics {
    /// The registry served at `/metrics`.
    pub registry: Registry,
    /// `bulkops_http_requests_total{route,method,status}`
    pub http_requests: IntCounterVec,
    /// `bulkops_http_request_duration_seconds{route,method}`
    pub http_duration: HistogramVec,
    /// `bulkops_batches_accepted_total{kind}`
    pub batches_accepted: IntCounterVec,
    /// `bulkops_batch_accept_duration_seconds{kind}`
    pub accept_duration: HistogramVec,
    /// `bulkops_items_settled_on_accept_total{kind,outcome}`
    pub items_settled_on_accept: IntCounterVec,
    /// `bulkops_quota_refusals_total{kind}`
    pub quota_refusals: IntCounterVec,
    /// `bulkops_split_published_total{kind,lane}`
    pub split_published: IntCounterVec,
    /// `bulkops_split_errors_total`
    pub split_errors: IntCounter,
    /// `bulkops_split_backlog_items`
    pub split_backlog: IntGauge,
    /// `bulkops_split_republished_total{kind,lane}`
    pub split_republished: IntCounterVec,
    /// `bulkops_split_stalled_batches{state}`
    pub split_stalled: IntGaugeVec,
    /// `bulkops_split_batches_owned`
    pub split_owned: IntGauge,
    /// `bulkops_batches_active{kind}`
    pub batches_active: IntGaugeVec,
    /// `bulkops_batch_items{batch_id,kind}` (active batches only)
    pub batch_items: IntGaugeVec,
    /// `bulkops_batch_items_done{batch_id,kind}` (active batches only)
    pub batch_items_done: IntGaugeVec,
    /// `bulkops_lane_backlog_items{lane}`
    pub lane_backlog: IntGaugeVec,
    /// `bulkops_queue_messages{queue}`
    pub queue_messages: IntGaugeVec,
    /// `bulkops_queue_consumers{queue}`
    pub queue_consumers: IntGaugeVec,
    /// `bulkops_retention_pruned_rows_total{table}`
    pub retention_pruned_rows: IntCounterVec,
    /// `bulkops_retention_batches_pruned_total`
    pub retention_batches_pruned: IntCounter,
    /// `bulkops_retention_errors_total`
    pub retention_errors: IntCounter,
    /// `bulkops_outbox_backlog_events`
    pub outbox_backlog: IntGauge,
    /// `bulkops_outbox_oldest_age_seconds`
    pub outbox_oldest_age: Gauge,
    /// Outbox relay metrics.
    pub outbox: std::sync::Arc<OutboxMetrics>,
    /// Dependency health.
    pub health: HealthMetrics,
}

impl ProducerMetrics {
    /// Registers every producer metric in a fresh registry.
    ///
    /// # Errors
    /// Only on a programming error (a metric defined twice).
    pub fn new() -> Result<Self, MetricsError> {
        let r = Registry::new();
        process_collector(&r)?;
        Ok(Self {
            http_requests: counter_vec(
                &r,
                "bulkops_http_requests_total",
                "HTTP requests answered, by matched route, method and status code.",
                &["route", "method", "status"],
            )?,
            http_duration: histogram_vec(
                &r,
                "bulkops_http_request_duration_seconds",
                "Time to answer an HTTP request (for streamed bodies: to the start of the body).",
                &["route", "method"],
                latency_buckets(),
            )?,
            batches_accepted: counter_vec(
                &r,
                "bulkops_batches_accepted_total",
                "Batches accepted (items frozen), by kind.",
                &["kind"],
            )?,
            accept_duration: histogram_vec(
                &r,
                "bulkops_batch_accept_duration_seconds",
                "Time to freeze a batch's items and commit, by kind.",
                &["kind"],
                latency_buckets(),
            )?,
            items_settled_on_accept: counter_vec(
                &r,
                "bulkops_items_settled_on_accept_total",
                "Items given their outcome by the accepting transaction itself (no message), by kind and outcome.",
                &["kind", "outcome"],
            )?,
            quota_refusals: counter_vec(
                &r,
                "bulkops_quota_refusals_total",
                "Bulk requests refused (429) because the agency's items in flight would exceed limits.max_active_items_per_agency, by kind.",
                &["kind"],
            )?,
            split_published: counter_vec(
                &r,
                "bulkops_split_published_total",
                "Per-record messages published and confirmed by the splitter, by kind and lane.",
                &["kind", "lane"],
            )?,
            split_errors: counter(
                &r,
                "bulkops_split_errors_total",
                "Split rounds that failed (database or broker) and were retried.",
            )?,
            split_republished: counter_vec(
                &r,
                "bulkops_split_republished_total",
                "Messages the stall sweeper published again for items of stalled batches (one generation at a time), by kind and lane.",
                &["kind", "lane"],
            )?,
            split_stalled: int_gauge_vec(
                &r,
                "bulkops_split_stalled_batches",
                "Stalled batches the last sweep did not republish, by why: held_outage (a worker reports waiting for a dependency), held_queued (their lane's queues still hold ready messages).",
                &["state"],
            )?,
            split_backlog: int_gauge(
                &r,
                "bulkops_split_backlog_items",
                "Items of batches this producer splits that are not yet published.",
            )?,
            split_owned: int_gauge(
                &r,
                "bulkops_split_batches_owned",
                "Batches this producer currently holds the split lease of.",
            )?,
            batches_active: int_gauge_vec(
                &r,
                "bulkops_batches_active",
                "Batches not yet completed, by kind (all agencies).",
                &["kind"],
            )?,
            batch_items: int_gauge_vec(
                &r,
                "bulkops_batch_items",
                "Items of an active batch (removed when the batch completes).",
                &["batch_id", "kind"],
            )?,
            batch_items_done: int_gauge_vec(
                &r,
                "bulkops_batch_items_done",
                "Items of an active batch that have an outcome (removed when the batch completes).",
                &["batch_id", "kind"],
            )?,
            lane_backlog: int_gauge_vec(
                &r,
                "bulkops_lane_backlog_items",
                "Items of active batches on a lane that have no outcome yet: queued (ready or unacknowledged, on every shard), waiting for a retry, or not yet published. What an autoscaler reads.",
                &["lane"],
            )?,
            queue_messages: int_gauge_vec(
                &r,
                "bulkops_queue_messages",
                "Messages ready in a bulkops queue (not those delivered and unacknowledged).",
                &["queue"],
            )?,
            queue_consumers: int_gauge_vec(
                &r,
                "bulkops_queue_consumers",
                "Consumers attached to a bulkops queue.",
                &["queue"],
            )?,
            retention_pruned_rows: counter_vec(
                &r,
                "bulkops_retention_pruned_rows_total",
                "Rows deleted by the retention pruner, by table (bulk_items, idempotency_keys, conversion_log, outbox).",
                &["table"],
            )?,
            retention_batches_pruned: counter(
                &r,
                "bulkops_retention_batches_pruned_total",
                "Completed batches whose items the retention pruner took away (the batch and its counts remain).",
            )?,
            retention_errors: counter(
                &r,
                "bulkops_retention_errors_total",
                "Retention passes that failed (database) and were retried at the next pass.",
            )?,
            outbox_backlog: int_gauge(
                &r,
                "bulkops_outbox_backlog_events",
                "Events written to the outbox and not yet published.",
            )?,
            outbox_oldest_age: gauge(
                &r,
                "bulkops_outbox_oldest_age_seconds",
                "Age of the oldest event waiting in the outbox (0 when empty).",
            )?,
            outbox: std::sync::Arc::new(OutboxMetrics::new(&r)?),
            health: HealthMetrics::new(&r)?,
            registry: r,
        })
    }
}

/// The worker's metrics.
#[derive(Clone)]
pub struct WorkerMetrics {
    /// The registry served at `/metrics`.
    pub registry: Registry,
    /// `bulkops_items_processed_total{kind,outcome}`
    pub items_processed: IntCounterVec,
    /// `bulkops_item_latency_seconds{kind,lane}`
    pub item_latency: HistogramVec,
    /// `bulkops_chunk_duration_seconds{kind}`
    pub chunk_duration: HistogramVec,
    /// `bulkops_chunk_items`
    pub chunk_items: Histogram,
    /// `bulkops_deliveries_total{lane}`
    pub deliveries: IntCounterVec,
    /// `bulkops_retries_total{kind,stage}`
    pub retries: IntCounterVec,
    /// `bulkops_dead_lettered_total{reason}`
    pub dead_lettered: IntCounterVec,
    /// `bulkops_lock_contention_total{kind}`
    pub lock_contention: IntCounterVec,
    /// `bulkops_ack_failures_total`
    pub ack_failures: IntCounter,
    /// `bulkops_worker_inflight_deliveries{lane}`
    pub inflight: IntGaugeVec,
    /// `bulkops_consumer_restarts_total{lane}`
    pub consumer_restarts: IntCounterVec,
    /// `bulkops_failures_total{class}`
    pub failures: IntCounterVec,
    /// `bulkops_lock_bypassed_total{kind}`
    pub lock_bypassed: IntCounterVec,
    /// `bulkops_dependency_degraded{dependency}`
    pub dependency_degraded: IntGaugeVec,
    /// `bulkops_dependency_waiting_chunks{dependency}`
    pub dependency_waiting: IntGaugeVec,
    /// Outbox relay metrics.
    pub outbox: std::sync::Arc<OutboxMetrics>,
    /// Dependency health.
    pub health: HealthMetrics,
}

impl WorkerMetrics {
    /// Registers every worker metric in a fresh registry.
    ///
    /// # Errors
    /// Only on a programming error (a metric defined twice).
    pub fn new() -> Result<Self, MetricsError> {
        let r = Registry::new();
        process_collector(&r)?;
        Ok(Self {
            items_processed: counter_vec(
                &r,
                "bulkops_items_processed_total",
                "Items given their outcome by this worker, by kind (create, convert) and outcome.",
                &["kind", "outcome"],
            )?,
            item_latency: histogram_vec(
                &r,
                "bulkops_item_latency_seconds",
                "Time from an item's message being published to its outcome committing.",
                &["kind", "lane"],
                latency_buckets(),
            )?,
            chunk_duration: histogram_vec(
                &r,
                "bulkops_chunk_duration_seconds",
                "Time to process one chunk of deliveries (locks, transaction, commit).",
                &["kind"],
                latency_buckets(),
            )?,
            chunk_items: histogram(
                &r,
                "bulkops_chunk_items",
                "Deliveries handled per database transaction.",
                vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
            )?,
            deliveries: counter_vec(
                &r,
                "bulkops_deliveries_total",
                "Messages received from the work queues, by lane.",
                &["lane"],
            )?,
            retries: counter_vec(
                &r,
                "bulkops_retries_total",
                "Retries of transient failures, by kind and stage (in_process, delayed).",
                &["kind", "stage"],
            )?,
            dead_lettered: counter_vec(
                &r,
                "bulkops_dead_lettered_total",
                "Messages sent to the dead-letter queue, by reason.",
                &["reason"],
            )?,
            lock_contention: counter_vec(
                &r,
                "bulkops_lock_contention_total",
                "Record locks found held by another worker, by kind.",
                &["kind"],
            )?,
            ack_failures: counter(
                &r,
                "bulkops_ack_failures_total",
                "Acknowledgements that did not reach the broker (the message will be redelivered).",
            )?,
            inflight: int_gauge_vec(
                &r,
                "bulkops_worker_inflight_deliveries",
                "Deliveries received and not yet acknowledged, by lane.",
                &["lane"],
            )?,
            consumer_restarts: counter_vec(
                &r,
                "bulkops_consumer_restarts_total",
                "Times a lane's consumer was re-established after a broker error.",
                &["lane"],
            )?,
            failures: counter_vec(
                &r,
                "bulkops_failures_total",
                "Failures the worker met, by class (db_<SQLSTATE>, db_connection, db_timeout, chunk_timeout, redis_unreachable, redis_oom, redis_readonly, redis_moved, …), however they were handled.",
                &["class"],
            )?,
            lock_bypassed: counter_vec(
                &r,
                "bulkops_lock_bypassed_total",
                "Items processed without their Redis lock because Redis refused lock writes or stayed unreachable (the database decides), by kind.",
                &["kind"],
            )?,
            dependency_degraded: int_gauge_vec(
                &r,
                "bulkops_dependency_degraded",
                "1 while a dependency answers but cannot be used as intended (redis: lock writes refused, locks bypassed), else 0.",
                &["dependency"],
            )?,
            dependency_waiting: int_gauge_vec(
                &r,
                "bulkops_dependency_waiting_chunks",
                "Chunks held unacknowledged while this worker waits for an unreachable dependency (database, redis).",
                &["dependency"],
            )?,
            outbox: std::sync::Arc::new(OutboxMetrics::new(&r)?),
            health: HealthMetrics::new(&r)?,
            registry: r,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_prefixed_and_registers_once() {
        let p = ProducerMetrics::new().unwrap();
        let w = WorkerMetrics::new().unwrap();
        p.http_requests
            .with_label_values(&["/x", "GET", "200"])
            .inc();
        w.items_processed
            .with_label_values(&["create", "created"])
            .inc();
        for text in [encode(&p.registry), encode(&w.registry)] {
            for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
                let name = line.split_whitespace().nth(2).unwrap();
                assert!(name.starts_with("bulkops_"), "{name}");
            }
        }
    }
}
