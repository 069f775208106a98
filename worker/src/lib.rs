//! The bulkops worker: consumes per-record messages and carries out bulk create and
//! conversion, idempotently, many deliveries per transaction.
//!
//! # Layout
//! - [`acks`]: many deliveries acknowledged with one frame, in order.
//! - [`consumer`]: one consumer per lane; prefetch, bounded concurrency, batching, drain.
//! - [`process`]: the chunk pipeline: take a chunk → lock → apply in one transaction → ack.
//! - [`job`]: the [`job::Job`] trait a kind of batch implements (lock targets, prepare,
//!   apply); [`create`] and [`convert`] are its two jobs, set-based SQL over a chunk.
//! - [`route`]: where failed deliveries go (delayed retry queues, the dead-letter queue).
//! - [`meta`]: cached batch facts.
//! - [`outcomes`]: recording a chunk's item outcomes in one statement.
//! - [`retry`]: failure classes, retry tiers, attempt history headers.
//! - [`gate`]: the record locks, waited for a bounded time and then bypassed.
//! - [`outage`]: waiting out an unreachable dependency (probe, wait, once per worker in the
//!   logs) and what follows a failure.
//! - [`status`]: the worker's row in `worker_status`: readiness for the operator console,
//!   and the outage report that holds the producers' stall sweeper.
//! - [`deadletter`]: records the failure of dead-lettered items.
//! - [`server`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`spans`]: the chunk's span (linked to its messages' contexts) and the batch spans
//!   under it (in the traces of the requests).

// The chunk pipeline's futures, each wrapped in its span, nest deeper than the default
// limit lets the compiler lay out.
#![recursion_limit = "256"]

pub mod acks;
pub mod consumer;
pub mod convert;
pub mod create;
pub mod deadletter;
pub mod gate;
pub mod job;
pub mod meta;
pub mod outage;
pub mod outcomes;
pub mod process;
pub mod retry;
pub mod route;
pub mod server;
pub mod spans;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bulkops_shared::amqp::{AmqpLink, Publisher};
use bulkops_shared::batch::Lane;
use bulkops_shared::config::Settings;
use bulkops_shared::lock::Locks;
use bulkops_shared::metrics::WorkerMetrics;
use bulkops_shared::outbox::OutboxRelay;
use bulkops_shared::topology::Topology;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::consumer::LaneConfig;
use crate::process::Processor;

/// Runs a worker until `shutdown`, then drains within `worker.drain_timeout_secs`.
///
/// # Errors
/// When the configuration is unusable or `metrics.bind` cannot be bound.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&settings.metrics.bind)
        .await
        .with_context(|| format!("cannot listen on metrics.bind {}", settings.metrics.bind))?;
    let db = bulkops_shared::db::connect(&settings.database)
        .await
        .context("database.url")?;
    let control = bulkops_shared::db::connect(&bulkops_shared::config::DatabaseSettings {
        max_connections: 1,
        min_connections: 0,
        ..settings.database.clone()
    })
    .await
    .context("database.url")?;
    let metrics = WorkerMetrics::new().context("metrics")?;
    let locks = Locks::connect(&settings.redis).context("redis (redis.url, redis.nodes)")?;
    let topology = Topology::from_settings(&settings);
    let consume_link = Arc::new(
        AmqpLink::new(&settings.amqp, "bulkops-worker-consume")
            .context("amqp.url / amqp.urls")?
            .with_placement(topology.clone()),
    );
    let publish_link = Arc::new(
        AmqpLink::new(&settings.amqp, "bulkops-worker-publish")
            .context("amqp.url / amqp.urls")?
            .with_placement(topology.clone()),
    );
    let outages = Arc::new(outage::Outages::new(metrics.clone()));
    let gate = Arc::new(gate::LockGate::new(
        locks.clone(),
        settings.worker.lock_bypass_after(),
        metrics.clone(),
        outages.clone(),
    ));
    let processor = Arc::new(Processor {
        db: db.clone(),
        gate: gate.clone(),
        outages: outages.clone(),
        logs: bulkops_shared::ratelog::LogGate::default(),
        meta: meta::MetaCache::new(db.clone(), settings.database.call_timeout()),
        publisher: Publisher::new(publish_link.clone(), settings.amqp.confirm_window)
            .with_topology(topology.clone()),
        topology: topology.clone(),
        settings: settings.worker.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        chunk_timeout: settings
            .worker
            .chunk_timeout(settings.database.statement_timeout_ms),
        statement_timeout: Duration::from_millis(settings.database.statement_timeout_ms),
        call_timeout: settings.database.call_timeout(),
        control: control.clone(),
    });

    let tasks = TaskTracker::new();
    let drain = Duration::from_secs(settings.worker.drain_timeout_secs);
    for (lane, concurrency) in [
        (Lane::Bulk, settings.worker.concurrency),
        (Lane::Interactive, 1),
    ] {
        tasks.spawn(consumer::run(
            consume_link.clone(),
            topology.clone(),
            processor.clone(),
            LaneConfig {
                lane,
                concurrency,
                chunk_size: settings.worker.chunk_size,
                prefetch: settings.amqp.prefetch,
                drain_timeout: drain,
            },
            shutdown.clone(),
        ));
    }
    tasks.spawn(deadletter::run(
        consume_link.clone(),
        topology.clone(),
        deadletter::Watcher {
            db: db.clone(),
            call_timeout: settings.database.call_timeout(),
            logs: bulkops_shared::ratelog::LogGate::default(),
        },
        shutdown.clone(),
    ));
    let relay_stop = CancellationToken::new();
    let relay_task = if settings.outbox.enabled {
        let relay = OutboxRelay::new(
            db.clone(),
            Publisher::new(publish_link.clone(), settings.amqp.confirm_window)
                .with_topology(topology.clone()),
            topology.events_exchange().to_owned(),
            settings.outbox.batch_size,
            Duration::from_millis(settings.outbox.poll_interval_ms),
            metrics.outbox.clone(),
        )
        .with_round_timeout(settings.database.call_timeout() + settings.amqp.timeout() * 2);
        Some(tokio::spawn(relay.run(relay_stop.clone())))
    } else {
        None
    };
    tasks.spawn(gate.clone().maintain(shutdown.clone()));
    tasks.spawn(consume_link.clone().maintain(shutdown.clone()));
    tasks.spawn(publish_link.clone().maintain(shutdown.clone()));
    let heartbeat_stop = CancellationToken::new();
    let heartbeat = tokio::spawn(
        status::Status {
            id: uuid::Uuid::new_v4(),
            db: db.clone(),
            links: vec![consume_link.clone(), publish_link.clone()],
            locks: locks.clone(),
            metrics: metrics.clone(),
            outages: outages.clone(),
            call_timeout: settings.database.call_timeout(),
        }
        .run(shutdown.clone(), heartbeat_stop.clone()),
    );
    let probe = server::Probe {
        db: db.clone(),
        links: vec![consume_link.clone(), publish_link.clone()],
        locks,
        gate,
        metrics,
    };
    let addr = listener.local_addr().context("metrics address")?;
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(
        axum::serve(listener, server::router(probe))
            .with_graceful_shutdown(server_stop.clone().cancelled_owned())
            .into_future(),
    );
    tracing::info!(%addr, "bulkops-worker running; metrics on {addr}");
    tasks.close();

    shutdown.cancelled().await;
    tracing::info!("draining");
    if tokio::time::timeout(drain + Duration::from_secs(1), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline reached");
    }
    // Events of the work finished during the drain leave before the relay stops; the
    // heartbeat row is deleted meanwhile.
    relay_stop.cancel();
    heartbeat_stop.cancel();
    if let Some(t) = relay_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    let _ = tokio::time::timeout(Duration::from_millis(500), heartbeat).await;
    server_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    consume_link.close().await;
    publish_link.close().await;
    db.close().await.ok();
    control.close().await.ok();
    tracing::info!("bulkops-worker stopped");
    Ok(())
}
